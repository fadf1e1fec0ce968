"""Issue 16: behaviour-cloning batches drawn and encoded in a worker process are the in-process ones."""

import numpy as np
import pytest
import torch

from agents.bc import build_data, build_policy, train
from agents.bc.data import Prefetcher

from .test_trainer import _cfg


def test_prefetched_batches_and_encodings_equal_in_process(tmp_path):
    cfg = _cfg(tmp_path / "run", batch_size=4, grounding_mix=0.5, grounding_only_steps=1, max_steps=4)
    policy = build_policy(cfg, tmp_path / "run")
    data = build_data(cfg)
    with Prefetcher(data, start=1, encode=policy.encode_trajectory, depth=2) as pre:
        got = [pre.next(k) for k in (1, 2, 3)]
        with pytest.raises(ValueError, match="next one is 4"):
            pre.next(6)
    for k, (batch, enc) in zip((1, 2, 3), got):
        want = data.batch(k)
        assert [t.sample_id for t in batch] == [t.sample_id for t in want]
        assert [s.text for t in batch for s in t.steps] == [s.text for t in want for s in t.steps]
        assert all(np.array_equal(s.observation, w.observation)
                   for t, u in zip(batch, want) for s, w in zip(t.steps, u.steps))
        for e, t in zip(enc, want):
            ref = policy.encode_trajectory(t)
            assert torch.equal(e.input_ids, ref.input_ids) and torch.equal(e.labels, ref.labels)
            assert torch.equal(e.pixel_values, ref.pixel_values)
    inline = Prefetcher(data, start=0, depth=0)  # no worker: made on demand
    batch, enc = inline.next(0)
    assert enc is None and [t.sample_id for t in batch] == [t.sample_id for t in data.batch(0)]


@pytest.mark.parametrize("pack", [True, False])
def test_a_micro_batch_crosses_in_one_buffer_per_dtype(tmp_path, pack):
    """pack=True: the worker's 4 x 7 tensors arrive as views of one shared buffer per dtype (long, int32, float32),
    with the values of the unpacked route."""
    cfg = _cfg(tmp_path / "run", batch_size=4, grounding_mix=0.5, grounding_only_steps=1, max_steps=4)
    policy = build_policy(cfg, tmp_path / "run")
    data = build_data(cfg)
    with Prefetcher(data, start=0, encode=policy.encode_trajectory, depth=1, pack=pack) as pre:
        _, enc = pre.next(0)
    storages = {t.untyped_storage().data_ptr() for e in enc for t in (e.input_ids, e.labels, e.step_index,
                                                                       e.mm_token_type_ids, e.pixel_values)}
    # packed: long (ids, labels, step index), int32 (token types), float32 (pixels); else one per tensor
    assert len(storages) == (3 if pack else 5 * len(enc))
    for e, t in zip(enc, data.batch(0)):
        ref = policy.encode_trajectory(t)
        assert all(torch.equal(getattr(e, f), getattr(ref, f)) for f in
                   ("input_ids", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw", "step_index"))


def test_run_with_prefetch_equals_run_without(tmp_path):
    kw = dict(batch_size=4, max_steps=3, grounding_mix=0.5, grounding_only_steps=1, number_sigma=20.0,
              clone_start=False)
    a = train(_cfg(tmp_path / "a", prefetch=0, **kw))
    b = train(_cfg(tmp_path / "b", prefetch=2, **kw))
    assert a["steps"] == b["steps"] == 3
    wa = torch.load(tmp_path / "a" / "checkpoints" / "iter_000003" / "trainable.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "checkpoints" / "iter_000003" / "trainable.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))


def test_online_batches_read_the_draw_lazily_and_keep_the_same_samples(tmp_path):
    """OnlineData stops making start records once a micro-batch is full: the picks equal those of the whole draw
    filtered at once (the route before), here with an IoU filter that drops about half of the scripted starts."""
    import dataclasses
    import random

    from agents.synthesis import Synthesizer

    cfg = _cfg(tmp_path / "run", batch_size=6)
    syn = Synthesizer(dataclasses.replace(cfg.synth, start="student", student="scripted", iou_min=0.3))
    data = build_data(dataclasses.replace(cfg, data="online", grounding_mix=0.0, grounding_only_steps=0,
                                          localize_steps=0))
    data.syn = syn
    made = 0
    for k in range(4):
        got = data.batch(k)
        rng, want = random.Random(f"{cfg.seed}/{k}"), []
        while len(want) < 6:  # the route before: every index of a draw at once, then the first kept ones
            need = 6 - len(want)
            recs = syn.starts([rng.randrange(data.n) for _ in range(need + need // 2 + 1)])
            made += len(recs)
            want += [r for r in recs if r["stage"] == "kept"][:need]
        assert [t.sample_id for t in got] == [r["sample_id"] for r in want]
        assert [t.meta["start_iou"] for t in got] == [r["iou"] for r in want]
    assert made > 4 * 10  # the filter dropped starts: some batches drew again
    assert data.seen < made  # fewer start records were made than drawn


def test_transfer_benchmark_prints_json(capsys):
    """benchmarks/bc_transfer.py end to end on one micro-batch per side: both routes give the same batches and
    the same rope positions."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bc_transfer.py"
    spec = importlib.util.spec_from_file_location("bc_transfer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--phases", "2", "--batches", "1", "--reps", "1", "--wait", "0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    phase = out["phases"]["2"]
    assert phase["transfer"]["same_batches"] and phase["rope"]["same_positions"]
    assert phase["transfer"]["before_wall_ms"] > 0 and phase["rope"]["now_ms"] > 0
