"""Drop-in replacement for ``trl.experimental.sdpo.SDPOTrainer`` whose loss runs on :func:`sdpo_ops.sdpo_loss`.

Change one import::

    from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer  # was: from trl.experimental.sdpo import ...

TRL's SDFT trainer has its twin here too, on the same fused loss: ``from sdpo_ops.adapters.trl import SDFTConfig,
SDFTTrainer`` (:mod:`sdpo_ops.adapters.trl_sdft`). What both share (the fused forward, heads, teacher checkpoints,
config validation, the served teacher) is :mod:`sdpo_ops.adapters.trl_fused`; this module adds SDPO's own parts.

Everything but the loss is TRL's (rollouts, rewards, reprompting, EMA/base/live teacher, vLLM, PEFT,
callbacks, metrics). The loss is computed from the models' last hidden states at the completion
positions and their lm_head weights, never from ``[B, T, V]`` logits:

- ``distillation_mode="topk_logits"`` / ``"full_logits"``: the fused divergence (``topk=distillation_topk``
  with ``add_tail=distillation_add_tail``, or the full vocabulary), the clipped IS weight from
  ``old_per_token_logps`` when ``distillation_is_clip`` is set;
- ``"sampled_token"``: TRL's token-level reverse KL from the fused call's target log-probs (student with
  gradient, teacher detached);
- ``distillation_weight < 1``: TRL's clipped policy loss on the same call's target log-probs;
- ``sample_routing=True`` (our option, SRPO's routing: :mod:`sdpo_ops.adapters.routing`): successful samples take
  that policy loss, failed ones with a teacher signal the distillation loss, over one joint token mean.

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

TRL internals overridden (here and in :mod:`sdpo_ops.adapters.trl_fused`; what a TRL upgrade can break):
``SDPOTrainer.compute_loss``, ``SDPOTrainer._compute_rollout_logps``, ``SDPOTrainer._calculate_rewards`` (wraps
the reward functions, then calls TRL's), ``SuccessfulRolloutTeacherContextBuilder.build`` (merges the feedback,
then calls TRL's), ``SDPOTrainer._setup_teacher_model`` (calls TRL's, then swaps its ``PEFTAdapterEMACallback``
for ours), ``Trainer.train`` and ``Trainer._save_checkpoint`` (the teacher file, then transformers' own).
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
step by comparing the model's own logits with the fused head's (backbone, lm_head, declared transform), in the
model's own mode from one seed (dropout draws alike in both). A quantised lm_head (QLoRA with the head quantised too)
is refused at construction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:
    import trl
    from packaging.version import Version
    from trl.experimental.sdpo import SDPOConfig as _TRLSDPOConfig
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer as _TRLSDPOTrainer
    from trl.experimental.sdpo.sdpo_trainer import SuccessfulRolloutTeacherContextBuilder
    from trl.experimental.sdpo.teacher_sync import PEFTAdapterEMACallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f'sdpo_ops.adapters.trl needs TRL >= 1.16 ({error}); install it with: pip install "sdpo-ops[trl]"'
    ) from error

if Version(trl.__version__) < Version("1.16"):  # pragma: no cover
    raise ImportError(
        f'sdpo_ops.adapters.trl needs TRL >= 1.16, found {trl.__version__}; upgrade with: pip install "sdpo-ops[trl]"'
    )

from sdpo_ops.adapters.feedback import split_scores_and_feedback
from sdpo_ops.adapters.routing import clipped_policy_loss_per_token, distillation_route, routed_loss
from sdpo_ops.adapters.trl_fused import FusedDistillationMixin
from sdpo_ops.adapters.trl_sdft import SDFTConfig, SDFTTrainer

__all__ = ["SDFTConfig", "SDFTTrainer", "SDPOConfig", "SDPOTrainer"]


@dataclass
class SDPOConfig(_TRLSDPOConfig):
    """TRL's ``SDPOConfig`` plus ``sample_routing`` (SRPO, arXiv:2604.02288; :mod:`sdpo_ops.adapters.routing`)."""

    sample_routing: bool = field(
        default=False,
        metadata={
            "help": "Route each sample to one loss: successful ones (reward >= success_reward_threshold) take "
            "the clipped policy loss, failed ones with a teacher signal the distillation loss, over one joint token "
            "mean. Replaces the blend: requires distillation_weight=1.0."
        },
    )


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


class SDPOTrainer(FusedDistillationMixin, _TRLSDPOTrainer):
    """``trl.experimental.sdpo.SDPOTrainer`` with the loss fused into the lm_head by :func:`sdpo_ops.sdpo_loss`.

    Same constructor and :class:`SDPOConfig` as TRL's; see the module docstring for what differs.
    """

    _trl_trainer = _TRLSDPOTrainer
    _trl_lora_ema_callback = PEFTAdapterEMACallback

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_context_builder = _FeedbackRoutingContextBuilder(self)
        self._pending_reward_feedback: list[str | None] | None = None

    # Same parameters as TRL's constructor, for help() and IDEs (the body forwards them untouched).
    __init__.__signature__ = inspect.signature(_TRLSDPOTrainer.__init__)

    def _validate_trainer_arguments(self, arguments: dict[str, Any]) -> None:
        args = arguments.get("args")
        if args is not None and getattr(args, "sample_routing", False):
            if args.distillation_weight != 1.0:
                raise ValueError(
                    "sample_routing replaces the blend (each sample takes one loss): set distillation_weight=1.0, "
                    f"got {args.distillation_weight}"
                )
            if args.use_teacher_server:
                raise ValueError("sample_routing is not supported with use_teacher_server=True")

    def _distillation_mask(self, inputs: dict[str, Any]) -> Tensor:
        """TRL's SDPO ``loss_mask``: the completion tokens of samples with a teacher signal."""
        loss_mask = inputs["completion_mask"].float()
        if inputs.get("self_distillation_mask") is not None:
            loss_mask = loss_mask * inputs["self_distillation_mask"].unsqueeze(1)
        return loss_mask

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

    # ------------------------------------------------------------------------------------------ loss

    def _local_teacher_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        """TRL's blend: ``(1 - w) * policy loss + w * distillation loss`` (``w = distillation_weight``), both from
        one fused call (the policy loss from its target log-probs)."""
        if getattr(self.args, "sample_routing", False):
            return self._routed_loss(model, inputs)
        weight = self.args.distillation_weight
        if weight == 1.0:
            return super()._local_teacher_loss(model, inputs)
        result = self._fused_call(model, inputs, with_teacher=weight != 0.0, reduce=False)
        policy_loss = self._policy_loss(inputs, result["target_logprobs"])
        if weight == 0.0:
            return policy_loss
        distillation_loss = self._distillation_loss(model, result)
        return (1 - weight) * policy_loss + weight * distillation_loss

    def _routed_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        """``sample_routing``: one fused call whose mask keeps the failed samples with a teacher signal; the policy
        loss of the others from the same call's target log-probs; :func:`routed_loss` joins them."""
        successful = inputs["rewards"] >= self.args.success_reward_threshold
        has_teacher = inputs.get("self_distillation_mask")
        has_teacher = torch.ones_like(successful) if has_teacher is None else has_teacher
        to_distillation = distillation_route(successful, has_teacher)
        result = self._fused_call(
            model, {**inputs, "self_distillation_mask": to_distillation}, with_teacher=True, reduce=False
        )
        completion_mask = inputs["completion_mask"].to(result["loss_mask"].device)
        distillation = self._distillation_per_token_loss(model, result)
        policy = self._policy_per_token_loss(inputs, result["target_logprobs"])
        mode = "train" if model.training else "eval"
        self._metrics[mode]["self_distillation/routed_to_distillation_fraction"].append(
            self.accelerator.gather(to_distillation.mean()).mean().item()
        )
        return routed_loss(policy, distillation, completion_mask, to_distillation.to(completion_mask.device))

    def _policy_per_token_loss(self, inputs: dict[str, Any], per_token_logps: Tensor) -> Tensor:
        """TRL's unmasked per-token clipped policy loss (``_compute_policy_loss``) on log-probs."""
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        return clipped_policy_loss_per_token(
            per_token_logps,
            old_per_token_logps.to(per_token_logps.device),
            inputs["advantages"].to(per_token_logps.device),
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            completion_mask=inputs["completion_mask"].to(per_token_logps.device),
            sequence_level=self.importance_sampling_level == "sequence",
        )

    def _policy_loss(self, inputs: dict[str, Any], per_token_logps: Tensor) -> Tensor:
        """TRL's clipped policy loss (``_compute_policy_loss``) on log-probs instead of logits."""
        completion_mask = inputs["completion_mask"].to(per_token_logps.device)
        per_token_loss = self._policy_per_token_loss(inputs, per_token_logps)

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
