"""The gradient w.r.t. the raw student logits, written in place over the chunk's logits buffer.

Per row, with ``S = softmax(z) = exp(z - lse(z))`` and ``scale = 1 / temperature``:

    dz_j = scale * (row_scale * g_j - S_j * dense_coef + sum_k sparse_value_k [j = sparse_index_k])

The dense part (one read and one write of the row) is the Triton kernel below; the optional elementwise
``g_j = dD/ds_j`` term exists in full-vocabulary mode only (HAS_TEACHER: also read the teacher row and
recompute ``g_j`` with ``full_vocab_divergence._gjsd_terms``, the same Triton math as the forward).

The sparse part is ``torch.Tensor.scatter_add_`` of ``scale * sparse_value [C, J]`` after the dense
kernel, on purpose: J is ~K+1 per row (a few hundred bytes), repeated columns in a row must accumulate
(the target may be among the top-K), and scatter_add_ gets that right on every device, while a Triton
scatter would need atomics, whose handling of duplicate addresses within one block the interpreter does
not promise, or a per-tile search over J. One extra tiny launch, no [C, V] traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sdpo_ops.kernels.full_vocab_divergence import _gjsd_terms, gjsd_launch_args
from sdpo_ops.kernels.launch import launch

# (BLOCK_V, num_warps) per device type; the interpreter favours few, larger tiles (its cost is per op).
_CUDA_CONFIG = (2048, 8)
_INTERPRET_CONFIG = (64, 1)


@triton.jit
def _logit_grad_kernel(
    student_logits_ptr,
    student_lse_ptr,
    dense_coef_ptr,
    teacher_logits_ptr,
    teacher_lse_ptr,
    row_scale_ptr,
    V,
    scale,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    stride_student_c,
    stride_student_v,
    stride_teacher_c,
    stride_teacher_v,
    HAS_TEACHER: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    student_row_ptr = student_logits_ptr + pid_n * stride_student_c
    student_lse = tl.load(student_lse_ptr + pid_n).to(tl.float32)
    dense_coef = tl.load(dense_coef_ptr + pid_n).to(tl.float32)
    if HAS_TEACHER:
        teacher_row_ptr = teacher_logits_ptr + pid_n * stride_teacher_c
        teacher_lse = tl.load(teacher_lse_ptr + pid_n).to(tl.float32)
        row_scale = tl.load(row_scale_ptr + pid_n).to(tl.float32)
    offs_v = tl.arange(0, BLOCK_V)

    for start in range(0, V, BLOCK_V):
        cols = start + offs_v
        in_row = cols < V
        z = tl.load(student_row_ptr + cols * stride_student_v, mask=in_row, other=-float("inf")).to(tl.float32)
        s = z - student_lse
        dz = -tl.exp(s) * dense_coef
        if HAS_TEACHER:
            u = tl.load(teacher_row_ptr + cols * stride_teacher_v, mask=in_row, other=-float("inf")).to(tl.float32)
            _, grad = _gjsd_terms(s, u - teacher_lse, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
            dz += row_scale * grad
        tl.store(student_row_ptr + cols * stride_student_v, dz * scale, mask=in_row)


def logit_grad_(
    student_logits: Tensor,
    student_lse: Tensor,
    dense_coef: Tensor,
    sparse_index: Tensor,
    sparse_value: Tensor,
    scale: float,
    teacher: tuple[Tensor, Tensor, Tensor, float] | None = None,
    *,
    block_v: int | None = None,
) -> Tensor:
    """Overwrite the student's logits with the gradient of the loss w.r.t. the raw logits (Triton).

    Same contract as ``sdpo_ops.row_ops.logit_grad_``: per row
    ``dz_j = scale * (row_scale * g_j - softmax(z)_j * dense_coef + sum_k sparse_value_k [j = index_k])``,
    repeated indices accumulating; the ``g_j`` term only with ``teacher = (teacher_logits [C, V],
    teacher_lse [C], row_scale [C], alpha)`` (full-vocabulary mode).

    Args:
        student_logits: [C, V] fp32, overwritten and returned.
        student_lse: [C]; dense_coef: [C]; sparse_index: [C, J] int64; sparse_value: [C, J] fp32.
        scale: ``1 / temperature``.
        teacher: see above, or None.
        block_v: tile width override (a power of two), for tests and tuning.
    """
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a floating [C, V] tensor, got {tuple(student_logits.shape)} {student_logits.dtype}"
        )
    C, V = student_logits.shape
    for name, x in (("student_lse", student_lse), ("dense_coef", dense_coef)):
        if x.shape != (C,):
            raise ValueError(f"{name} must be [C] = [{C}], got {tuple(x.shape)}")
    if sparse_index.dim() != 2 or sparse_index.shape[0] != C or sparse_index.dtype != torch.int64:
        raise ValueError(
            f"sparse_index must be a [C, J] = [{C}, J] int64 tensor, "
            f"got {tuple(sparse_index.shape)} {sparse_index.dtype}"
        )
    if sparse_value.shape != sparse_index.shape:
        raise ValueError(
            f"sparse_value {tuple(sparse_value.shape)} must match sparse_index {tuple(sparse_index.shape)}"
        )
    tensors = [student_logits, student_lse, dense_coef, sparse_index, sparse_value]
    if teacher is not None:
        teacher_logits, teacher_lse, row_scale, alpha = teacher
        if teacher_logits.shape != (C, V):
            raise ValueError(f"teacher logits must be [C, V] = [{C}, {V}], got {tuple(teacher_logits.shape)}")
        for name, x in (("teacher lse", teacher_lse), ("row_scale", row_scale)):
            if x.shape != (C,):
                raise ValueError(f"{name} must be [C] = [{C}], got {tuple(x.shape)}")
        gjsd_args = gjsd_launch_args(alpha)
        tensors += [teacher_logits, teacher_lse, row_scale]
    else:
        # placeholders: HAS_TEACHER=False compiles every teacher read away
        teacher_logits, teacher_lse, row_scale = student_logits, student_lse, student_lse
        gjsd_args = gjsd_launch_args(0.0)
    if any(x.device != student_logits.device for x in tensors):
        raise ValueError(f"all inputs must be on one device, got {[str(x.device) for x in tensors]}")

    default_block_v, num_warps = _CUDA_CONFIG if student_logits.is_cuda else _INTERPRET_CONFIG
    block_v = block_v or default_block_v
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    block_v = min(block_v, triton.next_power_of_2(V))
    if C == 0:
        return student_logits

    launch(
        _logit_grad_kernel,
        (C,),
        hbm_bytes=C * V * 2 * student_logits.element_size() * (2 if teacher is not None else 1),
        student_logits_ptr=student_logits,
        student_lse_ptr=student_lse,
        dense_coef_ptr=dense_coef,
        teacher_logits_ptr=teacher_logits,
        teacher_lse_ptr=teacher_lse,
        row_scale_ptr=row_scale,
        V=V,
        scale=float(scale),
        stride_student_c=student_logits.stride(0),
        stride_student_v=student_logits.stride(1),
        stride_teacher_c=teacher_logits.stride(0),
        stride_teacher_v=teacher_logits.stride(1),
        HAS_TEACHER=teacher is not None,
        **gjsd_args,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    # sparse part: see the module docstring for why this is a torch scatter_add_
    student_logits.scatter_add_(1, sparse_index, sparse_value.to(student_logits.dtype) * scale)
    return student_logits
