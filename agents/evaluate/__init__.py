"""Evaluation in the paper's layout: ``python -m agents.evaluate --policy NAME|--model DIR``.

- :mod:`agents.evaluate.core`: :func:`evaluate` (roll out, score, write) and the CLI.
- :mod:`agents.evaluate.metrics`: Acc@k, per-step IoU, improve / stagnation / degradation rates, strata (IVT Sec. 4).
- :mod:`agents.evaluate.report`: Table 1 / Table 2 / strata as Markdown.
- :mod:`agents.evaluate.viz`: trajectory strips (each step's overlay beside the GT).
"""

from agents.evaluate.core import EvalConfig, cli, evaluate, main
from agents.evaluate.metrics import compute_metrics

__all__ = ["EvalConfig", "cli", "compute_metrics", "evaluate", "main"]
