"""The tiny offline model: tokenizer (whole-number tokens, specials, chat template), build and load."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.policies.tiny import ASSET_DIR, SPECIAL_TOKENS, THINK_TOKENS, build_tiny_model, load_tiny_tokenizer
from agents.policies.vlm_processor import load_processor
from agents.policies.vlm_prompt import PromptLayout, load_prompts

from .conftest import rand_image


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def test_tokenizer_is_shipped():
    assert (ASSET_DIR / "tokenizer.json").is_file() and (ASSET_DIR / "chat_template.jinja").is_file()


def test_box_numbers_are_whole_tokens(tok):
    ids = tok("[12, 345, 1000, 7]", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[", "12", ",", "Ġ", "345", ",", "Ġ", "1000", ",", "Ġ", "7", "]"]
    assert [ids[i] for i in (1, 4, 7, 10)] == [tok.convert_tokens_to_ids(s) for s in ("12", "345", "1000", "7")]
    assert tok.decode(ids) == "[12, 345, 1000, 7]"


def test_every_number_0_to_1000_is_one_token(tok):
    ids = [tok(str(n), add_special_tokens=False)["input_ids"] for n in range(1001)]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 1001
    assert [tok.convert_ids_to_tokens(i[0]) for i in ids] == [str(n) for n in range(1001)]


def test_numbers_inside_text_are_cut_deterministically(tok):
    # digit runs are cut into "1000" / 1-3 digit pieces, left to right, whatever surrounds them; a piece with a
    # leading zero ("000", "007") is no vocabulary entry and falls back to single digits
    pieces = tok.convert_ids_to_tokens(tok("x12345y 1000000 007", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == ["123", "45", "1000", "0", "0", "0", "0", "0", "7"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_decode_round_trips(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_special_and_think_tokens(tok):
    for t in SPECIAL_TOKENS + THINK_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    ids = tok("<think>a</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"  # think tags are not special (Qwen3)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "find it"}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>find it<|im_end|>\n<|im_start|>assistant\n"
    )


def test_build_is_deterministic_and_loads(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (a / name).is_file()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl"
    assert cfg["text_config"]["hidden_size"] == 128 and cfg["text_config"]["num_hidden_layers"] == 2
    assert cfg["vision_config"]["depth"] == 2 and cfg["vision_config"]["patch_size"] == 16

    from agents.policies.vlm import VLMPolicy

    policy = VLMPolicy.from_pretrained(a, device="cpu")
    n_params = sum(p.numel() for p in policy.model.parameters())
    assert 0.5e6 < n_params < 1.5e6
    assert policy.hf_model.dtype == torch.float32


@pytest.mark.parametrize("arch,n_tokens,resized", [("qwen3_vl", 16, (128, 128)), ("qwen2_5_vl", 25, (140, 140))])
def test_processor_image_tokens(tiny_q3, tiny_q25, arch, n_tokens, resized):
    path = tiny_q3 if arch == "qwen3_vl" else tiny_q25
    proc = load_processor(path)
    layout = PromptLayout(proc, load_prompts(None), arch)
    chunk = layout.first_chunk(rand_image(0), "the blue circle")
    assert chunk.ids.count(layout.image_token_id) == n_tokens
    assert chunk.resized_hw == resized
    assert chunk.pixel_values.shape[0] == n_tokens * 4  # merge 2x2 patches per token
    text = proc.tokenizer.decode(chunk.ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "the blue circle" in text
    refine = proc.tokenizer.decode(layout.refine_chunk(rand_image(1)).ids)
    assert refine.startswith("\n<|vision_start|>") and refine.endswith(layout.prompts.refine_instruction + "\n")


def test_policy_needs_no_torchvision(tiny_q3):
    """Import, load and prompt with torchvision made unimportable (it has no working CPU build here)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import numpy as np\n"
        "from agents.policies.vlm import VLMPolicy\n"
        f"p = VLMPolicy.from_pretrained({str(tiny_q3)!r}, device='cpu')\n"
        "c = p.layout.first_chunk(np.zeros((128, 128, 3), np.uint8), 'x')\n"
        "assert c.ids.count(p.layout.image_token_id) == 16\n"
    )
    root = str(__import__("pathlib").Path(__file__).resolve().parents[3])
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
