"""Full-vocabulary generalized JSD per row and the row sum of its gradient w.r.t. the student log-probs.

Per row, streaming both ``[V]`` logit rows (student ``z``, teacher ``u``, fp32, divided by the
temperature) with their log-sum-exps: ``s_j = z_j - lse(z)``, ``t_j = u_j - lse(u)``, ``p = exp(s)``,
``q = exp(t)``, and the convention ``0 * log 0 = 0`` (a term is 0 where its weight p or q is 0, so -inf
logits contribute nothing):

    alpha = 0 (ALPHA_MODE 0):  D = sum q (t - s)                     g_j = -q_j
    alpha = 1 (ALPHA_MODE 1):  D = sum p (s - t)                     g_j = p_j (s_j - t_j) + p_j
    otherwise (ALPHA_MODE 2):  log m = logaddexp(s + log(1 - alpha), t + log(alpha))
                               D = (1 - alpha) sum p (s - log m) + alpha sum q (t - log m)
                               g_j = (1 - alpha) p_j (s_j - log m_j)

with ``g_j = dD/ds_j``. Written: ``divergence [C]`` and ``grad_sum [C] = sum_j g_j`` (the coefficient of
the dense ``-softmax(z)`` term of dD/dz). Both are accumulated per lane in fp32 and reduced once per row.
``_gjsd_terms`` is the one Triton copy of this math; ``logit_grad`` reuses it for the elementwise g_j.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sdpo_ops.kernels.elementwise import _on_load
from sdpo_ops.kernels.launch import launch, readable_width, runs_on_gpu

# (BLOCK_V, num_warps) per device type; the interpreter favours few, larger tiles (its cost is per op).
_CUDA_CONFIG = (2048, 8)
_INTERPRET_CONFIG = (64, 1)


def gjsd_launch_args(alpha: float) -> dict:
    """The ``_gjsd_terms`` arguments of a launch: ``ALPHA_MODE`` (the constexpr branch: 0 forward KL,
    1 reverse KL, 2 the general mixture) and the mixture's log-weights (placeholders at the endpoints,
    where a log would be -inf)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mode = 0 if alpha == 0.0 else 1 if alpha == 1.0 else 2
    return {
        "alpha": float(alpha),
        "log_one_minus_alpha": math.log(1.0 - alpha) if mode == 2 else 0.0,
        "log_alpha": math.log(alpha) if mode == 2 else 0.0,
        "ALPHA_MODE": mode,
    }


@triton.jit
def _gjsd_terms(s, t, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE: tl.constexpr):
    """Per element ``(divergence term, g = dD/ds)`` of the generalized JSD from log-probs s (student), t."""
    if ALPHA_MODE == 0:
        q = tl.exp(t)
        term = tl.where(q > 0, q * (t - s), 0.0)
        grad = -q
    elif ALPHA_MODE == 1:
        p = tl.exp(s)
        term = tl.where(p > 0, p * (s - t), 0.0)
        grad = term + p
    else:
        p = tl.exp(s)
        q = tl.exp(t)
        a = s + log_one_minus_alpha
        b = t + log_alpha
        hi = tl.maximum(a, b)
        # NaN only where both are -inf, i.e. p = q = 0, and those lanes are masked to 0 just below
        log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
        student_term = tl.where(p > 0, p * (s - log_m), 0.0)
        teacher_term = tl.where(q > 0, q * (t - log_m), 0.0)
        term = (1.0 - alpha) * student_term + alpha * teacher_term
        grad = (1.0 - alpha) * student_term
    return term, grad


@triton.jit
def _full_vocab_divergence_kernel(
    student_logits_ptr,
    teacher_logits_ptr,
    student_lse_ptr,
    teacher_lse_ptr,
    divergence_ptr,
    grad_sum_ptr,
    V,
    readable_v,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    pre_scale,
    softcap_bound,
    stride_student_c,
    stride_student_v,
    stride_teacher_c,
    stride_teacher_v,
    ALPHA_MODE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    student_row_ptr = student_logits_ptr + pid_n * stride_student_c
    teacher_row_ptr = teacher_logits_ptr + pid_n * stride_teacher_c
    student_lse = tl.load(student_lse_ptr + pid_n).to(tl.float32)
    teacher_lse = tl.load(teacher_lse_ptr + pid_n).to(tl.float32)
    offs_v = tl.arange(0, BLOCK_V)

    divergence = tl.zeros([BLOCK_V], dtype=tl.float32)
    grad_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs_v
        in_row = cols < V
        # lanes past V are -inf: p = q = 0 there, so their terms are 0 (loads masked at readable_v: 128-bit)
        readable = cols < readable_v
        z = tl.load(student_row_ptr + cols * stride_student_v, mask=readable, other=-float("inf")).to(tl.float32)
        u = tl.load(teacher_row_ptr + cols * stride_teacher_v, mask=readable, other=-float("inf")).to(tl.float32)
        z = tl.where(in_row, _on_load(z, pre_scale, softcap_bound, HAS_SOFTCAP), -float("inf"))
        u = tl.where(in_row, _on_load(u, pre_scale, softcap_bound, HAS_SOFTCAP), -float("inf"))
        term, grad = _gjsd_terms(z - student_lse, u - teacher_lse, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
        divergence += term
        grad_sum += grad
    tl.store(divergence_ptr + pid_n, tl.sum(divergence, axis=0))
    tl.store(grad_sum_ptr + pid_n, tl.sum(grad_sum, axis=0))


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
    block_v: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Full-vocabulary GJSD per row and the row sum of its gradient w.r.t. the student log-probs (Triton).

    Same contract as ``sdpo_ops.row_ops.full_vocab_divergence``.

    Args:
        student_logits, teacher_logits: [C, V] fp32 (bf16/fp16 are read as fp32).
        student_lse, teacher_lse: [C] fp32, the log-sum-exps of the two rows.
        alpha: in [0, 1]; 0 is KL(teacher || student), 1 is KL(student || teacher).
        out: ``(divergence, grad_sum)`` to write into, else allocated.
        pre_scale: multiplies the buffer on load: the part of the logit scale the chunk GEMM's epilogue did not apply.
        softcap_bound: ``softcap / temperature`` for softcapped heads (both rows are ``bound * tanh(logits)``).
        block_v: tile width override (a power of two), for tests and tuning.
    Returns:
        ``(divergence [C], grad_sum [C])`` fp32, with ``grad_sum = sum_j dD/ds_j``.
    """
    gjsd_args = gjsd_launch_args(alpha)
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"{name} must be a floating [C, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits {tuple(student_logits.shape)} differ"
        )
    C, V = student_logits.shape
    for name, lse in (("student_lse", student_lse), ("teacher_lse", teacher_lse)):
        if lse.shape != (C,):
            raise ValueError(f"{name} must be [C] = [{C}], got {tuple(lse.shape)}")
    tensors = (student_logits, teacher_logits, student_lse, teacher_lse)
    if any(x.device != student_logits.device for x in tensors):
        raise ValueError(f"all inputs must be on one device, got {[str(x.device) for x in tensors]}")

    default_block_v, num_warps = _CUDA_CONFIG if runs_on_gpu(student_logits) else _INTERPRET_CONFIG
    block_v = block_v or default_block_v
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    block_v = min(block_v, triton.next_power_of_2(V))

    if out is None:
        out = tuple(torch.empty(C, dtype=torch.float32, device=student_logits.device) for _ in range(2))
    divergence, grad_sum = out
    if C == 0:
        return out

    launch(
        _full_vocab_divergence_kernel,
        (C,),
        hbm_bytes=C * V * (student_logits.element_size() + teacher_logits.element_size()) + C * 16,
        student_logits_ptr=student_logits,
        teacher_logits_ptr=teacher_logits,
        student_lse_ptr=student_lse,
        teacher_lse_ptr=teacher_lse,
        divergence_ptr=divergence,
        grad_sum_ptr=grad_sum,
        V=V,
        readable_v=readable_width(student_logits, teacher_logits),
        pre_scale=float(pre_scale),
        softcap_bound=float(softcap_bound or 0.0),
        stride_student_c=student_logits.stride(0),
        stride_student_v=student_logits.stride(1),
        stride_teacher_c=teacher_logits.stride(0),
        stride_teacher_v=teacher_logits.stride(1),
        **gjsd_args,
        HAS_SOFTCAP=softcap_bound is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return divergence, grad_sum
