"""Training sequences of trajectories, and teacher-forced log-probs / entropies / BC loss over them.

:func:`encode_trajectory` builds the FULL token sequence of one trajectory in exactly the inference layout
(:mod:`agents.policies.vlm_prompt`): per step the injected chunk then the generated ids. Token-in / token-out: the
stored ``injected_ids`` / ``token_ids`` are used as they are; a teacher trajectory that carries only texts gets its
injected chunks from the same :class:`PromptLayout` code the engine uses, and each step's text tokenised as its
generated part. ``labels`` are the generated ids and -100 on every injected token (IVT Sec. 3.2).

Images (one per step): ``Step.observation`` (the collector keeps them with ``keep_observations=True``), else
``Step.image_path`` (PNG written by ``agents.synthesis``), else rendered: the original image (``meta["image"]``
array, ``meta["image_path"]`` file, step 0's observation / image_path, or an ``image_resolver(traj)`` callable,
an ``image_resolver(traj)`` callable) with the previous step's box drawn by ``ivt_env.rendering.draw_box`` (nothing
drawn when that box was invalid), as the env does: :func:`rollouts.observations.trajectory_images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from agents.policies.engine import LogitFilter
from rollouts.observations import ImageResolver, trajectory_images
from agents.policies.vlm_prompt import PromptLayout, mm_token_types

IGNORE = -100


@dataclass
class EncodedTrajectory:
    """One trajectory as a training sequence (inference layout)."""

    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long: generated ids, -100 on injected tokens
    mm_token_type_ids: torch.Tensor  # (L,) int32: 1 on image placeholders
    pixel_values: torch.Tensor  # (P, D): all images of the trajectory, step order
    image_grid_thw: torch.Tensor  # (n_steps, 3)
    step_index: torch.Tensor  # (L,) long: the step each token belongs to
    step_temperature: Optional[torch.Tensor] = None  # (n_steps,) float: each step's sampling temperature (1 if unknown)

    @property
    def n_generated(self) -> int:
        return int((self.labels != IGNORE).sum())


def encode_trajectory(traj: Any, layout: PromptLayout, resolver: Optional[ImageResolver] = None) -> EncodedTrajectory:
    """The full training sequence of ``traj`` (see the module docstring)."""
    if not traj.steps:
        raise ValueError(f"trajectory {traj.sample_id!r}: no steps")
    images = trajectory_images(traj, resolver)
    ids: list[int] = []
    labels: list[int] = []
    steps: list[int] = []
    temps: list[float] = []
    pixels, grids = [], []
    for t, (st, image) in enumerate(zip(traj.steps, images)):
        stop = bool((traj.meta or {}).get("allow_stop"))  # the step-0 question says the model may stop
        chunk = layout.first_chunk(image, traj.expression, stop) if t == 0 else layout.refine_chunk(image)
        injected = chunk.ids
        if st.injected_ids is not None:
            injected = list(st.injected_ids)
            n_img = sum(1 for i in injected if i == layout.image_token_id)
            if n_img != sum(1 for i in chunk.ids if i == layout.image_token_id):
                raise ValueError(
                    f"trajectory {traj.sample_id!r} step {t}: injected_ids hold {n_img} image tokens but its image "
                    f"({image.shape[1]}x{image.shape[0]}) gives {chunk.ids.count(layout.image_token_id)}; "
                    "wrong observation image or a different processor"
                )
        gen = list(st.token_ids) if st.token_ids is not None else layout.text_ids(st.text)
        bad = set(gen) & set(layout.placeholder_ids)
        if bad:
            raise ValueError(f"trajectory {traj.sample_id!r} step {t}: the generated part holds multimodal placeholder "
                             f"tokens {sorted(bad)} (text {st.text[:80]!r}); they may only be injected")
        ids += injected + gen
        given = bool((st.extra or {}).get("start_box"))  # a given start box (reset option start_box): context only
        labels += [IGNORE] * len(injected) + ([IGNORE] * len(gen) if given else gen)
        steps += [t] * (len(injected) + len(gen))
        temps.append(float(getattr(st, "temperature", None) or 1.0))  # None (teacher text, old data): T = 1
        pixels.append(chunk.pixel_values)
        grids.append(chunk.image_grid_thw)
    input_ids = torch.tensor(ids, dtype=torch.long)
    return EncodedTrajectory(
        input_ids=input_ids,
        labels=torch.tensor(labels, dtype=torch.long),
        mm_token_type_ids=mm_token_types(input_ids, layout.image_token_id),
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.cat(grids),
        step_index=torch.tensor(steps, dtype=torch.long),
        step_temperature=torch.tensor(temps, dtype=torch.float32),
    )


class NumberSmoothing:
    """Soft targets for whole-number tokens in the BC loss: a target number ``n*`` becomes a Gaussian over the
    number tokens, ``q(n) ∝ exp(-(n - n*)^2 / (2 sigma^2))``, and the token's loss is the cross-entropy
    ``-sum_n q(n) log p(n)`` instead of ``-log p(n*)``. A box coordinate one unit off then costs almost nothing
    and one 300 units off costs a lot: the loss knows that coordinates are values (Pix2Seq-style quantised
    coordinates trained with a distance-aware target). Only tokens that ARE a whole number (the tiny tokenizer's
    "0".."1000") are smoothed; other tokens, and tokenizers that spell numbers digit by digit, keep the plain loss.
    """

    def __init__(self, tokenizer: Any, sigma: float, max_value: int = 1000):
        if sigma <= 0:
            raise ValueError(f"NumberSmoothing: sigma must be > 0, got {sigma}")
        ids, values = [], []
        for n in range(max_value + 1):
            i = tokenizer.convert_tokens_to_ids(str(n))
            if isinstance(i, int) and i != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(i) == str(n):
                ids.append(i)
                values.append(n)
        self.sigma = float(sigma)
        self.ids = torch.tensor(ids, dtype=torch.long)  # (K,) token ids of the numbers
        self.values = torch.tensor(values, dtype=torch.float32)  # (K,)
        size = max(ids) + 1 if ids else 0
        self.value_of = torch.full((size,), -1.0)  # token id -> its value, -1 for other tokens
        if ids:
            self.value_of[self.ids] = self.values

    def __len__(self) -> int:
        return int(self.ids.numel())

    def __call__(self, target: torch.Tensor, logp_all: torch.Tensor) -> torch.Tensor:
        """``target`` (N,) token ids, ``logp_all`` (N, V) log-probs -> (N,) ``sum_v q(v) log p(v)`` (= log p(target)
        on rows whose target is not a number)."""
        lp = logp_all.gather(1, target[:, None]).squeeze(1)  # (N,)
        if not len(self):
            return lp
        t = target.cpu()
        val = torch.where(t < self.value_of.numel(), self.value_of[t.clamp_max(self.value_of.numel() - 1)], -1.0)
        rows = (val >= 0).nonzero(as_tuple=True)[0]  # (M,) rows with a number target
        if rows.numel() == 0:
            return lp
        dev = logp_all.device
        q = torch.softmax(-0.5 * ((self.values[None, :] - val[rows, None]) / self.sigma) ** 2, dim=1)  # (M, K)
        soft = (q.to(dev, logp_all.dtype) * logp_all[rows.to(dev)][:, self.ids.to(dev)]).sum(1)  # (M,)
        return lp.index_put((rows.to(dev),), soft)


def token_temperatures(encoded: Sequence[EncodedTrajectory]) -> torch.Tensor:
    """(B, L) float: the sampling temperature of every token's step, right-padded with 1 (layout of the batch)."""
    L = max(e.input_ids.shape[0] for e in encoded)
    out = torch.ones((len(encoded), L), dtype=torch.float32)
    for b, e in enumerate(encoded):
        if e.step_temperature is not None:
            out[b, : e.input_ids.shape[0]] = e.step_temperature[e.step_index]
    return out


def teacher_forced(model: Any, encoded: Sequence[EncodedTrajectory], pad_id: int, logit_filter: LogitFilter,
                   entropy: bool = True, smoothing: Optional[NumberSmoothing] = None,
                   temperature: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, entropies and mask of the generated tokens of a batch, right-padded: each ``(B, G)``.

    ``temperature=True`` (GRPO: the policy scoring its own samples): each token is scored under the distribution
    it was sampled from, ``log_softmax(logits / T_step)`` with its step's ``step_temperature``, and the entropy is
    that distribution's; False (behaviour cloning): temperature 1.

    ``smoothing`` (behaviour cloning only): the log-prob of a number token is replaced by its expected log-prob
    under the soft target (:class:`NumberSmoothing`); without it the values are the exact ``log p(token)``.

    One forward of the right-padded batch through ``model.model`` (positions computed by the model itself from
    ``mm_token_type_ids``, ``image_grid_thw`` and the attention mask: an independent route from the engine's),
    then ``lm_head`` only at the positions that predict a generated token.
    """
    dev = model.lm_head.weight.device
    B = len(encoded)
    L = max(e.input_ids.shape[0] for e in encoded)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.int32)
    for b, e in enumerate(encoded):
        n = e.input_ids.shape[0]
        ids[b, :n], labels[b, :n], attn[b, :n], mm[b, :n] = e.input_ids, e.labels, 1, e.mm_token_type_ids
    if bool((labels[:, 0] != IGNORE).any()):
        raise ValueError("a trajectory starts with a generated token: nothing to condition it on")
    out = model.model(
        input_ids=ids.to(dev),
        attention_mask=attn.to(dev),
        pixel_values=torch.cat([e.pixel_values for e in encoded]).to(dev),
        image_grid_thw=torch.cat([e.image_grid_thw for e in encoded]).to(dev),
        mm_token_type_ids=mm.to(dev),
        use_cache=False,
    )
    hidden = out.last_hidden_state  # (B, L, H)
    sel = labels != IGNORE  # (B, L)
    b_idx, j_idx = sel.nonzero(as_tuple=True)
    col = (sel.long().cumsum(1) - 1)[b_idx, j_idx]  # k-th generated token of its row
    G = int(sel.sum(1).max()) if B else 0
    b_dev, j_dev, col_dev = b_idx.to(dev), j_idx.to(dev), col.to(dev)
    logits = logit_filter(model.lm_head(hidden[b_dev, j_dev - 1]))  # (N, V): position j-1 predicts j
    if temperature:
        logits = logits / token_temperatures(encoded)[sel].to(dev, logits.dtype)[:, None]  # (N, V) / (N, 1)
    logp_all = torch.log_softmax(logits, dim=-1)
    target = labels[b_idx, j_idx].to(dev)
    if smoothing is None:
        lp = logp_all.gather(1, target[:, None]).squeeze(1)  # (N,)
    else:
        lp = smoothing(target, logp_all)  # (N,)
    logprobs = torch.zeros((B, G), dtype=lp.dtype, device=dev).index_put((b_dev, col_dev), lp)
    ent = torch.zeros((B, G), dtype=lp.dtype, device=dev)
    if entropy:
        h = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
        ent = ent.index_put((b_dev, col_dev), h)
    mask = torch.zeros((B, G), dtype=torch.bool, device=dev)
    mask[b_dev, col_dev] = True
    return logprobs, ent, mask
