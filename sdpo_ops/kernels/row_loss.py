"""The ``[C, K+1]`` math of a chunk in one launch: tail bins, GJSD, gradient coefficients, IS weight, row loss.

Per row, from the row statistics (``sdpo_ops.divergence`` is the torch statement of the same math):

    s_k = z_k - lse(z),  t_k = u_k - lse(u)           k over the student's top-K (K <= BLOCK_K lanes)
    ADD_TAIL:  tail = log(-expm1(min(logsumexp_k l_k, -1e-7))) on each side, D = GJSD over K + 1 bins,
               sparse_k = g_k - g_tail * exp(s_k - tail_s)  (g_tail = 0 where the mass was clamped),
               dense = sum_k sparse_k
    else:      l_k - logsumexp_k l_k on each side, D = GJSD over K bins,
               sparse_k = g_k - q_k * sum_k g_k  (q the renormalised student),  dense = 0
    HAS_SUPPORT = False (full-vocabulary mode): D and dense were written by ``full_vocab_divergence``.
    target:    logp = z_target - lse(z), teacher's likewise (0 without targets)
    HAS_IS:    w = min(exp(clamp(logp - old, -20, 20)), is_clip), else 1
    row_scale = row_weight * w, exactly 0 where row_weight is 0 (a select: a masked row may hold NaN),
    loss = row_scale * D (a select as well)

All outputs are written for every row. Before this kernel the same work was ~80 small torch launches per
chunk (the review counted ~90 per chunk in top-K mode); then it was one; with a teacher given as logits in top-K
mode it is none: ``student_row_stats`` calls ``_row_loss_epilogue`` on its registers. A served top-K teacher's
stage (``teacher_row_stats``) calls it too. The ``row_loss_`` launch remains where no stats kernel holds the
statistics: full-vocabulary mode, after ``full_vocab_divergence``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from sdpo_ops.kernels.elementwise import _expm1
from sdpo_ops.kernels.full_vocab_divergence import _gjsd_terms, gjsd_launch_args
from sdpo_ops.kernels.launch import launch, runs_on_gpu
from sdpo_ops.reference import IS_LOG_RATIO_LIMIT, TAIL_LOG_MASS_MAX
from sdpo_ops.row_outputs import RowLossInputs, RowOutputs

_NUM_WARPS = {"cuda": 4, "interpret": 1}


# ``_row_loss_epilogue``'s pointer arguments, in order: what it reads (old log-probs, row weights) and writes.
_ROW_LOSS_POINTERS = (
    "old_logprobs_ptr", "row_weight_ptr", "loss_ptr", "divergence_ptr", "target_logprobs_ptr",
    "teacher_target_logprobs_ptr", "is_weight_ptr", "topk_mass_ptr", "row_scale_ptr", "dense_grad_ptr",
    "sparse_grad_ptr",
)  # fmt: skip


@triton.jit
def _logsumexp(x):
    """Over a 1-D block whose padding lanes are -inf; shift 0 if every lane is -inf (no NaN)."""
    m = tl.max(x, axis=0)
    shift = tl.where(m == -float("inf"), 0.0, m)
    return shift + tl.log(tl.sum(tl.exp(x - shift), axis=0))


@triton.jit
def _tail_log_mass(logp, TAIL_MAX: tl.constexpr):
    log_mass = _logsumexp(logp)
    return tl.log(-_expm1(tl.minimum(log_mass, TAIL_MAX))), log_mass > TAIL_MAX


@triton.jit
def _row_loss_epilogue(
    row,
    s,
    t,
    offs_k,
    K,
    student_lse,
    teacher_lse,
    student_target,
    teacher_target,
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
    HAS_SUPPORT: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_IS: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    TAIL_MAX: tl.constexpr,
    LOG_RATIO_LIMIT: tl.constexpr,
):
    """One row's loss, outputs and gradient coefficients (the module docstring), written at ``row``, from its
    statistics in registers: ``s``, ``t`` the student's and teacher's logits at the support (lanes ``offs_k``, -inf
    from K on; unread without HAS_SUPPORT), the two log-sum-exps and target logits (unread without HAS_TARGET).
    ``row_loss_`` loads them; ``student_row_stats`` calls this on its own registers (no launch, no round trip)."""
    in_k = offs_k < K
    if HAS_SUPPORT:
        s = s - student_lse
        t = t - teacher_lse
        topk_mass = tl.sum(tl.exp(s), axis=0)
        if ADD_TAIL:
            student_tail, clamped = _tail_log_mass(s, TAIL_MAX)
            teacher_tail, _ = _tail_log_mass(t, TAIL_MAX)
            terms, grad = _gjsd_terms(s, t, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
            tail_term, tail_grad = _gjsd_terms(
                student_tail, teacher_tail, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE
            )
            divergence = tl.sum(terms, axis=0) + tail_term
            # d tail / d s_k = -exp(s_k - tail); no tail gradient where the mass was clamped
            tail_grad = tl.where(clamped, 0.0, tail_grad)
            sparse = grad - tail_grad * tl.exp(s - student_tail)
            dense = tl.sum(tl.where(in_k, sparse, 0.0), axis=0)
        else:
            s = s - _logsumexp(s)
            t = t - _logsumexp(t)
            terms, grad = _gjsd_terms(s, t, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
            divergence = tl.sum(terms, axis=0)
            sparse = grad - tl.exp(s) * tl.sum(tl.where(in_k, grad, 0.0), axis=0)
            dense = 0.0
        tl.store(sparse_grad_ptr + row * stride_sparse_grad + offs_k, sparse, mask=in_k)
        tl.store(dense_grad_ptr + row, dense)
        tl.store(divergence_ptr + row, divergence)
    else:
        divergence = tl.load(divergence_ptr + row).to(tl.float32)
        topk_mass = 1.0
    tl.store(topk_mass_ptr + row, topk_mass)

    if HAS_TARGET:
        target_logprob = student_target - student_lse
        teacher_target_logprob = teacher_target - teacher_lse
    else:
        target_logprob = 0.0
        teacher_target_logprob = 0.0
    tl.store(target_logprobs_ptr + row, target_logprob)
    tl.store(teacher_target_logprobs_ptr + row, teacher_target_logprob)

    if HAS_IS:
        old = tl.load(old_logprobs_ptr + row).to(tl.float32)
        log_ratio = tl.minimum(tl.maximum(target_logprob - old, -LOG_RATIO_LIMIT), LOG_RATIO_LIMIT)
        is_weight = tl.minimum(tl.exp(log_ratio), is_clip)
    else:
        is_weight = 1.0
    row_weight = tl.load(row_weight_ptr + row).to(tl.float32)
    row_scale = tl.where(row_weight != 0, row_weight * is_weight, 0.0)
    tl.store(is_weight_ptr + row, is_weight)
    tl.store(row_scale_ptr + row, row_scale)
    tl.store(loss_ptr + row, tl.where(row_scale != 0, row_scale * divergence, 0.0))


@triton.jit
def _row_loss_kernel(
    student_topk_ptr,
    teacher_topk_ptr,
    student_target_ptr,
    teacher_target_ptr,
    old_logprobs_ptr,
    row_weight_ptr,
    student_lse_ptr,
    teacher_lse_ptr,
    loss_ptr,
    divergence_ptr,
    target_logprobs_ptr,
    teacher_target_logprobs_ptr,
    is_weight_ptr,
    topk_mass_ptr,
    row_scale_ptr,
    dense_grad_ptr,
    sparse_grad_ptr,
    K,
    is_clip,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    stride_student_topk,
    stride_teacher_topk,
    stride_sparse_grad,
    HAS_SUPPORT: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_IS: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAIL_MAX: tl.constexpr,
    LOG_RATIO_LIMIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if HAS_SUPPORT:
        in_k = offs_k < K
        s = tl.load(student_topk_ptr + row * stride_student_topk + offs_k, mask=in_k, other=-float("inf"))
        t = tl.load(teacher_topk_ptr + row * stride_teacher_topk + offs_k, mask=in_k, other=-float("inf"))
        s, t = s.to(tl.float32), t.to(tl.float32)
    else:
        s, t = 0.0, 0.0
    if HAS_TARGET:
        student_target = tl.load(student_target_ptr + row).to(tl.float32)
        teacher_target = tl.load(teacher_target_ptr + row).to(tl.float32)
    else:
        student_target, teacher_target = 0.0, 0.0
    _row_loss_epilogue(
        row, s, t, offs_k, K, tl.load(student_lse_ptr + row).to(tl.float32),
        tl.load(teacher_lse_ptr + row).to(tl.float32), student_target, teacher_target, old_logprobs_ptr,
        row_weight_ptr, loss_ptr, divergence_ptr, target_logprobs_ptr, teacher_target_logprobs_ptr, is_weight_ptr,
        topk_mass_ptr, row_scale_ptr, dense_grad_ptr, sparse_grad_ptr, is_clip, alpha, log_one_minus_alpha,
        log_alpha, stride_sparse_grad, HAS_SUPPORT, ADD_TAIL, HAS_TARGET, HAS_IS, ALPHA_MODE, TAIL_MAX,
        LOG_RATIO_LIMIT,
    )  # fmt: skip


def row_loss_launch_args(inputs: RowLossInputs | None, has_support: bool, placeholder: Tensor | None = None) -> dict:
    """The arguments ``_row_loss_epilogue`` takes from its caller's launch, both kernels' (unit-stride rows: a caller's
    per-row tensor may be a strided view). ``inputs`` None (a launch without the row loss): every pointer is
    ``placeholder``, never read."""
    if inputs is None:
        pointers = dict.fromkeys(_ROW_LOSS_POINTERS, placeholder)
        return pointers | dict(is_clip=1.0, stride_sparse_grad=0, HAS_SUPPORT=has_support, ADD_TAIL=False,
                               HAS_IS=False, **gjsd_launch_args(0.0), TAIL_MAX=0.0,
                               LOG_RATIO_LIMIT=0.0)  # fmt: skip
    rows = inputs.rows
    has_is = inputs.old_logprobs is not None and inputs.is_clip is not None
    pointers = (
        inputs.old_logprobs.contiguous() if has_is else rows.loss,  # never read without HAS_IS
        inputs.row_weight.contiguous(),
        rows.loss,
        rows.divergence,
        rows.target_logprobs,
        rows.teacher_target_logprobs,
        rows.is_weight,
        rows.topk_mass,
        rows.row_scale,
        rows.dense_grad,
        rows.sparse_grad,
    )
    return dict(zip(_ROW_LOSS_POINTERS, pointers, strict=True)) | dict(
        is_clip=float(inputs.is_clip) if has_is else 1.0,
        stride_sparse_grad=rows.sparse_grad.stride(0),
        HAS_SUPPORT=has_support,
        ADD_TAIL=bool(inputs.add_tail),
        HAS_IS=has_is,
        **gjsd_launch_args(inputs.alpha),
        TAIL_MAX=TAIL_LOG_MASS_MAX,
        LOG_RATIO_LIMIT=float(IS_LOG_RATIO_LIMIT),
    )


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
    """Write the per-row loss, outputs and gradient coefficients of one chunk into ``rows`` (Triton).

    Same contract as ``sdpo_ops.row_ops.row_loss_``. Reads ``rows.student_lse``, ``rows.teacher_lse`` and,
    in full-vocabulary mode (``student_topk_logits`` None), ``rows.divergence`` and ``rows.dense_grad``.

    Args:
        rows: the chunk's rows of the call's ``RowOutputs``.
        student_topk_logits, teacher_topk_logits: [C, K] fp32 (the student's top-K and the teacher at the same
            columns), or both None in full-vocabulary mode.
        student_target_logit, teacher_target_logit: [C] fp32, or both None without targets.
        old_logprobs: [C] or None; row_weight: [C] (mask x token weights x reduction coefficient).
    """
    C = rows.loss.shape[0]
    has_support = student_topk_logits is not None
    K = student_topk_logits.shape[1] if has_support else 0
    if has_support and (teacher_topk_logits is None or teacher_topk_logits.shape != (C, K)):
        raise ValueError(f"teacher_topk_logits must be [C, K] = [{C}, {K}] beside student_topk_logits")
    has_target = student_target_logit is not None
    if has_target != (teacher_target_logit is not None):
        raise ValueError("student_target_logit and teacher_target_logit must be given together")
    if C == 0:
        return
    if has_target:
        student_target_logit, teacher_target_logit = (
            student_target_logit.contiguous(),
            teacher_target_logit.contiguous(),
        )
    placeholder = rows.loss  # never read: its constexpr flag compiles the read away
    num_warps = _NUM_WARPS["cuda" if runs_on_gpu(rows.loss) else "interpret"]
    inputs = RowLossInputs(rows, old_logprobs, row_weight, add_tail, alpha, is_clip)
    launch(
        _row_loss_kernel,
        (C,),
        hbm_bytes=C * (K * 4 * 4 + 15 * 4),
        num_warps=num_warps,
        student_topk_ptr=student_topk_logits if has_support else placeholder,
        teacher_topk_ptr=teacher_topk_logits if has_support else placeholder,
        student_target_ptr=student_target_logit if has_target else placeholder,
        teacher_target_ptr=teacher_target_logit if has_target else placeholder,
        student_lse_ptr=rows.student_lse,
        teacher_lse_ptr=rows.teacher_lse,
        K=K,
        stride_student_topk=student_topk_logits.stride(0) if has_support else 0,
        stride_teacher_topk=teacher_topk_logits.stride(0) if has_support else 0,
        BLOCK_K=max(triton.next_power_of_2(K), 2),
        HAS_TARGET=has_target,
        **row_loss_launch_args(inputs, has_support),
    )
