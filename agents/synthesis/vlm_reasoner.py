"""A teacher VLM that writes each step's reasoning while looking at exactly the image the student will see
(IVT Sec. 3.2: step 0 the original image, step t the env's overlay of box t-1; forward-reasoning framing).

The model is any one :class:`agents.policies.vlm.VLMPolicy` loads (the paper: Qwen3-VL-4B). It is prompted with a
single user turn (the image and a prompt from ``configs/teacher_prompts.yaml``, which names the expression, the
red box, the box the trajectory moves to and the geometric diagnosis) and answers with plain text; greedy decoding.
The answer is cleaned (tags and box lists removed, whitespace collapsed, length capped): it becomes the text
inside ``<think>...</think>``, the planned box follows it. An empty answer makes the caller fall back to the
geometric teacher (counted in the synthesis summary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from agents.common.config import load_yaml
from ivt_env.boxes import format_box
from agents.teacher.geometric import geometric_reasoning

_TAGS = re.compile(r"</?\s*(think|answer)\s*>", re.IGNORECASE)
_BOX = re.compile(r"[\[\(]\s*-?\d+(?:\.\d+)?\s*(?:,\s*-?\d+(?:\.\d+)?\s*){3}[\]\)]")
_JSON = re.compile(r"\{[^{}]*\}")


@dataclass
class TeacherPrompts:
    """Prompts of the teacher VLM. Placeholders: {expression}, {prev_box} (the red box, step t >= 1),
    {new_box} (the box this step answers), {gt_box}, {geometric} (the geometric teacher's diagnosis)."""

    system: Optional[str] = None
    """Optional system message."""
    first: str = (
        "Target: {expression}. The box {new_box} (x1, y1, x2, y2 in 0-1000) was chosen for it. In one or two short "
        "sentences, reason in the first person about where the target is and why you pick that region. Do not "
        "write coordinates."
    )
    """Step 0 (the original image, no overlay)."""
    refine: str = (
        "Target: {expression}. The red box on the image is my previous answer {prev_box}. A check says: "
        "{geometric} In two or three short sentences, reason in the first person: examine the red box, say what is "
        "wrong (shifted which way, too large or small, wrong object) or that it fits, and the correction needed. "
        "Do not write coordinates and do not mention any check."
    )
    """Step t >= 1 (the overlay of box t-1)."""
    max_chars: int = 400
    """Longer answers are cut at the last sentence end before this many characters."""


def clean_reasoning(text: str, max_chars: int = 400) -> str:
    """The model's answer as ``<think>`` content: no tags, no box lists or JSON, one line, at most ``max_chars``."""
    text = _TAGS.sub(" ", text)
    text = _JSON.sub(" ", text)
    text = _BOX.sub(" ", text)
    text = " ".join(text.replace("<", " ").replace(">", " ").split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
        text = cut[: end + 1] if end > 0 else cut.rstrip()
    return text.strip()


class VLMTeacher:
    """``reasoner(images, expressions, prev_boxes, new_boxes, gt_boxes, steps) -> list[str]`` for
    :class:`agents.teacher.planned.PlannedTeacher` (batched greedy generation)."""

    def __init__(self, policy: Any, prompts: TeacherPrompts, max_new_tokens: int = 96):
        self.policy = policy
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_config(cls, model: str, prompts: str | TeacherPrompts | None = None, max_new_tokens: int = 96,
                    **policy_kwargs: Any) -> "VLMTeacher":
        from agents.policies.vlm import VLMPolicy

        p = prompts if isinstance(prompts, TeacherPrompts) else load_yaml(TeacherPrompts, prompts or "teacher_prompts.yaml")
        return cls(VLMPolicy.from_pretrained(model, **policy_kwargs), p, max_new_tokens)

    def prompt(self, expression: str, prev: Optional[Sequence[float]], new: Sequence[float], gt: Sequence[float],
               step: int) -> str:
        """The text of one teacher query (see :class:`TeacherPrompts`)."""
        fields = {
            "expression": expression,
            "prev_box": format_box(prev) if prev is not None else "none",
            "new_box": format_box(new),
            "gt_box": format_box(gt),
            "geometric": geometric_reasoning(prev, new, gt, step, expression, None, 1),
        }
        template = self.prompts.first if step == 0 or prev is None else self.prompts.refine
        return template.format(**fields)

    def __call__(self, images: Sequence[np.ndarray], expressions: Sequence[str], prevs: Sequence[Optional[list]],
                 news: Sequence[list], gts: Sequence[list], steps: Sequence[int]) -> list[str]:
        prompts = [self.prompt(expr, prev, new, gt, t) for expr, prev, new, gt, t in zip(expressions, prevs, news,
                                                                                       gts, steps)]
        texts = self.policy.chat(images, prompts, system=self.prompts.system, max_new_tokens=self.max_new_tokens)
        return [clean_reasoning(text, self.prompts.max_chars) for text in texts]
