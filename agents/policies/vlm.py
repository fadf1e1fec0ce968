"""The VLM policy: a Qwen-VL model (Qwen3-VL, Qwen2.5-VL, Qwen2-VL) driving the IVT env, trainable by BC and GRPO.

Public API (other modules call these)::

    policy = VLMPolicy.from_pretrained(path, lora=LoraSettings(rank=64, alpha=128), load_in_4bit=False,
                                       device=None, dtype=None, prompts=None, full_finetune=False,
                                       gradient_checkpointing=False, seed=None, image_resolver=None,
                                       reference="initial")
    outs = policy.act(observations, histories, infos, sampling)   # list[PolicyOutput], batched + KV cache
    tl = policy.token_logprobs(trajectories, reference=False, grad=True)  # TokenLogprobs (B, G)
    #  token_logprobs / bc_loss / encode_trajectory need each step's image: collect with keep_observations=True,
    #  or give Step.image_path / meta["image_path"] / meta["image"] / an image_resolver (agents.policies.logprobs)
    loss, n = policy.bc_loss(trajectories)                         # mean CE over generated tokens
    enc = policy.encode_trajectory(traj)                           # EncodedTrajectory (ids, labels -100, images)
    policy.trainable_parameters(); policy.train(); policy.eval(); policy.save(directory)

``act`` works on lock-step batches (rollouts.collector): at step 0 (empty histories) it starts a new engine batch,
at step t it checks that ``histories`` continue that batch and appends the overlay image + instruction to the KV
cache (see :mod:`agents.policies.engine`). Per step the :class:`PolicyOutput` carries ``token_ids`` (generated),
``logprobs`` (``log_softmax(logits / T)`` of each generated token at the step's sampling temperature T, 1 for
greedy; ``temperature`` records T), ``injected_ids`` (what was put in context
before generating) and ``extra`` (``stop``: box | eos | length; for absolute-pixel models ``raw_text``, the
model's own text, while ``text`` given to the env has its boxes converted to [0, 1000]).

Training: LoRA via peft on the language model's q/k/v/o/gate/up/down projections (IVT: r 64, alpha 128). The
reference policy (GRPO's KL term) is the policy AS LOADED, with no second copy of the model weights:

- a new adapter on a base model: the same model under ``disable_adapter()`` (== the base model exactly);
- a saved adapter (e.g. the SFT checkpoint, IVT: "KL regularization against the SFT checkpoint"): a frozen second
  copy of the ADAPTER only (peft adapter "reference"), switched in for reference forwards;
- full fine-tuning: a frozen copy of the model as loaded.
``reference="base"`` makes a loaded adapter's reference the base model instead. 4-bit NF4 via bitsandbytes
(``load_in_4bit=True``) with the CPU AVX512-BF16 guard of DESIGN.md; gradient checkpointing; bf16 on GPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ivt_env.atomic import atomic_dir
from agents.policies.base import BCLossOptions, PolicyOutput, SamplingParams, TokenLogprobs, TrainablePolicy
from agents.policies.engine import LogitFilter, RolloutEngine
from agents.policies.logprobs import (IGNORE, EncodedTrajectory, ImageResolver, NumberSmoothing, encode_trajectory,
                                      mask_targets, number_token_ids, teacher_forced)
from agents.policies.vision import fast_vision
from agents.policies.vlm_processor import load_processor
from agents.policies.vlm_setup import (
    LoraSettings,
    bnb_4bit_config,
    default_device,
    disable_bnb_cpu_bf16_repack,
    lora_config,
    resolve_dtype,
)
from agents.policies.vlm_prompt import PromptConfig, PromptLayout, load_prompts, mm_token_types

REFERENCE_ADAPTER = "reference"  # peft adapter name of the frozen reference (a loaded adapter's initial weights)
POLICY_FILE = "ivt_policy.json"  # what save() records next to the weights (base model, prompts)
class VLMPolicy(TrainablePolicy):
    """See the module docstring. Build with :meth:`from_pretrained`."""

    name = "vlm"

    def __init__(self, model: Any, processor: Any, prompts: PromptConfig, *, base_path: str, lora: bool,
                 full_finetune: bool, load_in_4bit: bool, image_resolver: Optional[ImageResolver] = None,
                 reference_adapter: Optional[str] = None, reference: str = "initial") -> None:
        self.model = model  # the peft model when LoRA is on, else the transformers model
        self.hf_model = model.get_base_model() if lora else model  # *ForConditionalGeneration (LoRA layers inside)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompts = prompts
        self.base_path = base_path
        self.uses_lora = lora
        self.full_finetune = full_finetune
        self.load_in_4bit = load_in_4bit
        self.image_resolver = image_resolver
        self.reference_adapter = reference_adapter  # peft adapter name of the frozen reference, if any
        self.model_type = self.hf_model.config.model_type
        fast_vision(self.hf_model)  # patch Conv3d as a matmul, batched vision attention (issue 16: same weights)
        self.layout = PromptLayout(processor, prompts, self.model_type)
        self.logit_filter = LogitFilter(len(self.tokenizer), self.layout.placeholder_ids)
        self.engine = RolloutEngine(self.hf_model, self.layout, self.logit_filter)
        self.reference = reference  # initial | base | none (see from_pretrained)
        self._smoothing: Optional[NumberSmoothing] = None  # bc_loss's soft number targets, built on first use
        self.ref_model = None
        self._last: Optional[list] = None  # act()'s last outputs, one per engine row (see _keep_running)
        if full_finetune and reference != "none":  # frozen reference = the weights as loaded (e.g. the SFT model)
            self.ref_model = copy.deepcopy(self.hf_model).eval().requires_grad_(False)
        self.training = False
        self.model.eval()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        lora: Optional[LoraSettings | Mapping[str, Any]] = None,
        load_in_4bit: bool = False,
        device: Optional[str] = None,
        dtype: Any = None,
        prompts: PromptConfig | str | None = None,
        full_finetune: bool = False,
        gradient_checkpointing: bool = False,
        seed: Optional[int] = None,
        image_resolver: Optional[ImageResolver] = None,
        reference: str = "initial",
    ) -> "VLMPolicy":
        """Load a model folder (or hub name in the local cache), or a folder written by :meth:`save`.

        ``path`` holding ``adapter_config.json`` is a saved LoRA policy: its base model (recorded in
        ``ivt_policy.json``) is loaded and the adapter attached, trainable (``lora`` and ``full_finetune`` are
        then ignored: the adapter is continued). ``lora``: add a NEW adapter to a model folder. ``prompts``: a
        :class:`PromptConfig`, a YAML path, or None (the folder's ``prompts.yaml`` if saved there, else
        ``configs/prompts.yaml``). ``device``/``dtype``: default CUDA + bf16
        when available, else CPU + float32. ``seed`` seeds sampling. ``reference``: "initial" (the policy as
        loaded, see the module docstring), "base" (a loaded adapter's reference is the base model) or "none" (no
        reference: behaviour cloning needs none, and full fine-tuning then keeps no frozen copy of the weights).
        ``image_resolver(traj) -> image``: where text-only trajectories get their original image.
        """
        from transformers import AutoModelForImageTextToText

        from agents.policies.model_dir import resolve_model_dir

        path = resolve_model_dir(path, "model")  # best/, checkpoints/iter_N/ as given; a missing folder named
        if isinstance(lora, Mapping):
            lora = LoraSettings(**lora)
        if lora is not None and not lora.enabled:
            lora = None
        if reference not in ("initial", "base", "none"):
            raise ValueError(f"reference must be 'initial', 'base' or 'none', got {reference!r}")
        dev = default_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        info: dict[str, Any] = {}
        if os.path.isfile(os.path.join(path, POLICY_FILE)):
            with open(os.path.join(path, POLICY_FILE)) as f:
                info = json.load(f)
        adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
        if adapter:  # a saved adapter is continued as LoRA (no full fine-tuning of its base, no frozen full copy)
            full_finetune = False
        if full_finetune and (lora is not None or load_in_4bit):
            raise ValueError("full_finetune excludes lora and load_in_4bit")
        base = info.get("base_model") if adapter else path
        if base and os.path.isdir(base):
            base = os.path.abspath(base)
        if adapter and not base:
            with open(os.path.join(path, "adapter_config.json")) as f:
                base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter folder without a base model (no {POLICY_FILE}, no base path)")
        if prompts is None and os.path.isfile(os.path.join(path, "prompts.yaml")):
            prompts = os.path.join(path, "prompts.yaml")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if load_in_4bit:
            kwargs["quantization_config"] = bnb_4bit_config(torch_dtype)
            kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
        try:
            model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
        except OSError as exc:
            raise FileNotFoundError(f"cannot load model {base!r} (for policy {path!r}): {exc}") from exc
        if not load_in_4bit:
            model.to(dev)
        else:
            disable_bnb_cpu_bf16_repack(model)
        processor = load_processor(path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base,
                                   model.config.model_type)
        if gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) without input grads
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # pragma: no cover - older transformers
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.requires_grad_(full_finetune)
        uses_lora = False
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=True)
            if reference == "initial":  # a frozen copy of the loaded adapter weights (small) as the reference
                model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
                model.set_adapter("default")
            uses_lora = True
        elif lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(lora))
            uses_lora = True
        if load_in_4bit:
            disable_bnb_cpu_bf16_repack(model)
        policy = cls(model, processor, load_prompts(prompts), base_path=str(base), lora=uses_lora,
                     full_finetune=full_finetune, load_in_4bit=load_in_4bit, image_resolver=image_resolver,
                     reference_adapter=REFERENCE_ADAPTER if adapter and reference == "initial" else None,
                     reference=reference)
        policy.seed(seed)
        return policy

    # ------------------------------------------------------------------ modes
    @property
    def device(self) -> torch.device:
        return self.hf_model.lm_head.weight.device

    def train(self, mode: bool = True) -> "VLMPolicy":
        """Training mode for :meth:`token_logprobs`/:meth:`bc_loss` (dropout, gradient checkpointing)."""
        self.training = mode
        self.model.train(mode)
        return self

    def eval(self) -> "VLMPolicy":
        return self.train(False)

    def seed(self, seed: Optional[int]) -> None:
        self.engine.seed(seed)

    @contextlib.contextmanager
    def eval_mode(self):
        """Inside: the model in eval mode (no dropout), restored afterwards (for forwards outside act())."""
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------ acting
    def act(self, observations: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[PolicyOutput]],
            infos: Sequence[Mapping[str, Any]], sampling: SamplingParams) -> list[PolicyOutput]:
        """One step for a lock-step batch (see the module docstring)."""
        if len(histories) != len(observations):
            raise ValueError(f"VLMPolicy.act: {len(observations)} observations but {len(histories)} histories")
        steps = {int(o["step"]) for o in observations}
        if len(steps) != 1:
            raise ValueError(f"VLMPolicy.act: the batch must be in lock-step, got steps {sorted(steps)}")
        t = steps.pop()
        for i, h in enumerate(histories):
            if len(h) != t:
                raise ValueError(f"VLMPolicy.act: observation {i} is at step {t} but its history has {len(h)} steps")
        images = [o["image"] for o in observations]
        temp = sampling.temperature(t)
        allow_stop = any(bool(i.get("allow_stop")) for i in infos)  # the env says the policy may stop
        with self.eval_mode():
            if t == 0:
                share = None
                if sampling.branch > 1 and temp > 0:  # siblings: same group, same member // branch
                    share = [(i.get("group_id"), int(i.get("group_member", k)) // sampling.branch)
                             for k, i in enumerate(infos)]
                res = self.engine.start(images, [str(o["expression"]) for o in observations], temp,
                                        sampling.max_new_tokens, sampling.stop_at_box, share=share,
                                        allow_stop=allow_stop)
            else:
                if t == 1 and all(h and (h[0].extra or {}).get("start_box") for h in histories):
                    self._start_given(observations, histories, infos, allow_stop)
                self._keep_running(histories)
                self._check_continues(histories)
                # the env's keep marker (info["keep_marker"], None: off) ends a step that keeps its box
                keep = next(((i.get("keep_marker") or "") for i in infos if "keep_marker" in i), None)
                res = self.engine.refine(images, temp, sampling.max_new_tokens, sampling.stop_at_box,
                                         keep_marker=keep, allow_stop=allow_stop)
        marker = next((i["stop_marker"] for i in infos if i.get("stop_marker")), "<stop>")  # the env's stop text
        outs = []
        for r in res:  # a step the trained stop token ended (prompts.stop_token) carries the env's stop marker
            raw = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
            text = self.layout.to_env_text(raw, r.chunk) + (f" {marker}" if r.stop == "stop" else "")
            extra: dict[str, Any] = {"stop": r.stop}
            if text != raw:
                extra["raw_text"] = raw
            outs.append(PolicyOutput(text=text, token_ids=list(r.token_ids), logprobs=list(r.logprobs),
                                     injected_ids=list(r.injected_ids), extra=extra,
                                     temperature=r.temperature))
        self._last = outs  # the last output of each engine row, in row order (rows that stop are found by it)
        return outs

    def _start_given(self, observations, histories, infos, allow_stop: bool) -> None:
        """Episodes that start from a given box (reset option ``start_box``): the engine encodes the step-0 prompt
        on the original image (``info["start_image"]``) with the given box as step 0's answer."""
        if any(i.get("start_image") is None for i in infos):
            raise ValueError("VLMPolicy.act: episodes from a start box need info['start_image'] (the env's reset info)")
        if self.layout.abs_boxes:
            raise ValueError("VLMPolicy.act: start boxes are not supported for absolute-pixel models (Qwen2.5-VL)")
        self.engine.start_given([i["start_image"] for i in infos], [str(o["expression"]) for o in observations],
                                [h[0].text for h in histories], allow_stop)
        self._last = [h[-1] for h in histories]

    def _keep_running(self, histories: Sequence[Sequence[PolicyOutput]]) -> None:
        """Fewer histories than engine rows: the missing rows' episodes ended (the env stopped them); they leave the
        engine's batch, found by identity of each history's last output with what this policy returned."""
        last = getattr(self, "_last", None)
        if last is None or len(histories) >= len(self.engine.rows) or len(last) != len(self.engine.rows):
            return
        where = {id(o): r for r, o in enumerate(last)}
        index = [where.get(id(h[-1])) for h in histories]
        if any(r is None for r in index) or len(set(index)) != len(index):
            raise ValueError(f"VLMPolicy.act: {len(histories)} histories do not continue rows of the engine's batch of "
                             f"{len(self.engine.rows)} (their last outputs are not the ones this policy returned)")
        self.engine.keep(index)
        self._last = [last[r] for r in index]

    def _check_continues(self, histories: Sequence[Sequence[PolicyOutput]]) -> None:
        rows = self.engine.rows
        if len(rows) != len(histories) or self.engine.step != len(histories[0]):
            raise ValueError(
                f"VLMPolicy.act: histories ({len(histories)} rows at step {len(histories[0])}) do not continue the "
                f"engine's batch ({len(rows)} rows at step {self.engine.step}); the VLM policy needs lock-step "
                "batches that start with step-0 observations"
            )
        for i, (row, hist) in enumerate(zip(rows, histories)):
            for s, (mine, theirs) in enumerate(zip(row.steps, hist)):
                if theirs.token_ids is not None and list(theirs.token_ids) != mine.token_ids:
                    raise ValueError(f"VLMPolicy.act: histories[{i}][{s}] holds other token ids than this policy "
                                     "generated for that row (reordered or foreign batch)")

    # ------------------------------------------------------------------ training
    def encode_trajectory(self, traj: Any) -> EncodedTrajectory:
        """The full training sequence of ``traj`` in the inference layout (labels -100 on injected tokens)."""
        return encode_trajectory(traj, self.layout, self.image_resolver)

    def encoding_cache(self):
        """Context manager: inside it every chunk (image + text -> ids, pixel values) is encoded once and reused
        (:meth:`PromptLayout.caching`): GRPO wraps each iteration in it, so the update's policy and reference
        passes reuse the rollout's encodings instead of running the image processor again."""
        return self.layout.caching()

    @contextlib.contextmanager
    def _reference_context(self):
        """Forward passes inside run the reference policy (see the module docstring)."""
        if self.reference_adapter is not None:
            active = self.model.active_adapter
            grads = {id(p): p.requires_grad for p in self.model.parameters()}
            self.model.set_adapter(self.reference_adapter, inference_mode=True)
            try:
                yield
            finally:  # set_adapter toggles requires_grad: restore exactly what it was
                self.model.set_adapter(active)
                for p in self.model.parameters():
                    p.requires_grad_(grads[id(p)])
        elif self.uses_lora:
            with self.model.disable_adapter():
                yield
        else:
            yield

    def token_logprobs(
        self, trajectories: Sequence[Any], *, reference: bool = False, grad: bool = True
    ) -> TokenLogprobs:
        """Teacher-forced log-probs and entropies of the generated tokens (B, G), right-padded, with ``mask``, each
        token scored at its step's sampling temperature (``Step.temperature``; 1 for greedy or unknown), as the
        rollout scored it. ``reference=True``: the frozen reference (adapter disabled / frozen copy) at the same
        temperatures (the KL term compares like with like), never with grad; its ``entropy`` is zeros (unused)."""
        if reference and self.reference == "none":
            raise ValueError("token_logprobs(reference=True): this policy was loaded with reference='none' (no "
                             "frozen reference); load it with reference='initial' or 'base' for a KL term")
        encoded = [self.encode_trajectory(t) for t in trajectories]
        if reference:
            model = self.ref_model if self.ref_model is not None else self.hf_model
            with torch.no_grad(), self._reference_context(), self.eval_mode():
                lp, ent, mask = teacher_forced(model, encoded, self.layout.pad_id, self.logit_filter,
                                               temperature=True, entropy=False)
        else:
            with torch.set_grad_enabled(grad):
                lp, ent, mask = teacher_forced(self.hf_model, encoded, self.layout.pad_id, self.logit_filter,
                                               temperature=True)
        return TokenLogprobs(logprobs=lp, entropy=ent, mask=mask)

    def bc_loss(self, trajectories: Sequence[Any], options: Optional[BCLossOptions] = None,
                encoded: Optional[Sequence[EncodedTrajectory]] = None) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the generated tokens of ``trajectories`` and their count. ``options.number_sigma``
        > 0: whole-number tokens get Gaussian soft targets of that width (:class:`.number_targets.NumberSmoothing`).
        ``options.clone_start=False``: step 0 of a trajectory WITH refinement steps is context only (labels -100),
        e.g. when a scripted student wrote it and it is not the model's own answer; single-step samples still train.
        ``options.last_step_only``: only each trajectory's last step is a target (GRPO teacher guidance).
        ``options.clone_start_numbers=False``: step 0's number tokens (its box) are context only (issue 14).
        ``encoded``: the trajectories' :meth:`encode_trajectory` results made elsewhere (e.g. in the BC data worker,
        :class:`agents.bc.data.Prefetcher`); their labels are modified here."""
        options = options or BCLossOptions()
        number_sigma = options.number_sigma
        if encoded is None:
            encoded = [self.encode_trajectory(t) for t in trajectories]
        elif len(encoded) != len(trajectories):
            raise ValueError(f"bc_loss: {len(encoded)} encoded sequences for {len(trajectories)} trajectories")
        mask_targets(encoded, clone_start=options.clone_start, last_step_only=options.last_step_only,
                     start_number_ids=None if options.clone_start_numbers else number_token_ids(self.tokenizer))
        smoothing = None
        if number_sigma > 0:
            if self._smoothing is None or self._smoothing.sigma != number_sigma:
                self._smoothing = NumberSmoothing(self.tokenizer, number_sigma)
            smoothing = self._smoothing
        lp, _, mask = teacher_forced(self.hf_model, encoded, self.layout.pad_id, self.logit_filter, entropy=False,
                                     smoothing=smoothing)
        n = int(mask.sum())
        if n == 0:
            raise ValueError("bc_loss: the trajectories hold no generated tokens")
        return -(lp * mask).sum() / n, n

    def chat(self, images: Sequence[np.ndarray], prompts: Sequence[str], *, system: Optional[str] = None,
             max_new_tokens: int = 96) -> list[str]:
        """Greedy answers to one-image chat turns outside the IVT loop (``prompts[i]`` about ``images[i]``), in one
        left-padded batch: what a teacher VLM writing reasoning needs (:mod:`agents.synthesis.vlm_reasoner`)."""
        tok = self.tokenizer
        texts = []
        for prompt in prompts:
            msgs = [{"role": "system", "content": system}] if system else []
            msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
            texts.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        side = tok.padding_side
        tok.padding_side = "left"  # batched generation continues every row at the same (last) position
        try:
            inputs = self.processor(text=texts, images=[np.asarray(im) for im in images], padding=True,
                                    return_tensors="pt")
        finally:
            tok.padding_side = side
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "mm_token_type_ids" not in inputs:  # Qwen3-VL's rope index reads the image token positions from it
            inputs["mm_token_type_ids"] = mm_token_types(inputs["input_ids"], self.layout.image_token_id)
        with torch.no_grad(), self.eval_mode():
            out = self.hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=self.layout.pad_id)
        gen = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        return [tok.decode(g, skip_special_tokens=True) for g in gen]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike) -> None:
        """Write the policy to ``directory`` (replaced as a whole): the LoRA adapter (``save_pretrained``) or the
        full model, the tokenizer + image-processor settings, ``prompts.yaml`` and ``ivt_policy.json``.
        :meth:`from_pretrained` loads it back."""
        from agents.common.config import save_yaml

        with atomic_dir(directory) as tmp:
            if self.load_in_4bit and not self.uses_lora:
                raise ValueError("save: a 4-bit model without LoRA has nothing trainable to save")
            if self.uses_lora:
                self.model.save_pretrained(str(tmp), selected_adapters=["default"])
            else:
                self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            self.processor.image_processor.save_pretrained(str(tmp))
            save_yaml(self.prompts, tmp / "prompts.yaml")
            info = {"base_model": self.base_path if self.uses_lora else None, "model_type": self.model_type,
                    "lora": self.uses_lora, "load_in_4bit": self.load_in_4bit}
            (tmp / POLICY_FILE).write_text(json.dumps(info, indent=2))


__all__ = ["IGNORE", "LoraSettings", "VLMPolicy", "disable_bnb_cpu_bf16_repack"]
