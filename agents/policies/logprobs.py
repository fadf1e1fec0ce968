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
from agents.policies import vision
from agents.policies.vision import distinct, vision_inputs
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
    image_keys: Optional[list] = None  # per step: content key of its image (equal keys: identical images)
    prompt_len: Optional[int] = None  # tokens of the step-0 injected chunk (the prompt every group member shares)

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
    pixels, grids, keys = [], [], []
    prompt_len = None
    for t, (st, image) in enumerate(zip(traj.steps, images)):
        chunk = layout.first_chunk(image, traj.expression) if t == 0 else layout.refine_chunk(image)
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
        if t == 0:
            prompt_len = len(injected)
        ids += injected + gen
        labels += [IGNORE] * len(injected) + gen
        steps += [t] * (len(injected) + len(gen))
        temps.append(float(getattr(st, "temperature", None) or 1.0))  # None (teacher text, old data): T = 1
        pixels.append(chunk.pixel_values)
        grids.append(chunk.image_grid_thw)
        keys.append(chunk.image_key)
    input_ids = torch.tensor(ids, dtype=torch.long)
    return EncodedTrajectory(
        input_ids=input_ids,
        labels=torch.tensor(labels, dtype=torch.long),
        mm_token_type_ids=mm_token_types(input_ids, layout.image_token_id),
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.cat(grids),
        step_index=torch.tensor(steps, dtype=torch.long),
        step_temperature=torch.tensor(temps, dtype=torch.float32),
        image_keys=keys,
        prompt_len=prompt_len,
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


def _per_image(e: EncodedTrajectory) -> list[torch.Tensor]:
    """``e.pixel_values`` split into its images' patch rows (step order)."""
    sizes = e.image_grid_thw.prod(-1).tolist()
    return list(torch.split(e.pixel_values, sizes)) if len(sizes) > 1 else [e.pixel_values]


def _prefix_plan(model: Any, encoded: Sequence[EncodedTrajectory], labels: torch.Tensor) -> Optional[tuple]:
    """(prompt length per row, first row of each distinct prompt, per row its prompt's number) when some rows share
    their step-0 prompt (ids and image), else None (nothing to share, or a model/setting this route does not
    cover: gradient checkpointing, a model without precomputed-feature inputs)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if len(encoded) < 2 or bool(getattr(model, name, False)):  # checkpointed layers run without a KV cache
        return None
    if not vision.supports_precomputed(model.model):
        return None
    keys, lens = [], []
    for b, e in enumerate(encoded):
        n = e.prompt_len
        if not n or e.image_keys is None or not e.image_keys or e.image_keys[0] is None:
            return None
        if e.input_ids.shape[0] <= n or bool((labels[b, :n] != IGNORE).any()):
            return None
        keys.append((tuple(e.input_ids[:n].tolist()), e.image_keys[0]))
        lens.append(n)
    first, mapping = distinct(keys)
    if len(first) == len(encoded):
        return None
    return lens, first, mapping


def _shared_prefix_hidden(model: Any, encoded: Sequence[EncodedTrajectory], plan: tuple, ids: torch.Tensor,
                          attn: torch.Tensor, mm: torch.Tensor, b_idx: torch.Tensor, j_idx: torch.Tensor,
                          pad_id: int, dev: Any) -> torch.Tensor:
    """Hidden states (N, H) at the positions ``j_idx - 1`` of rows ``b_idx`` (those predicting the generated
    tokens), computed as: the P distinct step-0 prompts in one forward (KV cache kept, with its graph), the cache
    rows gathered per trajectory, then every row's continuation (its step-0 answer, the refinement chunks and
    answers) in a second forward on top of it. Rope positions are the full sequences' (the model's own
    ``get_rope_index`` over the whole padded batch), so each token sees exactly what it sees in the one-pass
    forward; the prompt rows' pad columns sit masked between prompt and continuation."""
    from transformers import DynamicCache

    lens, first, mapping = plan
    B, L = ids.shape
    P = len(first)
    grids_all = torch.cat([e.image_grid_thw for e in encoded])
    pos, _ = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grids_all,
                                        attention_mask=attn)  # (3, B, L) as the one-pass forward computes them
    Lp = max(lens[i] for i in first)
    p_ids = torch.full((P, Lp), pad_id, dtype=torch.long)
    p_attn = torch.zeros((P, Lp), dtype=torch.long)
    p_pos = torch.zeros((pos.shape[0], P, Lp), dtype=pos.dtype)
    for g, i in enumerate(first):
        n = lens[i]
        p_ids[g, :n], p_attn[g, :n], p_pos[:, g, :n] = ids[i, :n], 1, pos[:, i, :n]
    ends = [e.input_ids.shape[0] for e in encoded]
    Ls = max(ends[b] - lens[b] for b in range(B))
    s_ids = torch.full((B, Ls), pad_id, dtype=torch.long)
    s_attn = torch.zeros((B, Ls), dtype=torch.long)
    s_pos = torch.zeros((pos.shape[0], B, Ls), dtype=pos.dtype)
    for b in range(B):
        n, m = lens[b], ends[b] - lens[b]
        s_ids[b, :m], s_attn[b, :m], s_pos[:, b, :m] = ids[b, n:n + m], 1, pos[:, b, n:n + m]
        s_pos[:, b, m:] = pos[:, b, n + m - 1:n + m]  # pads: masked keys, unused queries
    for g, i in enumerate(first):
        n = lens[i]
        p_pos[:, g, n:] = pos[:, i, n - 1:n]

    per_row = [_per_image(e) for e in encoded]
    p_vis = vision_inputs(model.model, [per_row[i][0] for i in first], [encoded[i].image_grid_thw[:1] for i in first],
                          [encoded[i].image_keys[0] for i in first], dev)
    cache = DynamicCache(config=model.config)
    cache_kw = vision.cache_kwarg(model.model)
    p_out = model.model(input_ids=p_ids.to(dev), attention_mask=p_attn.to(dev), position_ids=p_pos.to(dev),
                        use_cache=True, **{cache_kw: cache}, **p_vis)
    cache.batch_select_indices(torch.tensor(mapping, device=dev))  # (P, ...) -> (B, ...): differentiable gather
    s_pix = [p for row in per_row for p in row[1:]]
    s_grid = [e.image_grid_thw[t:t + 1] for e in encoded for t in range(1, e.image_grid_thw.shape[0])]
    s_keys = [e.image_keys[t] for e in encoded for t in range(1, e.image_grid_thw.shape[0])]
    s_vis = vision_inputs(model.model, s_pix, s_grid, s_keys, dev)
    full_attn = torch.cat([p_attn[torch.tensor(mapping)], s_attn], dim=1)
    s_out = model.model(input_ids=s_ids.to(dev), attention_mask=full_attn.to(dev), position_ids=s_pos.to(dev),
                        use_cache=True, **{cache_kw: cache}, **s_vis)
    H = p_out.last_hidden_state.shape[-1]
    flat = torch.cat([p_out.last_hidden_state.reshape(P * Lp, H), s_out.last_hidden_state.reshape(B * Ls, H)])
    src = j_idx - 1  # (N,) the predicting position
    n_p = torch.tensor(lens)[b_idx]
    g_of = torch.tensor(mapping)[b_idx]
    where = torch.where(src < n_p, g_of * Lp + src, P * Lp + b_idx * Ls + (src - n_p))
    return flat[where.to(dev)]


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
                   temperature: bool = False, share_prefix: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, entropies and mask of the generated tokens of a batch, right-padded: each ``(B, G)``.

    ``temperature=True`` (GRPO: the policy scoring its own samples): each token is scored under the distribution
    it was sampled from, ``log_softmax(logits / T_step)`` with its step's ``step_temperature``, and the entropy is
    that distribution's; False (behaviour cloning): temperature 1.

    ``smoothing`` (behaviour cloning only): the log-prob of a number token is replaced by its expected log-prob
    under the soft target (:class:`NumberSmoothing`); without it the values are the exact ``log p(token)``.

    One forward of the right-padded batch through ``model.model`` (positions computed by the model itself from
    ``mm_token_type_ids``, ``image_grid_thw`` and the attention mask: an independent route from the engine's),
    then ``lm_head`` only at the positions that predict a generated token.

    ``share_prefix`` (issue 16): when rows share their step-0 prompt (the N members of a GRPO group: same image,
    same expression), the distinct prompts run once and every row continues from its prompt's KV cache (with
    gradients through it): the same positions, masks and result up to float rounding, a third fewer tokens
    through the language model at N = 6 (:func:`_shared_prefix_hidden`).
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
    sel = labels != IGNORE  # (B, L)
    b_idx, j_idx = sel.nonzero(as_tuple=True)
    col = (sel.long().cumsum(1) - 1)[b_idx, j_idx]  # k-th generated token of its row
    G = int(sel.sum(1).max()) if B else 0
    b_dev, j_dev, col_dev = b_idx.to(dev), j_idx.to(dev), col.to(dev)
    plan = _prefix_plan(model, encoded, labels) if (vision.ENABLED and share_prefix) else None
    if plan is None:  # one forward of the whole right-padded batch
        keys = []
        for e in encoded:  # one key per image; trajectories without keys share nothing
            n_img = e.image_grid_thw.shape[0]
            keys += list(e.image_keys) if e.image_keys is not None and len(e.image_keys) == n_img else [None] * n_img
        pixels = [p for e in encoded for p in _per_image(e)]
        grids = [g[None] for e in encoded for g in e.image_grid_thw]
        out = model.model(
            input_ids=ids.to(dev),
            attention_mask=attn.to(dev),
            mm_token_type_ids=mm.to(dev),
            use_cache=False,
            **vision_inputs(model.model, pixels, grids, keys, dev),  # each distinct image through the tower once
        )
        picked = out.last_hidden_state[b_dev, j_dev - 1]  # (N, H): position j-1 predicts j
    else:
        picked = _shared_prefix_hidden(model, encoded, plan, ids, attn, mm, b_idx, j_idx, pad_id, dev)
    logits = logit_filter(model.lm_head(picked))  # (N, V)
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
