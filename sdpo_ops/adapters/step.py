"""One SDPO loss evaluation for a hand-written loop: two backbone forwards and one ``sdpo_loss`` call.

Neither model's lm_head is applied: the backbones return hidden states, the completion positions are
sliced out, and :func:`sdpo_ops.sdpo_loss` fuses the lm_head into the loss, so no ``[B, T, V]`` logits
exist. The teacher runs first, under ``torch.no_grad()``, so its activations are freed before the
student's graph is built.

Heads that post-process ``lm_head(last_hidden_state)`` as their config declares (Gemma 2's final
soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...: :mod:`sdpo_ops.adapters.heads`)
get that transform applied inside the fused loss. A transform the config does not declare is refused at the
first call for each student, by comparing its own logits for one sequence with backbone + lm_head + declared
transform (in the model's own mode, from one seed, random streams forked: the training's draws are unchanged).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdpo_ops.adapters.batch import SDPOBatch
from sdpo_ops.adapters.heads import (
    HEAD_CHECK_SEED,
    LogitTransform,
    head_check_streams,
    refuse_unreproduced_logits,
    shared_logit_transform,
)
from sdpo_ops.adapters.model_inputs import backbone_and_head, completion_hidden_states, positions_from_mask
from sdpo_ops.adapters.routing import SampleRouting, clipped_policy_loss_per_token, distillation_route, routed_loss
from sdpo_ops.adapters.teacher import EMATeacher
from sdpo_ops.loss import SDPOOutput, sdpo_loss


@dataclass
class SDPOStepOutput:
    """What :func:`sdpo_step` returns.

    Attributes:
        loss: 0-dim loss with gradient into the student (call ``loss.backward()``).
        output: the :class:`sdpo_ops.SDPOOutput` of the loss call (``target_logprobs`` ``[B, T]`` with
            gradient, the teacher's detached ``teacher_target_logprobs``, IS weights, top-K mass).
        loss_mask: ``[B, T]`` float, completion mask times the per-sample self-distillation mask (with
            ``routing``: times the samples routed to the distillation loss).
        metrics: detached 0-dim tensors: ``loss``, the loss's metrics, ``self_distillation_fraction``
            (samples with a teacher signal) and ``num_loss_tokens``; with ``routing`` also
            ``routed_to_distillation_fraction``, ``policy_loss`` and ``distillation_loss`` (each the token
            mean over its own samples).
    """

    loss: Tensor
    output: SDPOOutput
    loss_mask: Tensor
    metrics: dict[str, Tensor]


def sdpo_step(
    student: nn.Module,
    teacher: EMATeacher | nn.Module | None,
    batch: SDPOBatch,
    *,
    reduction: str = "seq-mean-token-mean",
    position_ids_from_mask: bool = True,
    routing: SampleRouting | None = None,
    **loss_options: Any,
) -> SDPOStepOutput:
    """SDPO loss of the student on a batch of its completions, against the teacher on the reprompted inputs.

    Computes exactly: ``sdpo_ops.reference.sdpo_loss_reference_from_logits(student_logits, teacher_logits,
    mask=completion_mask * self_distillation_mask, target_ids=completion_ids, old_logprobs=old_logprobs, ...)``
    where ``*_logits`` are the models' logits (``model(input_ids, attention_mask, position_ids).logits``, the
    config's logit scale and softcap included) at the positions that predict the completion tokens, without
    ever forming them.

    Args:
        student: the causal LM being trained (plain ``transformers`` model or PEFT wrapper).
        teacher: an :class:`EMATeacher`, a separate frozen model, or None for the live student (TRL's
            ``teacher_model_kind="live"``, run in the student's current mode, dropout included), always
            under ``torch.no_grad()``.
        batch: an :class:`SDPOBatch` (see :func:`sdpo_ops.adapters.build_sdpo_batch`).
        reduction: default ``"seq-mean-token-mean"``: the mean over sequences of each one's token mean, which
            is TRL's reduction and, in effect, the official one (token mean per micro-batch of one sequence).
        position_ids_from_mask: pass position ids counted from the attention mask (as ``generate`` does), so
            left padding does not shift positions; False lets the model use ``arange(L)``.
        routing: a :class:`sdpo_ops.adapters.routing.SampleRouting` to route the samples (SRPO): successful
            ones take the clipped policy loss on the same call's target log-probs (against
            ``batch.old_logprobs``, or the detached current ones), failed ones with a teacher signal the
            distillation loss, over one joint token mean (:func:`sdpo_ops.adapters.routing.routed_loss`), which
            replaces ``reduction`` (leave it at its default).
        **loss_options: the other keyword arguments of :func:`sdpo_ops.sdpo_loss` (``topk``, ``add_tail``,
            ``alpha``, ``is_clip``, ``temperature``, ``normalizer``, ``token_weights``, ``backend``, ...).
            ``logit_scale`` and ``logit_softcap`` come from the models' configs.

    Returns:
        An :class:`SDPOStepOutput`; call ``result.loss.backward()``.
    """
    for reserved in ("mask", "target_ids", "old_logprobs", "return_outputs"):
        if reserved in loss_options:
            raise TypeError(f"sdpo_step sets {reserved!r} from the batch; do not pass it")
    for reserved in ("logit_scale", "logit_softcap"):
        if reserved in loss_options:
            raise TypeError(
                f"sdpo_step reads {reserved!r} from the models' configs (sdpo_ops.adapters.heads); do not pass it"
            )
    if routing is not None:
        if reduction != "seq-mean-token-mean" or "normalizer" in loss_options:
            raise ValueError(
                "routing reduces the loss itself (a joint token mean): do not pass reduction or normalizer"
            )
        if routing.successful.shape != batch.self_distillation_mask_or_ones().shape:
            raise ValueError(
                f"routing.successful must be [B={batch.completion_ids.shape[0]}], got {tuple(routing.successful.shape)}"
            )
    num_completion = batch.completion_ids.shape[1]

    teacher_model = student if teacher is None else teacher
    # The teacher is the EMA copy, or the student itself in shadow mode: its config is the one to read.
    transform = shared_logit_transform(
        student, teacher_model.model if isinstance(teacher_model, EMATeacher) else teacher_model
    )
    with torch.no_grad():
        if isinstance(teacher_model, EMATeacher):
            with teacher_model.forward_context() as model:
                teacher_hidden, teacher_weight, teacher_bias = _teacher_side(
                    model, batch, num_completion, position_ids_from_mask
                )
        else:
            teacher_hidden, teacher_weight, teacher_bias = _teacher_side(
                teacher_model, batch, num_completion, position_ids_from_mask
            )

    backbone, student_weight, student_bias = backbone_and_head(student)
    _verify_head_once(student, backbone, student_weight, student_bias, transform, batch, position_ids_from_mask)
    student_hidden = completion_hidden_states(
        backbone, batch.input_ids, batch.attention_mask, num_completion, position_ids_from_mask=position_ids_from_mask
    )
    loss_mask = batch.completion_mask.float()
    to_distillation = None
    if routing is not None:
        to_distillation = distillation_route(
            routing.successful.to(loss_mask.device), batch.self_distillation_mask_or_ones()
        )
        loss_mask = loss_mask * to_distillation.unsqueeze(1)
    elif batch.self_distillation_mask is not None:
        loss_mask = loss_mask * batch.self_distillation_mask.float().unsqueeze(1)
    output = sdpo_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        mask=loss_mask,
        target_ids=batch.completion_ids,
        old_logprobs=batch.old_logprobs,
        reduction="none" if routing is not None else reduction,
        return_outputs=True,
        **loss_options,
        **transform.loss_options(),
    )
    loss = output.loss
    metrics = {}
    if routing is not None:
        loss, metrics = _routed(batch, routing, output, to_distillation)
    metrics = {"loss": loss.detach(), **output.metrics, **metrics}
    if batch.self_distillation_mask is not None:
        metrics["self_distillation_fraction"] = batch.self_distillation_mask.float().mean()
    metrics["num_loss_tokens"] = loss_mask.sum()
    return SDPOStepOutput(loss=loss, output=output, loss_mask=loss_mask, metrics=metrics)


def _routed(
    batch: SDPOBatch, routing: SampleRouting, output: SDPOOutput, to_distillation: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The routed loss of :func:`sdpo_step` from the fused call's per-token divergence and target log-probs."""
    logprobs = output.target_logprobs
    old_logprobs = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs.to(logprobs.dtype)
    policy = clipped_policy_loss_per_token(
        logprobs,
        old_logprobs,
        routing.advantages.to(logprobs.device, logprobs.dtype),
        epsilon_low=routing.epsilon_low,
        epsilon_high=routing.epsilon_high,
    )
    completion_mask = batch.completion_mask.to(logprobs.dtype)
    loss = routed_loss(policy, output.loss, completion_mask, to_distillation)

    def token_mean(values: Tensor, rows: Tensor) -> Tensor:
        weights = completion_mask * rows.unsqueeze(1)
        return (values.detach() * weights).sum() / weights.sum().clamp(min=1.0)

    metrics = {
        "routed_to_distillation_fraction": to_distillation.mean(),
        "policy_loss": token_mean(policy, 1 - to_distillation),
        "distillation_loss": token_mean(output.loss, to_distillation),
    }
    return loss, metrics


# Students whose own logits were found equal to backbone + lm_head + declared transform (checked once each).
_VERIFIED_STUDENTS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _verify_head_once(
    model: nn.Module,
    backbone: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    transform: LogitTransform,
    batch: SDPOBatch,
    position_ids_from_mask: bool,
) -> None:
    """Refuse, at its first step, a student whose logits are not what the fused loss computes (an undeclared
    transform): both forwards on the batch's first sequence, at the position predicting its last token."""
    if model in _VERIFIED_STUDENTS:
        return
    input_ids, attention_mask = batch.input_ids[:1], batch.attention_mask[:1]
    model_inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids_from_mask:
        model_inputs["position_ids"] = positions_from_mask(attention_mask)
    with torch.no_grad(), head_check_streams():
        torch.manual_seed(HEAD_CHECK_SEED)
        hidden = completion_hidden_states(
            backbone, input_ids, attention_mask, 1, position_ids_from_mask=position_ids_from_mask
        )[0, -1]
        torch.manual_seed(HEAD_CHECK_SEED)
        expected = model(**model_inputs).logits[0, -2]
        actual = transform.apply(nn.functional.linear(hidden, weight, bias))
    refuse_unreproduced_logits(
        model, expected, actual, transform, alternative="Use sdpo_ops.sdpo_loss_from_logits on its logits instead."
    )
    _VERIFIED_STUDENTS.add(model)


def _teacher_side(
    model: nn.Module, batch: SDPOBatch, num_completion: int, position_ids_from_mask: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    backbone, weight, bias = backbone_and_head(model)
    hidden = completion_hidden_states(
        backbone,
        batch.teacher_input_ids,
        batch.teacher_attention_mask,
        num_completion,
        position_ids_from_mask=position_ids_from_mask,
    )
    # Detached copies: in shadow mode the weight is swapped back out of the model when the context exits.
    return hidden.detach(), weight.detach(), None if bias is None else bias.detach()
