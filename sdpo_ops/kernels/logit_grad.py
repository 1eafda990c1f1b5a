"""The gradient w.r.t. the raw student logits of one chunk, written in the GEMM dtype for the dH/dW GEMMs.

Per row, with ``S = softmax(z) = exp(z - lse(z))``, ``scale = 1 / temperature``, ``r = row_scale`` and the
target term's upstream gradient ``c`` (``target_scale``, only when the target log-probs need a gradient):

    dz_j = scale * (r * g_j - S_j * (r * dense + c) + r * sparse_k [j = index_k] + c [j = target])

(times ``1 - (z_j / bound)^2`` for softcapped logits ``z = bound * tanh(...)``: the chain rule back to the
raw head output, with ``scale = logit_scale / temperature``)
with the elementwise ``g_j = dD/ds_j`` only in full-vocabulary mode (HAS_TEACHER: the teacher row is read
and ``g_j`` recomputed by ``full_vocab_divergence._gjsd_terms``, the forward's own Triton math). A row
with ``r = 0`` and ``c = 0`` (masked) is written as exact zeros, whatever its logits hold.

One program per row, two phases:

1. the dense term over BLOCK_V tiles, read from the intact fp32 logits and stored in ``out``'s dtype (bf16
   on CUDA: no separate cast pass over ``[C, V]``);
2. after a CTA barrier (the same columns were stored by other threads in phase 1), the K top-K columns and
   the target column again: the dense value recomputed from the fp32 logits plus the sparse terms, stored
   once, so each of them is rounded once to the GEMM dtype. The top-K columns are distinct; the target may
   be one of them, and then only the top-K entry (carrying ``r * sparse_k + c``) stores it. No atomics:
   the result is deterministic (``scatter_add_`` on CUDA is not when a column repeats).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sdpo_ops.kernels.elementwise import _on_load
from sdpo_ops.kernels.full_vocab_divergence import _gjsd_terms, gjsd_launch_args
from sdpo_ops.kernels.launch import launch, readable_width, runs_on_gpu

# (BLOCK_V, num_warps) per device type; the interpreter favours few, larger tiles (its cost is per op).
_CUDA_CONFIG = (2048, 8)
_INTERPRET_CONFIG = (64, 1)


@triton.jit
def _dense_logit_grad(z, student_lse, dense_coef, u, teacher_lse, divergence_scale, alpha, log_one_minus_alpha,
                      log_alpha, HAS_TEACHER: tl.constexpr, ALPHA_MODE: tl.constexpr):  # fmt: skip
    s = z - student_lse
    dz = -tl.exp(s) * dense_coef
    if HAS_TEACHER:
        _, grad = _gjsd_terms(s, u - teacher_lse, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
        dz += divergence_scale * grad
    return dz


@triton.jit
def _chain_to_raw(dz, z, scale, inv_softcap_bound, HAS_SOFTCAP: tl.constexpr):
    """dL/d(raw head output) from dL/dz: ``scale = logit_scale / T``, times ``1 - tanh^2 = 1 - (z / bound)^2``
    when the logits were softcapped."""
    if HAS_SOFTCAP:
        tanh = z * inv_softcap_bound
        return dz * (scale * (1.0 - tanh * tanh))
    return dz * scale


@triton.jit
def _logit_grad_kernel(
    logits_ptr,
    out_ptr,
    student_lse_ptr,
    row_scale_ptr,
    dense_grad_ptr,
    topk_index_ptr,
    sparse_grad_ptr,
    target_ids_ptr,
    target_scale_ptr,
    teacher_logits_ptr,
    teacher_lse_ptr,
    V,
    readable_v,
    K,
    scale,
    pre_scale,
    softcap_bound,
    inv_softcap_bound,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    stride_logits_c,
    stride_out_c,
    stride_teacher_c,
    stride_topk_index_c,
    stride_sparse_grad_c,
    HAS_TEACHER: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_c
    out_row = out_ptr + row * stride_out_c
    teacher_row = teacher_logits_ptr + row * stride_teacher_c
    student_lse = tl.load(student_lse_ptr + row).to(tl.float32)
    row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
    has_divergence = row_scale != 0
    # select, never multiply by 0: a masked row's coefficients may be NaN
    dense_coef = tl.where(has_divergence, row_scale * tl.load(dense_grad_ptr + row).to(tl.float32), 0.0)
    if HAS_TARGET:
        target = tl.load(target_ids_ptr + row)
        target_scale = tl.load(target_scale_ptr + row).to(tl.float32)
        dense_coef += target_scale
        live = has_divergence | (target_scale != 0)
    else:
        live = has_divergence
    teacher_lse = tl.load(teacher_lse_ptr + row).to(tl.float32) if HAS_TEACHER else 0.0
    offs_v = tl.arange(0, BLOCK_V)

    for start in range(0, V, BLOCK_V):
        cols = start + offs_v
        in_row = cols < V
        # masked at readable_v (a multiple of 16 where the rows are padded): 128-bit accesses; past V discarded
        readable = cols < readable_v
        z = tl.load(logits_row + cols, mask=readable, other=-float("inf")).to(tl.float32)
        z = tl.where(in_row, _on_load(z, pre_scale, softcap_bound, HAS_SOFTCAP), -float("inf"))
        if HAS_TEACHER:
            u = tl.load(teacher_row + cols, mask=readable, other=-float("inf")).to(tl.float32)
            u = tl.where(in_row, _on_load(u, pre_scale, softcap_bound, HAS_SOFTCAP), -float("inf"))
        else:
            u = z
        dz = _dense_logit_grad(z, student_lse, dense_coef, u, teacher_lse, row_scale, alpha, log_one_minus_alpha,
                               log_alpha, HAS_TEACHER, ALPHA_MODE)  # fmt: skip
        dz = tl.where(live, _chain_to_raw(dz, z, scale, inv_softcap_bound, HAS_SOFTCAP), 0.0)
        dz = tl.where(in_row, dz, 0.0)  # zeros into the padding
        tl.store(out_row + cols, dz.to(out_ptr.dtype.element_ty), mask=readable)

    tl.debug_barrier()
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    index = tl.load(topk_index_ptr + row * stride_topk_index_c + offs_k, mask=in_k, other=0)
    sparse = tl.load(sparse_grad_ptr + row * stride_sparse_grad_c + offs_k, mask=in_k, other=0.0).to(tl.float32)
    sparse = tl.where(has_divergence, row_scale * sparse, 0.0)
    if HAS_TARGET:
        is_target = in_k & (index == target)
        sparse += tl.where(is_target, target_scale, 0.0)
    z = _on_load(
        tl.load(logits_row + index, mask=in_k, other=0.0).to(tl.float32), pre_scale, softcap_bound, HAS_SOFTCAP
    )
    if HAS_TEACHER:
        u = tl.load(teacher_row + index, mask=in_k, other=0.0).to(tl.float32)
        u = _on_load(u, pre_scale, softcap_bound, HAS_SOFTCAP)
    else:
        u = z
    dz = _dense_logit_grad(z, student_lse, dense_coef, u, teacher_lse, row_scale, alpha, log_one_minus_alpha,
                           log_alpha, HAS_TEACHER, ALPHA_MODE) + sparse  # fmt: skip
    dz = tl.where(live, _chain_to_raw(dz, z, scale, inv_softcap_bound, HAS_SOFTCAP), 0.0)
    tl.store(out_row + index, dz.to(out_ptr.dtype.element_ty), mask=in_k)
    if HAS_TARGET:
        # the target column, unless a top-K entry above already carried its term
        target_outside_topk = tl.sum(is_target.to(tl.int32), axis=0) == 0
        # an out-of-range id (a caller bug, caught by the device-side assert of sdpo_loss) touches no memory
        target_in_range = (target >= 0) & (target < V)
        z_t = tl.load(logits_row + target, mask=target_in_range, other=0.0).to(tl.float32)
        z_t = _on_load(z_t, pre_scale, softcap_bound, HAS_SOFTCAP)
        if HAS_TEACHER:
            u_t = tl.load(teacher_row + target, mask=target_in_range, other=0.0).to(tl.float32)
            u_t = _on_load(u_t, pre_scale, softcap_bound, HAS_SOFTCAP)
        else:
            u_t = z_t
        dz_t = _dense_logit_grad(z_t, student_lse, dense_coef, u_t, teacher_lse, row_scale, alpha,
                                 log_one_minus_alpha, log_alpha, HAS_TEACHER, ALPHA_MODE) + target_scale  # fmt: skip
        dz_t = tl.where(live, _chain_to_raw(dz_t, z_t, scale, inv_softcap_bound, HAS_SOFTCAP), 0.0)
        tl.store(out_row + target, dz_t.to(out_ptr.dtype.element_ty), mask=target_outside_topk & live & target_in_range)


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
    block_v: int | None = None,
) -> Tensor:
    """dLoss/d(raw student logits) of one chunk into ``out`` (Triton; see the module docstring).

    Same contract as ``sdpo_ops.row_ops.logit_grad``.

    Args:
        student_logits: [C, V] fp32, the chunk's logits divided by the temperature (read only).
        student_lse, row_scale, dense_grad: [C]; topk_index: [C, K] int64 (distinct per row); sparse_grad: [C, K].
        target_ids, target_scale: [C] (int64, fp32), or both None: the target log-prob term.
        scale: ``logit_scale / temperature``: dz/d(raw head output) without a softcap.
        teacher: ``(teacher_logits [C, V], teacher_lse [C], alpha)`` in full-vocabulary mode, else None.
        out: [C, V] floating (fp32, or the GEMM dtype), written and returned; where the rows of every [C, V]
            argument have memory up to the next multiple of 16 columns (a padded row stride:
            ``kernels.launch.readable_width``), ``out``'s columns V up to it are written with zeros.
        pre_scale: multiplies the buffer on load: the part of the logit scale the chunk GEMM's epilogue did not apply.
        softcap_bound: ``softcap / temperature`` for a softcapped head: the buffer holds the pre-tanh values
            (``sdpo_ops.kernels.elementwise._softcapped``), the logits are ``bound * tanh(y)`` and the gradient gains
            the factor ``1 - (z / softcap_bound)^2``; else None.
        block_v: tile width override (a power of two), for tests and tuning.
    """
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a floating [C, V] tensor, got {tuple(student_logits.shape)} {student_logits.dtype}"
        )
    C, V = student_logits.shape
    if out.shape != (C, V) or not out.is_floating_point():
        raise ValueError(f"out must be a floating [C, V] = [{C}, {V}] tensor, got {tuple(out.shape)} {out.dtype}")
    for name, x in (("student_lse", student_lse), ("row_scale", row_scale), ("dense_grad", dense_grad)):
        if x.shape != (C,):
            raise ValueError(f"{name} must be [C] = [{C}], got {tuple(x.shape)}")
    if topk_index.dim() != 2 or topk_index.shape[0] != C or topk_index.dtype != torch.int64:
        raise ValueError(
            f"topk_index must be a [C, K] = [{C}, K] int64 tensor, got {tuple(topk_index.shape)} {topk_index.dtype}"
        )
    if sparse_grad.shape != topk_index.shape:
        raise ValueError(f"sparse_grad {tuple(sparse_grad.shape)} must match topk_index {tuple(topk_index.shape)}")
    if (target_ids is None) != (target_scale is None):
        raise ValueError("target_ids and target_scale must be given together")
    tensors = [student_logits, out, student_lse, row_scale, dense_grad, topk_index, sparse_grad]
    if target_ids is not None:
        for name, x in (("target_ids", target_ids), ("target_scale", target_scale)):
            if x.shape != (C,):
                raise ValueError(f"{name} must be [C] = [{C}], got {tuple(x.shape)}")
        tensors += [target_ids, target_scale]
    if teacher is not None:
        teacher_logits, teacher_lse, alpha = teacher
        if teacher_logits.shape != (C, V):
            raise ValueError(f"teacher logits must be [C, V] = [{C}, {V}], got {tuple(teacher_logits.shape)}")
        if teacher_lse.shape != (C,):
            raise ValueError(f"teacher lse must be [C] = [{C}], got {tuple(teacher_lse.shape)}")
        tensors += [teacher_logits, teacher_lse]
    else:
        # placeholders: HAS_TEACHER=False compiles every teacher read away
        teacher_logits, teacher_lse, alpha = student_logits, student_lse, 0.0
    if any(x.device != student_logits.device for x in tensors):
        raise ValueError(f"all inputs must be on one device, got {[str(x.device) for x in tensors]}")
    for name, x in (("student_logits", student_logits), ("out", out), ("teacher logits", teacher_logits)):
        if x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along the vocabulary, got strides {x.stride()}")

    default_block_v, num_warps = _CUDA_CONFIG if runs_on_gpu(student_logits) else _INTERPRET_CONFIG
    block_v = block_v or default_block_v
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    block_v = min(block_v, triton.next_power_of_2(V))
    if C == 0:
        return out
    # the kernel reads per-row vectors with unit stride (an upstream gradient may be an expanded 0-stride view)
    student_lse, row_scale, dense_grad, teacher_lse = (
        x.contiguous() for x in (student_lse, row_scale, dense_grad, teacher_lse)
    )
    if target_ids is not None:
        target_ids, target_scale = target_ids.contiguous(), target_scale.contiguous()
    K = topk_index.shape[1]
    has_target = target_ids is not None
    reads = student_logits.element_size() * (2 if teacher is not None else 1)
    launch(
        _logit_grad_kernel,
        (C,),
        hbm_bytes=C * V * (reads + out.element_size()) + C * (K + 1) * 24,
        num_warps=num_warps,
        logits_ptr=student_logits,
        out_ptr=out,
        student_lse_ptr=student_lse,
        row_scale_ptr=row_scale,
        dense_grad_ptr=dense_grad,
        topk_index_ptr=topk_index,
        sparse_grad_ptr=sparse_grad,
        target_ids_ptr=target_ids if has_target else topk_index,
        target_scale_ptr=target_scale if has_target else row_scale,
        teacher_logits_ptr=teacher_logits,
        teacher_lse_ptr=teacher_lse,
        V=V,
        readable_v=readable_width(student_logits, out, teacher_logits),
        K=K,
        scale=float(scale),
        pre_scale=float(pre_scale),
        softcap_bound=float(softcap_bound or 0.0),
        inv_softcap_bound=0.0 if softcap_bound is None else 1.0 / softcap_bound,
        stride_logits_c=student_logits.stride(0),
        stride_out_c=out.stride(0),
        stride_teacher_c=teacher_logits.stride(0),
        stride_topk_index_c=topk_index.stride(0),
        stride_sparse_grad_c=sparse_grad.stride(0),
        HAS_TEACHER=teacher is not None,
        HAS_TARGET=has_target,
        HAS_SOFTCAP=softcap_bound is not None,
        **gjsd_launch_args(alpha),
        BLOCK_V=block_v,
        BLOCK_K=max(triton.next_power_of_2(K), 2),
    )
    return out
