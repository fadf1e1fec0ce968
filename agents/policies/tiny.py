"""A tiny, randomly initialised Qwen3-VL (or Qwen2.5-VL) built offline in seconds: tests and CPU defaults.

``build_tiny_model(out_dir)`` writes a transformers model folder (config, weights, tokenizer, chat template,
image-processor settings) that :meth:`agents.policies.vlm.VLMPolicy.from_pretrained` loads. No hub access.

Shape (DESIGN.md, "can a tiny model learn grounding from scratch on CPU?", the measured-learnable setting):
text hidden 128, 2 layers, 4 heads x 32; vision depth 2, hidden 64, patch 16, merge 2; a 128x128 image gives
8x8 patches -> 16 image tokens. About 1 M parameters.

The tokenizer (shipped in ``agents/assets/tiny_tokenizer/``, rebuilt by ``python -m agents.policies.tiny
--retrain-tokenizer``) is a byte-level BPE trained with ``tokenizers`` on the prompts, the geometric teacher's
phrases and the synthetic dataset's words, plus:

- the Qwen special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) and
  ``<think>``/``</think>`` (non-special, as in Qwen3, so they survive ``skip_special_tokens``), and a Qwen-style
  chat template;
- every whole number "0".."1000" as ONE token. Why: a box ``[12, 345, 1000, 7]`` is then 12 tokens
  (``[ 12 , Ġ 345 , Ġ 1000 , Ġ 7 ]``) instead of about 20 with per-digit tokens, and each coordinate is a
  single choice the model learns as one embedding; DESIGN.md measured Acc@0.5 0.44-0.50 vs 0.32 after the same
  10 CPU-minutes of behaviour cloning. Determinism: the pre-tokenizer isolates digit runs in pieces of
  ``1000|\\d{1,3}`` (so "1000" and any 1-3 digit run are their own piece, longer runs are cut left to right) and
  the BPE model uses ``ignore_merges=True``: a piece that is a vocabulary entry maps to that entry directly,
  whatever the merge table says. Hence every number 0..1000 written without leading zeros is exactly one token,
  and ``decode`` (byte-level) round-trips the text.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ivt_env.atomic import atomic_dir

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
NUMBER_MAX = 1000

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]  # Qwen3: added but not special

# Qwen-style chat template (the subset IVT uses: system/user/assistant, string or [{type: image|text}] content).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for c in message['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' %}{{- c['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Words a grounding dialogue uses beyond the fixed prompts (byte-level BPE still covers any text).
_EXTRA_WORDS = (
    "the a an of in on at to and or is it its this that with from by for box boxes red overlay object target "
    "image picture left right top bottom upper lower middle center centre corner side above below near far "
    "shifted move moved shift larger smaller too large small big tiny wide narrow tall short grow shrink "
    "wrong correct corrected correction fits fit keep kept looks right answer previous last first second "
    "person man woman child dog cat car bus table chair cup bottle horse bird sheep cow elephant zebra giraffe "
    "white black blue green yellow orange brown pink purple gray grey circle square triangle shape"
)


def tokenizer_corpus() -> list[str]:
    """Training texts of the tiny tokenizer: prompts, teacher phrases, synthetic words, box-format examples."""
    from agents.policies.vlm_prompt import PromptConfig, load_prompts

    lines: list[str] = []
    for p in (PromptConfig(), load_prompts(None)):
        lines += p.texts()
    from agents.teacher.geometric import teacher_corpus  # the geometric teacher's phrases

    for v in (0, 1, 2):
        lines += teacher_corpus(v)
    try:  # the synthetic dataset's words
        from ivt_env.datasets import synthetic_language as sl

        words = list(sl.VOCABULARY)
        lines += [" ".join(words), *("the " + w for w in words)]
        lines += [f"the {c} {k}" for c in sl.COLOURS for k in sl.KINDS]
    except ImportError:  # pragma: no cover
        pass
    lines += [_EXTRA_WORDS, "<think>The red box is too far left.</think> [120, 40, 560, 880]"]
    # Digits are removed: numbers are whole tokens added after training (see the module docstring).
    return [("".join(ch for ch in s if not ch.isdigit()) + "\n") * 3 for s in lines]


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024):
    """Train the byte-level BPE, add numbers and special tokens, save a transformers tokenizer folder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import TokenizersBackend

    def pre_tok():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"1000|\d{1,3}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tok()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    base.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model_json = __import__("json").loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    for n in range(NUMBER_MAX + 1):  # digits are plain ASCII, so byte-level form == the number's text
        vocab.setdefault(str(n), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tok()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    hf = TokenizersBackend(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    hf.padding_side = "right"
    hf.save_pretrained(str(out_dir))
    return hf


def load_tiny_tokenizer():
    """The shipped tiny tokenizer (trained into a temp folder if the asset is missing)."""
    from transformers import AutoTokenizer

    if (ASSET_DIR / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(ASSET_DIR))
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def tiny_config(tokenizer, arch: str = "qwen3_vl", **text_overrides):
    """The tiny model config for ``tokenizer`` (vocab and special ids taken from it)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5]},
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    text.update(text_overrides)
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text.pop("head_dim")
        vision = dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=text["hidden_size"], window_size=112, fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; use 'qwen3_vl' or 'qwen2_5_vl'")


def tiny_image_processor(arch: str = "qwen3_vl"):
    """PIL image processor: Qwen3-VL patch 16 (128x128 -> 8x8 patches -> 16 tokens, at most 64 tokens),
    Qwen2.5-VL patch 14 (128x128 is resized to 140x140 -> 25 tokens)."""
    from transformers import Qwen2VLImageProcessorPil

    patch = 16 if arch == "qwen3_vl" else 14
    factor = patch * 2
    mean_std = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]) if arch == "qwen3_vl" else {}
    return Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=factor * factor * 4,
        max_pixels=factor * factor * 64, **mean_std,
    )


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, arch: str = "qwen3_vl", **text_overrides) -> Path:
    """Write a tiny random-initialised ``arch`` model folder to ``out_dir`` (atomically) and return its path.

    The folder holds ``config.json``, ``model.safetensors``, the tokenizer with its chat template,
    ``preprocessor_config.json`` and ``generation_config.json``. Deterministic given ``seed``.
    ``text_overrides`` change the text config (e.g. ``hidden_size=256, num_hidden_layers=4``).
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out = Path(out_dir)
    tokenizer = load_tiny_tokenizer()
    config = tiny_config(tokenizer, arch, **text_overrides)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tiny_image_processor(arch).save_pretrained(str(tmp))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m agents.policies.tiny",
        description="Build the tiny offline Qwen-VL model folder (seconds, no hub access), or retrain the shipped "
        "tiny tokenizer in agents/assets/tiny_tokenizer/.",
    )
    ap.add_argument("out_dir", nargs="?", help="folder to write the model to")
    ap.add_argument("--arch", default="qwen3_vl", choices=["qwen3_vl", "qwen2_5_vl"], help="architecture")
    ap.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    ap.add_argument("--retrain-tokenizer", action="store_true", help=f"retrain the tokenizer into {ASSET_DIR}")
    args = ap.parse_args(argv)
    if args.retrain_tokenizer:
        with atomic_dir(ASSET_DIR) as tmp:
            train_tokenizer(tmp)
        print(f"tokenizer written to {ASSET_DIR}")
    if args.out_dir:
        print(build_tiny_model(args.out_dir, seed=args.seed, arch=args.arch))
    elif not args.retrain_tokenizer:
        ap.error("give an out_dir and/or --retrain-tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
