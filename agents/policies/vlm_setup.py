"""Model set-up pieces of the VLM policy: LoRA settings (peft), 4-bit NF4 (bitsandbytes) and its CPU gradient
guard, device and dtype defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA adapter settings (IVT Sec. 4.1: rank 64, alpha 128, all attention and MLP projections); the ``lora``
    section of the GRPO and behaviour-cloning configs."""

    enabled: bool = True
    """Train a new LoRA adapter. False: train all weights (full fine-tuning; the frozen reference is a copy of the
    start weights). A start checkpoint that already holds an adapter continues that adapter either way."""
    rank: int = 64
    """LoRA rank r."""
    alpha: int = 128
    """LoRA alpha (scale alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout (0 keeps rollout and training log-probs identical)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projection names to adapt."""
    language_model_only: bool = True
    """Adapt only the language model's projections (not the vision tower)."""


def lora_config(lora: LoraSettings) -> Any:
    """The peft ``LoraConfig``; with ``language_model_only`` a regex that matches the projections under the
    language model only (Qwen-VL's vision tower uses other names today, but a regex keeps it so)."""
    from peft import LoraConfig

    targets: Any = list(lora.target_modules)
    if lora.language_model_only:
        targets = r".*language_model.*\.(" + "|".join(lora.target_modules) + r")"
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none")


def bnb_4bit_config(compute_dtype: torch.dtype) -> Any:
    """4-bit NF4 with double quantisation (QLoRA; IVT Sec. 4.1 trains a 4-bit model with LoRA)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)


def disable_bnb_cpu_bf16_repack(model: Any) -> int:
    """DESIGN.md (measured): on CPUs with AVX512-BF16 the first no-grad forward repacks bitsandbytes 4-bit weights
    and later training forwards give WRONG LoRA gradients. Setting ``support_avx512bf16_for_cpu = False`` on every
    ``bnb.nn.Linear4bit`` restores exact gradients. Returns the number of modules patched."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - only needed for 4-bit models
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def default_device(device: Optional[str]) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """``dtype`` (a torch dtype or its name), else bf16 on CUDA and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        return getattr(torch, dtype)
    return dtype
