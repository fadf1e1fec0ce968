"""results.json, report.md and a self-contained report.html (figures embedded) from the evaluated rows."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from agents.reproduce.rows import KEYS, PAPER, ROWS, findings
from ivt_env.atomic import atomic_write_text


def _f(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _tables(rows: Mapping[str, dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of every table: each row ours, then the paper's."""
    t1, t2, strata = [], [], []
    for row in ROWS:
        for who, m in (("ours", rows.get(row.name)), ("paper", PAPER[row.name])):
            if m is None:
                continue
            best = m.get("best_step", {})
            t1.append([row.label, who, str(row.steps), _f(m.get("acc@0.5")), _f(m.get("acc@0.7")), _f(m.get("acc@0.9")),
                       _f(m.get("miou")), _f(best.get("acc@0.5")), _f(best.get("miou"))])
            if row.steps > 0:
                steps = (m.get("iou_step") or []) + [None] * 3
                t2.append([row.label, who, *(_f(v) for v in steps[:3]), _f(m.get("delta"), signed=True),
                           _pct(m.get("improve_rate")), _pct(m.get("stagnation_rate")), _pct(m.get("degradation_rate"))])
            for name, s in (m.get("strata") or {}).items() if who == "ours" and row.steps > 0 else ():
                strata.append([row.label, name, _pct(s.get("share")), _f(s.get("miou_step0")),
                               _f(s.get("miou_final")), _pct(s.get("improve_rate")), _pct(s.get("degradation_rate"))])
    return [
        ("Table 1: accuracy of the final box (best box over the steps in the last two columns)",
         ["row", "source", "T", "Acc@0.5", "Acc@0.7", "Acc@0.9", "IoU", "best Acc@0.5", "best IoU"], t1),
        ("Table 2: mean IoU per step and outcome (step T vs step 0 beyond 0.01)",
         ["row", "source", "step 0", "step 1", "step 2", "delta", "impr. %", "stagn. %", "degr. %"], t2),
        ("Difficulty strata by step-0 IoU (ours, T = 2 rows)",
         ["row", "stratum", "share %", "IoU step 0", "IoU final", "impr. %", "degr. %"], strata),
    ]


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _findings_lines(rows: Mapping[str, dict]) -> list[str]:
    return [f"{'HOLDS' if f['holds'] else 'does NOT hold'}: {f['finding']} ({f['check']}; "
            + ", ".join(f"{k} {v:.3f}" for k, v in f["values"].items()) + ")" for f in findings(rows)]


def write_report(out: Path, rows: Mapping[str, dict], meta: dict, figures: Sequence[tuple[str, Optional[Path]]]) -> dict:
    """Write results.json, report.md and report.html into ``out``; returns the results dict."""
    results = {"rows": {k: {**{key: v.get(key) for key in KEYS}, "best_step": v.get("best_step"),
                            "strata": v.get("strata"), "n": v.get("n"), "format_rate": v.get("format_rate")}
                        for k, v in rows.items()},
               "paper": PAPER, "findings": findings(rows), "meta": meta}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    intro = (f"Synthetic {meta['split']} split, {meta['limit']} scenes, greedy decoding, seed {meta['seed']}; "
             f"checkpoints: {meta['mode']}. Paper: Qwen3-VL-4B on the RefCOCOg / Ref-Adv-s / Ref-L4 mix.")
    until = {k: v for k, v in (meta.get("trained_until") or {}).items() if v}
    if until:  # e.g. a GRPO row's best/ is a trained iteration, never the start
        intro += " Checkpoints: " + ", ".join(f"{k} at {v}" for k, v in until.items()) + "."
    tables = _tables(rows)
    found = _findings_lines(rows)
    md = ["# IVT in miniature: the paper's Table 1 and Table 2 side by side", "", intro, "", "## Findings", ""]
    md += [f"- {line}" for line in found] + [""]
    for title, header, body in tables:
        md += [f"## {title}", "", _md_table(header, body), ""]
    for caption, path in figures:
        if path is not None:
            md += [f"![{caption}]({path.name})", ""]
    md += [f"Wall time: {meta.get('wall_s', 0):.0f} s."]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    body = [f"<h1>IVT in miniature</h1><p>{html.escape(intro)}</p><h2>Findings</h2><ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in found] + ["</ul>"]
    for title, header, rows_ in tables:
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows_)]
    for caption, path in figures:
        if path is not None:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            body += [f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>IVT reproduction</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(out / "report.html", page)
    return results
