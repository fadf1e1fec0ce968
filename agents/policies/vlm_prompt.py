"""Prompt and sequence layout of the VLM policy: the ONE place that turns images and texts into injected token ids.

Inference (the rollout engine) and training (``encode_trajectory``) both build their injected chunks here, so a
teacher trajectory is encoded exactly as the policy would have seen it at inference (IVT Sec. 3.2: "the corrective
instructions, identical to those injected at inference, are masked from loss").

Layout of one trajectory (IVT Sec. 3.1, prefix continuation inside ONE assistant turn)::

    [chat prefix: <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>{question}<|im_end|>\\n
     <|im_start|>assistant\\n]                                            <- steps[0].injected_ids
    <think>...</think> [x1, y1, x2, y2]                                  <- steps[0].token_ids (generated)
    [\\n<|vision_start|><|image_pad|>*n<|vision_end|>{instruction}\\n]    <- steps[1].injected_ids
    <think>...</think> [x1, y1, x2, y2]                                  <- steps[1].token_ids
    ...

Texts live in ``configs/prompts.yaml`` (:class:`PromptConfig`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from agents.common.config import load_yaml
from ivt_env.boxes import KEEP_MARKER, ends_with_keep

DEFAULT_PROMPTS = "prompts.yaml"  # resolved in configs/ by agents.common.config.resolve_config_path

# Architectures whose text boxes are absolute pixels of the processor-resized input (DESIGN.md, upstream formats).
ABS_PIXEL_ARCHS = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class PromptConfig:
    """Prompt texts and answer conventions of the VLM policy (see ``configs/prompts.yaml``)."""

    system: Optional[str] = None
    """Optional system message (None: no system message)."""
    question: str = (
        "Locate {expression} in the image. Think briefly inside <think></think>, then answer with its box as "
        "[x1, y1, x2, y2] {box_hint}."
    )
    """Step-0 question; {expression} and {box_hint} are filled in."""
    box_hint_norm: str = "with integers from 0 to 1000"
    """{box_hint} for models answering in [0, 1000] (Qwen3-VL)."""
    box_hint_abs: str = "in pixels"
    """{box_hint} for models answering in absolute pixels (Qwen2.5-VL)."""
    refine_instruction: str = (
        "The red box shows your last answer. Examine it, say what is wrong, then answer with a corrected box."
    )
    """Corrective instruction injected after each overlay image (IVT Sec. 3.1)."""
    refine_template: str = "\n{image}{instruction}\n"
    """Layout of one refinement injection; must contain {image} and {instruction}."""
    box_format: str = "auto"
    """auto | norm1000 | abs_pixels: the coordinate convention of the model's own text."""
    stop_box_requires_think: bool = True
    """Stop at a box's closing ']' only after '</think>' has been written."""
    keep_marker: str = KEEP_MARKER
    """A refinement step whose text ends with this text (the last words of its reasoning, ``...Keep it.</think>``,
    or after it) is complete: the env keeps the previous box for it (``ivt_env`` ``keep_marker``, "Keeping a
    box"). Used only when the env does not say its own (``info["keep_marker"]``, which wins). Empty: only a box
    ends a step."""
    stop_hint: str = ""
    """Adaptive refinement: appended to the step-0 question (after a space) only when the env allows stopping
    (``info["allow_stop"]``, trajectories with ``meta["allow_stop"]``); the question is unchanged otherwise.
    configs/prompts.yaml sets one; empty here, so a checkpoint saved before the field existed (its prompts.yaml
    lacks it) sees exactly the question it was trained on."""
    stop_token: str = ""
    """A trained stop decision (issue 14): one vocabulary token (e.g. ``"<|box_end|>"``) the model writes right after
    a complete step (its box, or the keep marker) to end the episode there. When the env allows stopping, the
    rollout engine reads one token past each complete step, choosing between this token (stop) and the first token
    of the next refinement chunk (go on: it is injected anyway); a step that stops gets the env's stop marker in
    its text. Empty: a step ends at its box, no decision (the paper's setting)."""

    def __post_init__(self) -> None:
        for key in ("{image}", "{instruction}"):
            if key not in self.refine_template:
                raise ValueError(f"prompts: refine_template must contain {key}, got {self.refine_template!r}")
        if "{expression}" not in self.question:
            raise ValueError(f"prompts: question must contain {{expression}}, got {self.question!r}")
        if self.box_format not in ("auto", "norm1000", "abs_pixels"):
            raise ValueError(f"prompts: box_format must be auto, norm1000 or abs_pixels, got {self.box_format!r}")

    def texts(self) -> list[str]:
        """All fixed texts (for the tiny tokenizer's training corpus)."""
        out = [self.question, self.box_hint_norm, self.box_hint_abs, self.refine_instruction]
        return out + ([self.system] if self.system else [])


def load_prompts(prompts: "PromptConfig | str | None" = None) -> PromptConfig:
    """A :class:`PromptConfig` from an instance, a YAML path (or a name in ``configs/``), or the default file."""
    if isinstance(prompts, PromptConfig):
        return prompts
    if isinstance(prompts, dict):
        from agents.common.config import from_dict

        return from_dict(PromptConfig, prompts, where="prompts")
    return load_yaml(PromptConfig, prompts or DEFAULT_PROMPTS)


@dataclass
class Chunk:
    """Injected tokens of one step, with the image they hold (exactly one image per chunk in IVT)."""

    ids: list[int]
    pixel_values: Optional[torch.Tensor]  # (n_patches, C * temporal_patch * patch * patch)
    image_grid_thw: Optional[torch.Tensor]  # (1, 3) LongTensor: (t, h, w) in patches
    resized_hw: Optional[tuple[int, int]] = None  # (H', W') the processor resized the image to
    image_key: Optional[tuple] = None  # content key of the image (shape + digest): equal keys, equal pixel_values


def image_key(image: np.ndarray) -> tuple:
    """A content key of a uint8 image: equal keys mean byte-identical images (so identical ``pixel_values`` and
    identical vision features: :func:`agents.policies.vision.vision_inputs`)."""
    image = np.ascontiguousarray(image)
    return (image.shape, hashlib.blake2b(image.data, digest_size=16).digest())


def prompt_key(image: np.ndarray, expression: str) -> tuple:
    """Identity of a step-0 prompt: the image's content and the expression (rows of one group share it)."""
    return image_key(np.asarray(image)), expression


# A bracketed list of four numbers (same admitted syntax as ivt_env.boxes).
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
LIST4 = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")


def abs_box_text_to_norm(text: str, resized_w: int, resized_h: int) -> str:
    """Rewrite every ``[x1, y1, x2, y2]`` of absolute pixels of the resized input (Qwen2.5-VL) into the env's
    [0, 1000] integers: ``floor(x * 1000 / W')`` (IVT Sec. 3.1). No clipping, so an out-of-image box stays
    out of range and the env reports it."""

    def conv(m: re.Match) -> str:
        vals = [float(g) for g in m.groups()]
        scale = (resized_w, resized_h, resized_w, resized_h)
        return "[" + ", ".join(str(math.floor(v * 1000.0 / s)) for v, s in zip(vals, scale)) + "]"

    return LIST4.sub(conv, text)


class BoxStopper:
    """Per-row incremental stop test: a complete ``[a, b, c, d]`` written (after ``</think>`` if required) and
    every bracket opened after ``</think>`` closed again, so a list of boxes ``[[...], [...]]`` (multi-object
    grounding) stops at its closing ``]``; a lone box stops at once, as before. ``keep_marker``: a text that ends
    with it (:func:`ivt_env.boxes.ends_with_keep`: the last words of the closed reasoning, or after it) is complete
    too, a step that keeps the previous box.

    >>> s = BoxStopper(1, True, keep_marker="Keep it.")
    >>> [s.feed(0, p) for p in ["<think>", "Box fits.", " Keep", " it", ".", "</think>"]]
    [False, False, False, False, False, True]
    """

    def __init__(self, n: int, requires_think: bool, keep_marker: str = "") -> None:
        self.buf = [""] * n
        self.requires_think = requires_think
        self.keep_marker = keep_marker

    def feed(self, row: int, piece: str) -> bool:
        """Append the decoded text of one token; True when the step is complete (a box just closed, or the keep
        marker was just written)."""
        self.buf[row] += piece
        keep = bool(self.keep_marker) and (">" in piece or self.keep_marker[-1] in piece)
        if "]" not in piece and not keep:
            return False
        text = self.buf[row]
        if keep and ends_with_keep(text, self.keep_marker):
            return True
        if self.requires_think:
            k = text.rfind("</think>")
            if k < 0:
                return False
            text = text[k:]
        return LIST4.search(text) is not None and text.count("[") <= text.count("]")


def decision_logits(logits: torch.Tensor, raw: torch.Tensor, rows: Sequence[bool], ids: Sequence[int]) -> torch.Tensor:
    """``logits`` (n, V) where ``rows[i]`` is True replaced by ``raw``'s logits of ``ids`` only (the others -inf):
    the stop decision read past a complete step (:meth:`PromptLayout.stop_decision`) chooses among ``ids``.

    >>> decision_logits(torch.zeros(2, 4), torch.arange(8.).view(2, 4), [False, True], [1, 3]).tolist()
    [[0.0, 0.0, 0.0, 0.0], [-inf, 5.0, -inf, 7.0]]
    """
    idx = torch.tensor(list(ids), dtype=torch.long, device=raw.device)
    only = torch.full_like(raw, float("-inf"))
    only[:, idx] = raw[:, idx]
    return torch.where(torch.tensor(list(rows), device=raw.device)[:, None], only, logits)


class PromptLayout:
    """Builds injected chunks (ids + image tensors) with the model's tokenizer, chat template and image processor.

    ``processor`` is an image-only Qwen-VL processor (:func:`agents.policies.vlm_processor.load_processor`):
    calling it with a text holding one ``<|image_pad|>`` and one image expands the pad to the image's token count.
    """

    def __init__(self, processor: Any, prompts: PromptConfig, arch: str) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompts = prompts
        self.arch = arch
        fmt = prompts.box_format
        self.abs_boxes = (arch in ABS_PIXEL_ARCHS) if fmt == "auto" else (fmt == "abs_pixels")
        tok = self.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        self.vision_start = getattr(processor, "vision_start_token", "<|vision_start|>")
        self.vision_end = getattr(processor, "vision_end_token", "<|vision_end|>")
        self.patch_size = int(processor.image_processor.patch_size)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        stops = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tok.get_vocab()}
        if tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        self.stop_ids = sorted(int(s) for s in stops)
        vocab = tok.get_vocab()
        names = [self.image_token, self.vision_start, self.vision_end, "<|video_pad|>", "<|vision_pad|>"]
        self.placeholder_ids = sorted({int(vocab[n]) for n in names if n in vocab})
        self.merge_size = int(getattr(processor.image_processor, "merge_size", 2) or 2)
        # encode() fast path (issue 16): the image processor alone + the text's ids with its one image placeholder
        # expanded, instead of the multimodal processor call (about 3x cheaper per chunk). The first FAST_CHECKS
        # chunks of each pixel route are also encoded by the processor and compared; any difference turns the fast
        # path off for good.
        self.fast_encode = True
        self._fast_checks = {"numpy": self.FAST_CHECKS, "image_processor": self.FAST_CHECKS}  # per pixel route
        self._text_ids: dict[str, list[int]] = {}
        # the same checked-then-trusted pattern for the chat template (the question spliced between the template's
        # fixed prefix and suffix instead of a jinja render per prompt) and the tokenizer (its Rust backend called
        # directly instead of through the Python wrapper): each about 0.3 ms a call saved, results compared first
        self._splice: Any = None  # (prefix, suffix) of the rendered step-0 prompt; False: off
        self._splice_checks = self.FAST_CHECKS
        self._backend = getattr(self.tokenizer, "_tokenizer", None)  # tokenizers.Tokenizer of a fast tokenizer
        self._backend_checks = {True: self.FAST_CHECKS, False: self.FAST_CHECKS}  # per add_special_tokens
        self._decisions: dict[tuple[str, str], tuple[int, int]] = {}  # stop_decision() memo
        self._cache: Optional[OrderedDict] = None  # chunk memo, active inside caching()
        self._cache_max = 0
        self.cache_hits = 0

    FAST_CHECKS = 4

    @contextlib.contextmanager
    def caching(self, max_items: int = 4096):
        """Inside the block, :meth:`encode` memoises chunks by (text, image content): a GRPO iteration encodes each
        observation once for the rollout and reuses it for the policy and reference passes of the update (the chunk
        is a pure function of the text and the image bytes, so results are identical). Nested blocks share the outer
        memo; it is dropped when the outermost block ends (no memory held between iterations)."""
        if self._cache is not None:
            yield
            return
        self._cache, self._cache_max = OrderedDict(), int(max_items)
        try:
            yield
        finally:
            self._cache = None

    # ------------------------------------------------------------------ texts
    def question_text(self, expression: str, allow_stop: bool = False) -> str:
        p = self.prompts
        q = p.question.format(expression=expression, box_hint=p.box_hint_abs if self.abs_boxes else p.box_hint_norm)
        return f"{q} {p.stop_hint}" if allow_stop and p.stop_hint else q

    def first_text(self, expression: str, allow_stop: bool = False) -> str:
        """Step-0 prompt through the opening of the assistant turn (the model's own chat template)."""
        question = self.question_text(expression, allow_stop)
        if self._splice and self._splice_checks <= 0:
            return self._splice[0] + question + self._splice[1]
        text = self._render(question)
        if self._splice is None:  # the template around a marker question: its fixed prefix and suffix
            parts = self._render(_MARKER).split(_MARKER)
            self._splice = (parts[0], parts[1]) if len(parts) == 2 else False
        if self._splice:
            self._splice_checks -= 1
            if self._splice[0] + question + self._splice[1] != text:
                self._splice = False  # the template transforms the question: render every prompt
        return text

    def _render(self, question: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages = ([{"role": "system", "content": self.prompts.system}] if self.prompts.system else []) + [
            {"role": "user", "content": content}
        ]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _ids(self, text: str, special: bool) -> list[int]:
        """``tokenizer(text, add_special_tokens=special)["input_ids"]``, through the Rust backend once the first
        FAST_CHECKS calls agreed with the wrapper."""
        if self._backend is not None and self._backend_checks[special] <= 0:
            return self._backend.encode(text, add_special_tokens=special).ids
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if self._backend is not None:
            self._backend_checks[special] -= 1
            try:
                same = self._backend.encode(text, add_special_tokens=special).ids == ids
            except (AttributeError, TypeError):
                same = False
            if not same:
                self._backend = None
        return ids

    def refine_text(self) -> str:
        image = self.vision_start + self.image_token + self.vision_end
        return self.prompts.refine_template.format(image=image, instruction=self.prompts.refine_instruction)

    # ------------------------------------------------------------------ chunks
    def encode(self, text: str, image: np.ndarray) -> Chunk:
        """Tokenise ``text`` (holding exactly one image placeholder) with ``image`` (H, W, 3) uint8."""
        if text.count(self.image_token) != 1:
            raise ValueError(f"prompt text must hold exactly one {self.image_token}: {text!r}")
        image = np.ascontiguousarray(np.asarray(image))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
        ikey = image_key(image)
        key = (text, ikey)
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                self._cache.move_to_end(key)
                return Chunk(list(hit.ids), hit.pixel_values, hit.image_grid_thw, hit.resized_hw, hit.image_key)
        chunk, route = self._encode_fast(text, image) if self.fast_encode else (None, "")
        if chunk is None or self._fast_checks.get(route, 0) > 0:
            ref = self._encode_processor(text, image)
            if chunk is not None:
                self._fast_checks[route] -= 1
                if not _same_chunk(chunk, ref):
                    self.fast_encode = False
            chunk = ref
        chunk.image_key = ikey
        if self._cache is not None:
            self._cache[key] = chunk
            if len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
            return Chunk(list(chunk.ids), chunk.pixel_values, chunk.image_grid_thw, chunk.resized_hw, ikey)
        return chunk

    def _encode_processor(self, text: str, image: np.ndarray) -> Chunk:
        """The reference route: the multimodal processor expands the placeholder and tokenises the text."""
        out = self.processor(text=[text], images=[image], return_tensors="pt")
        grid = out["image_grid_thw"].long()
        hw = (int(grid[0, 1]) * self.patch_size, int(grid[0, 2]) * self.patch_size)
        return Chunk(out["input_ids"][0].tolist(), out["pixel_values"], grid, hw)

    def _encode_fast(self, text: str, image: np.ndarray) -> tuple[Optional[Chunk], str]:
        """The image's pixel values (:func:`_numpy_pixels`, else the image processor alone) and the text's ids
        (memoised per text) with the one placeholder expanded to the image's token count (grid cells /
        merge_size^2), as the processor does before tokenising; with the pixel route taken."""
        fast = _numpy_pixels(self.processor.image_processor, image)
        route = "numpy" if fast is not None else "image_processor"
        if fast is not None:
            pixel_values, grid = fast
        else:
            out = self.processor.image_processor(images=[image], return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"].long()
        n = int(grid[0].prod()) // self.merge_size ** 2
        tmpl = self._text_ids.get(text)
        if tmpl is None:
            if len(self._text_ids) > 4096:
                self._text_ids.clear()
            tmpl = self._text_ids[text] = self._ids(text, special=True)
        if tmpl.count(self.image_token_id) != 1:
            return None, route  # the processor route handles (or reports) it
        k = tmpl.index(self.image_token_id)
        ids = tmpl[:k] + [self.image_token_id] * n + tmpl[k + 1:]
        hw = (int(grid[0, 1]) * self.patch_size, int(grid[0, 2]) * self.patch_size)
        return Chunk(ids, pixel_values, grid, hw), route

    def first_chunk(self, image: np.ndarray, expression: str, allow_stop: bool = False) -> Chunk:
        return self.encode(self.first_text(expression, allow_stop), image)

    def refine_chunk(self, image: np.ndarray) -> Chunk:
        return self.encode(self.refine_text(), image)

    def stop_decision(self) -> Optional[tuple[int, int]]:
        """``(stop id, go-on id)`` of the trained stop decision (``prompts.stop_token``), or None without one. The
        go-on id is the first token of every refinement chunk (what follows a step that does not stop)."""
        if not self.prompts.stop_token:
            return None
        key = (self.prompts.stop_token, self.refine_text())  # read once per generated step: memoised
        if key not in self._decisions:
            ids = self.text_ids(key[0])
            go = self.tokenizer(key[1])["input_ids"][0]
            if len(ids) != 1 or ids[0] == go or ids[0] in self.placeholder_ids:
                raise ValueError(f"prompts: stop_token {key[0]!r} must be one token of the vocabulary (got ids "
                                 f"{ids}), not a placeholder or the refinement chunk's first token ({go})")
            self._decisions[key] = (ids[0], int(go))
        return self._decisions[key]

    def text_ids(self, text: str) -> list[int]:
        """A generated step's text as ids (teacher trajectories without ids)."""
        return self._ids(text, special=False)

    def to_env_text(self, text: str, chunk0: Chunk) -> str:
        """The env action for a generated text: boxes converted to [0, 1000] for absolute-pixel models."""
        if not self.abs_boxes:
            return text
        h, w = chunk0.resized_hw
        return abs_box_text_to_norm(text, w, h)


def _numpy_pixels(ip: Any, image: np.ndarray) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``Qwen2VLImageProcessor(Pil)`` on one RGB uint8 image that needs no resizing, in a few numpy operations:
    rescale (in float64, then float32, as ``image_transforms.rescale``), normalise, patchify. None when the image
    would be resized or the processor is set up otherwise (the caller then runs the processor itself)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # pragma: no cover - other transformers layouts
        return None
    P, T, M = int(ip.patch_size), int(ip.temporal_patch_size), int(ip.merge_size)
    if not (ip.do_rescale and ip.do_normalize) or image.ndim != 3 or image.shape[2] != 3:
        return None
    try:
        lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]
    except (KeyError, TypeError, AttributeError):
        return None
    if lo is None or hi is None:
        return None
    h, w = image.shape[:2]
    if smart_resize(h, w, factor=P * M, min_pixels=lo, max_pixels=hi) != (h, w):
        return None
    x = (image.astype(np.float64) * ip.rescale_factor).astype(np.float32)
    mean, std = np.asarray(ip.image_mean, dtype=np.float32), np.asarray(ip.image_std, dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # (C, H, W)
    gh, gw = h // P, w // P
    x = np.broadcast_to(x[None], (T, 3, h, w))  # one image: its frame repeated temporal_patch_size times
    x = x.reshape(1, T, 3, gh // M, M, P, gw // M, M, P).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * T * P * P))
    return pixels, torch.tensor([[1, gh, gw]], dtype=torch.long)


_MARKER = "\x00question\x00"  # a question no prompt holds: splits the rendered template into prefix and suffix


def _same_chunk(a: Chunk, b: Chunk) -> bool:
    return (a.ids == b.ids and torch.equal(a.image_grid_thw, b.image_grid_thw) and a.resized_hw == b.resized_hw
            and a.pixel_values.dtype == b.pixel_values.dtype and torch.equal(a.pixel_values, b.pixel_values))


def mm_token_types(ids: Sequence[int] | torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``mm_token_type_ids``: 1 on image placeholder tokens, 0 elsewhere (same shape as ``ids``)."""
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    return (t == image_token_id).to(torch.int32)
