"""Tiny offline models shared by the VLM policy tests (built once per session, seconds each)."""

import numpy as np
import pytest

from agents.policies.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_q3(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_q25(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", seed=0, arch="qwen2_5_vl")


@pytest.fixture(params=["qwen3_vl", "qwen2_5_vl"])
def tiny_any(request, tiny_q3, tiny_q25):
    return tiny_q3 if request.param == "qwen3_vl" else tiny_q25


def rand_image(seed: int, h: int = 128, w: int = 128) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
