"""The per-row results of the fused loss: allocated once per call, written chunk by chunk by the row stages.

Both row-stage namespaces (``sdpo_ops.row_ops`` in torch, ``sdpo_ops.kernels.row_ops`` in Triton) write
their results straight into row slices of these tensors, so a chunk costs no copies between stages, and
backward finds what it needs (log-sum-exps, top-K columns, gradient coefficients, row scales) in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RowOutputs(NamedTuple):
    """``[N]`` unless noted; fp32 (fp64 for fp64 inputs), the index int64. Every field is written for every
    row by the stages (nothing relies on a fill)."""

    loss: Tensor  # row_scale * D: the per-token weighted divergence
    divergence: Tensor  # D, unweighted (logging)
    target_logprobs: Tensor  # the student's log p(target) (0 without targets)
    teacher_target_logprobs: Tensor  # the teacher's log p(target) (0 without targets)
    is_weight: Tensor  # the clipped importance weight (1 without old log-probs)
    topk_mass: Tensor  # the student's probability on its top-K (1 in full-vocabulary mode)
    row_scale: Tensor  # row_weight * is_weight, exactly 0 on masked rows: multiplies dD/dz
    dense_grad: Tensor  # coefficient of -softmax(z) in dD/dz
    sparse_grad: Tensor  # [N, K] dD/dz at the top-K columns beyond the dense term
    student_lse: Tensor
    teacher_lse: Tensor
    topk_index: Tensor  # [N, K] int64: the student's top-K columns, or a top-K teacher's ids
    entropy: Tensor  # the student's entropy over the full vocabulary (logging), from the log-sum-exp's pass

    @classmethod
    def allocate(
        cls, num_tokens: int, topk: int, dtype: torch.dtype, device: torch.device, topk_index: Tensor | None = None
    ) -> RowOutputs:
        """``topk_index``: the support's columns when the caller already has them (a top-K teacher's ids), else
        allocated for the student's top-K stage to write."""

        def row() -> Tensor:
            return torch.empty(num_tokens, dtype=dtype, device=device)

        return cls(
            loss=row(),
            divergence=row(),
            target_logprobs=row(),
            teacher_target_logprobs=row(),
            is_weight=row(),
            topk_mass=row(),
            row_scale=row(),
            dense_grad=row(),
            sparse_grad=torch.empty(num_tokens, topk, dtype=dtype, device=device),
            student_lse=row(),
            teacher_lse=row(),
            topk_index=torch.empty(num_tokens, topk, dtype=torch.int64, device=device)
            if topk_index is None
            else topk_index,
            entropy=row(),
        )

    def rows(self, rows: slice) -> RowOutputs:
        """Views of the rows of one chunk."""
        return RowOutputs(*(field[rows] for field in self))


class RowLossInputs(NamedTuple):
    """What the row loss reads beyond a chunk's statistics: ``row_loss_``'s remaining arguments, handed to
    ``student_row_stats(..., row_loss=)`` to run it in that launch's epilogue."""

    rows: RowOutputs  # the chunk's rows: written
    old_logprobs: Tensor | None  # [C]
    row_weight: Tensor  # [C]
    add_tail: bool
    alpha: float
    is_clip: float | None
    # a served teacher's top-K log-probs [C, K] at the support (``teacher_row_stats`` then reads the student's
    # buffer: the teacher side is these, with a log-sum-exp and target logit of 0); None: a teacher given as logits
    served_teacher_logprobs: Tensor | None = None
