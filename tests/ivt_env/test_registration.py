"""Registered ids, ``gym.make("ivt_env:...")`` without an import, check_env on every registered env (real datasets
from fixtures in their exact upstream layouts), and vector envs (Sync and Async) with images of varying size."""

import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import ivt_env
from ivt_env.datasets.base import DatasetError
from tests.ivt_env.datasets.fixtures import write_all
from tests.ivt_env.fake_data import FakeDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL_IDS = ["IVT-RefCOCOg-v0", "IVT-RefAdv-v0", "IVT-RefL4-v0", "IVT-Mix-v0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_all(str(tmp_path_factory.mktemp("ivt_data")))


def test_all_ids_registered():
    for env_id, name in ivt_env.ENV_DATASETS.items():
        spec = gym.spec(env_id)
        assert spec.entry_point == "ivt_env.env:GroundingRefineEnv"
        extra = {"allow_stop": True} if env_id == "IVT-Synthetic-Adaptive-v0" else {}
        assert spec.kwargs == {"dataset": name, "split": "train", "max_refine_steps": 2, **extra}
    assert set(ivt_env.ENV_DATASETS) == {"IVT-Synthetic-v0", "IVT-Synthetic-Adaptive-v0", *REAL_IDS}


def test_make_with_module_prefix_without_import(data_root):
    code = (
        "import sys, gymnasium as gym\n"
        "assert 'ivt_env' not in sys.modules\n"
        "env = gym.make('ivt_env:IVT-Synthetic-v0', split='val', max_refine_steps=1)\n"
        "obs, info = env.reset(seed=0)\n"
        "print(obs['image'].shape, info['dataset'])\n"
        f"env = gym.make('ivt_env:IVT-Mix-v0', data_root={data_root!r}, split='test')\n"
        "print(len(env.unwrapped.dataset), env.reset(seed=0)[1]['dataset'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "(128, 128, 3) synthetic" and lines[1].endswith(" mix") and int(lines[1].split()[0]) > 0


def _check(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        check_env(env.unwrapped)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_check_env_synthetic(split):
    _check(gym.make("IVT-Synthetic-v0", split=split, render_mode="rgb_array"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_check_env_adaptive(split):
    env = gym.make("IVT-Synthetic-Adaptive-v0", split=split, render_mode="rgb_array")
    assert env.unwrapped.allow_stop and env.unwrapped.stop_marker == "<stop>"
    _check(env)


@pytest.mark.parametrize("env_id", REAL_IDS)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_check_env_real_datasets(env_id, split, data_root):
    env = gym.make(env_id, data_root=data_root, split=split, render_mode="rgb_array")
    assert len(env.unwrapped.dataset) > 0
    _check(env)


def test_data_root_from_environment(data_root, monkeypatch):
    monkeypatch.setenv("IVT_DATA", data_root)
    env = gym.make("IVT-RefAdv-v0", split="val")
    obs, info = env.reset(seed=0)
    assert info["dataset"] == "refadv" and obs["image"].ndim == 3


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="refcocog"):
        gym.make("IVT-RefCOCOg-v0", data_root=str(tmp_path))


def _rollout(venv, actions_per_step):
    obs, _ = venv.reset(seed=7)
    frames = [obs]
    for actions in actions_per_step:
        obs, r, term, trunc, info = venv.step(actions)
        frames.append((obs, r, term, info["iou"]))
    return frames


ACTIONS = [
    ("[0, 0, 500, 500]", "no box", "[250, 250, 750, 750]"),
    ("[100, 100, 900, 900]", "[0, 0, 1000, 1000]", "[0, 0, 10, 10]"),
    ("[250, 250, 750, 750]", "[250, 250, 750, 750]", "bad"),
]


@pytest.mark.parametrize(
    "mode,vector_kwargs",
    [("sync", {}), ("async", {}), ("async", {"shared_memory": False})],
    ids=["sync", "async-shared", "async-pickled"],
)
def test_vector_envs_with_images_of_varying_size(mode, vector_kwargs):
    sizes = [(48, 64), (40, 30), (64, 64)]
    venv = gym.make_vec(
        "IVT-Synthetic-v0",
        num_envs=3,
        vectorization_mode=mode,
        vector_kwargs=vector_kwargs,
        dataset=FakeDataset(sizes=sizes),
    )
    try:
        obs, info = venv.reset(options={"index": 0})
        obs, info = venv.reset(seed=[0, 1, 2], options=None)
        assert isinstance(obs["image"], tuple) and len(obs["image"]) == 3
        # the reference: single envs seeded the same way
        refs = []
        for i in range(3):
            e = ivt_env.GroundingRefineEnv(FakeDataset(sizes=sizes))
            refs.append((e, *e.reset(seed=i)))
        for i, (e, o, inf) in enumerate(refs):
            assert np.array_equal(obs["image"][i], o["image"]) and obs["expression"][i] == o["expression"]
            assert info["sample_id"][i] == inf["sample_id"]
        assert venv.observation_space.contains(obs)
        for t, actions in enumerate(ACTIONS):
            obs, rew, term, trunc, info = venv.step(actions)
            for i, (e, _, _) in enumerate(refs):
                o, r, te, _, inf = e.step(actions[i])
                assert np.array_equal(obs["image"][i], o["image"]), (t, i)
                assert obs["expression"][i] == o["expression"] and obs["step"][i] == o["step"]
                assert np.array_equal(obs["prev_box"][i], o["prev_box"]) and obs["prev_valid"][i] == o["prev_valid"]
                assert rew[i] == pytest.approx(r) and term[i] == te and info["iou"][i] == pytest.approx(inf["iou"])
        assert term.all()
        # next-step autoreset: a fresh episode, fresh (varying-size) images and texts
        obs, *_ = venv.step(("x", "x", "x"))
        assert all(o.shape[2] == 3 for o in obs["image"]) and (obs["step"] == 0).all()
    finally:
        venv.close()
