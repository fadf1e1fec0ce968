"""The collector: group layout, lock-step batches, Step fields, env sources (list / factory / id / vector env)."""

import gymnasium as gym
import numpy as np
import pytest

import ivt_env  # noqa: F401  (registers the env ids)
from rollouts.policy import Policy, PolicyOutput, SamplingParams
from agents.policies.scripted import OraclePolicy, RandomPolicy
from ivt_env.boxes import format_box, to_pixels
from ivt_env.rendering import draw_box
from rollouts.collector import Collector, collect_groups, unbatch_info

GREEDY = SamplingParams(greedy=True)


def synth(T=2):
    return gym.make("IVT-Synthetic-v0", split="test", max_refine_steps=T)


class Recorder(Policy):
    """Answers a fixed box per step with fake token data; records every call's batch."""

    def __init__(self):
        self.calls = []

    def act(self, observations, histories, infos, sampling):
        self.calls.append({"steps": [int(o["step"]) for o in observations], "hist": [len(h) for h in histories],
                           "members": [i["group_member"] for i in infos], "ids": [i["sample_id"] for i in infos],
                           "max_steps": [i["max_steps"] for i in infos]})
        out = []
        for o in observations:
            t = int(o["step"])
            box = [100 + 50 * t, 100, 600, 700]
            out.append(PolicyOutput(text=f"<think>t{t}</think> {format_box(box)}", token_ids=[t, t + 1],
                                    logprobs=[-0.1 * t, -0.2], injected_ids=[9, 9, t], extra={"step": t}))
        return out


def test_groups_batches_and_step_fields():
    pol = Recorder()
    trajs = collect_groups(synth, pol, [5, 2, 7], group_size=4, sampling=GREEDY, num_envs=8, keep_observations=True)
    ds = synth().unwrapped.dataset
    assert len(trajs) == 12
    # sample-major order, group ids and members
    assert [t.meta["index"] for t in trajs] == [5] * 4 + [2] * 4 + [7] * 4
    assert [t.group_id for t in trajs] == [0] * 4 + [1] * 4 + [2] * 4
    assert [t.meta["group_member"] for t in trajs] == [0, 1, 2, 3] * 3
    assert [t.sample_id for t in trajs[::4]] == [ds[5].sample_id, ds[2].sample_id, ds[7].sample_id]
    # lock-step: batch of 8 (two full groups) for 3 steps, then 4 for 3 steps; each call is one step
    assert [len(c["steps"]) for c in pol.calls] == [8, 8, 8, 4, 4, 4]
    assert [set(c["steps"]) for c in pol.calls] == [{0}, {1}, {2}] * 2
    assert [set(c["hist"]) for c in pol.calls] == [{0}, {1}, {2}] * 2
    assert pol.calls[0]["members"] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert set(pol.calls[0]["max_steps"]) == {2}
    for traj in trajs:
        s = ds[traj.meta["index"]]
        assert traj.gt_box == list(s.gt_box) and (traj.width, traj.height) == (s.width, s.height)
        assert traj.expression == s.expression and traj.dataset == "synthetic"
        assert [st.t for st in traj.steps] == [0, 1, 2]
        image = s.load_image()
        for st in traj.steps:
            box_norm = [100 + 50 * st.t, 100, 600, 700]
            box_px = list(to_pixels(box_norm, s.width, s.height))
            assert st.valid and st.box_norm == box_norm and st.box == pytest.approx(box_px)
            assert st.token_ids == [st.t, st.t + 1] and st.logprobs == [-0.1 * st.t, -0.2]
            assert st.injected_ids == [9, 9, st.t] and st.extra == {"step": st.t}
            gx1, gy1, gx2, gy2 = s.gt_box
            inter = max(0, min(box_px[2], gx2) - max(box_px[0], gx1)) * max(0, min(box_px[3], gy2) - max(box_px[1], gy1))
            union = (box_px[2] - box_px[0]) * (box_px[3] - box_px[1]) + (gx2 - gx1) * (gy2 - gy1) - inter
            assert st.iou == pytest.approx(inter / union)
        # IVT Eq. 3: nothing before the last step, then IoU_T + 0.1 * valid fraction
        assert [st.reward for st in traj.steps[:-1]] == [0.0, 0.0]
        assert traj.steps[-1].reward == pytest.approx(traj.steps[-1].iou + 0.1)
        # observations: the image the policy saw at each step
        np.testing.assert_array_equal(traj.steps[0].observation, image)
        np.testing.assert_array_equal(traj.steps[1].observation, draw_box(image, traj.steps[0].box))
        np.testing.assert_array_equal(traj.steps[2].observation, draw_box(image, traj.steps[1].box))


def test_vector_env_matches_list_of_envs():
    pol = RandomPolicy(invalid_rate=0.2)
    ref = collect_groups(synth, pol, range(5), group_size=2, sampling=GREEDY, seed=3, num_envs=4)
    vec = gym.make_vec("IVT-Synthetic-v0", num_envs=4, vectorization_mode="sync", split="test")
    try:
        got = collect_groups(vec, pol, range(5), group_size=2, sampling=GREEDY, seed=3)  # 10 work: 4 + 4 + 2 (+2 idle)
        assert [t.to_dict() for t in got] == [t.to_dict() for t in ref]
        again = collect_groups(vec, pol, range(5), group_size=2, sampling=GREEDY, seed=3)  # reused vector env
        assert [t.to_dict() for t in again] == [t.to_dict() for t in ref]
    finally:
        vec.close()


def test_env_sources_give_the_same_trajectories():
    pol = OraclePolicy(noise=25.0)
    ref = collect_groups(synth, pol, [3, 1], group_size=2, seed=0)
    single = collect_groups(synth(), pol, [3, 1], group_size=2, seed=0)
    by_id = collect_groups("IVT-Synthetic-v0", pol, [3, 1], group_size=2, seed=0,
                           env_kwargs={"split": "test", "max_refine_steps": 2}, progress=True)
    listed = collect_groups([synth(), synth(), synth()], pol, [3, 1], group_size=2, seed=0)
    for other in (single, by_id, listed):
        assert [t.to_dict() for t in other] == [t.to_dict() for t in ref]


def test_collector_reuse_and_single_step():
    c = Collector(lambda: synth(T=0), num_envs=3)
    try:
        a = c.collect(OraclePolicy(), range(4))
        b = c.collect(OraclePolicy(), range(4, 6))
        assert [len(t.steps) for t in a + b] == [1] * 6
        assert [t.meta["index"] for t in b] == [4, 5]
    finally:
        c.close()
    assert collect_groups(synth, OraclePolicy(), []) == []


def test_bad_policy_and_sources():
    class Short(Policy):
        def act(self, observations, histories, infos, sampling):
            return [PolicyOutput(text="[1, 1, 2, 2]")][: len(observations) - 1]

    with pytest.raises(ValueError, match="returned 1 outputs for 2 observations"):
        collect_groups(synth, Short(), [0, 1], num_envs=2)
    with pytest.raises(TypeError, match="cannot collect from a int"):
        collect_groups(3, OraclePolicy(), [0])
    with pytest.raises(ValueError, match="group_size"):
        collect_groups(synth, OraclePolicy(), [0], group_size=0)


def test_unbatch_info():
    info = {"a": np.array([1, 2]), "_a": np.array([True, True]), "b": np.array([None, (1, 2)], dtype=object),
            "_b": np.array([False, True]), "c": {"d": np.array([0.5, 1.5]), "_d": np.array([True, True])},
            "_c": np.array([True, True])}
    assert unbatch_info(info, 0) == {"a": 1, "c": {"d": 0.5}}
    assert unbatch_info(info, 1) == {"a": 2, "b": (1, 2), "c": {"d": 1.5}}
    assert type(unbatch_info(info, 0)["a"]) is int


def _async_vec(n=3):
    import ivt_env  # noqa: F401

    return gym.vector.AsyncVectorEnv(
        [lambda: gym.make("IVT-Synthetic-v0", split="test", max_refine_steps=1) for _ in range(n)], context="fork"
    )


def test_owned_async_vector_env_closes_after_a_worker_died(caplog):
    import logging
    import os
    import signal

    from ivt_env.wrappers import close_vector_env

    # Gymnasium's own close raises on a dead worker and leaves the others running: the behaviour we guard against
    vec = _async_vec()
    vec.reset(seed=0)
    os.kill(vec.processes[1].pid, signal.SIGKILL)
    vec.processes[1].join(5)
    with pytest.raises((BrokenPipeError, EOFError, ConnectionError)):
        vec.close()
    lingering = [p for p in vec.processes if p.is_alive()]
    assert lingering  # workers 0 and 2 never got joined
    close_vector_env(vec)  # the robust close also mops up after a failed plain close
    assert not any(p.is_alive() for p in vec.processes)

    # a Collector that owns the vector env closes it without raising and stops every worker
    vec = _async_vec()
    collector = Collector(vec, own_envs=True)
    trajs = collector.collect(RandomPolicy(), [0, 1, 2], group_size=1, seed=0)
    assert len(trajs) == 3
    os.kill(vec.processes[0].pid, signal.SIGKILL)
    vec.processes[0].join(5)
    with caplog.at_level(logging.WARNING, logger="ivt_env.wrappers"):
        collector.close()
    assert not any(p.is_alive() for p in vec.processes) and vec.closed
    assert "close failed" in caplog.text and "-9" in caplog.text
    close_vector_env(vec)  # closing again is a no-op


def test_bad_record_at_reset_is_skipped_counted_and_named(caplog):
    import logging

    from ivt_env.datasets.base import DatasetError, ListDataset, Sample
    from ivt_env.env import GroundingRefineEnv

    calls = {"bad": 0}

    def good(i):
        return lambda: np.full((32, 32, 3), i, np.uint8)

    def bad():
        calls["bad"] += 1
        raise DatasetError("sample s-1: cannot read image /data/s-1.jpg: OSError: image file is truncated")

    samples = [Sample(f"s-{i}", f"thing {i}", (4.0, 4.0, 20.0, 20.0), 32, 32, "t", bad if i == 1 else good(i))
               for i in range(4)]
    samples.append(Sample("s-4", "x" * 5000, (4.0, 4.0, 20.0, 20.0), 32, 32, "t", good(4)))  # over the env's limit
    ds = ListDataset(samples)
    for make in (lambda: [GroundingRefineEnv(ds, max_refine_steps=1) for _ in range(3)],
                 lambda: gym.vector.SyncVectorEnv([lambda: GroundingRefineEnv(ds, max_refine_steps=1)] * 3)):
        calls["bad"] = 0
        collector = Collector(make())
        with caplog.at_level(logging.WARNING, logger="rollouts.collector"):
            caplog.clear()
            trajs = collector.collect(RandomPolicy(), [0, 1, 2, 4, 3], group_size=2, seed=0)
        assert [t.sample_id for t in trajs] == ["s-0", "s-0", "s-2", "s-2", "s-3", "s-3"]
        assert [t.group_id for t in trajs] == [0, 0, 2, 2, 4, 4]
        assert [(s["index"], s["error"].split(":")[0]) for s in collector.last_skipped] == [(1, "DatasetError"),
                                                                                            (4, "DatasetError")]
        assert "/data/s-1.jpg" in collector.last_skipped[0]["error"]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2 and "/data/s-1.jpg" in lines[0] and "expression longer" in lines[1]
        if hasattr(collector.slots, "envs"):  # list slots name the sample id too
            assert "(s-1)" in lines[0]
        # a later call skips the known-bad samples without loading them again, and counts them again
        caplog.clear()
        n_bad = calls["bad"]
        trajs = collector.collect(RandomPolicy(), [1, 0], group_size=1, seed=0)
        assert [t.sample_id for t in trajs] == ["s-0"] and [s["index"] for s in collector.last_skipped] == [1]
        assert calls["bad"] == n_bad and not caplog.records
        collector.close()


def test_skipped_loader_record_is_named_with_its_file(tmp_path, caplog):
    import logging

    from ivt_env.datasets.images import FileImage
    from ivt_env.datasets.records import RawRecord, RecordDataset
    from ivt_env.env import GroundingRefineEnv
    from tests.ivt_env.datasets import fixtures as fx

    recs = []
    for i in range(2):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(fx.image_bytes(64, 48, (8, 8, 24, 24)))
        recs.append(RawRecord(f"rec-{i}", "the red box", (8, 8, 24, 24), FileImage(str(p)), 64, 48))
    ds = RecordDataset(recs, "files", "test")
    data = (tmp_path / "img1.jpg").read_bytes()
    (tmp_path / "img1.jpg").write_bytes(data[: len(data) // 3])  # damaged after loading
    collector = Collector([GroundingRefineEnv(ds, max_refine_steps=0)])
    with caplog.at_level(logging.WARNING, logger="rollouts.collector"):
        trajs = collector.collect(RandomPolicy(), [0, 1], seed=0)
    assert [t.sample_id for t in trajs] == ["rec-0"]
    line = caplog.records[-1].getMessage()
    assert f"(rec-1, image {tmp_path / 'img1.jpg'})" in line and "truncated" in line.lower()
