"""Training sequences of trajectories, and teacher-forced log-probs / entropies / BC loss over them.

:func:`encode_trajectory` builds the FULL token sequence of one trajectory in exactly the inference layout
(:mod:`agents.policies.vlm_prompt`): per step the injected chunk then the generated ids. Token-in / token-out: the
stored ``injected_ids`` / ``token_ids`` are used as they are; a teacher trajectory that carries only texts gets its
injected chunks from the same :class:`PromptLayout` code the engine uses, and each step's text tokenised as its
generated part. ``labels`` are the generated ids and -100 on every injected token (IVT Sec. 3.2), except, in a
trajectory with ``meta["stop_decisions"]`` (a trained stop token, ``PromptConfig.stop_token``), the first token of
each refinement chunk: the previous step's decision to go on.

Speed (issue 16): :func:`teacher_forced` runs shared beginnings once (GRPO groups share their prompt, branch
siblings their step-0 answer and step-1 overlay), each distinct image through the vision tower once
(:mod:`agents.policies.vision`), and uneven batches as two length buckets; tests compare every route with the plain
one-pass forward.

Images (one per step): ``Step.observation`` (the collector keeps them with ``keep_observations=True``), else
``Step.image_path`` (PNG written by ``agents.synthesis``), else rendered: the original image (``meta["image"]``
array, ``meta["image_path"]`` file, step 0's observation / image_path, or an ``image_resolver(traj)`` callable)
with the previous step's box drawn by ``ivt_env.rendering.draw_box`` (nothing drawn when that box was invalid), as
the env does: :func:`rollouts.observations.trajectory_images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from agents.policies.engine import LogitFilter
from agents.policies.rope import rope_positions
from agents.policies.number_targets import NumberSmoothing, number_token_ids  # noqa: F401 (re-exported)
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
    injected_ends: Optional[list] = None  # per step: the index where its injected chunk ends (its answer starts)

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
    injected_ends = []
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
        injected_ends.append(len(ids) + len(injected))
        ids += injected + gen
        given = bool((st.extra or {}).get("start_box"))  # a given start box (reset option start_box): context only
        n_ctx = len(gen) if given else _context_tokens(layout, st, gen, traj.sample_id)
        labels += [IGNORE] * (len(injected) + n_ctx) + gen[n_ctx:]
        if t > 0 and (traj.meta or {}).get("stop_decisions"):  # the step before went on: that decision (the
            labels[len(ids) - len(gen) - len(injected)] = injected[0]  # chunk's first token) is a target too
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
        injected_ends=injected_ends,
    )


def _context_tokens(layout: PromptLayout, st: Any, gen: list[int], sid: str) -> int:
    """Leading generated tokens that are context: ``extra["context_prefix"]``'s (a prefix of the text), else 0."""
    prefix = (st.extra or {}).get("context_prefix")
    if not prefix:
        return 0
    pre = layout.text_ids(prefix)
    if not st.text.startswith(prefix) or gen[: len(pre)] != pre:
        raise ValueError(f"trajectory {sid!r} step {st.t}: context_prefix {prefix!r} is no token prefix of its text")
    return len(pre)


def mask_targets(encoded: Sequence[EncodedTrajectory], *, clone_start: bool = True, last_step_only: bool = False,
                 start_number_ids: Optional[torch.Tensor] = None) -> None:
    """Behaviour-cloning targets, in place: ``clone_start=False`` makes step 0 of a multi-step sequence context
    (labels -100); ``last_step_only`` keeps only each sequence's last step as a target (GRPO teacher guidance);
    ``start_number_ids`` (token ids, :func:`number_token_ids`): those tokens of step 0 become context, in every
    sequence (``BCLossOptions.clone_start_numbers=False``)."""
    for e in encoded:
        last = int(e.step_index.max())
        if not clone_start and last > 0:
            e.labels[e.step_index == 0] = IGNORE
        if start_number_ids is not None:
            e.labels[(e.step_index == 0) & torch.isin(e.labels, start_number_ids)] = IGNORE
        if last_step_only:
            e.labels[e.step_index < last] = IGNORE


def _per_image(e: EncodedTrajectory) -> list[torch.Tensor]:
    """``e.pixel_values`` split into its images' patch rows (step order)."""
    sizes = e.image_grid_thw.prod(-1).tolist()
    return list(torch.split(e.pixel_values, sizes)) if len(sizes) > 1 else [e.pixel_values]


def _prefix_plan(model: Any, encoded: Sequence[EncodedTrajectory]) -> Optional[tuple[list, list]]:
    """The shared segments of a batch, level by level: level 0 is each row's step-0 prompt, level t >= 1 its
    step-(t-1) answer plus its step-t injected chunk (overlay image, instruction). Rows share a level-t segment when
    they share every segment before it and this one's ids and image (the N members of a GRPO group share level 0,
    the siblings of a branching group level 1 as well). Returns ``(levels, starts)``: per level ``(start, end,
    first, mapping)`` (per row its segment [start, end), the first row of each distinct segment, per row its
    distinct segment's number), only while a level is shared, and each row's start of the rest (its own suffix);
    None when nothing is shared or the route does not apply (gradient checkpointing: checkpointed layers run
    without a KV cache; a model without precomputed-feature inputs)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if len(encoded) < 2 or bool(getattr(model, name, False)) or not vision.supports_precomputed(model.model):
        return None
    B = len(encoded)
    for e in encoded:
        if not e.injected_ends or e.image_keys is None or len(e.image_keys) != len(e.injected_ends):
            return None
    levels: list = []
    start = [0] * B
    prev = [0] * B
    for t in range(max(len(e.injected_ends) for e in encoded)):
        if any(t >= len(e.injected_ends) or e.image_keys[t] is None for e in encoded):
            break
        end = [e.injected_ends[t] for e in encoded]
        keys = [(prev[b], tuple(encoded[b].input_ids[start[b]:end[b]].tolist()), encoded[b].image_keys[t])
                for b in range(B)]
        first, mapping = distinct(keys)
        if len(first) == B:
            break
        levels.append((list(start), end, first, mapping))
        start, prev = end, mapping
    while levels and any(e.input_ids.shape[0] <= levels[-1][1][b] for b, e in enumerate(encoded)):
        levels.pop()  # a row with nothing after its last shared segment: share one level less
    if not levels:
        return None
    return levels, list(levels[-1][1])


def _segment(rows: Sequence[int], start: Sequence[int], end: Sequence[int], ids: torch.Tensor, pos: torch.Tensor,
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """ids, attention mask, positions of the segments [start[r], end[r]) of ``rows``, right-padded (pads repeat
    the last position: masked keys, unused queries), and the width."""
    W = max(end[r] - start[r] for r in rows)
    n = len(rows)
    s_ids = torch.full((n, W), pad_id, dtype=torch.long)
    s_attn = torch.zeros((n, W), dtype=torch.long)
    s_pos = torch.zeros((pos.shape[0], n, W), dtype=pos.dtype)
    for q, r in enumerate(rows):
        a, m = start[r], end[r] - start[r]
        s_ids[q, :m], s_attn[q, :m], s_pos[:, q, :m] = ids[r, a:a + m], 1, pos[:, r, a:a + m]
        s_pos[:, q, m:] = pos[:, r, a + m - 1:a + m]
    return s_ids, s_attn, s_pos, W


_ROPE_MEMO: dict = {}  # the last two batches' rope positions (GRPO's reference and policy passes score one batch)


def _rope_index(model: Any, ids: torch.Tensor, mm: torch.Tensor, grid: torch.Tensor, attn: torch.Tensor):
    """Rope positions (3, B, L) of a padded batch (:func:`.rope.rope_positions`), memoised (GRPO's reference and
    policy passes score one batch)."""
    key = (type(model.model), getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", None),
           tuple(ids.shape), *(t.cpu().numpy().tobytes() for t in (ids, mm, grid, attn)))
    if key not in _ROPE_MEMO:
        while len(_ROPE_MEMO) >= 2:
            _ROPE_MEMO.pop(next(iter(_ROPE_MEMO)))
        _ROPE_MEMO[key] = rope_positions(model, ids, mm, grid, attn)
    return _ROPE_MEMO[key]


def _shared_prefix_hidden(model: Any, encoded: Sequence[EncodedTrajectory], plan: tuple, ids: torch.Tensor,
                          attn: torch.Tensor, mm: torch.Tensor, b_idx: torch.Tensor, j_idx: torch.Tensor,
                          pad_id: int, dev: Any) -> torch.Tensor:
    """Hidden states (N, H) at the positions ``j_idx - 1`` of rows ``b_idx`` (those predicting the generated
    tokens), computed segment level by segment level (:func:`_prefix_plan`): each level's distinct segments in one
    forward on top of the KV cache of the level before (its rows gathered from the distinct segments they
    continue, a differentiable gather: gradients flow back into the shared segments), then every row's own rest.
    Rope positions are the full sequences' (the model's own ``get_rope_index`` over the whole padded batch), so
    each token sees exactly what it sees in the one-pass forward; pad columns of a segment sit masked between it
    and the next."""
    from transformers import DynamicCache

    levels, rest_start = plan
    B = len(encoded)
    pos = _rope_index(model, ids, mm, torch.cat([e.image_grid_thw for e in encoded]), attn)  # (3, B, L)
    per_row = [_per_image(e) for e in encoded]
    cache = DynamicCache(config=model.config)
    cache_kw = vision.cache_kwarg(model.model)
    hidden, offsets, widths = [], [], []
    total = 0
    attn_so_far = None
    parent = None  # per row: its distinct segment at the level before
    for t, (start, end, first, mapping) in enumerate(levels):
        s_ids, s_attn, s_pos, W = _segment(first, start, end, ids, pos, pad_id)
        if parent is not None:
            idx = torch.tensor([parent[r] for r in first])
            cache.batch_select_indices(idx.to(dev))
            s_attn_full = torch.cat([attn_so_far[idx], s_attn], dim=1)
        else:
            s_attn_full = s_attn
        vis = vision_inputs(model.model, [per_row[r][t] for r in first],
                            [encoded[r].image_grid_thw[t:t + 1] for r in first],
                            [encoded[r].image_keys[t] for r in first], dev)
        out = model.model(input_ids=s_ids.to(dev), attention_mask=s_attn_full.to(dev), position_ids=s_pos.to(dev),
                          use_cache=True, **{cache_kw: cache}, **vis)
        h = out.last_hidden_state
        hidden.append(h.reshape(-1, h.shape[-1]))
        offsets.append(total)
        widths.append(W)
        total += h.shape[0] * W
        attn_so_far, parent = s_attn_full, mapping
    # every row's own rest: its later answers and chunks
    ends = [e.input_ids.shape[0] for e in encoded]
    r_ids, r_attn, r_pos, Wr = _segment(range(B), rest_start, ends, ids, pos, pad_id)
    idx = torch.tensor(parent)
    cache.batch_select_indices(idx.to(dev))
    T0 = len(levels)
    r_vis = vision_inputs(model.model, [p for row in per_row for p in row[T0:]],
                          [e.image_grid_thw[t:t + 1] for e in encoded for t in range(T0, e.image_grid_thw.shape[0])],
                          [e.image_keys[t] for e in encoded for t in range(T0, e.image_grid_thw.shape[0])], dev)
    out = model.model(input_ids=r_ids.to(dev), attention_mask=torch.cat([attn_so_far[idx], r_attn], 1).to(dev),
                      position_ids=r_pos.to(dev), use_cache=True, **{cache_kw: cache}, **r_vis)
    h = out.last_hidden_state
    flat = torch.cat(hidden + [h.reshape(-1, h.shape[-1])])
    # where each predicting position lives: the first level whose segment holds it, else the row's rest
    src = j_idx - 1
    where = total + b_idx * Wr + (src - torch.tensor(rest_start)[b_idx])
    done = torch.zeros_like(src, dtype=torch.bool)
    for (start, end, first, mapping), off, W in zip(levels, offsets, widths):
        st, en, mp = torch.tensor(start)[b_idx], torch.tensor(end)[b_idx], torch.tensor(mapping)[b_idx]
        inside = ~done & (src >= st) & (src < en)
        where = torch.where(inside, off + mp * W + (src - st), where)
        done |= inside
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

    One forward of the right-padded batch through ``model.model`` (rope positions of the whole padded batch from
    ``mm_token_type_ids``, ``image_grid_thw`` and the attention mask, :func:`.rope.rope_positions`: an independent
    route from the engine's per-chunk positions),
    then ``lm_head`` only at the positions that predict a generated token.

    ``share_prefix`` (issue 16): when rows share their beginnings (the N members of a GRPO group share the step-0
    prompt, the siblings of a branching group also the step-0 answer and the step-1 overlay chunk), each distinct
    shared segment runs once and the rows continue from its KV cache, with gradients through it
    (:func:`_shared_prefix_hidden`): the same positions, masks and result up to float rounding, and about half the
    tokens through the language model for the default GRPO batch (8 prompts x 6, branches of 3). Otherwise, when
    the lengths are uneven enough (behaviour cloning's mixed batches of 1-step samples and 3-step trajectories), the
    batch runs as two length buckets (:func:`length_buckets`): the same per-row results without the padding.
    """
    kw = dict(entropy=entropy, smoothing=smoothing, temperature=temperature)
    plan = _prefix_plan(model, encoded) if (vision.ENABLED and share_prefix) else None
    parts = length_buckets([e.input_ids.shape[0] for e in encoded]) if (vision.ENABLED and plan is None) else None
    if parts is None:
        return _teacher_forced(model, encoded, pad_id, logit_filter, plan=plan, **kw)
    outs = [_teacher_forced(model, [encoded[i] for i in part], pad_id, logit_filter, plan=None, **kw)
            for part in parts]
    G = max(o[0].shape[1] for o in outs)
    order = torch.tensor([i for part in parts for i in part])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order))
    inv = inv.to(outs[0][0].device)

    def merge(k: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(o[k], (0, G - o[k].shape[1])) for o in outs])[inv]

    return merge(0), merge(1), merge(2)


def length_buckets(lengths: Sequence[int], min_saving: float = 0.25) -> Optional[list[list[int]]]:
    """Two groups of row indices (short rows, long rows) when running them as two right-padded batches saves at
    least ``min_saving`` of the padded token count of one batch (``B * max length``), else None."""
    B = len(lengths)
    if B < 4:
        return None
    order = sorted(range(B), key=lambda b: lengths[b])
    full = B * lengths[order[-1]]
    best, cut = full, 0
    for k in range(1, B):
        area = k * lengths[order[k - 1]] + (B - k) * lengths[order[-1]]
        if area < best:
            best, cut = area, k
    if best > (1.0 - min_saving) * full:
        return None
    return [sorted(order[:cut]), sorted(order[cut:])]


def _teacher_forced(model: Any, encoded: Sequence[EncodedTrajectory], pad_id: int, logit_filter: LogitFilter, *,
                    entropy: bool, smoothing: Optional[NumberSmoothing], temperature: bool,
                    plan: Optional[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One right-padded batch of :func:`teacher_forced` (``plan``: its shared segments, or None)."""
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
    if plan is None:  # one forward of the whole right-padded batch
        keys = []
        for e in encoded:  # one key per image; trajectories without keys share nothing
            n_img = e.image_grid_thw.shape[0]
            keys += list(e.image_keys) if e.image_keys is not None and len(e.image_keys) == n_img else [None] * n_img
        pixels = [p for e in encoded for p in _per_image(e)]
        grids = [g[None] for e in encoded for g in e.image_grid_thw]
        pos = _rope_index(model, ids, mm, torch.cat([e.image_grid_thw for e in encoded]), attn)  # (3, B, L)
        out = model.model(
            input_ids=ids.to(dev),
            attention_mask=attn.to(dev),
            mm_token_type_ids=mm.to(dev),
            position_ids=pos.to(dev),
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
