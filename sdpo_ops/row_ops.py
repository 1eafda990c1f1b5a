"""The row stages of one chunk, in torch: the twins of the Triton kernels in ``sdpo_ops.kernels``.

The chunked autograd Function (``sdpo_ops.chunked``) forms a chunk's logits with a matmul into an fp32
``[C, V]`` buffer, then calls these four stages. ``sdpo_ops.kernels.row_ops`` provides the same four
functions, same signatures and semantics, as Triton kernels; the Function takes either namespace, so the
CPU tests exercise the same host orchestration the GPU runs.

All logits here are fp32 and already divided by the temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo_ops.divergence import generalized_jsd_and_grad


def student_row_stats(logits: Tensor, topk: int, target_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-sum-exp, top-K and target logit per row of the student's logits.

    Args:
        logits: [C, V] fp32.
        topk: K >= 0 (0: no top-K, e.g. full-vocabulary mode).
        target_ids: [C] int64 or None.
    Returns:
        ``(lse [C], topk_logits [C, K], topk_index [C, K] int64, target_logit [C])``; ``target_logit`` is
        zeros when ``target_ids`` is None. Top-K order is unspecified (ties: any consistent choice).
    """
    lse = torch.logsumexp(logits, dim=-1)
    if topk > 0:
        topk_logits, topk_index = torch.topk(logits, topk, dim=-1, sorted=False)
    else:
        topk_logits = logits.new_empty(logits.shape[0], 0)
        topk_index = torch.empty(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    target_logit = torch.zeros_like(lse) if target_ids is None else logits.gather(1, target_ids[:, None]).squeeze(1)
    return lse, topk_logits, topk_index, target_logit


def teacher_row_stats(logits: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Log-sum-exp per row of the teacher's logits and the logits at the given columns.

    Args:
        logits: [C, V] fp32.
        index: [C, J] int64 (the student's top-K columns, possibly followed by the target column).
    Returns:
        ``(lse [C], gathered [C, J])``.
    """
    return torch.logsumexp(logits, dim=-1), logits.gather(1, index)


def full_vocab_divergence(
    student_logits: Tensor, teacher_logits: Tensor, student_lse: Tensor, teacher_lse: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Full-vocabulary GJSD per row and the row sum of its gradient w.r.t. the student log-probs.

    Args:
        student_logits, teacher_logits: [C, V] fp32; student_lse, teacher_lse: [C].
    Returns:
        ``(divergence [C], grad_sum [C])`` with ``grad_sum = sum_j dD/ds_j``.
    """
    divergence, grad = generalized_jsd_and_grad(
        student_logits - student_lse[:, None], teacher_logits - teacher_lse[:, None], alpha
    )
    return divergence, grad.sum(-1)


def logit_grad_(
    student_logits: Tensor,
    student_lse: Tensor,
    dense_coef: Tensor,
    sparse_index: Tensor,
    sparse_value: Tensor,
    scale: float,
    teacher: tuple[Tensor, Tensor, Tensor, float] | None = None,
) -> Tensor:
    """Overwrite the student's logits with the gradient of the loss w.r.t. the raw logits.

    Per row: ``dz_j = scale * (row_scale * g_j - softmax(z)_j * dense_coef + sum_k sparse_value_k [j = index_k])``
    where the elementwise ``g_j = dD/ds_j`` term exists only in full-vocabulary mode (``teacher`` given as
    ``(teacher_logits [C, V], teacher_lse [C], row_scale [C], alpha)``). ``scale`` is ``1 / temperature``.
    Repeated indices in a row accumulate.

    Args:
        student_logits: [C, V] fp32, overwritten and returned.
        student_lse: [C]; dense_coef: [C]; sparse_index: [C, J] int64; sparse_value: [C, J] fp32.
    """
    probs = torch.exp(student_logits - student_lse[:, None])
    if teacher is not None:
        teacher_logits, teacher_lse, row_scale, alpha = teacher
        _, grad = generalized_jsd_and_grad(
            student_logits - student_lse[:, None], teacher_logits - teacher_lse[:, None], alpha
        )
        student_logits.copy_(grad.mul_(row_scale[:, None]))
    else:
        student_logits.zero_()
    student_logits.sub_(probs.mul_(dense_coef[:, None]))
    student_logits.scatter_add_(1, sparse_index, sparse_value)
    if scale != 1.0:
        student_logits.mul_(scale)
    return student_logits
