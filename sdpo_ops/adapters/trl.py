"""Drop-in replacement for ``trl.experimental.sdpo.SDPOTrainer`` whose loss runs on :func:`sdpo_ops.sdpo_loss`.

Change one import::

    from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer  # was: from trl.experimental.sdpo import ...

Everything but the loss is TRL's (rollouts, rewards, reprompting, EMA/base/live teacher, vLLM, PEFT,
callbacks, metrics). The loss is computed from the models' last hidden states at the completion
positions and their lm_head weights, never from ``[B, T, V]`` logits:

- ``distillation_mode="topk_logits"`` / ``"full_logits"``: the fused divergence (``topk=distillation_topk``
  with ``add_tail=distillation_add_tail``, or the full vocabulary), the clipped IS weight from
  ``old_per_token_logps`` when ``distillation_is_clip`` is set;
- ``"sampled_token"``: TRL's token-level reverse KL from the fused call's target log-probs (student with
  gradient, teacher detached);
- ``distillation_weight < 1``: TRL's clipped policy loss on the same call's target log-probs.

TRL's aggregation is kept exactly: per-sequence token mean, then the mean over sequences, divided by the
gradient-accumulation steps (``num_items_in_batch`` is ignored, as TRL does). The rollout log-probs
(``old_per_token_logps``) come from the same fused path (the student as its own teacher, no gradient).
TRL's metrics are logged, plus ``self_distillation/is_weight_mean``, ``self_distillation/is_clipped_fraction``
and ``self_distillation/topk_mass_mean`` (averaged over the distilled tokens of all processes).

The loss runs inside the student wrapper's forward (TRL's ``_ForwardRedirection``), so DDP synchronises
the gradients and FSDP/ZeRO-3 gather the backbone; the backbones run under the accelerator's autocast, as
the accelerate-wrapped ``model.forward`` TRL calls would, and the head takes autocast's compute dtype.
Under ZeRO-3 the lm_head is gathered with TRL's ``maybe_gather_lm_head_ctx`` and a copy is held until
backward (the fused loss recomputes logits there); FSDP2 DTensor heads are gathered with ``full_tensor``.
With ``use_teacher_server=True`` (the vLLM server scores the completions and returns the teacher's own top-k
log-probs) the loss runs on :func:`sdpo_ops.sdpo_loss_from_teacher_topk` from the student's hidden states, with
TRL's weight sync, server request (``_get_teacher_token_logprobs_from_server``), error for a required token the
server did not score, and ``self_distillation/server_logprob_abs_diff`` metric.

Reward functions may also return textual feedback (see :mod:`sdpo_ops.adapters.feedback`): a list of
``{"score", "feedback"}`` dicts or a ``RewardWithFeedback``. The feedback of each completion reaches the
teacher reprompt exactly as a ``privileged_context`` dataset column would (so TRL's
``include_environment_feedback`` and ``environment_feedback_only_without_solution`` apply); it is appended
to the dataset's context when both exist.

TRL internals overridden here (what a TRL upgrade can break): ``SDPOTrainer.compute_loss``,
``SDPOTrainer._compute_rollout_logps``, ``SDPOTrainer._calculate_rewards`` (wraps the reward functions,
then calls TRL's), ``SuccessfulRolloutTeacherContextBuilder.build`` (merges the feedback, then calls TRL's),
``SDPOTrainer._setup_teacher_model`` (calls TRL's, then swaps its ``PEFTAdapterEMACallback`` for ours),
``Trainer.train`` and ``Trainer._save_checkpoint`` (the teacher file, then transformers' own).
Used, not overridden: ``_get_teacher_context_for_self_distillation``, ``teacher_model``, ``model_kwarg_keys``,
``_get_teacher_token_logprobs_from_server``, ``vllm_generation.sync_weights``, ``_last_loaded_step``,
``current_gradient_accumulation_steps``, ``_metrics``, ``_log_self_distillation_metric``,
``trl.models.utils._ForwardRedirection``, ``trl.trainer.utils.maybe_gather_lm_head_ctx``.

Where it differs from TRL's trainer (README, "In TRL"):

- checkpoints carry the EMA teacher (:mod:`sdpo_ops.adapters.trl_teacher`: ``sdpo_teacher.safetensors`` in each
  checkpoint folder, restored before the first resumed step; TRL rebuilds it from the base model), and the LoRA
  EMA teacher works under FSDP2 (TRL's ``PEFTAdapterEMACallback`` fails on DTensor shards);
- under autocast on CPU the fused head keeps fp32 operands, so its logits stay fp32 where TRL's lm_head rounds
  them to bf16 (on CUDA the kernels keep fp32 logits from bf16 operands);
- configs TRL accepts but fails on after a rollout (or silently misreads) are rejected in ``__init__``.

Heads that scale or softcap their logits (Gemma 2, Cohere, Granite, ...) are trained exactly: the transform is
read from the model config as TRL's ``add_fused_lm_head`` reads it (:mod:`sdpo_ops.adapters.heads`) and applied
inside the fused loss. PEFT adapters on the lm_head and prompt-learning PEFT are refused with an error: the fused
loss would silently optimise another objective. So is a transform the config does not declare, caught at the first
step by comparing the model's own logits with the fused head's (backbone, lm_head, declared transform), in eval
mode from one seed (dropout cannot make them differ).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    import trl
    from accelerate.utils import is_peft_model
    from packaging.version import Version
    from trl.experimental.sdpo import SDPOConfig
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer as _TRLSDPOTrainer
    from trl.experimental.sdpo.sdpo_trainer import SuccessfulRolloutTeacherContextBuilder
    from trl.experimental.sdpo.teacher_sync import PEFTAdapterEMACallback
    from trl.models.utils import _ForwardRedirection
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f'sdpo_ops.adapters.trl needs TRL >= 1.16 ({error}); install it with: pip install "sdpo-ops[trl]"'
    ) from error

if Version(trl.__version__) < Version("1.16"):  # pragma: no cover
    raise ImportError(
        f'sdpo_ops.adapters.trl needs TRL >= 1.16, found {trl.__version__}; upgrade with: pip install "sdpo-ops[trl]"'
    )

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from sdpo_ops import sdpo_loss, sdpo_loss_from_teacher_topk
from sdpo_ops.adapters import trl_teacher
from sdpo_ops.adapters.feedback import split_scores_and_feedback
from sdpo_ops.adapters.heads import (
    HEAD_CHECK_SEED,
    LogitTransform,
    head_check_mode,
    refuse_unreproduced_logits,
    shared_logit_transform,
)

__all__ = ["SDPOConfig", "SDPOTrainer"]


def _transformers_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside an (accelerate-unwrapped) model, below any PEFT wrapper."""
    if is_peft_model(model):
        # PeftModel -> LoraModel (tuner) -> the transformers model, whose layers carry the adapters in place.
        return model.base_model.model
    return model


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that outputs the last hidden state (the model without its lm_head)."""
    causal_lm = _transformers_model(model)
    backbone = getattr(causal_lm, "base_model", None)
    if backbone is None or backbone is causal_lm:
        raise ValueError(
            f"{type(causal_lm).__name__} exposes no backbone through `base_model` (its `base_model_prefix` is "
            f"{getattr(causal_lm, 'base_model_prefix', None)!r}); sdpo_ops.adapters.trl needs the hidden states "
            "before the lm_head"
        )
    return backbone


def _fused_result(output, reduced_loss, per_token_loss, loss_mask: Tensor, device) -> dict[str, Tensor]:
    """What the loss step reads from one fused call (``SDPOOutput``), the shape both teacher kinds share."""
    result = {
        "reduced_loss": reduced_loss,
        "per_token_loss": per_token_loss,
        "target_logprobs": output.target_logprobs,
        "topk_mass": output.topk_mass,
        "loss_mask": loss_mask.to(device),
    }
    if output.is_weight is not None:
        result["is_weight"] = output.is_weight
    return result


def _full_shape(tensor: Tensor) -> torch.Size:
    """A tensor's whole shape: a ZeRO-3 partitioned parameter is an empty (or flat) tensor carrying it in ds_shape."""
    return getattr(tensor, "ds_shape", None) or tensor.shape


def _lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the model's output projection (possibly ZeRO-3 partitioned)."""
    head = _transformers_model(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or len(_full_shape(weight)) != 2:
        raise ValueError(
            f"the output embeddings of {type(model).__name__} are {type(head).__name__}, not a linear layer with a "
            "[V, H] weight; sdpo_ops.adapters.trl needs a plain lm_head"
        )
    return weight, getattr(head, "bias", None)


def _check_model_is_supported(model: nn.Module, role: str) -> None:
    """Refuse models whose logits the fused loss would compute wrongly."""
    if is_peft_model(model):
        from peft import PromptLearningConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(model.get_output_embeddings(), BaseTunerLayer):
            raise ValueError(
                f"a PEFT adapter on the {role}'s lm_head is not supported: the fused loss reads lm_head.weight "
                "directly, so the adapter would be ignored and never trained. Remove 'lm_head' from target_modules."
            )
        if any(isinstance(config, PromptLearningConfig) for config in model.peft_config.values()):
            raise ValueError(
                f"prompt-learning PEFT methods (prompt/prefix/P-tuning, on the {role}) are not supported: the fused "
                "loss runs the backbone directly, so the virtual tokens would never be prepended. Use a weight "
                "adapter such as LoRA."
            )


class _HeldCopy(torch.autograd.Function):
    """Identity onto a copy of a gathered ZeRO-3 parameter, still valid once the parameter is re-partitioned.

    The fused loss may read the lm_head weight again in backward (it recomputes logits there), after the
    gather context has released the full weight. The gradient flows to the parameter unchanged, full-size,
    as a fused Liger loss hands it to ZeRO-3.
    """

    @staticmethod
    def forward(ctx, parameter: Tensor) -> Tensor:
        return parameter.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _is_zero3_partitioned(parameter: Tensor) -> bool:
    if not hasattr(parameter, "ds_status"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return parameter.ds_status != ZeroParamStatus.AVAILABLE


@contextlib.contextmanager
def _full_head_tensors(*tensors: Tensor | None):
    """Yield the head tensors whole: FSDP2 DTensors gathered, ZeRO-3 shards gathered and held for backward."""
    full = [t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t for t in tensors]
    partitioned = {id(t) for t in full if t is not None and _is_zero3_partitioned(t)}
    if not partitioned:
        yield full
        return
    # TRL's context gathers each parameter once (the student and teacher heads may be one tied parameter).
    with maybe_gather_lm_head_ctx(*full):
        copies: dict[int, Tensor] = {}
        for t in full:
            if t is not None and id(t) in partitioned and id(t) not in copies:
                copies[id(t)] = _HeldCopy.apply(t)
        yield [copies.get(id(t), t) if t is not None else None for t in full]


class _FeedbackRoutingContextBuilder(SuccessfulRolloutTeacherContextBuilder):
    """TRL's teacher-context builder, fed the reward functions' feedback as extra ``privileged_context``."""

    def build(self, output, prompts, rewards, feedbacks=None):
        reward_feedback = self.trainer._take_reward_feedback()
        if reward_feedback is not None:
            feedbacks = _merge_feedback(feedbacks, reward_feedback, len(prompts))
        return super().build(output, prompts, rewards, feedbacks=feedbacks)


def _merge_feedback(
    dataset_feedback: Sequence[Any] | None, reward_feedback: Sequence[str | None], num_samples: int
) -> list[str | None]:
    """Per sample: the dataset's context and the reward feedback, joined by a blank line; None when neither."""
    if len(reward_feedback) != num_samples:
        raise ValueError(f"reward feedback has {len(reward_feedback)} entries for {num_samples} completions")
    dataset_feedback = [None] * num_samples if dataset_feedback is None else list(dataset_feedback)
    merged = []
    for context, extra in zip(dataset_feedback, reward_feedback, strict=True):
        parts = [text for text in (context, extra) if isinstance(text, str) and text.strip()]
        merged.append("\n\n".join(parts) if parts else None)
    return merged


class _FeedbackCapturingReward:
    """A reward function as TRL calls it: returns the scores, hands the feedback to ``sink``."""

    def __init__(self, reward_func: Callable, sink: list[list[str | None]]):
        self.reward_func = reward_func
        self.sink = sink

    def __call__(self, *args, **kwargs) -> list[float | None]:
        scores, feedback = split_scores_and_feedback(self.reward_func(*args, **kwargs))
        self.sink.append(feedback)
        return scores


_DISTILLATION_MODES = ("sampled_token", "full_logits", "topk_logits")
_TEACHER_MODEL_KINDS = ("ema", "base", "live")


def _validate_config(args: SDPOConfig) -> None:
    """Reject, naming the field, what TRL accepts but would fail on (or silently misread) only after a rollout."""
    if args.distillation_mode not in _DISTILLATION_MODES:
        raise ValueError(f"distillation_mode must be one of {_DISTILLATION_MODES}, got {args.distillation_mode!r}")
    if args.teacher_model_kind not in _TEACHER_MODEL_KINDS:
        # TRL treats any unknown kind as a frozen copy of the initial model.
        raise ValueError(f"teacher_model_kind must be one of {_TEACHER_MODEL_KINDS}, got {args.teacher_model_kind!r}")
    if not 0.0 <= args.distillation_alpha <= 1.0:
        raise ValueError(f"distillation_alpha must be in [0, 1], got {args.distillation_alpha}")
    if args.distillation_is_clip is not None and not args.distillation_is_clip > 0:
        raise ValueError(
            f"distillation_is_clip must be > 0 (or None to disable the IS weight), got {args.distillation_is_clip}"
        )
    if not args.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {args.temperature}")
    if args.distillation_mode == "topk_logits":
        if args.distillation_topk is None:
            raise ValueError("distillation_mode='topk_logits' requires distillation_topk to be set")
        _validate_topk(args.distillation_topk, vocab_size=None)
    elif args.distillation_topk is not None:
        warnings.warn(
            f"distillation_topk={args.distillation_topk} is ignored with distillation_mode={args.distillation_mode!r} "
            "(only 'topk_logits' uses it)",
            UserWarning,
            stacklevel=3,
        )


def _validate_topk(topk: Any, vocab_size: int | None) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"distillation_topk must be an int, got {topk!r}")
    upper = "V" if vocab_size is None else f"V={vocab_size} (the rows of the model's lm_head)"
    if topk < 1 or (vocab_size is not None and topk > vocab_size):
        raise ValueError(f"distillation_topk must be in [1, {upper}], got {topk}")


def _declared_logit_transform(student: nn.Module, teacher: nn.Module) -> LogitTransform:
    """The scale/softcap both models' configs declare after the lm_head, applied inside every fused call."""
    return shared_logit_transform(_transformers_model(student), _transformers_model(teacher))


def _vocab_size(model: nn.Module) -> int:
    """V: the rows of the lm_head (its full shape under ZeRO-3 partitioning)."""
    weight, _ = _lm_head(model)
    return int(_full_shape(weight)[0])


class _RestoreTeacherOnTrainBegin(TrainerCallback):
    """Restores the checkpoint's EMA teacher once the model is prepared and the LoRA teacher adapter exists."""

    def __init__(self, trainer: SDPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._restore_teacher_state()


class SDPOTrainer(_TRLSDPOTrainer):
    """``trl.experimental.sdpo.SDPOTrainer`` with the loss fused into the lm_head by :func:`sdpo_ops.sdpo_loss`.

    Same constructor and :class:`SDPOConfig` as TRL's; see the module docstring for what differs.
    """

    def __init__(self, *args, **kwargs):
        config = inspect.signature(_TRLSDPOTrainer.__init__).bind(self, *args, **kwargs).arguments.get("args")
        if config is not None:
            # Before TRL's constructor: it loads the model and may build a teacher copy first.
            _validate_config(config)
        super().__init__(*args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        _check_model_is_supported(student, "student")
        teacher = student
        if self.teacher_model is not self.model:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            _check_model_is_supported(teacher, "teacher")
        self._logit_transform = _declared_logit_transform(student, teacher)
        if self.args.distillation_mode == "topk_logits":
            _validate_topk(self.args.distillation_topk, _vocab_size(student))
        # DDP/FSDP/DeepSpeed hooks fire only through the wrapper's forward: the fused loss runs inside it.
        self._forward_redirection = _ForwardRedirection()
        self.teacher_context_builder = _FeedbackRoutingContextBuilder(self)
        self._pending_reward_feedback: list[str | None] | None = None
        self._head_verified = False
        self._resume_checkpoint: str | None = None
        # After TRL's callbacks (the LoRA EMA one creates the teacher adapter at train begin): restores the teacher.
        self.add_callback(_RestoreTeacherOnTrainBegin(self))

    # Same parameters as TRL's constructor, for help() and IDEs (the body forwards them untouched).
    __init__.__signature__ = inspect.signature(_TRLSDPOTrainer.__init__)

    # ------------------------------------------------------------------------------ teacher checkpoints

    def _setup_teacher_model(self) -> None:
        """TRL's teacher set-up, with TRL's LoRA EMA callback replaced by one that works under FSDP2 and saves."""
        super()._setup_teacher_model()
        self._lora_ema_callback: trl_teacher.LoRAEMATeacherCallback | None = None
        trl_callback = self.pop_callback(PEFTAdapterEMACallback)
        if trl_callback is not None:
            self._lora_ema_callback = trl_teacher.LoRAEMATeacherCallback(
                model=trl_callback.model,
                teacher_adapter_name=trl_callback.teacher_adapter_name,
                update_rate=trl_callback.update_rate,
                sync_steps=trl_callback.sync_steps,
                accelerator=trl_callback.accelerator,
            )
            self.add_callback(self._lora_ema_callback)
            if self.is_deepspeed_enabled:
                # ZeRO-3 must partition the teacher adapter with the rest: it has to exist before the engine.
                self._lora_ema_callback.initialize_teacher_adapter()

    def _teacher_state_kind(self) -> str | None:
        """What a checkpoint must hold for the teacher: None for ``"base"``/``"live"`` (rebuilt identically)."""
        if self.args.teacher_model_kind != "ema":
            return None
        return trl_teacher.EMA_LORA_ADAPTER if self._lora_ema_callback is not None else trl_teacher.EMA_COPY

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """TRL's ``train``; on resume, the EMA teacher saved in the checkpoint is restored before the first step."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._resume_checkpoint = resume_from_checkpoint or None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _save_checkpoint(self, model, trial) -> None:
        # The teacher is written first, so a checkpoint whose trainer state exists has its teacher too.
        kind = self._teacher_state_kind()
        if kind is not None:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            trl_teacher.write_teacher_state(
                folder, self._gather_teacher_state(kind), kind, is_writer=self.args.should_save
            )
        super()._save_checkpoint(model, trial)

    def _gather_teacher_state(self, kind: str) -> dict[str, Tensor]:
        """The teacher's tensors, whole (a collective under FSDP2/ZeRO-3: every rank calls it)."""
        if kind == trl_teacher.EMA_LORA_ADAPTER:
            return self._lora_ema_callback.state_tensors()
        return trl_teacher.gather_model_state(self.accelerator.unwrap_model(self.teacher_model))

    def _restore_teacher_state(self) -> None:
        """On resume: load the checkpoint's teacher (every rank reads the file), or warn that it has none."""
        checkpoint, self._resume_checkpoint = self._resume_checkpoint, None
        kind = self._teacher_state_kind()
        if checkpoint is None or kind is None:
            return
        tensors = trl_teacher.read_teacher_state(checkpoint, kind)
        if (
            tensors is None
            and kind == trl_teacher.EMA_LORA_ADAPTER
            and self._lora_ema_callback.resumed_from_checkpoint_adapter
        ):
            return  # PEFT saved the "teacher" adapter beside the student's, and transformers loaded it
        if tensors is None:
            restarted = "the zero-initialised EMA adapter" if kind == trl_teacher.EMA_LORA_ADAPTER else "the base model"
            warnings.warn(
                f"{checkpoint} has no {trl_teacher.TEACHER_STATE_FILE} (saved by trl's SDPOTrainer, or by an older "
                f"sdpo_ops): the EMA teacher resumes from {restarted}, not from its state at the checkpoint.",
                UserWarning,
                stacklevel=2,
            )
            return
        if kind == trl_teacher.EMA_LORA_ADAPTER:
            self._lora_ema_callback.load_state_tensors(tensors)
        else:
            trl_teacher.load_model_state(self.accelerator.unwrap_model(self.teacher_model), tensors)

    # ----------------------------------------------------------------------------------------- rewards

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's reward computation, with feedback-returning reward functions unwrapped into scores + feedback."""
        feedback_per_function: list[list[str | None]] = []
        original = self.reward_funcs
        self.reward_funcs = [
            func if isinstance(func, nn.Module) else _FeedbackCapturingReward(func, feedback_per_function)
            for func in original
        ]
        try:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = original
        merged: list[str | None] | None = None
        for feedback in feedback_per_function:
            merged = _merge_feedback(merged, feedback, len(prompts))
        self._pending_reward_feedback = merged
        return rewards

    def _take_reward_feedback(self) -> list[str | None] | None:
        feedback, self._pending_reward_feedback = self._pending_reward_feedback, None
        return feedback

    # -------------------------------------------------------------------------------- hidden states

    def _completion_hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, length: int):
        """``[B, length, H]``: the backbone's last hidden states where the last ``length`` tokens are predicted.

        Runs under the accelerator's autocast, as the model's own (accelerate-wrapped) forward would.
        """
        with self.accelerator.autocast():
            hidden = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return hidden.last_hidden_state[:, :-1][:, -length:]

    def _head_dtype(self, hidden: Tensor, weight: Tensor) -> torch.dtype:
        """The dtype of the fused head's operands: the hidden states' without mixed precision; under autocast,
        autocast's on CUDA (the Triton kernels accumulate and keep the logits in fp32), the weight's own (the fp32
        master) elsewhere: torch's CPU bf16 matmul returns bf16 logits, the rounding by which TRL's bf16 run
        strays from its fp32 run (measured: README, "In TRL")."""
        with self.accelerator.autocast():
            if not torch.is_autocast_enabled(hidden.device.type):
                return hidden.dtype
            if hidden.device.type == "cuda":
                return torch.get_autocast_dtype("cuda")
        return weight.dtype

    def _verify_plain_head(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Once: check that backbone + lm_head reproduce the student's own logits (catches undeclared transforms)."""
        if self._head_verified:
            return
        self._head_verified = True
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            expected, actual = self._forward_redirection(
                self.model, model, self._head_check_logits, model, input_ids[:1], attention_mask[:1]
            )
        refuse_unreproduced_logits(
            _transformers_model(model),
            expected,
            actual,
            self._logit_transform,
            alternative="Use trl.experimental.sdpo.SDPOTrainer.",
        )

    def _head_check_logits(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(model's own last logits [V], the declared transform of hidden @ W^T + b [V])`` for one sequence, fp32.

        Two forwards (the model's, and its backbone's as the fused loss runs it) that must not differ by chance: in
        eval mode, each from the same seed, the training's random streams forked (:func:`head_check_mode`).
        """
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        # The model's forward carries accelerate's autocast wrapper (if any); the backbone call gets the same.
        with head_check_mode(model), self.accelerator.autocast():
            torch.manual_seed(HEAD_CHECK_SEED)
            hidden = _backbone(model)(**model_inputs).last_hidden_state[0, -1]
            if "logits_to_keep" in self.model_kwarg_keys:
                model_inputs["logits_to_keep"] = 1
            torch.manual_seed(HEAD_CHECK_SEED)
            expected = model(**model_inputs).logits[0, -1].float()
            weight, bias = _lm_head(model)
            with _full_head_tensors(weight, bias) as (weight, bias):
                hidden = hidden.to(weight.device, weight.dtype)
                actual = self._logit_transform.apply(nn.functional.linear(hidden, weight, bias))
        return expected, actual.to(expected.device)

    # --------------------------------------------------------------------------------- fused call

    def _fused_forward(
        self, student: nn.Module, inputs: dict[str, Any], with_teacher: bool, with_is: bool, reduce: bool = False
    ):
        """The fused call, run inside the student's wrapper forward. Returns a dict of tensors.

        ``with_teacher=False`` uses the student itself as a (detached) teacher: only the target log-probs
        are wanted then (the rollout log-probs, or a pure policy loss). ``reduce=True`` lets the call apply
        TRL's per-sequence mean itself: its upstream gradient is then a scalar and the fused op forms the
        gradient in forward (no logits recompute in backward); the per-token loss comes back detached.
        """
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        length = completion_ids.size(1)
        student_hidden, student_weight, student_bias = self._student_hidden_and_head(student, inputs)
        if with_teacher:
            teacher_wrapper = self.teacher_model
            teacher = self.accelerator.unwrap_model(teacher_wrapper)
            teacher_inputs = (teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], length)
            with torch.no_grad(), self._get_teacher_context_for_self_distillation():
                if teacher is student:
                    # The teacher is the student's own model (a PEFT adapter switched): this already runs inside
                    # its wrapper's forward, and a second, nested one breaks ZeRO-3's parameter fetch order.
                    teacher_hidden = self._completion_hidden_states(*teacher_inputs)
                else:
                    teacher_hidden = self._forward_redirection(
                        teacher_wrapper, teacher, self._completion_hidden_states, *teacher_inputs
                    )
            teacher_weight, teacher_bias = _lm_head(teacher)
        else:
            teacher_hidden, teacher_weight, teacher_bias = student_hidden.detach(), student_weight, student_bias

        mode = self.args.distillation_mode
        if mode == "topk_logits":
            options = {"topk": self.args.distillation_topk, "add_tail": self.args.distillation_add_tail}
            alpha = self.args.distillation_alpha
        elif mode == "full_logits":
            options = {"topk": None}
            alpha = self.args.distillation_alpha
        else:
            # Only the target log-probs are used; the cheapest support keeps the call's divergence trivial.
            options = {"topk": 1}
            alpha = 1.0
        loss_mask = completion_mask.float()
        sd_mask = inputs.get("self_distillation_mask")
        if sd_mask is not None:
            loss_mask = loss_mask * sd_mask.unsqueeze(1)

        head_dtype = self._head_dtype(student_hidden, student_weight)
        with (
            _full_head_tensors(student_weight, student_bias, teacher_weight, teacher_bias) as heads,
            torch.autocast(student_hidden.device.type, enabled=False),
        ):
            student_weight, student_bias, teacher_weight, teacher_bias = heads
            device = student_weight.device
            # Both operands in the head's compute dtype (see _head_dtype). The casts are differentiable, so the
            # gradient reaches the (fp32 master) weight.
            student_hidden = student_hidden.to(device, head_dtype)
            teacher_hidden = teacher_hidden.to(device, head_dtype)
            student_weight = student_weight.to(head_dtype)
            teacher_weight = teacher_weight.detach().to(device, head_dtype)
            if student_bias is not None:
                student_bias = student_bias.to(head_dtype)
            if teacher_bias is not None:
                teacher_bias = teacher_bias.detach().to(device, head_dtype)
            output = sdpo_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                mask=loss_mask.to(device),
                target_ids=completion_ids.to(device),
                old_logprobs=inputs["old_per_token_logps"].to(device) if with_is else None,
                alpha=alpha,
                is_clip=self.args.distillation_is_clip if with_is else None,
                temperature=self.temperature,
                reduction="seq-mean-token-mean" if reduce else "none",
                return_outputs=True,
                **options,
                **self._logit_transform.loss_options(),
            )
        result = _fused_result(
            output, output.loss if reduce else None, output.per_token_loss if reduce else output.loss, loss_mask, device
        )
        result["teacher_target_logprobs"] = output.teacher_target_logprobs
        return result

    def _student_hidden_and_head(self, student: nn.Module, inputs: dict[str, Any]):
        """The student's last hidden states at the completion positions and its lm_head ``(weight, bias)``."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        hidden = self._completion_hidden_states(
            student,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
        )
        return (hidden, *_lm_head(student))

    def _compute_rollout_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """TRL's rollout log-probs (same condition), from the fused path instead of ``[B, T, V]`` logits."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.args.gradient_accumulation_steps % generate_every == 0:
            return None
        self._verify_plain_head(
            torch.cat([prompt_ids, completion_ids], dim=1), torch.cat([prompt_mask, completion_mask], dim=1)
        )
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
        }
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            # Through `self.model`'s own forward, as TRL's `_forward_logits(self.model, ...)` (FSDP unshards there).
            result = self._forward_redirection(
                self.model, model, self._fused_forward, model, batch, with_teacher=False, with_is=False
            )
        return result["target_logprobs"].to(completion_ids.device)

    # ------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPOTrainer does not support returning outputs")
        if self.use_teacher_server:  # TRL allows it only with distillation_weight == 1
            loss = self._server_distillation_loss(model, inputs)
            return loss / (self.current_gradient_accumulation_steps if self.model.training else 1.0)
        self._verify_plain_head(
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        )

        weight = self.args.distillation_weight
        with_teacher = weight != 0.0
        with_is = (
            with_teacher
            and self.args.distillation_is_clip is not None
            and inputs.get("old_per_token_logps") is not None
        )
        student = self.accelerator.unwrap_model(model)
        # Only the divergence needs a gradient: let the fused call reduce (cheaper backward).
        reduce = weight == 1.0 and self.args.distillation_mode != "sampled_token"
        result = self._forward_redirection(
            model,
            student,
            self._fused_forward,
            student,
            inputs,
            with_teacher=with_teacher,
            with_is=with_is,
            reduce=reduce,
        )
        # Gathers (collectives) for metrics run here, after the wrapped forward returned, as in TRL's trainers.
        if weight == 1.0:
            loss = self._distillation_loss(model, result)
        elif weight == 0.0:
            loss = self._policy_loss(inputs, result["target_logprobs"])
        else:
            policy_loss = self._policy_loss(inputs, result["target_logprobs"])
            distillation_loss = self._distillation_loss(model, result)
            loss = (1 - weight) * policy_loss + weight * distillation_loss

        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / accumulation_scale

    def _server_distillation_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        """TRL's ``_compute_server_distillation_loss`` with the loss on the fused path: no ``[B, T, V]`` logits."""
        # As TRL: buffered batches are reused across optimizer steps, so the server may hold stale weights.
        if self.state.global_step != self._last_loaded_step:
            self.vllm_generation.sync_weights()
            self.accelerator.wait_for_everyone()
            self._last_loaded_step = self.state.global_step
        completion_ids = inputs["completion_ids"]
        self._verify_plain_head(
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        )
        loss_mask = inputs["completion_mask"].float()
        if inputs.get("self_distillation_mask") is not None:
            loss_mask = loss_mask * inputs["self_distillation_mask"].unsqueeze(1)
        teacher = self._get_teacher_token_logprobs_from_server(inputs, completion_ids.size(1))
        required = loss_mask.bool()
        if (required & ~torch.isfinite(teacher["actual_logprobs"])).any():
            raise ValueError("Teacher server returned no logprob for a required completion token.")
        student = self.accelerator.unwrap_model(model)
        result = self._forward_redirection(
            model, student, self._served_teacher_forward, student, inputs, teacher, loss_mask
        )
        # TRL's diagnostic: the student's local log-prob of each realized token against the server's.
        loss_mask = result["loss_mask"]
        teacher_logprobs = torch.where(required, teacher["actual_logprobs"], 0.0).to(loss_mask.device)
        result["teacher_target_logprobs"] = teacher_logprobs  # what the "sampled_token" objective reads
        abs_diff = (result["target_logprobs"].detach() - teacher_logprobs).abs()
        abs_diff = (abs_diff * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        mode = "train" if model.training else "eval"
        self._metrics[mode]["self_distillation/server_logprob_abs_diff"].append(
            self.accelerator.gather(abs_diff).mean().item()
        )
        return self._distillation_loss(model, result)

    def _served_teacher_forward(
        self, student: nn.Module, inputs: dict[str, Any], teacher: dict[str, Tensor], loss_mask: Tensor
    ) -> dict[str, Tensor]:
        """The student's side of the server loss, run inside its wrapper forward: hidden states, the lm_head and
        :func:`sdpo_loss_from_teacher_topk` on the server's top-k; the same dict as :meth:`_fused_forward`."""
        completion_ids = inputs["completion_ids"]
        student_hidden, student_weight, student_bias = self._student_hidden_and_head(student, inputs)
        with_is = self.args.distillation_is_clip is not None and inputs.get("old_per_token_logps") is not None
        sampled_token = self.args.distillation_mode == "sampled_token"
        head_dtype = self._head_dtype(student_hidden, student_weight)
        with (
            _full_head_tensors(student_weight, student_bias) as (student_weight, student_bias),
            torch.autocast(student_hidden.device.type, enabled=False),
        ):
            device = student_weight.device
            output = sdpo_loss_from_teacher_topk(
                student_hidden.to(device, head_dtype),
                student_weight.to(head_dtype),
                teacher["topk_logprobs"].to(device),
                teacher["topk_token_ids"].to(device),
                student_bias=None if student_bias is None else student_bias.to(head_dtype),
                mask=loss_mask.to(device),
                target_ids=completion_ids.to(device),
                old_logprobs=inputs["old_per_token_logps"].to(device) if with_is else None,
                add_tail=self.args.distillation_add_tail,
                # "sampled_token" reads only the target log-probs (the server sent its top-1): any divergence will do
                alpha=1.0 if sampled_token else self.args.distillation_alpha,
                is_clip=self.args.distillation_is_clip if with_is else None,
                temperature=self.temperature,
                # the divergence alone needs a gradient: reduced in the call, its gradient formed in forward
                reduction="none" if sampled_token else "seq-mean-token-mean",
                return_outputs=True,
                **self._logit_transform.loss_options(),
            )
        return _fused_result(output, None if sampled_token else output.loss, output.per_token_loss, loss_mask, device)

    def _distillation_loss(self, model, result: dict[str, Tensor]) -> Tensor:
        """TRL's aggregation of the per-token divergence: token mean per sequence, mean over sequences."""
        loss_mask = result["loss_mask"]
        if self.args.distillation_mode == "sampled_token":
            student_logprobs = result["target_logprobs"]
            log_ratio = student_logprobs - result["teacher_target_logprobs"]
            per_token_loss = log_ratio.detach() * student_logprobs
            if "is_weight" in result:
                per_token_loss = per_token_loss * result["is_weight"]
            per_token_loss = per_token_loss * loss_mask
        else:
            per_token_loss = result["per_token_loss"]  # mask and IS weight already applied
        loss = result.get("reduced_loss")
        if loss is None:
            loss = (per_token_loss.sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()

        mode = "train" if model.training else "eval"
        mean_distill_loss = per_token_loss.detach().sum() / loss_mask.sum().clamp(min=1.0)
        self._log_self_distillation_metric(mode, self.accelerator.gather(mean_distill_loss).mean().item())
        if "is_weight" in result:
            is_weight = result["is_weight"]
            self._log_masked_mean(mode, "self_distillation/is_weight_mean", is_weight, loss_mask)
            clipped = (is_weight >= self.args.distillation_is_clip).float()
            self._log_masked_mean(mode, "self_distillation/is_clipped_fraction", clipped, loss_mask)
        if self.args.distillation_mode == "topk_logits":
            self._log_masked_mean(mode, "self_distillation/topk_mass_mean", result["topk_mass"], loss_mask)
        return loss

    def _log_masked_mean(self, mode: str, key: str, values: Tensor, mask: Tensor) -> None:
        """Log the mean of ``values`` over the masked tokens of every process (nothing when none is masked in)."""
        totals = torch.stack([(values.detach().float() * mask).sum(), mask.sum()])
        total, count = self.accelerator.gather(totals).view(-1, 2).sum(0).tolist()
        if count > 0:
            self._metrics[mode][key].append(total / count)

    def _policy_loss(self, inputs: dict[str, Any], per_token_logps: Tensor) -> Tensor:
        """TRL's clipped policy loss (``_compute_policy_loss``) on log-probs instead of logits."""
        completion_mask = inputs["completion_mask"].to(per_token_logps.device)
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = per_token_logps - old_per_token_logps
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(
                -1, keepdim=True
            ).clamp(min=1.0)
        coef_1 = torch.exp(log_ratio)
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)

        if self.loss_type == "grpo":
            loss = (per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
            loss = loss.mean()
        elif self.loss_type in ("bnpo", "dapo"):
            loss = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * self.max_completion_length)
        else:
            raise ValueError(f"Unsupported loss_type: {self.loss_type}")

        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["self_distillation/policy_loss"].append(
            self.accelerator.gather(loss.detach()).mean().item()
        )
        return loss
