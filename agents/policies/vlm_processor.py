"""Image-only processors for Qwen-VL models, loaded explicitly (no torchvision, no video processor).

DESIGN.md (measured): ``Qwen3VLProcessor(..., video_processor=None)`` fails because the default video processor
needs torchvision, which has no working CPU build here, and ``AutoProcessor.from_pretrained`` on a folder
without a video processor silently returns only the tokenizer. So the policy builds the processor itself:
the tokenizer (``AutoTokenizer``), the PIL image processor (``Qwen2VLImageProcessorPil``, reading the folder's
``preprocessor_config.json``; works for Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike) and one of the subclasses below,
which drop the video processor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with no video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with no video processor (also used for Qwen2-VL: same image token scheme)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


PROCESSORS = {
    "qwen3_vl": ImageOnlyQwen3VLProcessor,
    "qwen3_vl_moe": ImageOnlyQwen3VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
    "qwen2_vl": ImageOnlyQwen2_5_VLProcessor,
}


def model_type_of(path: str | os.PathLike) -> str:
    """``model_type`` from a model folder's ``config.json`` (clear error when missing)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: no config.json; expected a transformers model folder")
    with open(cfg) as f:
        data = json.load(f)
    if "model_type" not in data:
        raise ValueError(f"{cfg}: no 'model_type' field")
    return str(data["model_type"])


def load_processor(path: str | os.PathLike, model_type: str | None = None):
    """The image-only processor of the model folder ``path`` (tokenizer, PIL image processor, chat template)."""
    model_type = model_type or model_type_of(path)
    if model_type not in PROCESSORS:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported by the VLM policy (supported: {sorted(PROCESSORS)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    return PROCESSORS[model_type](image_processor=image_processor, tokenizer=tokenizer)
