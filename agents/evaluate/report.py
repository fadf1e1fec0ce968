"""Markdown tables of a metrics dict, in the row layout of the IVT paper's Table 1 and Table 2 (plus Sec. 4.3 strata).

Table 1 prints fractions with three decimals; Table 2 prints mean IoUs with three decimals and the outcome shares
as percentages with one decimal, as the paper does.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

_STRATUM_LABEL = {"hard": "Hard (<0.5)", "medium": "Medium [0.5, 0.75)", "easy": "Easy (>=0.75)"}


def _f3(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def _signed(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table1(m: Mapping[str, Any], name: str) -> str:
    """IVT Table 1 row: Method | IVT | Acc@0.5 | Acc@0.7 | Acc@0.9 | IoU (final box)."""
    ivt = f"T={m['steps']}" if m["steps"] > 0 else "no"
    return _table(
        ["Method", "IVT", "Acc@0.5", "Acc@0.7", "Acc@0.9", "IoU"],
        [[name, ivt, _f3(m["acc@0.5"]), _f3(m["acc@0.7"]), _f3(m["acc@0.9"]), _f3(m["miou"])]],
    )


def table2(m: Mapping[str, Any], name: str) -> str:
    """IVT Table 2 row: Model | Step 0..Step T | Delta | Impr. | Stagn. | Degr. (percent of trajectories)."""
    steps = [f"Step {t}" for t in range(len(m["iou_step"]))]
    row = [name] + [_f3(v) for v in m["iou_step"]]
    row += [_signed(m["delta"]), _pct(m["improve_rate"]), _pct(m["stagnation_rate"]), _pct(m["degradation_rate"])]
    return _table(["Model"] + steps + ["Δ", "Impr. %", "Stagn. %", "Degr. %"], [row])


def strata_table(m: Mapping[str, Any]) -> str:
    """IVT Sec. 4.3: strata of step-0 IoU with share, mean IoU at step 0 and at step T, and outcome shares."""
    rows = []
    for key, s in m["strata"].items():
        rows.append(
            [
                _STRATUM_LABEL.get(key, key),
                str(s["count"]),
                _pct(s["share"]),
                _f3(s["miou_step0"]),
                _f3(s["miou_final"]),
                _signed(s["delta"]),
                _pct(s["improve_rate"]),
                _pct(s["stagnation_rate"]),
                _pct(s["degradation_rate"]),
            ]
        )
    head = ["Stratum (step-0 IoU)", "n", "Share %", "IoU step 0", f"IoU step {m['steps']}", "Δ"]
    return _table(head + ["Impr. %", "Stagn. %", "Degr. %"], rows)


def dataset_table(m: Mapping[str, Any]) -> str:
    rows = [
        [k, str(v["n"]), _f3(v["acc@0.5"]), _f3(v["acc@0.7"]), _f3(v["acc@0.9"]), _f3(v["miou"])]
        for k, v in m["by_dataset"].items()
    ]
    return _table(["Dataset", "n", "Acc@0.5", "Acc@0.7", "Acc@0.9", "IoU"], rows)


def counts_table(c: Mapping[str, Any]) -> str:
    """Multi-object trajectories: the scores above are HIoU; count errors of the final step and per step, and the
    final HIoU by the number of referred objects."""
    rows = [["all", str(c["n"]), _pct(c["exact"]), _pct(c["too_few"]), _pct(c["too_many"]),
             f"{c['mean_boxes']:.2f} / {c['mean_gt_boxes']:.2f}", "", ""]]
    for k, v in c["by_gt_count"].items():
        rows.append([f"{k} object(s)", str(v["n"]), "", "", "", "", _f3(v["acc@0.5"]), _f3(v["miou"])])
    table = _table(["Referents", "n", "Exact count %", "Too few %", "Too many %", "Boxes / GT boxes",
                    "Acc@0.5 (HIoU)", "HIoU"], rows)
    per = ", ".join(f"{_pct(a)}/{_pct(b)}" for a, b in zip(c["too_few_step"], c["too_many_step"]))
    return table + f"\n\nToo few / too many boxes per step (%): {per}."


def adaptive_section(m: Mapping[str, Any]) -> str:
    """Adaptive refinement (episodes of different lengths): steps used, accuracy against steps used, per stratum.
    Table 2 above carries a stopped trajectory's last box forward (agents.evaluate.metrics)."""
    rows = [[k, str(v["n"]), _pct(v["share"]), _f3(v["acc@0.5"]), _f3(v["miou"])]
            for k, v in m["by_steps_used"].items()]
    strata = "; ".join(f"{_STRATUM_LABEL.get(k, k)}: {_f3(s.get('refine_steps_mean'))} steps, stop at step 0 "
                       f"{_pct(s.get('stop_at_0_rate'))}%" for k, s in m["strata"].items())
    reached = ", ".join(f"{n} ({_f3(v)})" for n, v in zip(m["reached_step"], m["iou_step_reached"]))
    return "\n".join([
        "## Adaptive refinement: steps used", "",
        f"Refinement steps used: mean {m['refine_steps_mean']:.3f} (of at most {m['steps']}). Trajectories that "
        f"took each step (their mean IoU there): {reached}. Table 2 carries a stopped trajectory's last box forward.",
        "", _table(["Refinement steps used", "n", "Share %", "Acc@0.5", "IoU"], rows), "", f"Per stratum: {strata}."])


def format_report(m: Mapping[str, Any], name: str = "policy", title: Optional[str] = None) -> str:
    """All tables of one evaluation as Markdown (also readable as plain text on a terminal)."""
    parts = [f"# {title}" if title else f"# Evaluation: {name}", ""]
    parts += [f"n = {m['n']} trajectories, T = {m['steps']} refinement steps", ""]
    parts += ["## Table 1: accuracy of the final box", "", table1(m, name), ""]
    parts += ["## Table 2: mean IoU per step and outcome (|IoU_T - IoU_0| > 0.01)", "", table2(m, name), ""]
    parts += ["## Difficulty strata (step-0 IoU)", "", strata_table(m), ""]
    per_step = ", ".join(_pct(v) for v in m["format_rate_step"])
    parts += [f"Valid format: {_pct(m['format_rate'])}% of all steps (per step: {per_step}); "
              "invalid steps count as IoU 0."]
    b = m["best_step"]
    parts += [
        f"Best box over the steps (Sec. 4.1 'best predicted box'): Acc@0.5 {_f3(b['acc@0.5'])}, "
        f"Acc@0.7 {_f3(b['acc@0.7'])}, Acc@0.9 {_f3(b['acc@0.9'])}, IoU {_f3(b['miou'])}."
    ]
    if "return_mean" in m:
        parts += [f"Mean return: {m['return_mean']:.4f}."]
    if "refine_steps_mean" in m:
        parts += ["", adaptive_section(m)]
    if len(m.get("by_dataset", {})) > 1:
        parts += ["", "## Per dataset (final box)", "", dataset_table(m)]
    if m.get("counts"):
        parts += ["", "## Several objects: HIoU and count errors (final step)", "", counts_table(m["counts"])]
    return "\n".join(parts) + "\n"
