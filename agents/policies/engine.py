"""The rollout engine: batched, KV-cached generation of IVT trajectories (all rows advance in lock-step).

One :class:`RolloutEngine` batch holds B trajectories (the N of a group and several groups). Per refinement step
the injected chunk (overlay image + instruction) is appended to the SAME KV cache and generation continues; the
prefix is never re-encoded. Rows that end their episode (adaptive refinement: the env stopped them) leave the batch
before the next step (:meth:`RolloutEngine.keep`: their cache rows are dropped, so no forward spends compute on
them). The step-0 prompt of a group is encoded once and its cache is expanded along the batch.
Branching groups (GRPO ``branch_size``): rows given one ``share`` key get ONE sampled step-0 answer, generated
once, then the cache is forked along the batch (:meth:`RolloutEngine.fork`), each row refining on its own.

Layout inside the cache: every chunk is right-padded to the batch's widest chunk, and rows that stop early keep
feeding masked pad tokens until a quarter of the decode batch has finished; then the finished rows leave the decode
batch (their cache rows copied out, ``RolloutEngine.shrink_at``) and the full batch is rebuilt at the end of the step
with zero keys / values under mask 0 where they were absent. So the cache has masked "holes" (attention mask 0).
Holes never break attention: every hole position has real tokens before it (the prompt), so no query row is fully
masked (no NaN), and masked keys get zero weight. Positions are explicit (DESIGN.md, measured): multimodal rope
positions ``(3, B, L)`` computed per chunk with the model's own ``get_rope_index`` (shift-invariant, so a chunk's
positions are its local positions plus the row's next position), text tokens continue at ``max position + 1``.
``pixel_values`` of the NEW images only are passed with each chunk. A test checks that tokens (greedy) and
log-probs equal a plain full re-encode.

Log-probs are those of the distribution each token was drawn from: ``log_softmax(logits / T)`` at the step's
sampling temperature T (greedy steps are scored at T = 1), i.e. exactly what :meth:`VLMPolicy.token_logprobs`
recomputes by teacher forcing from the temperature recorded per step (``StepResult.temperature`` ->
``Step.temperature``); drawn at 0.7 and scored at 1 would bias the policy gradient (DESIGN.md, "Sampling
temperature"). Both use the same :class:`LogitFilter` (unknown ids left out, multimodal placeholders banned). The
one exception, a trained stop token (``PromptConfig.stop_token``), is scored as the two-way decision it was drawn
from; teacher forcing scores it over the vocabulary (it is trained by behaviour cloning, not GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from agents.policies.kv_cache import (cache_kw, cache_rows, growing_cache, lean_decode_hidden, lean_text_model,
                                     sample_inverse_cdf, write_rows)
from agents.policies.vision import vision_inputs
from agents.policies.vlm_prompt import (BoxStopper, Chunk, PromptLayout, decision_logits, mm_token_types,
                                        prompt_key)


BANNED_LOGIT = -1e9  # finite, so exp() is exactly 0 and p * log p stays 0 (no NaN in entropies or gradients)


class LogitFilter:
    """The next-token distribution the policy samples from, shared by generation and teacher forcing:
    float32 logits of the ids the tokenizer knows (``(..., V) -> (..., n_valid)``: Qwen pads its embedding matrix
    beyond the tokenizer, such ids can never be drawn) with the multimodal placeholders (image / video pad, vision
    start / end) banned: a generated placeholder would break the image-token layout of the sequence."""

    def __init__(self, n_valid: int, banned_ids: Sequence[int] = ()) -> None:
        self.n_valid = int(n_valid)
        self.banned = sorted({int(i) for i in banned_ids if 0 <= int(i) < self.n_valid})

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits[..., : self.n_valid].float()
        if self.banned:
            out = out.index_fill(-1, torch.tensor(self.banned, device=out.device), BANNED_LOGIT)
        return out


@dataclass
class StepResult:
    """One row's step: injected ids, generated ids with their log-probs, why it stopped."""

    injected_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    stop: str  # "box" | "eos" | "length" | "stop" (the trained stop token ended the step: PromptConfig.stop_token)
    chunk: Chunk = field(repr=False)
    temperature: float = 1.0  # the distribution the log-probs are scored under: sampling T, 1.0 for greedy


@dataclass
class _Row:
    next_pos: int = 0  # next rope position (text tokens continue here)
    pending: list[int] = field(default_factory=list)  # generated ids not yet in the cache
    steps: list[StepResult] = field(default_factory=list)


class RolloutEngine:
    """Cached batched generation for Qwen-VL models (``model``: a ``*ForConditionalGeneration``, possibly with
    LoRA layers injected by peft; it needs ``.model`` (returning hidden states), ``.lm_head`` and
    ``.model.get_rope_index``)."""

    shrink_at = 0.25  # finished fraction of the decode batch that makes it drop its finished rows (0: never)
    lean_decode = True  # decode forwards through the text model's layer loop (kv_cache.lean_decode_hidden)

    def __init__(self, model: Any, layout: PromptLayout, logit_filter: LogitFilter) -> None:
        self.model = model
        self.layout = layout
        self.filter = logit_filter
        self.tokenizer = layout.tokenizer
        self._piece_cache: dict[int, str] = {}
        self._pos_memo: dict[tuple, torch.Tensor] = {}  # _local_positions by placeholder layout and grid
        self._placeholders = frozenset(layout.placeholder_ids) | {layout.image_token_id}
        self.rows: list[_Row] = []
        self.cache: Optional[DynamicCache] = None
        self.attn: Optional[torch.Tensor] = None  # (B, L) long, 1 on real tokens
        self.next_logits: Optional[torch.Tensor] = None  # (B, V) logits of the next token
        self.generator: Optional[torch.Generator] = None
        self._full: Optional[tuple] = None  # during a step's decode: see _sync
        self.live: list[int] = []  # the full-batch row of each row of the decode batch (logits row j is row live[j])

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def step(self) -> int:
        return len(self.rows[0].steps) if self.rows else 0

    def reset(self) -> None:
        self.rows, self.cache, self.attn, self.next_logits = [], None, None, None

    def seed(self, seed: Optional[int]) -> None:
        self.generator = None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))

    # ------------------------------------------------------------------ public steps
    @torch.no_grad()
    def start(self, images: Sequence[np.ndarray], expressions: Sequence[str], temperature: float, max_new_tokens: int,
              stop_at_box: bool = True, stop_at_eos: bool = True,
              share: Optional[Sequence[Any]] = None, allow_stop: bool = False) -> list[StepResult]:
        """Begin a new batch: step 0 for each (image, expression). Identical prompts are encoded once.

        ``temperature`` <= 0 is greedy. A row stops after ``max_new_tokens``, at an end-of-turn id (unless
        ``stop_at_eos`` is False: benchmarks) or, with ``stop_at_box``, right after a box closes.

        ``share`` (branching groups): one hashable key per row; rows with equal keys (which must have the same
        prompt) get ONE sampled step-0 answer: it is generated once for the first such row, then the KV cache,
        mask and row state are forked along the batch (:meth:`fork`), so the shared prefix is computed once.
        ``allow_stop``: the step-0 question says the model may stop (``PromptConfig.stop_hint``)."""
        if share is not None and len(set(share)) < len(share):
            if len(share) != len(images):
                raise ValueError(f"RolloutEngine.start: {len(share)} share keys for {len(images)} rows")
            first: dict[Any, int] = {}
            for i, k in enumerate(share):
                first.setdefault(k, i)
                if prompt_key(images[i], expressions[i]) != prompt_key(images[first[k]], expressions[first[k]]):
                    raise ValueError(f"RolloutEngine.start: rows {first[k]} and {i} share step 0 but not the prompt")
            reps = list(first.values())  # representative rows, in order
            res = self.start([images[i] for i in reps], [expressions[i] for i in reps], temperature,
                             max_new_tokens, stop_at_box, stop_at_eos, allow_stop=allow_stop)
            slot = {k: j for j, k in enumerate(first)}
            index = [slot[k] for k in share]
            self.fork(index)
            return [res[j] for j in index]
        self.reset()
        if len(images) != len(expressions) or not images:
            raise ValueError(f"RolloutEngine.start: {len(images)} images and {len(expressions)} expressions")
        keys = [prompt_key(im, ex) for im, ex in zip(images, expressions)]
        slot: dict[Any, int] = {}  # prompt key -> index among the unique prompts
        firsts: list[int] = []  # first row of each unique prompt
        for i, k in enumerate(keys):
            if k not in slot:
                slot[k] = len(firsts)
                firsts.append(i)
        chunks = [self.layout.first_chunk(images[i], expressions[i], allow_stop) for i in firsts]
        self.rows = [_Row() for _ in firsts]
        self._append_chunks(chunks)
        # Expand the shared prompts along the batch: row i reads unique prompt index[i].
        index = torch.tensor([slot[k] for k in keys], device=self.device)
        if len(firsts) != len(keys):
            self.cache.batch_select_indices(index)
            self.attn = self.attn[index]
            self.next_logits = self.next_logits[index]
            src = self.rows
            self.rows = [_Row(next_pos=src[j].next_pos) for j in index.tolist()]
        chunk_of = [chunks[j] for j in index.tolist()]
        return self._generate(chunk_of, temperature, max_new_tokens, stop_at_box, stop_at_eos, decide=allow_stop)

    @torch.no_grad()
    def refine(self, images: Sequence[np.ndarray], temperature: float, max_new_tokens: int,
               stop_at_box: bool = True, stop_at_eos: bool = True,
               keep_marker: Optional[str] = None, allow_stop: bool = False) -> list[StepResult]:
        """Step t >= 1: append each row's overlay image + instruction to its cache and continue generating.
        ``keep_marker``: the text that ends a step keeping the previous box (the env's, ``info["keep_marker"]``;
        None: the prompts' ``keep_marker``; "": none). ``allow_stop``: the env may stop (a stop decision is read)."""
        if not self.rows:
            raise RuntimeError("RolloutEngine.refine: no batch in progress (call start first)")
        if len(images) != len(self.rows):
            raise ValueError(f"RolloutEngine.refine: {len(images)} images for a batch of {len(self.rows)} rows")
        chunks = [self.layout.refine_chunk(im) for im in images]
        self._append_chunks(chunks)
        keep = self.layout.prompts.keep_marker if keep_marker is None else keep_marker
        return self._generate(chunks, temperature, max_new_tokens, stop_at_box, stop_at_eos, keep=keep,
                              decide=allow_stop)

    @torch.no_grad()
    def start_given(self, images: Sequence[np.ndarray], expressions: Sequence[str], texts: Sequence[str],
                    allow_stop: bool = False) -> list[StepResult]:
        """Begin a batch whose step-0 answers are GIVEN (reset option ``start_box``: another model's proposal): the
        prompt is encoded, each text's ids become the row's step 0 (no log-probs: nothing was sampled, ``stop`` is
        ``"given"``) and the next :meth:`refine` appends them with the overlay, as for a generated answer."""
        self.reset()
        if not (len(images) == len(expressions) == len(texts)) or not images:
            raise ValueError(f"RolloutEngine.start_given: {len(images)} images, {len(expressions)} expressions and "
                             f"{len(texts)} texts")
        chunks = [self.layout.first_chunk(im, ex, allow_stop) for im, ex in zip(images, expressions)]
        self.rows = [_Row() for _ in chunks]
        self._append_chunks(chunks)
        self.next_logits = None
        out = []
        for row, chunk, text in zip(self.rows, chunks, texts):
            ids = list(self.layout.text_ids(text))
            row.pending = ids
            res = StepResult(list(chunk.ids), ids, [], "given", chunk, 1.0)
            row.steps.append(res)
            out.append(res)
        return out

    def keep(self, index: Sequence[int]) -> None:
        """Between steps: only rows ``index`` (in that order) continue; the others (finished episodes) leave the
        batch with their cache rows, so later forwards run on ``len(index)`` rows."""
        if list(index) != list(range(len(self.rows))):
            self.fork(index)

    def fork(self, index: Sequence[int]) -> None:
        """Between steps: new row r continues old row ``index[r]`` (cache rows, attention mask, positions, pending
        token and step history copied), so rows that branch from one prefix share its computation."""
        if not self.rows or self.cache is None:
            raise RuntimeError("RolloutEngine.fork: no batch in progress")
        idx = torch.tensor(list(index), dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.attn = self.attn[idx]
        if self.next_logits is not None:
            self.next_logits = self.next_logits[idx]
        src = self.rows
        self.rows = [_Row(next_pos=src[j].next_pos, pending=list(src[j].pending), steps=list(src[j].steps))
                     for j in index]

    # ------------------------------------------------------------------ internals
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, vision: Optional[dict],
                 last_cols: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (B, W) to the cache; return logits (B, V) at column ``last_cols[b]`` of each row.
        ``vision``: the image keyword arguments (:func:`agents.policies.vision.vision_inputs`), None for none."""
        lm = lean_text_model(self.model) if self.lean_decode and vision is None and ids.shape[1] == 1 else None
        if lm is not None:
            hidden = lean_decode_hidden(lm, ids, pos, self.attn, self.cache)  # (B, 1, H)
        else:
            hidden = self.model.model(
                input_ids=ids,
                attention_mask=self.attn,
                position_ids=pos,
                use_cache=True,
                **{cache_kw(self.model.model): self.cache},  # cache / past_key_values: by transformers version
                **(vision or {}),
            ).last_hidden_state  # (B, W, H)
        h = hidden[torch.arange(ids.shape[0], device=ids.device), last_cols]  # (B, H)
        return self.model.lm_head(h)

    def _append_chunks(self, chunks: Sequence[Chunk]) -> None:
        """Feed each row's pending generated ids + its chunk, right-padded to one width."""
        dev, B = self.device, len(chunks)
        seqs = [r.pending + c.ids for r, c in zip(self.rows, chunks)]
        W = max(len(s) for s in seqs)
        ids = torch.full((B, W), self.layout.pad_id, dtype=torch.long)
        mask = torch.zeros((B, W), dtype=torch.long)
        pos = torch.zeros((3, B, W), dtype=torch.long)
        for b, (row, chunk, seq) in enumerate(zip(self.rows, chunks, seqs)):
            n = len(seq)
            ids[b, :n] = torch.tensor(seq)
            mask[b, :n] = 1
            local = self._local_positions(seq, chunk.image_grid_thw)  # (3, n), starting at 0
            pos[:, b, :n] = local + row.next_pos
            pos[:, b, n:] = row.next_pos  # pads: masked, any value
            row.next_pos += int(local.max()) + 1
            row.pending = []
        with_image = [c for c in chunks if c.pixel_values is not None and c.image_grid_thw is not None]
        if self.cache is None:
            self.cache = growing_cache(self.model.config)
            self.attn = mask.to(dev)
        else:
            self.attn = torch.cat([self.attn, mask.to(dev)], dim=1)
        last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        self.next_logits = self._forward(
            ids.to(dev),
            pos.to(dev),
            # siblings of a branching group see the same overlay: each distinct image through the tower once
            vision_inputs(self.model.model, [c.pixel_values for c in with_image],
                          [c.image_grid_thw for c in with_image], [c.image_key for c in with_image], dev),
            last,
        )

    def _local_positions(self, seq: list[int], grid: Optional[torch.Tensor]) -> torch.Tensor:
        """Rope positions (3, n) of ``seq`` as if it started the sequence (the model's own ``get_rope_index``),
        memoised by what they depend on: the placeholder layout of ``seq`` and the image grid (a batch's rows and
        steps repeat a few layouts: about 100 calls of 1-2 ms per default GRPO iteration before)."""
        img, special = self.layout.image_token_id, self._placeholders
        key = (tuple((i, t) for i, t in enumerate(seq) if t in special), len(seq),
               None if grid is None else tuple(grid.flatten().tolist()))
        hit = self._pos_memo.get(key)
        if hit is not None:
            return hit
        ids = torch.tensor([seq], dtype=torch.long)
        mm = mm_token_types(ids, img)
        if grid is None or not bool(mm.any()):
            pos = torch.arange(len(seq)).view(1, -1).expand(3, -1)
        else:
            pos = self.model.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm,
                                                  image_grid_thw=grid.cpu())[0][:, 0, :].cpu()
        if len(self._pos_memo) > 4096:
            self._pos_memo.clear()
        self._pos_memo[key] = pos
        return pos

    def _piece(self, tok: int) -> str:
        s = self._piece_cache.get(tok)
        if s is None:
            s = self._piece_cache[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
        return s

    def _generate(self, chunks: Sequence[Chunk], temperature: float, max_new_tokens: int,
                  stop_at_box: bool, stop_at_eos: bool, keep: str = "", decide: bool = False) -> list[StepResult]:
        """``keep``: the keep marker that may end this step ("" at step 0, which has no box to keep: the env reads
        a step-0 keep marker as no box, so generation goes on to the box). ``decide`` (the env may stop, and the
        prompts name a ``stop_token``): a complete step reads one more token, the stop token or the go-on id only
        (:func:`decision_logits`); stop ends the step with it (``stop="stop"``), go on writes nothing.

        Rows that finish leave the decode batch once at least :attr:`shrink_at` of it has finished (:meth:`_shrink`;
        the copy of the cache rows is amortised over the quarter); ``live`` lists the full-batch row of each row of
        the decode batch. A row that left keeps its last token pending (fed with its next chunk, as for a row that
        stopped on the step's last token), and the full layout is restored when the step ends (:meth:`_unshrink`)."""
        dev, B = self.device, len(self.rows)
        stop_ids = torch.tensor(self.layout.stop_ids if stop_at_eos else [-1], device=dev)
        stopper = BoxStopper(B, self.layout.prompts.stop_box_requires_think, keep)
        gen: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        why = ["length"] * B
        done = [False] * B
        dec = self.layout.stop_decision() if decide else None  # (stop id, go-on id)
        deciding = [False] * B
        live = self.live = list(range(B))
        self._full = None  # (cache, attn, synced length) of all B rows while the decode batch is smaller
        logits = self.next_logits
        for k in range(max_new_tokens):
            raw, logits = logits, self.filter(logits)  # (len(live), V)
            if dec is not None and any(deciding[b] for b in live):
                logits = decision_logits(logits, raw, [deciding[b] for b in live], dec)
            live_t = torch.tensor(live, device=dev) if len(live) < B else None
            if temperature <= 0:
                tok = logits.argmax(dim=-1)
                logp = torch.log_softmax(logits, dim=-1)  # greedy: scored at T = 1
            else:
                scaled = logits / temperature  # (len(live), V) the sampling distribution's logits
                logp = torch.log_softmax(scaled, dim=-1)
                tok = sample_inverse_cdf(torch.softmax(scaled, dim=-1), self.generator, live_t, B)
            lp = logp.gather(1, tok[:, None]).squeeze(1)
            is_eos = torch.isin(tok, stop_ids)
            tok_l, lp_l, eos_l = tok.tolist(), lp.tolist(), is_eos.tolist()
            for j, b in enumerate(live):
                if done[b]:
                    continue
                if deciding[b]:  # past a complete step: stop (the token ends the step) or go on (nothing written)
                    done[b], deciding[b] = True, False
                    if tok_l[j] != dec[0]:
                        continue
                    why[b] = "stop"
                gen[b].append(tok_l[j])
                lps[b].append(lp_l[j])
                self.rows[b].pending.append(tok_l[j])  # not in the cache yet
                if eos_l[j]:
                    why[b] = "eos"
                    done[b] = True
                elif why[b] != "stop" and stop_at_box and stopper.feed(b, self._piece(tok_l[j])):
                    why[b] = "box"
                    done[b], deciding[b] = dec is None, dec is not None
            n_done = sum(done[b] for b in live)
            if n_done == len(live) or k == max_new_tokens - 1:
                break
            if self.shrink_at > 0 and n_done >= max(1.0, self.shrink_at * len(live)):
                live = self.live = self._shrink(live, [j for j, b in enumerate(live) if not done[b]])
            logits = self._decode_pending(live)
        self._unshrink(live)
        self.live = list(range(B))
        self.next_logits = None
        results = []
        for b, row in enumerate(self.rows):
            res = StepResult(list(chunks[b].ids), gen[b], lps[b], why[b], chunks[b], score_temperature(temperature))
            row.steps.append(res)
            results.append(res)
        return results

    def _shrink(self, live: list[int], keep: list[int]) -> list[int]:
        """The decode batch (rows ``live`` of the full batch) keeps only its rows ``keep``: their cache rows and
        attention mask are copied into a smaller cache; the full batch's cache (its first ``synced`` positions
        current) gets the positions decoded since, so it holds every row up to here. Returns the new ``live``."""
        part = cache_rows(self.cache, torch.tensor(keep, device=self.device))
        if part is None:  # a layer type that cannot be split: keep computing the finished rows
            return live
        self._sync(live)
        self.cache, self.attn = part, self.attn[keep]
        return [live[j] for j in keep]

    def _sync(self, live: list[int]) -> None:
        """Bring the full batch's cache and mask (``self._full``) up to the decode batch's length."""
        L = self.attn.shape[1]
        if self._full is None:
            self._full = (self.cache, self.attn, L)  # the decode batch is still the full batch
            return
        cache, attn, synced = self._full
        if L > synced:
            rows = torch.tensor(live, device=self.device)
            write_rows(cache, self.cache, rows, synced)
            new = attn.new_zeros((attn.shape[0], L - synced))  # (B, new positions): holes for the rows that left
            new[rows] = self.attn[:, synced:]
            attn = torch.cat([attn, new], dim=1)
        self._full = (cache, attn, L)

    def _unshrink(self, live: list[int]) -> None:
        """End of a step: the full batch (all rows, one cache) again, for the next chunk, :meth:`fork`, ..."""
        if self._full is not None:
            self._sync(live)
            self.cache, self.attn = self._full[0], self._full[1]
        self._full = None

    def _decode_pending(self, live: list[int]) -> torch.Tensor:
        """One decode forward over the decode batch (full-batch rows ``live``): each row feeds its single pending
        token (mask 1) or, having finished, a pad (mask 0)."""
        dev, n = self.device, len(live)
        ids_l, mask_l, pos_l = [], [], []  # python lists, one tensor each: per-element tensor writes cost more
        for b in live:
            row = self.rows[b]
            pos_l.append(row.next_pos)
            if row.pending:
                assert len(row.pending) == 1, "decode feeds one pending token per row"
                ids_l.append(row.pending.pop())
                mask_l.append(1)
                row.next_pos += 1
            else:
                ids_l.append(self.layout.pad_id)
                mask_l.append(0)
        ids = torch.tensor(ids_l, dtype=torch.long, device=dev).view(n, 1)
        pos = torch.tensor(pos_l, dtype=torch.long, device=dev).view(1, n, 1).expand(3, n, 1).contiguous()
        self.attn = torch.cat([self.attn, torch.tensor(mask_l, dtype=torch.long, device=dev).view(n, 1)], dim=1)
        return self._forward(ids, pos, None, torch.zeros(n, dtype=torch.long, device=dev))


def score_temperature(temperature: float) -> float:
    """The temperature a step's tokens are scored at: the sampling temperature, 1.0 for greedy (T <= 0)."""
    return float(temperature) if temperature > 0 else 1.0

