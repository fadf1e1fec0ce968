"""The rows of the reproduction (IVT Table 1 and Table 2) and the paper's own figures beside them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    name: str
    """Key in results.json."""
    label: str
    """How the paper names the configuration."""
    model: str
    """Which checkpoint: base | sft | grpo | grpo_single."""
    steps: int
    """T at evaluation (0: one box, no refinement)."""


ROWS = (
    Row("base_single_shot", "Base (single shot)", "base", 0),
    Row("base_ivt", "Base + IVT", "base", 2),
    Row("sft_ivt", "SFT + IVT", "sft", 2),
    Row("sft_grpo_single_step", "SFT + GRPO (single step)", "grpo_single", 0),
    Row("sft_grpo_ivt", "SFT + GRPO + IVT", "grpo", 2),
)

SHIPPED = {  # model key -> shipped checkpoint folder (relative to the repository)
    "base": "assets/tiny-ivt-base",
    "sft": "assets/tiny-ivt-bc",
    "grpo": "assets/tiny-ivt-grpo",
    "grpo_single": "assets/tiny-ivt-grpo-single",
}

# IVT (arXiv 2606.13156) with Qwen3-VL-4B on the RefCOCOg / Ref-Adv-s / Ref-L4 mix; ../shared/seeds/README.md.
# Table 1's IVT rows match the best box over the steps (Sec. 4.1), Table 2 the per-step means.
PAPER = {
    "base_single_shot": {"acc@0.5": 0.796, "acc@0.7": 0.709, "acc@0.9": 0.455, "miou": 0.719},
    "base_ivt": {"acc@0.5": 0.487, "acc@0.7": 0.442, "acc@0.9": 0.283, "miou": 0.442,
                 "iou_step": [0.377, 0.145, 0.156], "delta": -0.221, "improve_rate": 0.051,
                 "stagnation_rate": 0.624, "degradation_rate": 0.325},
    "sft_ivt": {"acc@0.5": 0.820, "acc@0.7": 0.741, "acc@0.9": 0.483, "miou": 0.743,
                "iou_step": [0.716, 0.632, 0.576], "delta": -0.140, "improve_rate": 0.119,
                "stagnation_rate": 0.248, "degradation_rate": 0.634},
    "sft_grpo_single_step": {"acc@0.5": 0.800, "acc@0.7": 0.709, "acc@0.9": 0.457, "miou": 0.716},
    "sft_grpo_ivt": {"acc@0.5": 0.806, "acc@0.7": 0.725, "acc@0.9": 0.471, "miou": 0.729,
                     "iou_step": [0.715, 0.688, 0.686], "delta": -0.029, "improve_rate": 0.113,
                     "stagnation_rate": 0.640, "degradation_rate": 0.248},
}

KEYS = ("acc@0.5", "acc@0.7", "acc@0.9", "miou", "iou_step", "delta", "improve_rate", "stagnation_rate",
        "degradation_rate")


def findings(rows: dict[str, dict]) -> list[dict]:
    """The paper's three findings as checks on our rows (the issue's thresholds), each with its margin."""
    get = lambda r, k: rows.get(r, {}).get(k)  # noqa: E731
    out = []
    a, b = get("base_single_shot", "acc@0.5"), get("base_ivt", "acc@0.5")
    if a is not None and b is not None:
        out.append({"finding": "a: iterating without refinement training hurts",
                    "check": "base_ivt Acc@0.5 < base_single_shot Acc@0.5 - 0.05",
                    "values": {"base_single_shot": a, "base_ivt": b}, "holds": b < a - 0.05})
    s = get("sft_ivt", "acc@0.5")
    if s is not None and b is not None:
        out.append({"finding": "b: behaviour cloning on teacher trajectories recovers",
                    "check": "sft_ivt Acc@0.5 > base_ivt Acc@0.5 + 0.1",
                    "values": {"sft_ivt": s, "base_ivt": b}, "holds": s > b + 0.1})
    d_sft, d_grpo = get("sft_ivt", "degradation_rate"), get("sft_grpo_ivt", "degradation_rate")
    if d_sft is not None and d_grpo is not None:
        out.append({"finding": "c: GRPO cuts per-step degradation",
                    "check": "sft_grpo_ivt degradation <= 0.5 x sft_ivt degradation",
                    "values": {"sft_ivt": d_sft, "sft_grpo_ivt": d_grpo}, "holds": d_grpo <= 0.5 * d_sft})
    return out
