"""What ``sdpo_ops.adapters.trl.SDPOTrainer`` and ``SDFTTrainer`` share: TRL's self-distillation loss on the fused path.

TRL's ``trl.experimental.sdpo.SDPOTrainer`` and ``trl.experimental.sdft.SDFTTrainer`` compute the same
self-distillation objective (their ``loss_utils.py`` are identical) from full ``[B, T, V]`` student and teacher
logits. :class:`FusedDistillationMixin`, placed before either TRL class, computes it from the models' last hidden
states at the completion positions and their lm_head weights instead, with :func:`sdpo_ops.sdpo_loss` (local teacher)
or :func:`sdpo_ops.sdpo_loss_from_teacher_topk` (the vLLM server's top-k, ``use_teacher_server=True``):

- ``distillation_mode="topk_logits"`` / ``"full_logits"``: the fused divergence (``topk=distillation_topk`` with
  ``add_tail=distillation_add_tail``, or the full vocabulary), the clipped IS weight from ``old_per_token_logps``
  when ``distillation_is_clip`` is set;
- ``"sampled_token"``: TRL's token-level reverse KL from the fused call's target log-probs (student with gradient,
  teacher detached).

TRL's aggregation is kept exactly: per-sequence token mean, then the mean over sequences, divided by the
gradient-accumulation steps. The rollout log-probs (``old_per_token_logps``) come from the same fused path (the
student as its own teacher, no gradient). Which tokens are distilled is the trainer's (:meth:`_distillation_mask`):
SDPO's ``self_distillation_mask``, SDFT's ``num_loss_tokens_to_skip``.

The loss runs inside the student wrapper's forward (TRL's ``_ForwardRedirection``), so DDP synchronises the
gradients and FSDP/ZeRO-3 gather the backbone; the backbones run under the accelerator's autocast, and the head takes
autocast's compute dtype on CUDA. Under ZeRO-3 the lm_head is gathered with TRL's ``maybe_gather_lm_head_ctx`` and a
copy is held until backward (the fused loss recomputes logits there); FSDP2 DTensor heads are gathered with
``full_tensor``. Heads that scale or softcap their logits are read from the model config
(:mod:`sdpo_ops.adapters.heads`); a transform the config does not declare is caught at the first step. The EMA
teacher is saved in every checkpoint and restored on resume (:mod:`sdpo_ops.adapters.trl_teacher`). Configs TRL
accepts but fails on after a rollout (or silently misreads) are rejected in ``__init__``.

TRL internals overridden (what a TRL upgrade can break): ``compute_loss``, ``_compute_rollout_logps``,
``_setup_teacher_model`` (calls TRL's, then swaps its ``PEFTAdapterEMACallback`` for ours), ``Trainer.train`` and
``Trainer._save_checkpoint`` (the teacher file, then transformers' own). Used, not overridden:
``_get_teacher_context_for_self_distillation``, ``teacher_model``, ``model_kwarg_keys``,
``_get_teacher_token_logprobs_from_server``, ``vllm_generation.sync_weights``, ``_last_loaded_step``,
``current_gradient_accumulation_steps``, ``_metrics``, ``_log_self_distillation_metric``,
``trl.models.utils._ForwardRedirection``, ``trl.trainer.utils.maybe_gather_lm_head_ctx``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import warnings
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from sdpo_ops import sdpo_loss, sdpo_loss_from_teacher_topk, validate_teacher_topk
from sdpo_ops.adapters import trl_teacher
from sdpo_ops.adapters.heads import (
    HEAD_CHECK_SEED,
    LogitTransform,
    head_check_streams,
    refuse_quantized_head,
    refuse_unreproduced_logits,
    shared_logit_transform,
)

__all__ = ["FusedDistillationMixin", "validate_distillation_config"]


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
        "entropy": output.entropy,
        "loss_mask": loss_mask.to(device),
    }
    if output.is_weight is not None:
        result["is_weight"] = output.is_weight
    return result


def _full_shape(tensor: Tensor) -> torch.Size:
    """A tensor's whole shape: a ZeRO-3 partitioned parameter is an empty (or flat) tensor carrying it in ds_shape."""
    return getattr(tensor, "ds_shape", None) or tensor.shape


def _lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the model's output projection (possibly ZeRO-3 partitioned).

    Raises ``ValueError`` for a quantised head (a QLoRA base quantised with its lm_head) and any other head that is
    not a linear layer with a ``[V, H]`` weight.
    """
    causal_lm = _transformers_model(model)
    head = causal_lm.get_output_embeddings()
    refuse_quantized_head(causal_lm, head)
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
    _lm_head(model)  # a [V, H] head, not quantised


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


_DISTILLATION_MODES = ("sampled_token", "full_logits", "topk_logits")
_TEACHER_MODEL_KINDS = ("ema", "base", "live")


def validate_distillation_config(args) -> None:
    """Reject, naming the field, what TRL accepts but would fail on (or silently misread) only after a rollout.

    ``args``: an ``SDPOConfig`` or ``SDFTConfig`` (the distillation fields they share).
    """
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
    elif args.distillation_topk != _field_default(args, "distillation_topk"):
        # Set on purpose (SDFTConfig defaults to 100 for its default "topk_logits": no warning for that).
        warnings.warn(
            f"distillation_topk={args.distillation_topk} is ignored with distillation_mode={args.distillation_mode!r} "
            "(only 'topk_logits' uses it)",
            UserWarning,
            stacklevel=4,  # the user's call of the trainer's constructor
        )


def _field_default(config, name: str) -> Any:
    return next(field.default for field in dataclasses.fields(config) if field.name == name)


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

    def __init__(self, trainer: FusedDistillationMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._restore_teacher_state()


class FusedDistillationMixin:
    """TRL's self-distillation trainer with the loss fused into the lm_head; placed before the TRL class it extends.

    A subclass names the TRL trainer it extends and that trainer's LoRA EMA callback class, and says which completion
    tokens are distilled (:meth:`_distillation_mask`). Same constructor as the TRL class.
    """

    #: The TRL trainer class this one extends (its constructor's signature, its name in error messages).
    _trl_trainer: type
    #: TRL's ``PEFTAdapterEMACallback`` as that trainer's module imports it (replaced by ours, which saves).
    _trl_lora_ema_callback: type

    def __init__(self, *args, **kwargs):
        arguments = inspect.signature(self._trl_trainer.__init__).bind(self, *args, **kwargs).arguments
        # Before TRL's constructor: it loads the model and may build a teacher copy first.
        if arguments.get("args") is not None:
            validate_distillation_config(arguments["args"])
        self._validate_trainer_arguments(arguments)
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
        self._head_verified = False
        self._resume_checkpoint: str | None = None
        # After TRL's callbacks (the LoRA EMA one creates the teacher adapter at train begin): restores the teacher.
        self.add_callback(_RestoreTeacherOnTrainBegin(self))

    def _validate_trainer_arguments(self, arguments: dict[str, Any]) -> None:
        """Refuse what only this trainer reads (``arguments``: the constructor's, by TRL's parameter names) before
        TRL loads anything; the shared distillation fields are checked already."""

    def _distillation_mask(self, inputs: dict[str, Any]) -> Tensor:
        """``[B, T]`` float: 1 where a completion token is distilled (the trainer's TRL ``loss_mask``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ teacher checkpoints

    def _setup_teacher_model(self) -> None:
        """TRL's teacher set-up, with TRL's LoRA EMA callback replaced by one that works under FSDP2 and saves."""
        super()._setup_teacher_model()
        self._lora_ema_callback: trl_teacher.LoRAEMATeacherCallback | None = None
        trl_callback = self.pop_callback(self._trl_lora_ema_callback)
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
                f"{checkpoint} has no {trl_teacher.TEACHER_STATE_FILE} (saved by TRL's own trainer, or by an older "
                f"sdpo_ops): the EMA teacher resumes from {restarted}, not from its state at the checkpoint.",
                UserWarning,
                stacklevel=2,
            )
            return
        if kind == trl_teacher.EMA_LORA_ADAPTER:
            self._lora_ema_callback.load_state_tensors(tensors)
        else:
            trl_teacher.load_model_state(self.accelerator.unwrap_model(self.teacher_model), tensors)

    # -------------------------------------------------------------------------------- hidden states

    def _completion_hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, length: int):
        """``[B, length, H]``: the backbone's last hidden states where the last ``length`` tokens are predicted.

        Runs under the accelerator's autocast, as the model's own (accelerate-wrapped) forward would, except for the
        trained model in evaluation (:meth:`_student_autocast`).
        """
        autocast = self._student_autocast() or model is not self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast() if autocast else torch.autocast(input_ids.device.type, enabled=False):
            hidden = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return hidden.last_hidden_state[:, :-1][:, -length:]

    def _student_autocast(self) -> bool:
        """Whether the trained model's forwards run under autocast: in training. In evaluation TRL's ``evaluate()``
        runs the student without it (the model is not yet accelerate-wrapped: fp32 logits) and only a separate teacher
        under it; ours does so always, also after training wrapped the model (TRL's student then runs in bf16)."""
        return self.model.training

    def _head_dtype(self, hidden: Tensor, weight: Tensor) -> torch.dtype:
        """The dtype of the fused head's operands: the hidden states' without mixed precision; under autocast,
        autocast's on CUDA (the Triton kernels accumulate and keep the logits in fp32), the weight's own (the fp32
        master) elsewhere: torch's CPU bf16 matmul returns bf16 logits, the rounding by which TRL's bf16 run
        strays from its fp32 run (measured: README, "In TRL")."""
        if not self._student_autocast():
            return hidden.dtype
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
            alternative=f"Use {self._trl_trainer.__module__.rsplit('.', 1)[0]}.{self._trl_trainer.__name__}.",
        )

    def _head_check_logits(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(model's own last logits [V], the declared transform of hidden @ W^T + b [V])`` for one sequence, fp32.

        Two forwards (the model's, and its backbone's as the fused loss runs it) that must not differ by chance: each
        from the same seed, the training's random streams forked, the model left in its mode
        (:func:`head_check_streams`: an eval-mode forward would repack a bitsandbytes CPU 4-bit base for good).
        """
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        # The model's forward carries accelerate's autocast wrapper (if any); the backbone call gets the same.
        with head_check_streams(), self.accelerator.autocast():
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
        completion_ids = inputs["completion_ids"]
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
        loss_mask = self._distillation_mask(inputs)

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
            raise ValueError(f"The {self._trl_trainer.__name__} does not support returning outputs")
        if self.use_teacher_server:
            loss = self._server_distillation_loss(model, inputs)
        else:
            self._verify_plain_head(
                torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            )
            loss = self._local_teacher_loss(model, inputs)
        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / accumulation_scale

    def _local_teacher_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        """The distillation loss against the local teacher (TRL's ``_compute_self_distillation_loss``)."""
        # Only the divergence needs a gradient: let the fused call reduce (cheaper backward).
        result = self._fused_call(
            model, inputs, with_teacher=True, reduce=self.args.distillation_mode != "sampled_token"
        )
        return self._distillation_loss(model, result)

    def _fused_call(self, model, inputs: dict[str, Any], *, with_teacher: bool, reduce: bool) -> dict[str, Tensor]:
        """:meth:`_fused_forward` through the student wrapper's forward, with the IS weight when TRL applies it."""
        with_is = (
            with_teacher
            and self.args.distillation_is_clip is not None
            and inputs.get("old_per_token_logps") is not None
        )
        student = self.accelerator.unwrap_model(model)
        # Gathers (collectives) for metrics run after the wrapped forward returned, as in TRL's trainers.
        return self._forward_redirection(
            model,
            student,
            self._fused_forward,
            student,
            inputs,
            with_teacher=with_teacher,
            with_is=with_is,
            reduce=reduce,
        )

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
        loss_mask = self._distillation_mask(inputs)
        # TRL builds the server's answer on the request ids' device: give it host ids (it lists them anyway), so the
        # answer stays on the host, where it is validated for free before it moves (no sync inside the loss).
        host_ids = {key: inputs[key].cpu() for key in ("teacher_input_ids", "teacher_attention_mask")}
        teacher = self._get_teacher_token_logprobs_from_server({**inputs, **host_ids}, completion_ids.size(1))
        teacher["loss_mask"] = loss_mask.cpu()  # before the student's forward is queued: waits for nothing new
        required = teacher["loss_mask"].bool()
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
            topk_logprobs, topk_ids = teacher["topk_logprobs"], teacher["topk_token_ids"]
            validate_teacher_topk(topk_logprobs, topk_ids, student_weight.shape[0], mask=teacher["loss_mask"])
            output = sdpo_loss_from_teacher_topk(
                student_hidden.to(device, head_dtype),
                student_weight.to(head_dtype),
                topk_logprobs.to(device),
                topk_ids.to(device),
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
                validate_teacher=False,  # checked above, on the host
                **self._logit_transform.loss_options(),
            )
        return _fused_result(output, None if sampled_token else output.loss, output.per_token_loss, loss_mask, device)

    def _distillation_loss(self, model, result: dict[str, Tensor]) -> Tensor:
        """TRL's aggregation of the per-token divergence: token mean per sequence, mean over sequences."""
        per_token_loss = self._distillation_per_token_loss(model, result)
        loss = result.get("reduced_loss")
        if loss is None:
            loss = (per_token_loss.sum(-1) / result["loss_mask"].sum(-1).clamp(min=1.0)).mean()
        return loss

    def _distillation_per_token_loss(self, model, result: dict[str, Tensor]) -> Tensor:
        """The masked per-token divergence (IS weight applied) of a fused call's result; logs TRL's metrics."""
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
        if result.get("entropy") is not None:
            # GRPOTrainer's metric name; here over the distilled tokens (the fused call's mask), GRPO's is over all.
            self._log_masked_mean(mode, "entropy", result["entropy"], loss_mask)
        return per_token_loss

    def _log_masked_mean(self, mode: str, key: str, values: Tensor, mask: Tensor) -> None:
        """Log the mean of ``values`` over the masked tokens of every process (nothing when none is masked in)."""
        totals = torch.stack([(values.detach().float() * mask).sum(), mask.sum()])
        total, count = self.accelerator.gather(totals).view(-1, 2).sum(0).tolist()
        if count > 0:
            self._metrics[mode][key].append(total / count)
