"""Student row statistics: log-sum-exp, top-K (values and columns) and target logit per row.

Per row ``z`` (``[V]`` fp32, already divided by the temperature):

    keys     packed_j = key(z_j) << 32 | (V - 1 - j)   (int64, all distinct)
             ``key`` maps the fp32 bits to an int32 of the same order (negative floats get their 31 low
             bits flipped), so one int64 comparison orders by value, then by *lower* column first.
    pass 1   over BLOCK_V-wide tiles: the online log-sum-exp *per lane*, in base 2 (z' = z log2(e))
                 m' = max(m, z'),  s' = s * 2^(m - m') + 2^(z' - m')
             from a running max that starts at -FLT_MAX (finite: -inf lanes and rows stay NaN-free with no guard
             per element), reduced across the lanes once at the end (lse = (M + log2 sum s 2^(m - M)) ln 2); beside
             it (when asked) the entropy accumulator t = sum 2^(z' - m) (z' - m), moved with s when m changes
             (``elementwise._rescaled``), giving the entropy (log2 S - T / S) ln 2 about the row max; and the max
             logit of every SUB-wide sub-block (of z itself), stored to a per-row scratch row ([NB_PAD] fp32,
             position = block id), read back after a barrier.
    select   the K largest sub-blocks by (max, lower block id), found as the top K_PAD (next power of two
             >= max(K, 2)) of their packed keys: the candidates. Every top-K key lies in a candidate: an
             element e of any other block B is beaten by the max element of each of the K candidates
             (a larger value, or the same value in a lower block, hence a lower column).
    pass 2   over the K candidate blocks only, GROUP at a time (a gathered [GROUP, SUB] tile): the survivors, keys
             at or above a threshold, have their columns compacted (cumsum positions) into a per-row scratch; once
             BATCH = 2 K_PAD wait, and after the last group, they are merged into the running top-K_PAD (kept
             descending) BATCH at a time: the batch's top K_PAD by a bitonic top-k network (ascending), one bitonic
             half-cleaner ``max(running, batch_top)`` and a log2(K_PAD)-stage bitonic merge. The threshold starts
             at the K-th largest block maximum (value only, any column; each candidate holds a value at least that
             large, so a smaller one has K keys above it; with fewer blocks than K nothing is cut) and rises to the
             K-th running key after each merge. ~K of the K * SUB keys survive typically: one merge per row; ties
             at the threshold merge more (all-equal logits: the first group, then nothing passes).
    target   one load of ``z[target]``.
    teacher  (HAS_TEACHER: a teacher given as logits) the teacher's row ``u`` is loaded beside ``z`` in pass 1, its
             log-sum-exp kept per group of 4 adjacent lanes (one thread's 128-bit load, so the group max needs no
             shuffle) in base 2 from a running max that starts at -FLT_MAX (no -inf guard per element): the
             teacher's bytes stream while this kernel is issue-bound, and ``teacher_row_stats``' launch and pass
             disappear. After the top-K, ``u`` at its K columns and at the target (K + 1 scattered reads, the columns
             still in registers) into ``teacher_topk [C, K]`` and ``teacher_target [C]``: no row_loss or extra
             launch needs the top-K columns back from memory.
    row loss (HAS_ROW_LOSS: a teacher and a top-K) ``row_loss._row_loss_epilogue`` on the statistics still in
             registers: the chunk's loss, IS weight and gradient coefficients with no launch of their own and no
             [C, K] round trip (the ``row_loss_`` kernel runs the same function on loaded values).

The bitonic work touches ~K + NB_PAD keys per row instead of V (plus one threshold compare per candidate key:
K * SUB). Written: ``lse [C]``; the first K of the running set unpacked to ``topk_logits [C, K]`` (exact: the key
is a bijection of the fp32 bits) and ``topk_index [C, K]`` (int64), sorted by value descending; ``target_logit [C]``;
``entropy [C]`` when asked; with a teacher, ``teacher_lse [C]``, ``teacher_topk [C, K]``, ``teacher_target [C]``.

Tried first: one pass with the network on every BLOCK_V tile (no sub-block selection). Compiled for
sm_90 with ptxas (no GPU here; estimates, not measurements) at BLOCK_V=2048, K_PAD=128, 8 warps, its
tile loop is ~3,700 SASS instructions per thread, ~280K per row at V=151936: ~1.2 ms per 512-row chunk
if issue-bound (~19 ms at N=8192). Then the network over every candidate key (~3,360 per group, 7 groups):
~47K per row. This form: ~269 per pass-1 tile, ~520 per pass-2 group, ~517 per merge: ~29K per row, 108
registers, 2 CTAs per SM (``bench/results/sm90-compile/student_row_stats_before_after.md``). The teacher fused in
adds ~75 per pass-1 tile (344): ~34.9K per row, still 108 registers (first tries, a per-lane online update with two
exponentials and -inf guards: 441; one exp2 per element: 369). The student's own accumulators then moved to base 2
from the -FLT_MAX floor (no -inf guards): 255 per tile, ~28.2K per row, 108 registers
(``bench/results/sm90-compile/3.7.1.md``). The row loss in the epilogue: ~28.7K per row, 120 registers (triton 3.6:
128, no spills), still 2 CTAs per SM.
The network is written with ``tl.reshape``/``tl.sum``/``tl.max`` only, not ``tl.topk`` (its signature
differs between Triton releases) nor ``tl.sort`` (a full sort is ~2.5x the work of the top-k network).
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

# Packed key below every real one (the key of -inf is > INT32_MIN): lanes past V never enter the top-K.
_PACKED_MIN = tl.constexpr(-(2**63))
# (BLOCK_V, sub-blocks per tile, num_warps) per device type: on CUDA SUB = 2048 / 16 = 128; the
# interpreter favours few, larger tiles (its cost is per op).
_CUDA_CONFIG = (2048, 16, 8)
_INTERPRET_CONFIG = (64, 8, 1)
# Adjacent teacher logits per thread in pass 1: one 128-bit load of fp32.
_TEACHER_VEC = 4
# Cap on the sub-block maxima per row (registers): SUB grows past the default for larger V.
_MAX_BLOCKS = 4096
# Pass 2 merges its survivors BATCH = this many times K_PAD at a time.
_SURVIVOR_BATCH_PER_K_PAD = 2


@triton.jit
def _bitonic_merge(h, zero, LOG_N: tl.constexpr, STAGE: tl.constexpr, ORDER: tl.constexpr):
    """Sort each bitonic run of ``2**STAGE`` elements of the ``[2] * LOG_N`` hypercube ``h``.

    ORDER 0: ascending, 1: descending, 2: alternating (run r ascending iff bit STAGE of its index is 0).
    ``zero``: zeros shaped like ``h``, added to the position masks; where they are loaded in a loop (opaque to the
    compiler), the masks are computed where used instead of hoisted out of the loop and kept live (registers).
    Compare-and-swaps are inlined (no nested jit calls): the interpreter pays per call.
    """
    # 0/1 per element: whether its run sorts descending (a constexpr for ORDER 0 and 1)
    flip = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - STAGE - 1) + [2] + [1] * STAGE) + zero if ORDER == 2 else ORDER
    # bits STAGE - 1, ..., 0, written as the axis they index (the last axis is bit 0)
    for axis in tl.static_range(LOG_N - STAGE, LOG_N):
        # the partner differs in this bit: (a + b) - self over the size-2 axis (int64 wrap-around cancels)
        partner = tl.sum(h, axis=axis, keep_dims=True) - h
        is_right = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (LOG_N - 1 - axis)) + zero
        # the left element keeps the min where flip is 0, the max where flip is 1
        h = tl.where((h > partner) != (flip ^ is_right), partner, h)
    return h


@triton.jit
def _tile_topk(packed, zero, LOG_N: tl.constexpr, LOG_K_PAD: tl.constexpr, ORDER: tl.constexpr):
    """Top ``2**LOG_K_PAD`` of ``packed [2**LOG_N]`` (a bitonic top-k network), ascending (ORDER 0) or not (1), and
    ``zero`` (int32 zeros shaped like ``packed``, see ``_bitonic_merge``) reduced to its shape."""
    h = tl.reshape(packed, [2] * LOG_N)
    zero = tl.reshape(zero, [2] * LOG_N)
    # sort runs of K_PAD, alternately ascending / descending
    for stage in tl.static_range(1, LOG_K_PAD + 1):
        h = _bitonic_merge(h, zero, LOG_N, stage, 2 if stage < LOG_N else ORDER)
    # halve: the max of an ascending run and the next (descending) one is the top half of both, bitonic
    for i in tl.static_range(LOG_K_PAD + 1, LOG_N + 1):
        h = tl.max(h, axis=LOG_N - i)
        zero = tl.max(zero, axis=LOG_N - i)
        h = _bitonic_merge(h, zero, LOG_N - i + LOG_K_PAD, LOG_K_PAD, 2 if i < LOG_N else ORDER)
    return tl.reshape(h, [2**LOG_K_PAD]), tl.reshape(zero, [2**LOG_K_PAD])


@triton.jit
def _pack(z, cols, N):
    """Order-preserving int32 key of the fp32 bits, packed with the reversed column (ties: lower column < N).
    -0.0 is keyed as +0.0: their bits differ, but they tie, and a tie goes to the lower column."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (N - 1 - cols).to(tl.int64)


@triton.jit
def _merged_top(running, keys, zero, LOG_N: tl.constexpr, LOG_K_PAD: tl.constexpr):
    """The top ``2**LOG_K_PAD`` of ``running`` (descending) and ``keys [2**LOG_N]``, descending (``zero``: see
    ``_bitonic_merge``)."""
    top, zero = _tile_topk(keys, zero, LOG_N, LOG_K_PAD, 0)
    # bitonic half-cleaner: running (descending) vs top (ascending) keeps the top K_PAD of both, bitonic
    merged = tl.reshape(tl.maximum(running, top), [2] * LOG_K_PAD)
    zero = tl.reshape(zero, [2] * LOG_K_PAD)
    return tl.reshape(_bitonic_merge(merged, zero, LOG_K_PAD, LOG_K_PAD, 1), [2**LOG_K_PAD])


@triton.jit
def _candidate_keys(row_ptr, stride_logits_v, candidate_blocks, g, num_candidates, V, readable_v, pre_scale,
                    softcap_bound, HAS_SOFTCAP: tl.constexpr, SUB: tl.constexpr, GROUP: tl.constexpr,
                    NUM_GROUPS: tl.constexpr):  # fmt: skip
    """The packed keys and the columns of candidate group ``g`` (``GROUP`` gathered sub-blocks, ``[GROUP * SUB]``
    each); keys of no candidate (past ``num_candidates``) or past V are ``_PACKED_MIN``."""
    blocks = tl.sum(tl.where(tl.arange(0, NUM_GROUPS)[:, None] == g, candidate_blocks, 0), axis=0)
    is_candidate = g * GROUP + tl.arange(0, GROUP) < num_candidates
    cols = blocks[:, None] * SUB + tl.arange(0, SUB)[None, :]
    in_row = is_candidate[:, None] & (cols < V)
    readable = is_candidate[:, None] & (cols < readable_v)
    z = tl.load(row_ptr + cols * stride_logits_v, mask=readable, other=-float("inf")).to(tl.float32)
    z = _on_load(z, pre_scale, softcap_bound, HAS_SOFTCAP)
    packed = tl.where(in_row, _pack(z, cols, V), _PACKED_MIN)
    return tl.reshape(packed, [GROUP * SUB]), tl.reshape(cols, [GROUP * SUB])


@triton.jit
def _student_row_stats_kernel(
    logits_ptr,
    target_ids_ptr,
    lse_ptr,
    topk_logits_ptr,
    topk_index_ptr,
    target_logit_ptr,
    entropy_ptr,
    teacher_ptr,
    teacher_lse_ptr,
    teacher_topk_ptr,
    teacher_target_ptr,
    block_max_ptr,
    survivors_ptr,
    V,
    readable_v,
    teacher_readable_v,
    K,
    num_candidates,
    pre_scale,
    softcap_bound,
    stride_logits_c,
    stride_logits_v,
    stride_topk_logits_c,
    stride_topk_index_c,
    stride_teacher_c,
    stride_teacher_v,
    stride_teacher_topk_c,
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
    HAS_TOPK: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    HAS_ROW_LOSS: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    HAS_IS: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    TAIL_MAX: tl.constexpr,
    LOG_RATIO_LIMIT: tl.constexpr,
    TEACHER_VEC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SUB: tl.constexpr,
    NB_PAD: tl.constexpr,
    LOG_NB_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    LOG_GATHER: tl.constexpr,
    K_PAD: tl.constexpr,
    LOG_K_PAD: tl.constexpr,
    BATCH: tl.constexpr,
    LOG_BATCH: tl.constexpr,
    CAP: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + pid_n * stride_logits_c
    teacher_row_ptr = teacher_ptr + pid_n * stride_teacher_c
    offs_v = tl.arange(0, BLOCK_V)
    TILE_BLOCKS: tl.constexpr = BLOCK_V // SUB

    # pass 1: a per-lane online log-sum-exp and entropy accumulator (no cross-thread reduction per tile; one at the
    # end; the entropy's is dead code without HAS_ENTROPY) and the max of every SUB-wide sub-block, stored to a
    # per-row scratch row (no layout conversion into a register array)
    m = tl.full([BLOCK_V], _FLT_MAX_NEG, tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    # the teacher row's log-sum-exp (HAS_TEACHER; dead code otherwise) per group of TEACHER_VEC adjacent lanes (one
    # thread's 128-bit load: the group's max needs no shuffle), in base 2 (the transform's scale folds log2(e) in:
    # no multiply per element): its bytes stream while the student's issue-bound work runs. The running max starts at
    # -FLT_MAX, not -inf: below every finite logit, and a -inf logit then gives exp2(-inf) = 0 instead of
    # -inf - -inf = NaN, with no guard per element.
    TEACHER_GROUPS: tl.constexpr = BLOCK_V // TEACHER_VEC
    m_teacher = tl.full([TEACHER_GROUPS], _FLT_MAX_NEG, tl.float32)
    s_teacher = tl.zeros([TEACHER_GROUPS], dtype=tl.float32)
    if HAS_SOFTCAP:
        teacher_pre_scale, teacher_bound = pre_scale, softcap_bound * _LOG2E
    else:
        teacher_pre_scale, teacher_bound = pre_scale * _LOG2E, softcap_bound
    offs_tile_blocks = tl.arange(0, TILE_BLOCKS)
    for start in range(0, V, BLOCK_V):
        cols = start + offs_v
        in_row = cols < V
        z = tl.load(row_ptr + cols * stride_logits_v, mask=cols < readable_v, other=-float("inf")).to(tl.float32)
        z = tl.where(in_row, _on_load(z, pre_scale, softcap_bound, HAS_SOFTCAP), -float("inf"))

        # base 2 (z times log2(e): one multiply, z itself feeds the block maxima) from the finite floor of m
        z2 = z * _LOG2E
        m_new = tl.maximum(m, z2)
        s, t = _rescaled(m, s, t, m_new)
        e, e_log = _exp_terms(z2, m_new)
        s += e
        t += e_log
        m = m_new

        if HAS_TEACHER:
            u = tl.load(teacher_row_ptr + cols * stride_teacher_v, mask=cols < teacher_readable_v, other=-float("inf"))
            u = _on_load(u.to(tl.float32), teacher_pre_scale, teacher_bound, HAS_SOFTCAP)  # times log2(e)
            u = tl.reshape(tl.where(in_row, u, -float("inf")), [TEACHER_GROUPS, TEACHER_VEC])
            m_teacher_new = tl.maximum(m_teacher, tl.max(u, axis=1))
            e = tl.sum(tl.exp2(u - m_teacher_new[:, None]), axis=1)
            s_teacher = s_teacher * tl.exp2(m_teacher - m_teacher_new) + e
            m_teacher = m_teacher_new

        if HAS_TOPK:
            tile_max = tl.max(tl.reshape(z, [TILE_BLOCKS, SUB]), axis=1)
            tl.store(block_max_ptr + pid_n * NB_PAD + start // SUB + offs_tile_blocks, tile_max)

    row_max = tl.max(m, axis=0)
    s, t = _rescaled(m, s, t, row_max)
    row_s = tl.sum(s, axis=0)
    # back from base 2; a row of -inf only: -FLT_MAX + log2(0) = -inf
    lse = (row_max + tl.log2(row_s)) * _LN2
    tl.store(lse_ptr + pid_n, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + pid_n, _entropy(row_s, tl.sum(t, axis=0)))
    if HAS_TEACHER:
        teacher_max = tl.max(m_teacher, axis=0)
        teacher_s = tl.sum(s_teacher * tl.exp2(m_teacher - teacher_max), axis=0)
        # back from base 2; a row of -inf only: -FLT_MAX + log2(0) = -inf
        teacher_lse = (teacher_max + tl.log2(teacher_s)) * _LN2
        tl.store(teacher_lse_ptr + pid_n, teacher_lse)

    if HAS_TOPK:
        # the candidate blocks: the K_PAD largest maxima (ties: lower block), descending, [K_PAD // GROUP, GROUP]
        tl.debug_barrier()  # the scratch row was written by other threads of this program
        offs_blocks = tl.arange(0, NB_PAD)
        written = offs_blocks < tl.cdiv(V, BLOCK_V) * TILE_BLOCKS
        block_max = tl.load(block_max_ptr + pid_n * NB_PAD + offs_blocks, mask=written, other=-float("inf"))
        block_keys = _pack(block_max, offs_blocks, NB_PAD)
        candidates, _ = _tile_topk(block_keys, tl.zeros([NB_PAD], tl.int32), LOG_NB_PAD, LOG_K_PAD, 1)
        candidate_blocks = tl.reshape(((NB_PAD - 1) - (candidates & 0xFFFFFFFF)).to(tl.int32), [K_PAD // GROUP, GROUP])
        NUM_GROUPS: tl.constexpr = K_PAD // GROUP
        num_groups = (num_candidates + GROUP - 1) // GROUP
        survivors_row = survivors_ptr + pid_n * CAP

        # pass 2 (see the module docstring): the columns of the keys at or above the threshold are compacted into the
        # row's scratch (CAP = BATCH + a group's keys: fewer than BATCH wait between merges) and merged BATCH at a time
        offs_k = tl.arange(0, K_PAD)
        offs_batch = tl.arange(0, BATCH)
        kth_max = tl.sum(tl.where(offs_k == num_candidates - 1, candidates, 0), axis=0)
        threshold = tl.where(num_candidates < K, _PACKED_MIN + 1, (kth_max >> 32) << 32)
        running = tl.full([K_PAD], _PACKED_MIN, tl.int64)
        count = 0
        for g in range(0, num_groups + 1):
            if g < num_groups:
                packed, group_cols = _candidate_keys(row_ptr, stride_logits_v, candidate_blocks, g, num_candidates, V,
                                                     readable_v, pre_scale, softcap_bound, HAS_SOFTCAP, SUB, GROUP,
                                                     NUM_GROUPS)  # fmt: skip
                keep = packed >= threshold
                keep_count = keep.to(tl.int32)
                position = count + tl.cumsum(keep_count, axis=0) - keep_count
                tl.store(survivors_row + position, group_cols, mask=keep)
                count += tl.sum(keep_count, axis=0)
            if (count >= BATCH) | (g == num_groups):
                tl.debug_barrier()  # the survivors were written by other threads of this program
                for start in range(0, count, BATCH):
                    in_batch = start + offs_batch < count
                    batch_cols = tl.load(survivors_row + start + offs_batch, mask=in_batch, other=0)
                    z = tl.load(row_ptr + batch_cols * stride_logits_v, mask=in_batch, other=-float("inf"))
                    z = _on_load(z.to(tl.float32), pre_scale, softcap_bound, HAS_SOFTCAP)
                    batch = tl.where(in_batch, _pack(z, batch_cols, V), _PACKED_MIN)
                    # batch_cols >> 31: zeros the compiler cannot see through (columns are < 2**31)
                    running = _merged_top(running, batch, batch_cols >> 31, LOG_BATCH, LOG_K_PAD)
                count = 0
                threshold = tl.maximum(threshold, tl.sum(tl.where(offs_k == K - 1, running, 0), axis=0))
                tl.debug_barrier()  # read before the next group's survivors overwrite them

        index = (V - 1) - (running & 0xFFFFFFFF)
        key = (running >> 32).to(tl.int32)
        value = (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        tl.store(topk_logits_ptr + pid_n * stride_topk_logits_c + offs_k, value, mask=offs_k < K)
        tl.store(topk_index_ptr + pid_n * stride_topk_index_c + offs_k, index, mask=offs_k < K)
        if HAS_TEACHER:
            # the teacher at the student's top-K columns: K scattered reads, the columns still in registers
            u = tl.load(teacher_row_ptr + index * stride_teacher_v, mask=offs_k < K, other=float("nan"))
            u = _on_load(u.to(tl.float32), pre_scale, softcap_bound, HAS_SOFTCAP)
            tl.store(teacher_topk_ptr + pid_n * stride_teacher_topk_c + offs_k, u, mask=offs_k < K)

    target_logit = _store_target_logit(row_ptr, stride_logits_v, target_ids_ptr, target_logit_ptr, pid_n, V,
                                       pre_scale, softcap_bound, HAS_TARGET, HAS_SOFTCAP)  # fmt: skip
    if HAS_TEACHER:
        teacher_target = _store_target_logit(teacher_row_ptr, stride_teacher_v, target_ids_ptr, teacher_target_ptr,
                                             pid_n, V, pre_scale, softcap_bound, HAS_TARGET, HAS_SOFTCAP)  # fmt: skip
        if HAS_ROW_LOSS:
            # the row loss on the statistics still in registers (``row_loss._row_loss_epilogue``): no launch of its
            # own, no [C, K] round trip; the support lanes from K on are -inf, as row_loss_ loads them
            in_k = offs_k < K
            _row_loss_epilogue(
                pid_n, tl.where(in_k, value, -float("inf")), tl.where(in_k, u, -float("inf")), offs_k, K, lse,
                teacher_lse, target_logit, teacher_target, old_logprobs_ptr, row_weight_ptr, loss_ptr,
                divergence_ptr, target_logprobs_ptr, teacher_target_logprobs_ptr, is_weight_ptr, topk_mass_ptr,
                row_scale_ptr, dense_grad_ptr, sparse_grad_ptr, is_clip, alpha, log_one_minus_alpha, log_alpha,
                stride_sparse_grad, HAS_SUPPORT, ADD_TAIL, HAS_TARGET, HAS_IS, ALPHA_MODE, TAIL_MAX, LOG_RATIO_LIMIT,
            )  # fmt: skip


def student_row_stats(
    logits: Tensor,
    topk: int,
    target_ids: Tensor | None,
    *,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    pre_scale: float = 1.0,
    softcap_bound: float | None = None,
    entropy: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_out: tuple[Tensor, Tensor, Tensor] | None = None,
    row_loss: RowLossInputs | None = None,
    block_v: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-sum-exp, top-K and target logit per row of the student's logits (Triton); with ``teacher_logits``, the
    teacher's statistics too (``teacher_row_stats`` at the student's top-K, fused into the same launch).

    Same contract as ``sdpo_ops.row_ops.student_row_stats``; the top-K comes sorted by value (descending,
    ties to the lower column).

    Args:
        logits: [C, V] fp32 (bf16/fp16 are read as fp32).
        topk: K with 0 <= K <= min(V, 256) (0: no top-K).
        target_ids: [C] int64 or None.
        out: ``(lse, topk_logits, topk_index, target_logit)`` to write into (e.g. row slices of the call's
            outputs), else allocated.
        pre_scale: multiplies the buffer on load: the part of the logit scale the chunk GEMM's epilogue did not apply.
        softcap_bound: ``softcap / temperature`` for a softcapped head: the statistics are of
            ``bound * tanh(logits)`` (see ``sdpo_ops.kernels.elementwise._softcapped``); None: of ``logits``.
        entropy: [C] fp32 to write each row's entropy into (``-sum p log p`` of the softmax of the transformed
            logits), from the log-sum-exp's own pass; None: not computed.
        teacher_logits: [C, V] (same transforms on load), streamed beside the student's row in pass 1 for its
            log-sum-exp, then read at the student's top-K columns and the target; None: no teacher.
        teacher_out: ``(teacher_lse [C], teacher_topk_logits [C, K], teacher_target_logit [C])`` to write into;
            required with ``teacher_logits``.
        row_loss: with a teacher and K > 0, the rest of ``row_loss_``'s arguments: the chunk's row loss is computed
            in this launch's epilogue from the statistics in registers, as ``row_loss_`` would from the outputs.
        block_v: pass-1 tile width override (a power of two; raised to the top-K width), for tests and tuning.
    Returns:
        ``(lse [C], topk_logits [C, K], topk_index [C, K] int64, target_logit [C])``, fp32 except the index;
        ``target_logit`` is zeros when ``target_ids`` is None.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [C, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    C, V = logits.shape
    if not 0 <= topk <= min(V, 256):
        raise ValueError(f"topk must be in [0, min(V, 256)] = [0, {min(V, 256)}], got {topk}")
    if target_ids is not None:
        if target_ids.shape != (C,) or target_ids.dtype != torch.int64:
            raise ValueError(
                f"target_ids must be a [C] = [{C}] int64 tensor, got {tuple(target_ids.shape)} {target_ids.dtype}"
            )
        if target_ids.device != logits.device:
            raise ValueError(f"target_ids is on {target_ids.device}, logits on {logits.device}")
    check_row_output("entropy", entropy, logits)
    has_teacher = teacher_logits is not None
    if has_teacher:
        _check_teacher(teacher_logits, teacher_out, logits, topk)
    if row_loss is not None and not (has_teacher and topk > 0):
        raise ValueError("row_loss needs teacher_logits and topk > 0 (the support the row loss is over)")

    k_pad = max(triton.next_power_of_2(topk), 2)
    default_block_v, tile_blocks, num_warps = _CUDA_CONFIG if runs_on_gpu(logits) else _INTERPRET_CONFIG
    block_v = block_v or default_block_v
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    sub = max(block_v // tile_blocks, 1)
    # the network needs a tile of at least K_PAD keys; no tile wider than the (padded) row
    block_v = min(max(block_v, k_pad), max(triton.next_power_of_2(V), k_pad))
    while triton.cdiv(V, sub) > _MAX_BLOCKS:
        sub *= 2
    sub = min(sub, block_v)
    block_v = max(block_v, sub)
    tile_blocks = block_v // sub
    num_blocks = triton.cdiv(V, sub)
    nb_pad = max(triton.next_power_of_2(triton.cdiv(V, block_v) * tile_blocks), k_pad)
    group = min(tile_blocks, k_pad)

    if out is None:
        out = (
            torch.empty(C, dtype=torch.float32, device=logits.device),
            torch.empty(C, topk, dtype=torch.float32, device=logits.device),
            torch.empty(C, topk, dtype=torch.int64, device=logits.device),
            torch.empty(C, dtype=torch.float32, device=logits.device),
        )
    lse, topk_logits, topk_index, target_logit = out
    if C == 0:
        return out
    # per-row sub-block maxima of pass 1 and survivors of pass 2 (a few KB per row each)
    scratch_rows = C if topk > 0 else 1
    block_max_scratch = torch.empty(scratch_rows, nb_pad, dtype=torch.float32, device=logits.device)
    batch = _SURVIVOR_BATCH_PER_K_PAD * k_pad
    # fewer than a batch left over, and at most every key of a group
    cap = batch + group * sub
    survivors_scratch = torch.empty(scratch_rows, cap, dtype=torch.int32, device=logits.device)

    hbm_bytes = C * (V + min(topk, num_blocks) * sub) * logits.element_size() + C * (topk * 12 + 16)
    if has_teacher:  # its row, the K + 1 gathered logits, and lse, top-K and target written
        hbm_bytes += C * ((V + topk + 1) * teacher_logits.element_size() + topk * 4 + 8)
    # without a row loss its pointers are placeholders, never touched: HAS_ROW_LOSS compiles the epilogue away
    loss_args = row_loss_launch_args(row_loss, has_support=True, placeholder=lse)
    if row_loss is not None:  # what it reads and writes beyond the statistics: ~16 floats a row, [C, K] coefficients
        hbm_bytes += C * (topk + 12) * 4
    launch(
        _student_row_stats_kernel,
        (C,),
        hbm_bytes=hbm_bytes,
        logits_ptr=logits,
        target_ids_ptr=target_ids if target_ids is not None else lse,
        lse_ptr=lse,
        topk_logits_ptr=topk_logits,
        topk_index_ptr=topk_index,
        target_logit_ptr=target_logit,
        entropy_ptr=entropy if entropy is not None else lse,
        teacher_ptr=teacher_logits if has_teacher else logits,
        teacher_lse_ptr=teacher_out[0] if has_teacher else lse,
        teacher_topk_ptr=teacher_out[1] if has_teacher else topk_logits,
        teacher_target_ptr=teacher_out[2] if has_teacher else lse,
        block_max_ptr=block_max_scratch,
        survivors_ptr=survivors_scratch,
        V=V,
        readable_v=readable_width(logits),
        teacher_readable_v=readable_width(teacher_logits) if has_teacher else 0,
        K=topk,
        num_candidates=min(topk, num_blocks),
        pre_scale=float(pre_scale),
        softcap_bound=float(softcap_bound or 0.0),
        stride_logits_c=logits.stride(0),
        stride_logits_v=logits.stride(1),
        stride_topk_logits_c=topk_logits.stride(0),
        stride_topk_index_c=topk_index.stride(0),
        stride_teacher_c=teacher_logits.stride(0) if has_teacher else 0,
        stride_teacher_v=teacher_logits.stride(1) if has_teacher else 1,
        stride_teacher_topk_c=teacher_out[1].stride(0) if has_teacher else 0,
        HAS_TOPK=topk > 0,
        HAS_TARGET=target_ids is not None,
        HAS_SOFTCAP=softcap_bound is not None,
        HAS_ENTROPY=entropy is not None,
        HAS_TEACHER=has_teacher,
        HAS_ROW_LOSS=row_loss is not None,
        **loss_args,
        TEACHER_VEC=min(_TEACHER_VEC, block_v),
        BLOCK_V=block_v,
        SUB=sub,
        NB_PAD=nb_pad,
        LOG_NB_PAD=nb_pad.bit_length() - 1,
        GROUP=group,
        LOG_GATHER=(group * sub).bit_length() - 1,
        K_PAD=k_pad,
        LOG_K_PAD=k_pad.bit_length() - 1,
        BATCH=batch,
        LOG_BATCH=batch.bit_length() - 1,
        CAP=cap,
        num_warps=num_warps,
    )
    return out


def _check_teacher(teacher_logits: Tensor, teacher_out: tuple[Tensor, ...] | None, logits: Tensor, topk: int) -> None:
    """``teacher_logits`` like ``logits``; ``teacher_out``: the ``[C]``, ``[C, K]``, ``[C]`` fp32 written from it."""
    if teacher_logits.shape != logits.shape or not teacher_logits.is_floating_point():
        raise ValueError(
            f"teacher_logits must be a floating {tuple(logits.shape)} tensor like logits, got "
            f"{tuple(teacher_logits.shape)} {teacher_logits.dtype}"
        )
    if teacher_logits.device != logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device}, logits on {logits.device}")
    C = logits.shape[0]
    shapes = ((C,), (C, topk), (C,))
    if (
        teacher_out is None
        or len(teacher_out) != 3
        or any(
            t.shape != shape or t.dtype != torch.float32 or t.device != logits.device
            for t, shape in zip(teacher_out, shapes, strict=True)
        )
    ):
        raise ValueError(
            f"teacher_out must be (teacher_lse [{C}], teacher_topk_logits [{C}, {topk}], teacher_target_logit [{C}]) "
            "fp32 tensors on the logits' device with teacher_logits"
        )
