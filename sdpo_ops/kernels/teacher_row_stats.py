"""Teacher row statistics: log-sum-exp over the whole row and the logits at given columns.

Per row ``u`` (``[V]`` fp32, already divided by the temperature) and its ``J`` columns ``index`` (the
student's top-K, possibly followed by the target):

    lse        online over BLOCK_V tiles, in base 2 (u' = u log2(e)): m' = max(m, max_tile u'),
               s' = s * 2^(m - m') + sum_tile 2^(u' - m'), m from a -FLT_MAX floor (NaN-free for -inf tiles and rows
               with no guard); lse = (m + log2 s) ln 2
    entropy    (when asked: a top-K teacher's stage runs over the *student's* buffer) the same pass carries
               t = sum 2^(u' - m) (u' - m), moved with s (``elementwise._rescaled``): entropy = (log2 s - t / s) ln 2
    gathered_j = u[index_j]   (one masked gather of J <= BLOCK_J elements; out-of-range columns read NaN)

    row loss   (HAS_ROW_LOSS: a served teacher, the row the student's) ``row_loss._row_loss_epilogue`` on the
               registers, against the teacher's log-probs at the same columns.

Written: ``lse [C]``, ``gathered [C, J]``, ``target_logit [C]``, ``entropy [C]`` when asked. The teacher needs its
full row only for the log-sum-exp; the gather is an indexed read of a few hundred bytes per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sdpo_ops.kernels.elementwise import (
    _FLT_MAX_NEG,
    _LN2,
    _LOG2E,
    _entropy,
    _exp_terms,
    _on_load,
    _rescaled,
    _store_target_logit,
)
from sdpo_ops.kernels.launch import check_row_output, launch, readable_width, runs_on_gpu
from sdpo_ops.kernels.row_loss import _row_loss_epilogue, row_loss_launch_args
from sdpo_ops.row_outputs import RowLossInputs

# (BLOCK_V, num_warps) per device type; the interpreter favours few, larger tiles (its cost is per op).
_CUDA_CONFIG = (4096, 8)
_INTERPRET_CONFIG = (64, 1)


@triton.jit
def _teacher_row_stats_kernel(
    logits_ptr,
    index_ptr,
    lse_ptr,
    gathered_ptr,
    target_ids_ptr,
    target_logit_ptr,
    entropy_ptr,
    V,
    readable_v,
    J,
    pre_scale,
    softcap_bound,
    stride_logits_c,
    stride_logits_v,
    stride_index_c,
    stride_index_j,
    stride_gathered_c,
    teacher_logprobs_ptr,
    stride_teacher_logprobs_c,
    old_logprobs_ptr,
    row_weight_ptr,
    loss_ptr,
    divergence_ptr,
    target_logprobs_ptr,
    teacher_target_logprobs_ptr,
    is_weight_ptr,
    topk_mass_ptr,
    row_scale_ptr,
    dense_grad_ptr,
    sparse_grad_ptr,
    is_clip,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    stride_sparse_grad,
    BLOCK_V: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_ROW_LOSS: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    HAS_IS: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    TAIL_MAX: tl.constexpr,
    LOG_RATIO_LIMIT: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + pid_n * stride_logits_c
    offs_v = tl.arange(0, BLOCK_V)

    # online log-sum-exp (and entropy: dead code without HAS_ENTROPY) in base 2 (u times log2(e)) from a finite floor
    # of m: no -inf guard (see ``elementwise._rescaled``)
    m = _FLT_MAX_NEG
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs_v
        u = tl.load(row_ptr + cols * stride_logits_v, mask=cols < readable_v, other=-float("inf")).to(tl.float32)
        u = tl.where(cols < V, _on_load(u, pre_scale, softcap_bound, HAS_SOFTCAP), -float("inf")) * _LOG2E
        m_new = tl.maximum(m, tl.max(u, axis=0))
        s, t = _rescaled(m, s, t, m_new)
        e, e_log = _exp_terms(u, m_new)
        s += tl.sum(e, axis=0)
        t += tl.sum(e_log, axis=0)
        m = m_new
    # back from base 2; a row of -inf only: -FLT_MAX + log2(0) = -inf
    lse = (m + tl.log2(s)) * _LN2
    tl.store(lse_ptr + pid_n, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + pid_n, _entropy(s, t))

    # gather at the given columns
    offs_j = tl.arange(0, BLOCK_J)
    in_j = offs_j < J
    index = tl.load(index_ptr + pid_n * stride_index_c + offs_j * stride_index_j, mask=in_j, other=0)
    in_range = (index >= 0) & (index < V)
    gathered = tl.load(row_ptr + index * stride_logits_v, mask=in_j & in_range, other=float("nan")).to(tl.float32)
    gathered = _on_load(gathered, pre_scale, softcap_bound, HAS_SOFTCAP)
    tl.store(gathered_ptr + pid_n * stride_gathered_c + offs_j, gathered, mask=in_j)

    target_logit = _store_target_logit(row_ptr, stride_logits_v, target_ids_ptr, target_logit_ptr, pid_n, V,
                                       pre_scale, softcap_bound, HAS_TARGET, HAS_SOFTCAP)  # fmt: skip
    if HAS_ROW_LOSS:
        # a served teacher (the row is the student's): the row loss on these statistics against its log-probs, whose
        # log-sum-exp and target logit are 0 (``row_loss._row_loss_epilogue``: no launch, no [C, K] round trip)
        t = tl.load(teacher_logprobs_ptr + pid_n * stride_teacher_logprobs_c + offs_j, mask=in_j, other=-float("inf"))
        _row_loss_epilogue(
            pid_n, tl.where(in_j, gathered, -float("inf")), t.to(tl.float32), offs_j, J, lse, 0.0, target_logit, 0.0,
            old_logprobs_ptr, row_weight_ptr, loss_ptr, divergence_ptr, target_logprobs_ptr,
            teacher_target_logprobs_ptr, is_weight_ptr, topk_mass_ptr, row_scale_ptr, dense_grad_ptr, sparse_grad_ptr,
            is_clip, alpha, log_one_minus_alpha, log_alpha, stride_sparse_grad, HAS_SUPPORT, ADD_TAIL, HAS_TARGET,
            HAS_IS, ALPHA_MODE, TAIL_MAX, LOG_RATIO_LIMIT,
        )  # fmt: skip


def teacher_row_stats(
    logits: Tensor,
    index: Tensor,
    target_ids: Tensor | None = None,
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    pre_scale: float = 1.0,
    softcap_bound: float | None = None,
    entropy: Tensor | None = None,
    row_loss: RowLossInputs | None = None,
    block_v: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-sum-exp per row of the teacher's logits and the logits at the given columns (Triton).

    Same contract as ``sdpo_ops.row_ops.teacher_row_stats``.

    Args:
        logits: [C, V] fp32 (bf16/fp16 are read as fp32).
        index: [C, J] int64, columns in [0, V) (the student's top-K).
        target_ids: [C] int64 or None: one more column per row, read into ``target_logit``.
        out: ``(lse, gathered, target_logit)`` to write into, else allocated.
        pre_scale: multiplies the buffer on load: the part of the logit scale the chunk GEMM's epilogue did not apply.
        softcap_bound: ``softcap / temperature`` for a softcapped head (statistics of ``bound * tanh(logits)``).
        entropy: [C] to write each row's entropy into (of the softmax of the transformed logits), from the
            log-sum-exp's own pass; None: not computed.
        row_loss: for a served teacher (``logits`` the student's, ``index`` the teacher's ids), the rest of
            ``row_loss_``'s arguments, ``served_teacher_logprobs`` [C, J] given: the chunk's row loss in this launch's
            epilogue.
        block_v: tile width override (a power of two), for tests and tuning.
    Returns:
        ``(lse [C], gathered [C, J], target_logit [C])``, fp32; ``target_logit`` is zeros without targets.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [C, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    C, V = logits.shape
    if index.dim() != 2 or index.shape[0] != C or index.dtype != torch.int64:
        raise ValueError(f"index must be a [C, J] = [{C}, J] int64 tensor, got {tuple(index.shape)} {index.dtype}")
    if index.device != logits.device:
        raise ValueError(f"index is on {index.device}, logits on {logits.device}")
    J = index.shape[1]
    check_row_output("entropy", entropy, logits)

    default_block_v, num_warps = _CUDA_CONFIG if runs_on_gpu(logits) else _INTERPRET_CONFIG
    block_v = block_v or default_block_v
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    block_v = min(block_v, triton.next_power_of_2(V))

    if target_ids is not None and (target_ids.shape != (C,) or target_ids.dtype != torch.int64):
        raise ValueError(
            f"target_ids must be a [C] = [{C}] int64 tensor, got {tuple(target_ids.shape)} {target_ids.dtype}"
        )
    if out is None:
        out = (
            torch.empty(C, dtype=torch.float32, device=logits.device),
            torch.empty(C, J, dtype=torch.float32, device=logits.device),
            torch.empty(C, dtype=torch.float32, device=logits.device),
        )
    if row_loss is not None:
        served = row_loss.served_teacher_logprobs
        if served is None or served.shape != (C, J) or served.device != logits.device:
            raise ValueError(
                f"row_loss needs served_teacher_logprobs of shape [C, J] = [{C}, {J}] on the logits' device"
            )
    lse, gathered, target_logit = out
    if C == 0:
        return out
    # without a row loss its pointers are placeholders, never touched: HAS_ROW_LOSS compiles the epilogue away
    loss_args = row_loss_launch_args(row_loss, has_support=True, placeholder=lse)
    served = None if row_loss is None else row_loss.served_teacher_logprobs
    if served is not None and served.stride(1) != 1:  # the kernel reads a row's log-probs with unit stride
        served = served.contiguous()

    launch(
        _teacher_row_stats_kernel,
        (C,),
        hbm_bytes=C * (V + J + 1) * logits.element_size()
        + C * (J * 12 + 16 + 4 * (entropy is not None))
        + (0 if row_loss is None else C * (2 * J + 12) * 4),
        logits_ptr=logits,
        index_ptr=index,
        lse_ptr=lse,
        gathered_ptr=gathered,
        target_ids_ptr=target_ids if target_ids is not None else index,
        target_logit_ptr=target_logit,
        entropy_ptr=entropy if entropy is not None else lse,
        V=V,
        readable_v=readable_width(logits),
        J=J,
        pre_scale=float(pre_scale),
        softcap_bound=float(softcap_bound or 0.0),
        stride_logits_c=logits.stride(0),
        stride_logits_v=logits.stride(1),
        stride_index_c=index.stride(0),
        stride_index_j=index.stride(1),
        stride_gathered_c=gathered.stride(0),
        BLOCK_V=block_v,
        BLOCK_J=max(triton.next_power_of_2(J), 2),
        HAS_TARGET=target_ids is not None,
        HAS_SOFTCAP=softcap_bound is not None,
        HAS_ENTROPY=entropy is not None,
        HAS_ROW_LOSS=row_loss is not None,
        teacher_logprobs_ptr=lse if served is None else served,
        stride_teacher_logprobs_c=0 if served is None else served.stride(0),
        **loss_args,
        num_warps=num_warps,
    )
    return out
