"""The row stages of one chunk, in torch: the twins of the Triton kernels in ``sdpo_ops.kernels``.

The chunked autograd Function (``sdpo_ops.chunked``) forms a chunk's logits with a matmul into an fp32
``[C, V]`` buffer, then calls these stages. ``sdpo_ops.kernels.row_ops`` provides the same functions, same
signatures and semantics, as Triton kernels; the Function takes either namespace, so the CPU tests exercise
the same host orchestration the GPU runs. Results go straight into the caller's tensors (``out=``, or the
chunk's rows of ``RowOutputs``).

All logits here are fp32 and already divided by the temperature. For a softcapped head the buffer holds the
pre-tanh values and every stage takes ``softcap_bound = softcap / T``; ``pre_scale`` is the part of the logit
scale the chunk GEMM's epilogue could not apply (bf16 on CUDA). Each stage works on
``_on_load(buffer) = bound * tanh(buffer * pre_scale)`` (or ``buffer * pre_scale``), as the Triton kernels do
on load: no transform ever makes a pass over the buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo_ops.divergence import generalized_jsd_and_grad, topk_divergence
from sdpo_ops.reference import importance_weight
from sdpo_ops.row_outputs import RowLossInputs, RowOutputs


def _on_load(buffer: Tensor, pre_scale: float, softcap_bound: float | None) -> Tensor:
    """The logits from a chunk buffer, as ``sdpo_ops.kernels.elementwise._on_load`` computes them."""
    logits = buffer if pre_scale == 1.0 else buffer * pre_scale
    return logits if softcap_bound is None else softcap_bound * torch.tanh(logits)


def _entropy_into(entropy: Tensor | None, logits: Tensor) -> None:
    """``entropy = -sum_j p_j log p_j`` per row (``p = softmax(logits)``; ``-inf`` logits add 0), when asked."""
    if entropy is None:
        return
    # log_softmax shifts by the row max before subtracting the log-sum-exp: no cancellation at logits of 1e4
    log_probs = torch.log_softmax(logits, -1)
    # -inf log-probs become the most negative float: p = 0 exactly, and 0 * finite = 0 instead of NaN
    log_probs.clamp_(min=torch.finfo(log_probs.dtype).min)
    entropy.copy_(-torch.linalg.vecdot(log_probs.exp(), log_probs))


def _into(out: tuple[Tensor, ...] | None, values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    if out is None:
        return values
    for destination, value in zip(out, values, strict=True):
        destination.copy_(value)
    return out


def student_row_stats(
    logits: Tensor,
    topk: int,
    target_ids: Tensor | None,
    *,
    out: tuple[Tensor, ...] | None = None,
    pre_scale: float = 1.0,
    softcap_bound: float | None = None,
    entropy: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_out: tuple[Tensor, Tensor, Tensor] | None = None,
    row_loss: RowLossInputs | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-sum-exp, top-K and target logit per row of the student's logits; with ``teacher_logits``, also
    ``teacher_row_stats`` of the teacher's at the student's top-K columns, and with ``row_loss`` then the chunk's
    ``row_loss_`` from these statistics (the Triton kernel fuses all three into one launch).

    Args:
        logits: [C, V] fp32.
        topk: K >= 0 (0: no top-K, e.g. full-vocabulary mode).
        target_ids: [C] int64 or None.
        out: ``(lse, topk_logits, topk_index, target_logit)`` to write into, else allocated.
        entropy: [C] to write each row's entropy into (of ``softmax(logits)``), or None.
        teacher_logits: [C, V] fp32 or None; teacher_out: ``(teacher_lse, teacher_topk_logits, teacher_target_logit)``
            to write ``teacher_row_stats(teacher_logits, topk_index, target_ids)`` into, required with it.
        row_loss: with a teacher and ``topk > 0``: ``row_loss_(row_loss.rows, <the two top-K>, <the two target
            logits>, ...)`` on the statistics just computed (``rows``' log-sum-exps read as written here).
    Returns:
        ``(lse [C], topk_logits [C, K], topk_index [C, K] int64, target_logit [C])``; ``target_logit`` is
        zeros when ``target_ids`` is None. Top-K order is unspecified (ties: any consistent choice).
    """
    logits = _on_load(logits, pre_scale, softcap_bound)
    lse = torch.logsumexp(logits, dim=-1)
    _entropy_into(entropy, logits)
    if topk > 0:
        topk_logits, topk_index = torch.topk(logits, topk, dim=-1, sorted=False)
    else:
        topk_logits = logits.new_empty(logits.shape[0], 0)
        topk_index = torch.empty(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    target_logit = torch.zeros_like(lse) if target_ids is None else logits.gather(1, target_ids[:, None]).squeeze(1)
    if teacher_logits is not None:
        if teacher_out is None:
            raise ValueError("teacher_out is required with teacher_logits")
        teacher_row_stats(
            teacher_logits, topk_index, target_ids, out=teacher_out, pre_scale=pre_scale, softcap_bound=softcap_bound
        )
    out = _into(out, (lse, topk_logits, topk_index, target_logit))
    if row_loss is not None:
        if teacher_logits is None or topk == 0:
            raise ValueError("row_loss needs teacher_logits and topk > 0 (the support the row loss is over)")
        _stage_row_loss(row_loss, (out[0], out[1], out[3]), teacher_out, target_ids is not None)
    return out


def teacher_row_stats(
    logits: Tensor,
    index: Tensor,
    target_ids: Tensor | None = None,
    *,
    out: tuple[Tensor, ...] | None = None,
    pre_scale: float = 1.0,
    softcap_bound: float | None = None,
    entropy: Tensor | None = None,
    row_loss: RowLossInputs | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-sum-exp per row of the teacher's logits, the logits at the given columns and at the target.

    Args:
        logits: [C, V] fp32.
        index: [C, J] int64 (the student's top-K columns).
        target_ids: [C] int64 or None.
        out: ``(lse, gathered, target_logit)`` to write into, else allocated.
        entropy: [C] to write each row's entropy into (a top-K teacher's stage reads the student's logits), or None.
        row_loss: for a served teacher (``logits`` the student's, ``index`` its ids), with ``served_teacher_logprobs``
            [C, J]: then ``row_loss_`` on these statistics against them (log-sum-exp and target logit 0).
    Returns:
        ``(lse [C], gathered [C, J], target_logit [C])``; ``target_logit`` is zeros without targets.
    """
    logits = _on_load(logits, pre_scale, softcap_bound)
    lse = torch.logsumexp(logits, dim=-1)
    _entropy_into(entropy, logits)
    target_logit = torch.zeros_like(lse) if target_ids is None else logits.gather(1, target_ids[:, None]).squeeze(1)
    out = _into(out, (lse, logits.gather(1, index), target_logit))
    if row_loss is not None:
        served = row_loss.served_teacher_logprobs
        if served is None or served.shape != index.shape:
            raise ValueError(f"row_loss needs served_teacher_logprobs of shape [C, J] = {list(index.shape)}")
        zeros = torch.zeros_like(out[0])  # the served teacher's log-sum-exp and target logit
        _stage_row_loss(row_loss, out, (zeros, served, zeros), target_ids is not None)
    return out


def full_vocab_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
    alpha: float,
    *,
    out: tuple[Tensor, Tensor] | None = None,
    pre_scale: float = 1.0,
    softcap_bound: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Full-vocabulary GJSD per row and the row sum of its gradient w.r.t. the student log-probs.

    Args:
        student_logits, teacher_logits: [C, V] fp32; student_lse, teacher_lse: [C].
        out: ``(divergence, grad_sum)`` to write into, else allocated.
    Returns:
        ``(divergence [C], grad_sum [C])`` with ``grad_sum = sum_j dD/ds_j``.
    """
    student_logits, teacher_logits = (
        _on_load(student_logits, pre_scale, softcap_bound),
        _on_load(teacher_logits, pre_scale, softcap_bound),
    )
    divergence, grad = generalized_jsd_and_grad(
        student_logits - student_lse[:, None], teacher_logits - teacher_lse[:, None], alpha
    )
    return _into(out, (divergence, grad.sum(-1)))


def _stage_row_loss(inputs: RowLossInputs, student: tuple[Tensor, ...], teacher: tuple[Tensor, ...],
                    has_target: bool) -> None:  # fmt: skip
    """``row_loss_`` on a stats stage's results, each side ``(lse, topk_logits, target_logit)``: what the Triton stats
    kernels run in their epilogue."""
    rows = inputs.rows._replace(student_lse=student[0], teacher_lse=teacher[0])
    row_loss_(
        rows, student[1], teacher[1], student[2] if has_target else None, teacher[2] if has_target else None,
        inputs.old_logprobs, inputs.row_weight, add_tail=inputs.add_tail, alpha=inputs.alpha, is_clip=inputs.is_clip,
    )  # fmt: skip


def row_loss_(
    rows: RowOutputs,
    student_topk_logits: Tensor | None,
    teacher_topk_logits: Tensor | None,
    student_target_logit: Tensor | None,
    teacher_target_logit: Tensor | None,
    old_logprobs: Tensor | None,
    row_weight: Tensor,
    *,
    add_tail: bool,
    alpha: float,
    is_clip: float | None,
) -> None:
    """Write one chunk's per-row loss, outputs and gradient coefficients into ``rows``.

    Reads ``rows.student_lse`` and ``rows.teacher_lse``; in full-vocabulary mode (``student_topk_logits``
    None) also ``rows.divergence`` and ``rows.dense_grad``, written before by ``full_vocab_divergence``.
    ``row_weight`` [C] is mask x token weights x reduction coefficient; ``row_scale = row_weight * is_weight``
    and ``loss = row_scale * D`` are exact zeros where ``row_weight`` is 0 (selects: a masked row may hold NaN).
    """
    if student_topk_logits is not None:
        support = topk_divergence(
            rows.student_lse, student_topk_logits, rows.teacher_lse, teacher_topk_logits, add_tail=add_tail, alpha=alpha
        )
        rows.divergence.copy_(support.divergence)
        rows.sparse_grad.copy_(support.sparse_grad)
        rows.dense_grad.copy_(support.dense_grad)
        rows.topk_mass.copy_(support.topk_mass)
    else:
        rows.topk_mass.fill_(1.0)
    if student_target_logit is not None:
        rows.target_logprobs.copy_(student_target_logit - rows.student_lse)
        rows.teacher_target_logprobs.copy_(teacher_target_logit - rows.teacher_lse)
    else:
        rows.target_logprobs.zero_()
        rows.teacher_target_logprobs.zero_()
    if old_logprobs is not None and is_clip is not None:
        rows.is_weight.copy_(importance_weight(rows.target_logprobs, old_logprobs, is_clip))
    else:
        rows.is_weight.fill_(1.0)
    rows.row_scale.copy_(torch.where(row_weight != 0, row_weight * rows.is_weight, 0.0))
    rows.loss.copy_(torch.where(rows.row_scale != 0, rows.row_scale * rows.divergence, 0.0))


def logit_grad(
    student_logits: Tensor,
    student_lse: Tensor,
    row_scale: Tensor,
    dense_grad: Tensor,
    topk_index: Tensor,
    sparse_grad: Tensor,
    target_ids: Tensor | None,
    target_scale: Tensor | None,
    scale: float,
    teacher: tuple[Tensor, Tensor, float] | None = None,
    *,
    out: Tensor,
    pre_scale: float = 1.0,
    softcap_bound: float | None = None,
) -> Tensor:
    """The gradient of the loss w.r.t. the raw student head outputs of one chunk, written into ``out``.

    Per row, with ``r = row_scale``, ``c = target_scale`` (0 without it) and ``S = softmax(z)``:
    ``dz_j = scale * (r g_j - S_j (r dense + c) + r sparse_k [j = index_k] + c [j = target])``; the elementwise
    ``g_j = dD/ds_j`` exists only in full-vocabulary mode (``teacher = (teacher_logits [C, V], teacher_lse [C],
    alpha)``); ``scale`` is ``logit_scale / temperature``, times ``1 - tanh^2 = 1 - (z_j / softcap_bound)^2`` for a
    softcapped head (``z = bound * tanh(buffer)``). Rows with ``r = 0`` and ``c = 0`` are exact zeros.
    Deterministic: a column listed twice (the target among the top-K) gets its terms summed before one write.

    Args:
        student_logits: [C, V] fp32 (read only); student_lse, row_scale, dense_grad: [C];
        topk_index: [C, K] int64; sparse_grad: [C, K]; target_ids, target_scale: [C] or both None.
        out: [C, V] floating, written and returned.
    """
    has_divergence = row_scale != 0
    # select, never multiply by 0: a masked row's coefficients may be NaN
    dense = torch.where(has_divergence, row_scale * dense_grad, 0.0)
    index = topk_index
    sparse = torch.where(has_divergence[:, None], row_scale[:, None] * sparse_grad, 0.0)
    live = has_divergence
    if target_scale is not None:
        dense = dense + target_scale
        index = torch.cat([index, target_ids[:, None]], 1)
        sparse = torch.cat([sparse, target_scale[:, None]], 1)
        live = live | (target_scale != 0)
    student_logits = _on_load(student_logits, pre_scale, softcap_bound)
    # the gradient is formed in `out` itself when it is the computation's dtype: no [C, V] temporaries
    grad = out if out.dtype == student_logits.dtype else torch.empty_like(student_logits)
    torch.sub(student_logits, student_lse[:, None], out=grad)  # the student's log-probs, for now
    divergence_grad = None
    if teacher is not None:
        teacher_logits, teacher_lse, alpha = teacher
        teacher_logits = _on_load(teacher_logits, pre_scale, softcap_bound)
        _, divergence_grad = generalized_jsd_and_grad(grad, teacher_logits - teacher_lse[:, None], alpha)
        divergence_grad.mul_(torch.where(has_divergence, row_scale, 0.0)[:, None])
    grad.exp_().mul_(-dense[:, None])
    if divergence_grad is not None:
        grad.add_(divergence_grad)
    merged = ((index[:, :, None] == index[:, None, :]) * sparse[:, None, :]).sum(-1)
    grad.scatter_(1, index, grad.gather(1, index) + merged)
    grad.mul_(scale)
    if softcap_bound is not None:
        grad.mul_(1.0 - (student_logits / softcap_bound).square())
    grad.masked_fill_(~live[:, None], 0.0)
    if grad is not out:
        out.copy_(grad)
    return out
