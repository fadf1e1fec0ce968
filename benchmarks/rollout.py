"""Rollout engine vs a naive baseline, measured in the same run; prints JSON.

Workload (IVT GRPO): ``--groups`` groups of N=``--group-size`` trajectories, T=``--steps`` refinement steps, a
FIXED ``--new-tokens`` per step (stopping disabled so both sides generate exactly the same number of tokens),
sampling at temperature 1.0 (step 0) / 0.7 (refinements).

- engine: :class:`agents.policies.engine.RolloutEngine`, all trajectories as one batch, the group prompt encoded
  once, each refinement step appended to the KV cache.
- batched: what a careful researcher writes (and multi-turn loops such as TRL's do): ONE batched ``model.generate``
  per step over all trajectories, each re-encoding its whole prefix (left-padded): the honest baseline of what the
  engine's KV-cache reuse and in-turn injection buy.
- naive: each trajectory alone; at every step the WHOLE prefix (all images, all previous text) is re-encoded and
  ``model.generate`` produces the step (its own KV cache inside the step only).
- engine_nolean_s: the engine with its decode forwards through the full model call (``lean_decode`` off).
- ``--uneven``: each row's step ends after its own number of tokens (the same on every side), as boxes and keep
  markers make it in GRPO; ``engine_noshrink_s``: the engine with finished rows kept in its decode batch.
- limit: the time the engine's run spent inside its model forward passes (prefills and decode steps), i.e. the same
  forwards without sampling, stopping or bookkeeping; ``engine_s / limit_s`` is the engine's overhead.

Each of the engine and batched variants runs ``--reps`` times in rotated orders (means reported; the machine is
noisy), the naive one once. Output: ``{"engine_s", "batched_s", "naive_s", "limit_s", "speedup_vs_batched",
"speedup" (vs naive), "engine_overhead", ...}`` plus the peak GPU memory on CUDA. Default: the tiny Qwen3-VL on
CPU (goals: >= 1.5x the batched baseline, >= 4x the naive one). GPU runs (not needed by CI)::

    python benchmarks/rollout.py --shape qwen3vl-4b --device cuda                    # bf16, random 4B-shaped model
    python benchmarks/rollout.py --shape qwen3vl-4b --device cuda --load-in-4bit --lora-rank 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Qwen3-VL-4B-Instruct's published shape (config.json), randomly initialised here: timings only.
QWEN3VL_4B_TEXT = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
QWEN3VL_4B_VISION = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
    hidden_act="gelu_pytorch_tanh",
)


def build_random_4b(out_dir: Path, device: str, overrides: dict) -> Path:
    """A randomly initialised model of Qwen3-VL-4B's shape with the tiny tokenizer (ids beyond it are never
    sampled, but the full 151,936-row lm_head is computed as in the real model)."""
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig

    from agents.policies.tiny import SPECIAL_TOKENS, load_tiny_tokenizer, tiny_image_processor

    tok = load_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(QWEN3VL_4B_TEXT, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    text.update({k: v for k, v in overrides.items() if not k.startswith("vision_")})
    vision = dict(QWEN3VL_4B_VISION, out_hidden_size=text["hidden_size"])
    vision.update({k[len("vision_"):]: v for k, v in overrides.items() if k.startswith("vision_")})
    vision["deepstack_visual_indexes"] = [i for i in vision["deepstack_visual_indexes"] if i < vision["depth"]]
    cfg = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    proc = tiny_image_processor("qwen3_vl")
    proc.size = {"shortest_edge": 65536, "longest_edge": 16777216}  # Qwen3-VL's processor bounds
    proc.save_pretrained(str(out_dir))
    del model
    return out_dir


def naive_rollouts(policy, images, expressions, steps, new_tokens, temps, lengths=None):
    """Each trajectory alone; every step re-encodes the whole prefix and calls ``model.generate``."""
    layout, model = policy.layout, policy.hf_model
    dev = policy.device
    n_tok = 0
    for row, (image, expr) in enumerate(zip(images, expressions)):
        ids: list[int] = []
        pixels, grids = [], []
        for t in range(steps + 1):
            chunk = layout.first_chunk(image, expr) if t == 0 else layout.refine_chunk(image)
            ids += chunk.ids
            pixels.append(chunk.pixel_values)
            grids.append(chunk.image_grid_thw)
            x = torch.tensor([ids], device=dev)
            out = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), pixel_values=torch.cat(pixels).to(dev),
                image_grid_thw=torch.cat(grids).to(dev), mm_token_type_ids=(x == layout.image_token_id).int(),
                do_sample=True, temperature=temps[t], top_k=0, top_p=1.0, pad_token_id=layout.pad_id,
                suppress_tokens=layout.placeholder_ids,
                **_length_kwargs(layout, new_tokens, x.shape[1], None if lengths is None else lengths[t][row:row + 1]),
            )
            gen = out[0, x.shape[1]:].tolist()
            n_tok += len(gen)
            ids += gen
    return n_tok


def batched_rollouts(policy, images, expressions, steps, new_tokens, temps, lengths=None):
    """All trajectories at once; every step ONE ``model.generate`` over the left-padded full prefixes."""
    layout, model, dev = policy.layout, policy.hf_model, policy.device
    B = len(images)
    ids: list[list[int]] = [[] for _ in range(B)]
    pixels: list[list] = [[] for _ in range(B)]
    grids: list[list] = [[] for _ in range(B)]
    n_tok = 0
    for t in range(steps + 1):
        for b in range(B):
            chunk = layout.first_chunk(images[b], expressions[b]) if t == 0 else layout.refine_chunk(images[b])
            ids[b] += chunk.ids
            pixels[b].append(chunk.pixel_values)
            grids[b].append(chunk.image_grid_thw)
        L = max(len(x) for x in ids)
        x = torch.full((B, L), layout.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b in range(B):  # left padding: every row continues at the last column
            x[b, L - len(ids[b]):] = torch.tensor(ids[b])
            mask[b, L - len(ids[b]):] = 1
        x, mask = x.to(dev), mask.to(dev)
        out = model.generate(
            input_ids=x, attention_mask=mask, pixel_values=torch.cat([p for row in pixels for p in row]).to(dev),
            image_grid_thw=torch.cat([g for row in grids for g in row]).to(dev),
            mm_token_type_ids=(x == layout.image_token_id).int(), do_sample=True, temperature=temps[t], top_k=0,
            top_p=1.0, pad_token_id=layout.pad_id, suppress_tokens=layout.placeholder_ids,
            **_length_kwargs(layout, new_tokens, L, None if lengths is None else lengths[t]),
        )
        gen = out[:, L:].tolist()
        for b in range(B):
            n = len(gen[b]) if lengths is None else int(lengths[t][b])  # generate pads rows that ended
            ids[b] += gen[b][:n]
            n_tok += n
    return n_tok


class ForwardTimer:
    """Accumulates the wall time of the engine's model forwards (``RolloutEngine._forward``) while installed."""

    def __init__(self, engine, device):
        self.engine, self.device, self.seconds, self._orig = engine, device, 0.0, engine._forward

    def __enter__(self):
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            out = self._orig(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - t0
            return out

        self.engine._forward = timed
        return self

    def __exit__(self, *exc):
        self.engine._forward = self._orig


def engine_rollouts(policy, images, expressions, steps, new_tokens, temps, lengths=None):
    eng = policy.engine
    base, uneven = eng.filter, lengths is not None
    try:
        if uneven:
            eng.filter = ForcedEnds(base, eng, policy.layout.stop_ids, lengths[0])
        res = eng.start(images, expressions, temps[0], new_tokens, stop_at_box=False, stop_at_eos=uneven)
        n_tok = sum(len(r.token_ids) for r in res)
        for t in range(1, steps + 1):
            if uneven:
                eng.filter = ForcedEnds(base, eng, policy.layout.stop_ids, lengths[t])
            res = eng.refine(images, temps[t], new_tokens, stop_at_box=False, stop_at_eos=uneven)
            n_tok += sum(len(r.token_ids) for r in res)
    finally:
        eng.filter = base
        eng.reset()
    return n_tok


def step_lengths(rows: int, steps: int, new_tokens: int, seed: int) -> list:
    """``--uneven``: tokens per row and step (a list of T + 1 long tensors (rows,)), uniform in [new_tokens / 8,
    new_tokens]: answers that end at different tokens, as boxes and keep markers make them."""
    g = torch.Generator().manual_seed(seed)
    lo = max(1, new_tokens // 8)
    return [torch.randint(lo, new_tokens + 1, (rows,), generator=g) for _ in range(steps + 1)]


class ForcedEnds:
    """Engine logit filter for ``--uneven``: row b draws an end-of-turn id as exactly its ``lengths[b]``-th token
    (none before). Logits row j is the engine's batch row ``engine.live[j]`` (finished rows leave the batch)."""

    def __init__(self, base, engine, stop_ids, lengths):
        self.base, self.engine, self.k = base, engine, 0
        self.stops, self.lengths = torch.tensor(stop_ids), lengths

    def __call__(self, logits):
        out = self.base(logits).clone()  # (rows of the decode batch, V)
        out[:, self.stops] = -1e9
        end = (self.lengths[torch.tensor(self.engine.live)] - 1 == self.k).nonzero().squeeze(1)
        out[end, self.stops[0]] = 1e4
        self.k += 1
        return out


class HFForcedEnds:
    """The same rule as :class:`ForcedEnds` as a transformers ``LogitsProcessor`` (``prompt_len``: the input
    width; generate keeps computing rows that ended, padded, until the last one ends)."""

    def __init__(self, stop_ids, lengths, prompt_len):
        self.stops, self.lengths, self.prompt_len = torch.tensor(stop_ids), lengths, prompt_len

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.stops] = -float("inf")
        end = (self.lengths.to(scores.device) - 1 == input_ids.shape[1] - self.prompt_len).nonzero().squeeze(1)
        scores[end, self.stops[0]] = 0.0
        return scores


def _length_kwargs(layout, new_tokens: int, prompt_len: int, lengths) -> dict:
    """``model.generate`` keyword arguments: a fixed ``new_tokens`` per row, or (``--uneven``) each row's own."""
    if lengths is None:
        return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    from transformers import LogitsProcessorList

    return dict(max_new_tokens=int(lengths.max()), eos_token_id=list(layout.stop_ids),
                logits_processor=LogitsProcessorList([HFForcedEnds(layout.stop_ids, lengths, prompt_len)]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/rollout.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: build the tiny Qwen3-VL in a temp folder)")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen3vl-4b"], help="model to build when no --model")
    ap.add_argument("--groups", type=int, default=2, help="number of groups (samples) in the batch")
    ap.add_argument("--group-size", type=int, default=6, help="trajectories per group (N)")
    ap.add_argument("--steps", type=int, default=2, help="refinement steps T (T+1 generations per trajectory)")
    ap.add_argument("--new-tokens", type=int, default=160, help="tokens generated per step (fixed)")
    ap.add_argument("--image-size", type=int, default=128, help="square test image side in pixels")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 weights (bitsandbytes)")
    ap.add_argument("--lora-rank", type=int, default=0, help="add a LoRA adapter of this rank (alpha = 2 rank)")
    ap.add_argument("--naive-trajectories", type=int, default=0,
                    help="run the naive baseline on only this many trajectories and scale its time to all "
                         "(0: all; for slow GPU-sized runs)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                    help="shrink the qwen3vl-4b shape for smoke tests, e.g. num_hidden_layers=1 vision_depth=1")
    ap.add_argument("--uneven", action="store_true",
                    help="each row's step ends (an end-of-turn id) after its own number of tokens, uniform in "
                         "[new_tokens / 8, new_tokens], the same on every side; adds engine_noshrink_s (finished "
                         "rows kept in the engine's decode batch: RolloutEngine.shrink_at = 0)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the engine / batched runs, in rotated "
                    "orders; the figures are their means (the naive baseline runs once)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from agents.policies.vlm import LoraSettings, VLMPolicy

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = tempfile.TemporaryDirectory(prefix="ivt_bench_")
    model_path = args.model
    if model_path is not None:
        from agents.policies.model_dir import resolve_model_dir

        try:
            model_path = resolve_model_dir(model_path, "--model")
        except FileNotFoundError as e:
            print(f"benchmarks/rollout.py: error: {e}", file=sys.stderr)
            return 2
    if model_path is None:
        out = Path(tmp.name) / "model"
        if args.shape == "tiny":
            from agents.policies.tiny import build_tiny_model

            model_path = str(build_tiny_model(out, seed=args.seed))
        else:
            overrides = {k: int(v) for k, v in (o.split("=", 1) for o in args.override)}
            model_path = str(build_random_4b(out, "cpu" if device.type == "cpu" else str(device), overrides))
    lora = LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank) if args.lora_rank else None
    policy = VLMPolicy.from_pretrained(model_path, lora=lora, load_in_4bit=args.load_in_4bit, device=str(device),
                                       dtype=args.dtype, seed=args.seed)
    rs = np.random.RandomState(args.seed)
    base_imgs = [rs.randint(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8) for _ in range(args.groups)]
    images = [im for im in base_imgs for _ in range(args.group_size)]
    expressions = [f"the shape number {g}" for g in range(args.groups) for _ in range(args.group_size)]
    temps = [1.0] + [0.7] * args.steps
    lengths = step_lengths(len(images), args.steps, args.new_tokens, args.seed) if args.uneven else None
    # Warm-up (allocators, kernels) on a small batch, not timed.
    engine_rollouts(policy, images[:2], expressions[:2], 1, 4, temps)
    naive_rollouts(policy, images[:1], expressions[:1], 1, 4, temps)
    batched_rollouts(policy, images[:2], expressions[:2], 1, 4, temps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eng = policy.engine
    # name -> (engine switches, runner); each repetition runs them in a rotated order (a noisy machine: the ratios
    # of the summed times), every variant on the same tokens
    variants = {"engine": ({}, engine_rollouts), "engine_nolean": ({"lean_decode": False}, engine_rollouts),
                "batched": ({}, batched_rollouts)}
    if args.uneven:
        variants["engine_noshrink"] = ({"shrink_at": 0.0}, engine_rollouts)
    secs = {k: 0.0 for k in variants}
    toks: dict = {}
    limit_s, engine_peak = 0.0, None
    for r in range(args.reps):
        names = list(variants)
        names = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            switches, runner = variants[name]
            saved = {k: getattr(eng, k) for k in switches}
            for k, v in switches.items():
                setattr(eng, k, v)
            timer = ForwardTimer(eng, device) if name == "engine" else contextlib.nullcontext()
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), timer:
                toks[name] = runner(policy, images, expressions, args.steps, args.new_tokens, temps, lengths)
            _sync(device)
            secs[name] += time.perf_counter() - t0
            for k, v in saved.items():
                setattr(eng, k, v)
            if name == "engine":
                limit_s += timer.seconds
                if device.type == "cuda" and engine_peak is None:
                    engine_peak = torch.cuda.max_memory_allocated() / 2**30
    if len(set(toks.values())) != 1:
        raise AssertionError(f"the variants generated different token counts: {toks}")
    secs = {k: v / args.reps for k, v in secs.items()}
    limit_s /= args.reps
    engine_s, batched_s, nolean_s = secs["engine"], secs["batched"], secs["engine_nolean"]
    noshrink_s = secs.get("engine_noshrink")
    eng_tok = batched_tok = toks["engine"]
    k = args.naive_trajectories or len(images)
    t0 = time.perf_counter()
    with torch.no_grad():
        naive_tok = naive_rollouts(policy, images[:k], expressions[:k], args.steps, args.new_tokens, temps,
                                   None if lengths is None else [x[:k] for x in lengths])
    _sync(device)
    naive_s = (time.perf_counter() - t0) * len(images) / k
    naive_tok = naive_tok * len(images) // k
    result = {
        "engine_s": round(engine_s, 4),
        "batched_s": round(batched_s, 4),
        "naive_s": round(naive_s, 4),
        "limit_s": round(limit_s, 4),
        "speedup_vs_batched": round(batched_s / engine_s, 3),
        "speedup": round(naive_s / engine_s, 3),
        "engine_overhead": round(engine_s / limit_s, 3),
        "batched_tokens_per_s": round(batched_tok / batched_s, 1),
        "engine_tokens_per_s": round(eng_tok / engine_s, 1),
        "naive_tokens_per_s": round(naive_tok / naive_s, 1),
        "tokens": eng_tok,
        "batched_tokens": batched_tok,
        "uneven": args.uneven,
        "engine_nolean_s": round(nolean_s, 4),
        "lean_speedup": round(nolean_s / engine_s, 3),
        "engine_noshrink_s": None if noshrink_s is None else round(noshrink_s, 4),
        "shrink_speedup": None if noshrink_s is None else round(noshrink_s / engine_s, 3),
        "noshrink_speedup_vs_batched": None if noshrink_s is None else round(batched_s / noshrink_s, 3),
        "trajectories": len(images),
        "groups": args.groups,
        "group_size": args.group_size,
        "steps": args.steps,
        "new_tokens_per_step": args.new_tokens,
        "naive_measured_trajectories": k,
        "model": args.model or args.shape,
        "parameters_m": round(sum(p.numel() for p in policy.model.parameters()) / 1e6, 2),
        "device": str(device),
        "dtype": str(policy.hf_model.dtype),
        "load_in_4bit": args.load_in_4bit,
        "lora_rank": args.lora_rank,
        "peak_gpu_mem_gb_engine": None if engine_peak is None else round(engine_peak, 2),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
