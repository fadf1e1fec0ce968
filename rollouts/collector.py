"""Collect groups of trajectories: N per sample, all advancing in lock-step so a batched policy sees full batches.

Work is the list of (sample, group member) pairs in order (sample-major: the N members of a group are adjacent).
It is cut into batches of B = number of env slots; each batch resets its slots to their samples
(``options={"index": i}``), then calls ``policy.act`` ONCE per step for all running trajectories of the batch
(across trajectories and samples) and steps every env with its text. An IVT episode always has T+1 steps, so a
batch runs exactly T+1 policy calls of size B (at most T+1 with stopping: see below).

Env sources: a gymnasium ``VectorEnv`` (``gymnasium.make_vec``; B = ``num_envs``), a list of envs (B = its
length), a single env (B = 1), an env id or an env factory (B = ``num_envs``, default ``4 * group_size``).
Per-env samples in a vector env come from masked resets (``options["reset_mask"]``), one per distinct sample.

Before a policy sees ``infos[i]`` the collector adds ``group_member`` (0..N-1), ``group_id`` and ``max_steps``
(T, when the env exposes ``max_refine_steps``). Each :class:`~rollouts.types.Step` gets the policy's text and token
fields, the env's parsed box / validity / IoU / reward and, with ``keep_observations=True``, the observation image
the policy saw at that step.

Adaptive refinement: an env with ``allow_stop`` ends a trajectory early (``terminated``); the trajectory leaves the
batch and the next ``act`` call sees only the running ones (fewer steps, trajectories of different lengths);
``meta["allow_stop"]`` is then True. ``reset_options`` (``{sample index: options}``, e.g. ``{"start_box": [...]}``)
are merged into each reset of that sample; a reset that reports step 0 itself (``info["start_box"]``: the env took
the given box as step 0's prediction) is recorded as step 0, with the box as its text, ``extra["start_box"]`` True
and reward 0, and the policy's first call is at step 1 with that output in its history.

Bad records met at reset: a sample whose reset raises :class:`~ivt_env.datasets.base.DatasetError` (an image that
cannot be decoded, an expression over the env's limit: what the loader's checks could not catch) is SKIPPED with its
whole group, counted in ``Collector.last_skipped`` / ``Collector.skipped`` and logged once (one WARNING line naming
the sample id and the error, which names the file); the collection goes on with the other samples, and later calls
skip that index without trying it again. Skipping needs envs that survive a failed reset: a list of envs, an env, a
``SyncVectorEnv``; Gymnasium's ``AsyncVectorEnv`` stops a worker on any error, so there the error ends the run.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import gymnasium as gym
import numpy as np

from ivt_env.datasets.base import DatasetError
from ivt_env.wrappers import close_vector_env
from rollouts.policy import Policy, PolicyOutput, SamplingParams
from rollouts.types import Step, Trajectory

EnvSource = Union[gym.Env, gym.vector.VectorEnv, Sequence[gym.Env], Callable[[], gym.Env], str]
_RESET_VECTOR_ENVS: "weakref.WeakSet" = weakref.WeakSet()  # vector envs whose every slot holds an observation
log = logging.getLogger(__name__)


class _ResetFailed(Exception):
    """The reset to sample ``index`` raised a DatasetError (a bad record): the collector skips that sample."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(index, error)
        self.index, self.error = index, error


def _after_failed_reset(env: Any) -> None:
    """Gymnasium's PassiveEnvChecker (``gym.make`` adds it) compares the first step with the first reset's data; when
    that first reset raised there is none, and the next steps would fail on ``None``: skip those comparisons."""
    while env is not None:
        if hasattr(env, "checked_step") and getattr(env, "_previous_data", True) is None:
            env.checked_step = env.checked_data_reuse = True
        env = getattr(env, "env", None)


def _sample_id(env: Any, index: int) -> Optional[str]:
    """``"id"`` or ``"id, image FILE"`` of sample ``index`` (the loaders' samples know their file)."""
    try:
        dataset = env.unwrapped.dataset
        sid = str(dataset.sample_ids[index])
    except Exception:  # noqa: BLE001 - only used to name the record in a log line
        return None
    try:
        ref = getattr(dataset[index].load_image, "ref", None)
        return f"{sid}, image {ref.describe()}" if ref is not None else sid
    except Exception:  # noqa: BLE001
        return sid


def _py(v: Any) -> Any:
    """numpy scalars/arrays from a vector env's info -> plain Python values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def unbatch_info(info: dict, i: int) -> dict:
    """Env ``i``'s info dict from a vector env's dict of arrays with ``_key`` masks (recursively)."""
    out = {}
    for k, v in info.items():
        if k.startswith("_"):
            continue
        mask = info.get("_" + k)
        if mask is not None and not mask[i]:
            continue
        out[k] = unbatch_info(v, i) if isinstance(v, dict) else _py(v[i])
    return out


def _unbatch_obs(obs: Any, i: int) -> Any:
    if isinstance(obs, dict):
        return {k: _unbatch_obs(v, i) for k, v in obs.items()}
    return obs[i]


class _ListSlots:
    """B independent envs."""

    def __init__(self, envs: Sequence[gym.Env], owned: bool):
        self.envs, self.owned = list(envs), owned
        self.n = len(self.envs)
        self.max_steps = getattr(self.envs[0].unwrapped, "max_refine_steps", None)

    def reset(self, items: list[tuple[int, int]], seeds: list[Optional[int]],
              extra: Optional[dict] = None) -> tuple[list, list]:
        obs, infos = [], []
        for slot, (index, _) in enumerate(items):
            try:
                o, info = self.envs[slot].reset(seed=seeds[slot], options={"index": index, **(extra or {}).get(index, {})})
            except DatasetError as e:
                _after_failed_reset(self.envs[slot])
                raise _ResetFailed(index, e) from e
            obs.append(o)
            infos.append(info)
        return obs, infos

    def step(self, actions: dict[int, str]) -> dict[int, tuple]:
        return {slot: self.envs[slot].step(text) for slot, text in actions.items()}

    def local_env(self) -> Optional[gym.Env]:
        return self.envs[0]

    def dataset_size(self) -> Optional[int]:
        return _len_or_none(getattr(self.envs[0].unwrapped, "dataset", None))

    def close(self) -> None:
        if self.owned:
            for env in self.envs:  # one failing close must not leave the others open
                close_vector_env(env)


class _VectorSlots:
    """A gymnasium vector env; slots without work (last, partial batch) replay the batch's first sample."""

    def __init__(self, vec: gym.vector.VectorEnv, owned: bool = False):
        self.owned = owned
        mode = getattr(vec, "autoreset_mode", None) or vec.metadata.get("autoreset_mode")
        if mode is not None and getattr(mode, "name", str(mode)) == "SAME_STEP":
            raise ValueError("collect_groups: vector envs with autoreset_mode SAME_STEP are not supported "
                             "(use NEXT_STEP, the default, or DISABLED)")
        self.vec, self.n = vec, vec.num_envs
        try:
            self.max_steps = vec.get_attr("max_refine_steps")[0]
        except Exception:  # noqa: BLE001 - an env without the attribute simply gives no T to the policy
            self.max_steps = None

    def reset(self, items: list[tuple[int, int]], seeds: list[Optional[int]],
              extra: Optional[dict] = None) -> tuple[list, list]:
        indices = [items[s][0] if s < len(items) else items[0][0] for s in range(self.n)]
        extra = extra or {}
        infos: list = [None] * self.n
        if self.vec not in _RESET_VECTOR_ENVS:
            # masked resets need every slot to hold an observation already: one full reset first
            try:
                obs, info = self.vec.reset(seed=list(seeds), options={"index": indices[0], **extra.get(indices[0], {})})
            except DatasetError as e:
                raise _ResetFailed(indices[0], e) from e
            _RESET_VECTOR_ENVS.add(self.vec)
            infos = [unbatch_info(info, s) for s in range(self.n)]
            seeds = [None] * self.n
        todo = [s for s in range(self.n) if infos[s] is None or indices[s] != indices[0]]
        for index in dict.fromkeys(indices[s] for s in todo):  # one masked reset per distinct sample
            mask = np.array([s in todo and indices[s] == index for s in range(self.n)], dtype=np.bool_)
            try:
                obs, info = self.vec.reset(seed=[seeds[s] if mask[s] else None for s in range(self.n)],
                                           options={"index": index, "reset_mask": mask, **extra.get(index, {})})
            except DatasetError as e:
                raise _ResetFailed(index, e) from e
            for s in np.flatnonzero(mask):
                infos[s] = unbatch_info(info, int(s))
        return [_unbatch_obs(obs, s) for s in range(self.n)], infos

    def step(self, actions: dict[int, str]) -> dict[int, tuple]:
        obs, rew, term, trunc, info = self.vec.step(tuple(actions.get(s, "") for s in range(self.n)))
        return {s: (_unbatch_obs(obs, s), float(rew[s]), bool(term[s]), bool(trunc[s]), unbatch_info(info, s))
                for s in actions}

    def local_env(self) -> Optional[gym.Env]:
        return getattr(self.vec, "envs", [None])[0]  # SyncVectorEnv holds its envs; AsyncVectorEnv does not

    def dataset_size(self) -> Optional[int]:
        try:
            return _len_or_none(self.vec.get_attr("dataset")[0])
        except Exception:  # noqa: BLE001 - an env without a dataset attribute
            return None

    def close(self) -> None:
        if self.owned:  # robustly: an async env with a dead worker must not leave the other workers running
            close_vector_env(self.vec)


def _len_or_none(dataset: Any) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None


def _as_output(o: Any, where: str) -> PolicyOutput:
    if isinstance(o, PolicyOutput):
        return o
    if isinstance(o, str):
        return PolicyOutput(text=o)
    raise TypeError(f"{where}: policy.act must return PolicyOutput objects (or strings), got {type(o).__name__}")


def _list_or_none(v: Any) -> Optional[list[float]]:
    return None if v is None else list(v)


class Collector:
    """Holds the env slots across calls (GRPO collects every iteration; datasets load once).

    ``own_envs=True`` hands a given vector env / env / list of envs to the collector: ``close()`` closes them
    (robustly: :func:`ivt_env.wrappers.close_vector_env`). Envs it builds from an id or factory are always its own.
    """

    def __init__(self, envs: EnvSource, num_envs: Optional[int] = None, env_kwargs: Optional[dict] = None,
                 own_envs: bool = False):
        self._explicit_n = num_envs
        if isinstance(envs, gym.vector.VectorEnv):
            self.slots: Any = _VectorSlots(envs, owned=own_envs)
        elif isinstance(envs, gym.Env):
            self.slots = _ListSlots([envs], owned=own_envs)
        elif isinstance(envs, (list, tuple)):
            if not envs or not all(isinstance(e, gym.Env) for e in envs):
                raise TypeError("collect_groups: a list of envs must be non-empty and hold gymnasium.Env objects")
            self.slots = _ListSlots(envs, owned=own_envs)
        elif isinstance(envs, str) or callable(envs):
            self.slots = None  # built lazily once the batch size is known
            kwargs = dict(env_kwargs or {})
            self._factory = (lambda: gym.make(envs, **kwargs)) if isinstance(envs, str) else envs
        else:
            raise TypeError(f"collect_groups: cannot collect from a {type(envs).__name__}; give a vector env, an env, "
                            "a list of envs, an env id or an env factory")
        #: sample index -> {"index", "sample_id", "error"} of every bad record met so far (skipped ever after)
        self.skipped: dict[int, dict] = {}
        #: the samples the last ``collect`` call skipped (one entry per sample, whatever the group size)
        self.last_skipped: list[dict] = []

    def _ensure(self, n_work: int, group_size: int) -> None:
        if self.slots is None:
            n = self._explicit_n or min(n_work, 4 * group_size)
            self.slots = _ListSlots([self._factory() for _ in range(max(1, n))], owned=True)

    def collect(
        self,
        policy: Policy,
        sample_indices: Iterable[int],
        group_size: int = 1,
        sampling: Optional[SamplingParams] = None,
        seed: Optional[int] = None,
        keep_observations: bool = False,
        progress: bool = False,
        reset_options: Optional[dict[int, dict]] = None,
    ) -> list[Trajectory]:
        """N = ``group_size`` trajectories for each sample index, in order (group k = sample_indices[k]);
        ``reset_options[index]``: extra reset options of that sample (see the module docstring)."""
        self._reset_options = dict(reset_options or {})
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        sampling = sampling or SamplingParams()
        work = [(int(idx), j, k) for k, idx in enumerate(sample_indices) for j in range(group_size)]
        if not work:  # e.g. a sharded evaluation's rank beyond the last sample
            self.last_skipped = []
            return []
        self._ensure(len(work), group_size)
        if seed is not None and hasattr(policy, "seed"):
            policy.seed(seed)
        B = self.slots.n
        self.last_skipped = [self.skipped[i] for i in dict.fromkeys(idx for idx, _, _ in work if idx in self.skipped)]
        work = [w for w in work if w[0] not in self.skipped]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(work), desc="rollouts", unit="traj", dynamic_ncols=True)
        out: list[Trajectory] = []
        try:
            b0 = 0
            while b0 < len(work):
                batch = work[b0 : b0 + B]
                first = seed is not None and b0 == 0
                seeds = [seed + s if first else None for s in range(B)]
                try:
                    out.extend(self._run_batch(policy, batch, sampling, seeds, keep_observations))
                except _ResetFailed as e:  # a bad record: drop its group, run the batch again without it
                    self._skip(e.index, e.error)
                    work = work[:b0] + [w for w in work[b0:] if w[0] != e.index]
                    continue
                b0 += len(batch)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _skip(self, index: int, error: BaseException) -> None:
        envs = getattr(self.slots, "envs", None)
        sid = _sample_id(envs[0], index) if envs else None
        entry = {"index": index, "sample_id": sid, "error": f"{type(error).__name__}: {error}"}
        self.skipped[index] = entry
        self.last_skipped.append(entry)
        log.warning("skipped sample %d%s at reset (a bad record; the run goes on): %s", index,
                    f" ({sid})" if sid else "", entry["error"])

    def _annotate(self, info: dict, item: tuple[int, int, int]) -> dict:
        # in place: envs return a fresh info dict per call, and only keys are added
        info["group_member"], info["group_id"] = item[1], item[2]
        if self.slots.max_steps is not None:
            info.setdefault("max_steps", self.slots.max_steps)
        return info

    def _run_batch(self, policy, batch, sampling, seeds, keep_obs) -> list[Trajectory]:
        obs, infos = self.slots.reset([(idx, j) for idx, j, _ in batch], seeds, getattr(self, "_reset_options", None))
        n = len(batch)
        trajs = []
        for s, (idx, j, k) in enumerate(batch):
            info = infos[s]
            meta = {"index": idx, "group_member": j, "source": info.get("source")}
            if info.get("multi"):  # a multi-box episode: every GT box (pixels) for count errors and HIoU
                meta["gt_boxes"] = [list(b) for b in info["gt_boxes"]]
            if info.get("allow_stop"):
                meta["allow_stop"] = True
            trajs.append(Trajectory(sample_id=str(info["sample_id"]), dataset=str(info.get("dataset", "")),
                                    expression=str(obs[s]["expression"]), gt_box=_list_or_none(info["gt_box"]),
                                    width=int(info["width"]), height=int(info["height"]), group_id=k, meta=meta))
        cur_obs = obs[:n]
        cur_infos = [self._annotate(infos[s], batch[s]) for s in range(n)]
        histories: list[list[PolicyOutput]] = [[] for _ in range(n)]
        for s in range(n):
            if cur_infos[s].get("start_box"):  # the env took a given box as step 0 (reset option start_box)
                self._record_start(trajs[s], histories[s], cur_infos[s], cur_obs[s], keep_obs)
        active = list(range(n))
        while active:
            outs = policy.act([cur_obs[s] for s in active], [histories[s] for s in active],
                              [cur_infos[s] for s in active], sampling)
            if len(outs) != len(active):
                raise ValueError(f"policy {type(policy).__name__}.act returned {len(outs)} outputs for {len(active)} "
                                 "observations")
            outs = [_as_output(o, type(policy).__name__) for o in outs]
            results = self.slots.step({s: o.text for s, o in zip(active, outs)})
            still = []
            for s, o in zip(active, outs):
                o_next, reward, term, trunc, info = results[s]
                steps = trajs[s].steps
                steps.append(Step(
                    t=len(steps), text=o.text, valid=bool(info["valid"]), iou=float(info["iou"]), reward=float(reward),
                    box_norm=_list_or_none(info.get("box_norm")), box=_list_or_none(info.get("box")),
                    reason=info.get("reason"), token_ids=o.token_ids, logprobs=o.logprobs,
                    boxes_norm=[list(b) for b in info["step_boxes_norm"]] if "step_boxes_norm" in info else None,
                    injected_ids=o.injected_ids, observation=cur_obs[s]["image"] if keep_obs else None,
                    extra=dict(o.extra) if o.extra else {}, temperature=o.temperature,
                ))
                histories[s].append(o)
                if not (term or trunc):
                    cur_obs[s], cur_infos[s] = o_next, self._annotate(info, batch[s])
                    still.append(s)
            active = still
        return trajs

    @staticmethod
    def _record_start(traj: Trajectory, history: list, info: dict, obs: dict, keep_obs: bool) -> None:
        from ivt_env.boxes import format_box

        out = PolicyOutput(text=format_box(info["box_norm"]), extra={"start_box": True})
        traj.steps.append(Step(t=0, text=out.text, valid=True, iou=float(info["iou"]), reward=0.0,
                               box_norm=_list_or_none(info["box_norm"]), box=_list_or_none(info["box"]),
                               observation=info.get("start_image") if keep_obs else None, extra={"start_box": True}))
        traj.meta["start_box"] = _list_or_none(info["box"])
        history.append(out)

    def local_env(self) -> Optional[gym.Env]:
        """One env of this process (to re-render a sample), or None when the envs live in worker processes."""
        return self.slots.local_env()

    def dataset_size(self) -> Optional[int]:
        """Samples in the envs' dataset (None when the env exposes no dataset)."""
        return self.slots.dataset_size()

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()


def collect_groups(
    env_fn_or_vector_env: EnvSource,
    policy: Policy,
    sample_indices: Iterable[int],
    group_size: int = 1,
    sampling: Optional[SamplingParams] = None,
    seed: Optional[int] = None,
    keep_observations: bool = False,
    progress: bool = False,
    num_envs: Optional[int] = None,
    env_kwargs: Optional[dict] = None,
    reset_options: Optional[dict[int, dict]] = None,
) -> list[Trajectory]:
    """One-shot collection (see the module docstring); envs built here from an id/factory are closed after."""
    collector = Collector(env_fn_or_vector_env, num_envs=num_envs, env_kwargs=env_kwargs)
    try:
        return collector.collect(policy, sample_indices, group_size, sampling, seed, keep_observations, progress,
                                 reset_options=reset_options)
    finally:
        collector.close()
