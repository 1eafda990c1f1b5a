"""The naive SDPO loss: SPEC section 2 line by line, materialising full ``[N, V]`` logits.

This module *is* the specification in code. It is the oracle of every test and the baseline of every
benchmark, so it stays short and obviously right and is never optimised: plain autograd does the
backward. Arguments are assumed valid (``sdpo_ops.loss`` validates before dispatching here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Clamp of the top-K log-mass before log(1 - mass): keeps the tail finite when the top-K holds
# (numerically) all the probability. The official code and TRL use the same constant.
TAIL_LOG_MASS_MAX = -1e-7
# Clamp of the log importance ratio before exp (official code and TRL).
IS_LOG_RATIO_LIMIT = 20.0


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for bf16/fp16/fp32, fp64 stays fp64 (gradcheck runs the oracle in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _xlogy_difference(log_p: Tensor, log_r: Tensor) -> Tensor:
    """``p * (log p - log r)`` with the convention ``0 * anything = 0`` (for -inf logits)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p))


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Per-row generalised JSD over the last dimension (log-probabilities in, divergence out).

    ``alpha = 0`` is ``KL(teacher || student)``, ``alpha = 1`` is ``KL(student || teacher)``,
    otherwise ``(1 - alpha) KL(p || m) + alpha KL(q || m)`` with ``m = (1 - alpha) p + alpha q``.
    """
    # -inf log-probs (masked vocabulary) become the most negative finite float: exp() is still exactly 0,
    # and autograd no longer meets (-inf) - (-inf) in the branches torch.where discards.
    student_logp = student_logp.clamp(min=torch.finfo(student_logp.dtype).min)
    teacher_logp = teacher_logp.clamp(min=torch.finfo(teacher_logp.dtype).min)
    if alpha == 0.0:
        return _xlogy_difference(teacher_logp, student_logp).sum(-1)
    if alpha == 1.0:
        return _xlogy_difference(student_logp, teacher_logp).sum(-1)
    log_m = torch.logaddexp(student_logp + math.log(1.0 - alpha), teacher_logp + math.log(alpha))
    return (1.0 - alpha) * _xlogy_difference(student_logp, log_m).sum(-1) + alpha * _xlogy_difference(
        teacher_logp, log_m
    ).sum(-1)


def _append_tail(support_logp: Tensor) -> Tensor:
    """Append the bin ``log(1 - sum exp(support_logp))`` holding the mass outside the support."""
    log_mass = torch.logsumexp(support_logp, dim=-1, keepdim=True)
    tail = torch.log(-torch.expm1(torch.clamp(log_mass, max=TAIL_LOG_MASS_MAX)))
    return torch.cat([support_logp, tail], dim=-1)


def transform_logits(
    raw_logits: Tensor, *, logit_scale: float = 1.0, logit_softcap: float | None = None, temperature: float = 1.0
) -> Tensor:
    """The head's output as the loss sees it, in TRL's order (``trl/kernels``, ``_torch_transform``):
    ``y = raw * logit_scale``; ``y = logit_softcap * tanh(y / logit_softcap)`` when set; ``z = y / temperature``."""
    y = _at_least_fp32(raw_logits) * logit_scale
    if logit_softcap is not None:
        y = logit_softcap * torch.tanh(y / logit_softcap)
    return y / temperature


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    topk: int | None,
    add_tail: bool,
    alpha: float,
    temperature: float,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Divergence per row of ``[N, V]`` raw head outputs (``transform_logits`` first).

    Returns ``(divergence [N], student_logp [N, V], topk_mass [N])``; ``topk_mass`` is the student's
    probability captured by the top-K (1 for the full vocabulary).
    """
    transform = {"logit_scale": logit_scale, "logit_softcap": logit_softcap, "temperature": temperature}
    student_logp = torch.log_softmax(transform_logits(student_logits, **transform), dim=-1)
    teacher_logp = torch.log_softmax(transform_logits(teacher_logits, **transform), dim=-1)
    if topk is None:
        student_support, teacher_support = student_logp, teacher_logp
        topk_mass = torch.ones(student_logp.shape[:-1], device=student_logp.device, dtype=student_logp.dtype)
    else:
        index = torch.topk(student_logp, topk, dim=-1).indices
        student_support = student_logp.gather(-1, index)
        teacher_support = teacher_logp.gather(-1, index)
        topk_mass = student_support.exp().sum(-1)
        return (
            support_divergence(student_support, teacher_support, add_tail=add_tail, alpha=alpha),
            student_logp,
            topk_mass,
        )
    return generalized_jsd(student_support, teacher_support, alpha), student_logp, topk_mass


def support_divergence(student_support: Tensor, teacher_support: Tensor, *, add_tail: bool, alpha: float) -> Tensor:
    """GJSD over a top-K support from full-vocabulary log-probs there: the tail bin appended on both sides, or both
    renormalised over the K."""
    if add_tail:
        student_support, teacher_support = _append_tail(student_support), _append_tail(teacher_support)
    else:
        student_support = student_support - torch.logsumexp(student_support, -1, keepdim=True)
        teacher_support = teacher_support - torch.logsumexp(teacher_support, -1, keepdim=True)
    return generalized_jsd(student_support, teacher_support, alpha)


ENTROPY_ROWS = 128


def entropy_of(log_probs: Tensor) -> Tensor:
    """``-sum p log p`` over the last dimension from full-vocabulary log-probs, detached (``0 log 0 = 0``).

    ``ENTROPY_ROWS`` rows at a time, as TRL's ``entropy_from_logits`` does: a logged metric must not add ``[N, V]``
    temporaries to the loss on materialised logits (``bench.memory_table`` prices that loss's memory)."""
    rows = log_probs.detach().reshape(-1, log_probs.shape[-1])
    if torch.compiler.is_compiling():
        # one expression: a row loop would specialise the graph on N, and a compiler fuses this into one reduction
        return _entropy_rows(rows).reshape(log_probs.shape[:-1])
    entropy = rows.new_empty(rows.shape[0])
    for start in range(0, rows.shape[0], ENTROPY_ROWS):
        entropy[start : start + ENTROPY_ROWS] = _entropy_rows(rows[start : start + ENTROPY_ROWS])
    return entropy.reshape(log_probs.shape[:-1])


def _entropy_rows(log_probs: Tensor) -> Tensor:
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)


def importance_weight(target_logprobs: Tensor, old_logprobs: Tensor, is_clip: float) -> Tensor:
    """``min(exp(clamp(logp - old, -20, 20)), is_clip)``, detached."""
    log_ratio = torch.clamp(
        target_logprobs.detach() - _at_least_fp32(old_logprobs), -IS_LOG_RATIO_LIMIT, IS_LOG_RATIO_LIMIT
    )
    return torch.clamp(log_ratio.exp(), max=is_clip)


def reduce_per_token_loss(
    per_token: Tensor, mask: Tensor, reduction: str, normalizer: Tensor | float | None = None
) -> Tensor:
    """Apply one of the verl reductions to a ``[B, T]`` (or ``[N]``) per-token loss, mask already applied.

    ``normalizer`` replaces the outer denominator: the token count of ``"token-mean"``, the number of
    sequences of the ``"seq-mean-*"`` reductions.
    """
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token-mean":
        denominator = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
        return per_token.sum() / denominator
    # [B, T] or one sequence [N] (explicit sizes: T or N may be 0); a 0-dim loss is one sequence of one token
    rows = per_token.shape[:-1].numel()
    per_sequence_loss = per_token.reshape(rows, per_token.shape[-1]) if per_token.dim() > 0 else per_token.reshape(1, 1)
    per_sequence_mask = mask.reshape(per_sequence_loss.shape)
    per_sequence = per_sequence_loss.sum(-1)
    if reduction == "seq-mean-token-mean":
        per_sequence = per_sequence / per_sequence_mask.sum(-1).clamp(min=1.0)
    elif reduction != "seq-mean-token-sum":
        raise ValueError(f"unknown reduction {reduction!r}")
    denominator = per_sequence.shape[0] if normalizer is None else normalizer
    return per_sequence.sum() / denominator


def sdpo_loss_reference_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    target_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    topk: int | None = 100,
    add_tail: bool = True,
    alpha: float = 0.5,
    is_clip: float | None = 2.0,
    temperature: float = 1.0,
    reduction: str = "token-mean",
    normalizer: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> dict[str, Tensor | None]:
    """Naive SDPO loss on ``[..., V]`` raw head outputs (student and teacher), every intermediate materialised.

    Returns a dict with ``loss`` (reduced as asked), ``per_token_loss`` (``[...]``, before the reduction,
    masked, detached), ``target_logprobs`` (``[...]``, with gradient;
    ``None`` without ``target_ids``), ``teacher_target_logprobs`` (detached), ``is_weight`` (``[...]``,
    detached; ``None`` without IS), ``topk_mass`` and ``entropy`` (``[...]``, detached; the student's entropy over
    the full vocabulary at the temperature, 0 at masked positions).
    """
    leading_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    divergence, student_logp, topk_mass = per_token_divergence(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        topk=topk,
        add_tail=add_tail,
        alpha=alpha,
        temperature=temperature,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
    )
    target_logprobs = teacher_target_logprobs = None
    if target_ids is not None:
        target_index = target_ids.reshape(-1, 1).long()
        target_logprobs = student_logp.gather(-1, target_index).squeeze(-1)
        teacher_z = transform_logits(
            teacher_logits.detach().reshape(-1, vocab),
            logit_scale=logit_scale,
            logit_softcap=logit_softcap,
            temperature=temperature,
        )
        teacher_logp = torch.log_softmax(teacher_z, -1)
        teacher_target_logprobs = teacher_logp.gather(-1, target_index).squeeze(-1)
    return _weighted_and_reduced(
        divergence, target_logprobs, teacher_target_logprobs, topk_mass, entropy_of(student_logp), leading_shape,
        mask=mask, old_logprobs=old_logprobs, is_clip=is_clip, token_weights=token_weights, reduction=reduction,
        normalizer=normalizer,
    )  # fmt: skip


def _weighted_and_reduced(
    divergence: Tensor,
    target_logprobs: Tensor | None,
    teacher_target_logprobs: Tensor | None,
    topk_mass: Tensor,
    entropy: Tensor,
    leading_shape: torch.Size,
    *,
    mask: Tensor | None,
    old_logprobs: Tensor | None,
    is_clip: float | None,
    token_weights: Tensor | None,
    reduction: str,
    normalizer: Tensor | float | None,
) -> dict[str, Tensor | None]:
    """From the per-row divergence ``[N]`` (and the student's entropy): IS weight, token weights, mask, reduction;
    the reference's dict."""
    per_token = divergence
    is_weight = None
    if old_logprobs is not None and is_clip is not None:
        is_weight = importance_weight(target_logprobs, old_logprobs.reshape(-1), is_clip)
        per_token = per_token * is_weight
    if token_weights is not None:
        per_token = per_token * _at_least_fp32(token_weights.detach().reshape(-1))
    flat_mask = torch.ones_like(per_token) if mask is None else mask.reshape(-1).to(per_token.dtype)
    per_token = torch.where(flat_mask != 0, per_token * flat_mask, torch.zeros_like(per_token))
    loss = reduce_per_token_loss(
        per_token.reshape(leading_shape), flat_mask.reshape(leading_shape), reduction, normalizer
    )

    def unflatten(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(leading_shape)

    return {
        "loss": loss,
        "per_token_loss": per_token.detach().reshape(leading_shape),
        "target_logprobs": unflatten(target_logprobs),
        "teacher_target_logprobs": unflatten(teacher_target_logprobs),
        "is_weight": unflatten(is_weight),
        "topk_mass": unflatten(topk_mass.detach()),
        "entropy": unflatten(torch.where(flat_mask != 0, entropy, torch.zeros_like(entropy))),
    }


def sdpo_loss_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    **options,
) -> dict[str, Tensor | None]:
    """Naive SDPO loss from hidden states and lm_head weights: full logits, then the logits path."""
    student_logits = _at_least_fp32(torch.nn.functional.linear(student_hidden, student_weight, student_bias))
    with torch.no_grad():
        teacher_logits = _at_least_fp32(torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias))
    return sdpo_loss_reference_from_logits(student_logits, teacher_logits, **options)


def sdpo_loss_reference_from_teacher_topk(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    *,
    student_bias: Tensor | None = None,
    mask: Tensor | None = None,
    target_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    add_tail: bool = True,
    alpha: float = 0.5,
    is_clip: float | None = 2.0,
    temperature: float = 1.0,
    reduction: str = "token-mean",
    normalizer: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> dict[str, Tensor | None]:
    """Naive SDPO loss against a teacher given as its top-K log-probs (SPEC 3.2, TRL's served-teacher loss).

    ``teacher_topk_logprobs``/``teacher_topk_ids``: ``[..., K]``. The support is the teacher's ids; the student's
    log-probs there are full-vocabulary ones; masked positions are set to 0 on both sides (TRL) before the tail
    bin or the renormalisation. Same dict as :func:`sdpo_loss_reference_from_logits`; ``teacher_target_logprobs``
    is None (unknown). Masked positions' ids are read through a clamp, so padding there never indexes out of range.
    """
    leading_shape = student_hidden.shape[:-1]
    topk = teacher_topk_ids.shape[-1]
    raw_logits = _at_least_fp32(torch.nn.functional.linear(student_hidden, student_weight, student_bias))
    transform = {"logit_scale": logit_scale, "logit_softcap": logit_softcap, "temperature": temperature}
    student_logp = torch.log_softmax(transform_logits(raw_logits, **transform), dim=-1).reshape(
        -1, raw_logits.shape[-1]
    )
    keep = (torch.ones(leading_shape, device=student_hidden.device) if mask is None else mask).reshape(-1, 1) != 0
    ids = torch.where(keep, teacher_topk_ids.reshape(-1, topk).long().clamp(0, student_logp.shape[-1] - 1), 0)
    student_support = torch.where(keep, student_logp.gather(-1, ids), 0.0)
    teacher_support = torch.where(keep, _at_least_fp32(teacher_topk_logprobs.detach()).reshape(-1, topk), 0.0)
    divergence = support_divergence(student_support, teacher_support, add_tail=add_tail, alpha=alpha)
    target_logprobs = None
    if target_ids is not None:
        target_logprobs = student_logp.gather(-1, target_ids.reshape(-1, 1).long()).squeeze(-1)
    return _weighted_and_reduced(
        divergence, target_logprobs, None, student_support.detach().exp().sum(-1), entropy_of(student_logp),
        leading_shape, mask=mask, old_logprobs=old_logprobs, is_clip=is_clip, token_weights=token_weights,
        reduction=reduction, normalizer=normalizer,
    )  # fmt: skip
