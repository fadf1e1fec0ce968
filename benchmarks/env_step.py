"""Env step throughput vs. a plain full-frame copy, at 640x480 and 1920x1080.

A step is what ``GroundingRefineEnv.step`` does: parse the text, IoU against the GT, reward, render the overlay
for the next observation and build the observation and info. The same run times ``np.copy`` of the frame;
``ratio`` = seconds per step / seconds per copy (goal: <= 3 at both sizes). Episodes use T = 2 and cycle through
step texts whose boxes cover 10-55 % of the frame (one invalid), from an in-memory dataset (no decoding).
``resets_per_s`` is reported too: ``reset`` tints the frame once per episode (see ``ivt_env.rendering``).

    python benchmarks/env_step.py [--repeats 7] [--min-time 0.4]

Prints JSON: ``{"sizes": [{"width", "height", "steps_per_s", "copies_per_s", "ratio", "resets_per_s"}, ...],
"hostile_worst_step_ms": ...}``: the slowest step (best of 3 each) over adversarial texts (a 6 MB action, repeated
JSON boxes, unclosed brackets), which the action-space cap keeps in milliseconds (goal: under 10 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ivt_env.datasets.base import ListDataset, Sample  # noqa: E402
from ivt_env.env import GroundingRefineEnv  # noqa: E402

TEXTS = [
    "<think>The red mug is on the left.</think> [120, 200, 480, 760]",
    '```json\n[{"bbox_2d": [150, 220, 520, 800], "label": "mug"}]\n```',
    "<think>Shift right a little.</think> <answer>[200, 250, 560, 790]</answer>",
    "<think>I am not sure.</think> no box here",
    "<think>Wider.</think> [100, 150, 900, 820]",
    "<think>Tighter.</think> [300, 300, 620, 640]",
]


def frame_dataset(width: int, height: int) -> ListDataset:
    """One in-memory sample of the given size (``load_image`` returns the array as is: no decoding in the loop)."""
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    gt = (0.2 * width, 0.25 * height, 0.55 * width, 0.8 * height)
    sample = Sample("bench-0", "the red mug on the left", gt, width, height, "bench", lambda: image)
    return ListDataset([sample], name=f"bench{width}x{height}")


def _time_copies(image: np.ndarray, seconds: float) -> float:
    """Seconds per ``np.copy(image)`` over a block of about ``seconds``."""
    n, total = 0, 0.0
    while total < seconds or n < 20:
        t0 = time.perf_counter()
        for _ in range(10):
            np.copy(image)
        total += time.perf_counter() - t0
        n += 10
    return total / n


def _time_steps(env: GroundingRefineEnv, seconds: float, cursor: list) -> tuple[float, float]:
    """(seconds per step, seconds per reset) over whole episodes; resets are timed apart from steps."""
    steps, step_total, resets, reset_total = 0, 0.0, 0, 0.0
    while step_total < seconds or steps < 30:
        t0 = time.perf_counter()
        env.reset()
        t1 = time.perf_counter()
        terminated = False
        while not terminated:
            _, _, terminated, _, _ = env.step(TEXTS[cursor[0] % len(TEXTS)])
            cursor[0] += 1
        step_total += time.perf_counter() - t1
        reset_total += t1 - t0
        steps += env.max_refine_steps + 1
        resets += 1
    return step_total / steps, reset_total / resets


def measure(width: int, height: int, repeats: int, min_time: float) -> dict:
    """Interleaves blocks of copies and of steps so both see the same machine load; medians over rounds."""
    data = frame_dataset(width, height)
    image = data[0].load_image()
    env = GroundingRefineEnv(data, max_refine_steps=2)
    env.reset(seed=0)
    cursor = [0]
    rounds = []
    for _ in range(repeats):
        copy_s = _time_copies(image, min_time / 2)
        step_s, reset_s = _time_steps(env, min_time / 2, cursor)
        rounds.append((step_s / copy_s, step_s, copy_s, reset_s))
    rounds.sort()
    ratio, step_s, copy_s, _ = rounds[len(rounds) // 2]
    return {
        "width": width,
        "height": height,
        "steps_per_s": round(1.0 / step_s, 1),
        "copies_per_s": round(1.0 / copy_s, 1),
        "ratio": round(ratio, 3),
        "resets_per_s": round(1.0 / float(np.median([r[3] for r in rounds])), 1),
    }


HOSTILE = [
    "[0, 0, 10, 10] " + "x" * 6_000_000,
    "[1, 2, 3, 4] " * 460_000,
    '{"bbox_2d": [1, 2, 3, 4]} ' * 700,
    '{"bbox_2d": [1, 2, 3]} ' * 800,
    '{"a": [1, 2, 3, 4], "bbox_2d": [5, 6, 7, 8]} ' * 400,
    "<answer>[1, 2, 3, 4]" * 1000,
    "<think>" * 2400,
    "[" * 20000,
    "[1, 2, 3, " * 1700,
]


def hostile_worst_step_ms() -> float:
    """The slowest of the adversarial step texts (each the best of 3 steps), in milliseconds, at 640x480."""
    worst = 0.0
    for which in ("last", "first"):
        env = GroundingRefineEnv(frame_dataset(640, 480), answer_box=which)
        for text in HOSTILE:
            best = float("inf")
            for _ in range(3):
                env.reset(seed=0, options={"index": 0})
                t0 = time.perf_counter()
                env.step(text)
                best = min(best, time.perf_counter() - t0)
            worst = max(worst, best)
    return round(1000 * worst, 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="measurement rounds; the median round counts")
    parser.add_argument("--min-time", type=float, default=0.4, help="seconds per measurement round")
    args = parser.parse_args(argv)
    sizes = [measure(w, h, args.repeats, args.min_time) for (w, h) in ((640, 480), (1920, 1080))]
    print(json.dumps({"sizes": sizes, "hostile_worst_step_ms": hostile_worst_step_ms()}, indent=2))


if __name__ == "__main__":
    main()
