"""The paper in miniature: ``python -m agents.reproduce`` puts the IVT paper's three findings side by side.

(a) iterating without refinement training hurts (base single shot vs base + IVT), (b) behaviour cloning on teacher
trajectories recovers and beats single shot, (c) GRPO cuts per-step degradation. Rows as in the paper's Table 1 and
Table 2 (:data:`agents.reproduce.rows.ROWS`), beside the paper's numbers, on the synthetic test split.

- :mod:`agents.reproduce.rows`: the rows, the paper's figures, the shipped checkpoints.
- :mod:`agents.reproduce.run`: evaluate (``--from-shipped``) or train everything from scratch, then evaluate.
- :mod:`agents.reproduce.figures`: matplotlib figures (IoU per step, GRPO validation curves, trajectory strips).
- :mod:`agents.reproduce.report`: ``results.json``, ``report.md`` and a self-contained ``report.html``.
"""
