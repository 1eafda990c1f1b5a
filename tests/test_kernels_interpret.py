"""The Triton row kernels against their torch twins (``sdpo_ops.row_ops``) and independent oracles.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) on tiny CPU shapes; the block
width is forced small (``block_v=16``) so rows span several tiles and V is not a multiple of the tile.
Oracles: ``torch.topk`` (up to ties: the *multiset* of selected values), ``torch.logsumexp``, the naive
``sdpo_ops.reference.generalized_jsd`` and float64 autograd for the gradients.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import ELEMENTWISE

from sdpo_ops import row_ops as torch_ops
from sdpo_ops.kernels import row_ops as triton_ops
from sdpo_ops.reference import generalized_jsd

# The interpreter evaluates IEEE arithmetic with numpy, which warns where a GPU is silent: log(0) = -inf for a
# fully masked row, and -inf - -inf = NaN in lanes that a where() then discards.
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

FP32 = ELEMENTWISE[torch.float32]
SHAPES = [(1, 7), (3, 33), (5, 64), (5, 100)]
BLOCK_V = 16


def _assert_close(actual, expected, **kwargs):
    torch.testing.assert_close(actual, expected, **{**FP32, **kwargs})


def _hard_logits(C: int, V: int, seed: int) -> torch.Tensor:
    """[C, V] fp32 logits whose rows cycle through the hard cases.

    Row flavours: 0 plain normal; 1 heavy ties (3 distinct values); 2 masked vocabulary (-inf except 3
    columns, so K may reach into the -inf entries); 3 +-1e4 logits among normal ones; 4 ties at the top and
    a few -inf.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(C, V, generator=gen) * 3
    for row in range(C):
        flavour = row % 5
        if flavour == 1:
            logits[row] = torch.randint(0, 3, (V,), generator=gen).float()
        elif flavour == 2:
            keep = torch.randperm(V, generator=gen)[:3]
            masked = torch.full((V,), -math.inf)
            masked[keep] = logits[row, keep]
            logits[row] = masked
        elif flavour == 3:
            pick = torch.randperm(V, generator=gen)[:4]
            logits[row, pick] = torch.tensor([1e4, -1e4, 1e4, -1e4])[: len(pick)]
        elif flavour == 4:
            pick = torch.randperm(V, generator=gen)[:6]
            logits[row, pick[:3]] = 10.0
            logits[row, pick[3:]] = -math.inf
    return logits


def _masked_pair(C: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits with a shared masked (-inf) vocabulary and a +-1e4-scale row."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(C, V, generator=gen) * 2
    teacher = torch.randn(C, V, generator=gen) * 2
    masked = torch.rand(C, V, generator=gen) < 0.2
    masked[:, 0] = False
    student[masked] = -math.inf
    teacher[masked] = -math.inf
    if C > 1:
        student[1] *= 1e3
        teacher[1] *= 1e3
    return student, teacher


# ---------------------------------------------------------------- student_row_stats


def _check_topk(logits, topk_logits, topk_index, K):
    C, V = logits.shape
    assert topk_logits.shape == (C, K) and topk_index.shape == (C, K) and topk_index.dtype == torch.int64
    if K == 0:
        return
    assert bool(((topk_index >= 0) & (topk_index < V)).all())
    # distinct columns per row, and the values are the logits at those columns
    assert all(len(set(row.tolist())) == K for row in topk_index)
    torch.testing.assert_close(topk_logits, logits.gather(1, topk_index), rtol=0, atol=0)
    # the multiset of selected values is torch.topk's (indices agree only up to ties)
    expected = torch.topk(logits, K, dim=-1).values
    torch.testing.assert_close(topk_logits.sort(-1).values, expected.sort(-1).values, rtol=0, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", SHAPES)
@pytest.mark.parametrize("K", [0, 1, 3, 8, "V"])
def test_student_row_stats_matches_torch(C, V, K):
    K = V if K == "V" else min(K, V)
    logits = _hard_logits(C, V, seed=C * 1000 + V)
    target_ids = torch.randint(0, V, (C,), generator=torch.Generator().manual_seed(V))

    lse, topk_logits, topk_index, target_logit = triton_ops.student_row_stats(logits, K, target_ids, block_v=BLOCK_V)
    ref_lse, _, _, ref_target_logit = torch_ops.student_row_stats(logits, K, target_ids)

    _assert_close(lse, torch.logsumexp(logits.double(), -1).float())
    _assert_close(lse, ref_lse)
    torch.testing.assert_close(target_logit, ref_target_logit, rtol=0, atol=0)
    _check_topk(logits, topk_logits, topk_index, K)
    assert not lse[torch.isfinite(logits).any(-1)].isnan().any()


@pytest.mark.interpret
def test_student_row_stats_prefers_lower_column_on_ties_and_sorts_descending():
    logits = torch.tensor([[1.0, 5.0, 5.0, -math.inf, 5.0, 2.0, 2.0, 0.0, 2.0]])
    _, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, 5, None, block_v=4)
    assert topk_index.tolist() == [[1, 2, 4, 5, 6]]
    assert topk_logits.tolist() == [[5.0, 5.0, 5.0, 2.0, 2.0]]


@pytest.mark.interpret
def test_student_row_stats_without_target_strided_and_all_masked_row():
    buffer = _hard_logits(3, 40, seed=7)
    buffer[2] = -math.inf  # a fully masked row: lse -inf like torch, top-K still K distinct columns
    logits = buffer[:, :37]  # a view whose row stride is not V
    lse, topk_logits, topk_index, target_logit = triton_ops.student_row_stats(logits, 3, None)
    _assert_close(lse, torch.logsumexp(logits, -1))
    assert lse[2].item() == -math.inf
    torch.testing.assert_close(target_logit, torch.zeros(3), rtol=0, atol=0)
    _check_topk(logits, topk_logits, topk_index, 3)


@pytest.mark.interpret
@pytest.mark.parametrize("K", [20, 37])
def test_student_row_stats_several_candidate_groups(K):
    # block_v=16 gives 2-wide sub-blocks and 16 or 32 candidate blocks per pass-2 group: K candidates span
    # two groups, the second one partial
    logits = _hard_logits(5, 100, seed=K)
    lse, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, K, None, block_v=BLOCK_V)
    _assert_close(lse, torch.logsumexp(logits, -1))
    _check_topk(logits, topk_logits, topk_index, K)


@pytest.mark.interpret
@settings(max_examples=15)
@given(
    V=st.integers(1, 300),
    k_fraction=st.floats(0.0, 1.0),
    block_v=st.sampled_from([2, 4, 8, 16, 32, 64, 128]),
    distinct=st.sampled_from([2, 5, 1000]),
    masked_fraction=st.sampled_from([0.0, 0.5, 0.95]),
    seed=st.integers(0, 2**16),
)
def test_student_topk_is_exact_with_lower_column_ties(V, k_fraction, block_v, distinct, masked_fraction, seed):
    K = min(round(k_fraction * V), 256)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, distinct, (2, V), generator=gen).float() - distinct / 2
    logits[torch.rand(2, V, generator=gen) < masked_fraction] = -math.inf
    _, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, K, None, block_v=block_v)
    # oracle: order by (value descending, column ascending), the documented tie rule
    for row in range(2):
        order = sorted(range(V), key=lambda j: (-logits[row, j].item(), j))[:K]
        assert topk_index[row].tolist() == order
    torch.testing.assert_close(topk_logits, logits.gather(1, topk_index), rtol=0, atol=0)


def test_student_row_stats_rejects_bad_arguments():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="topk"):
        triton_ops.student_row_stats(logits, 11, None)
    with pytest.raises(ValueError, match="topk"):
        triton_ops.student_row_stats(torch.zeros(2, 300), 257, None)
    with pytest.raises(ValueError, match="target_ids"):
        triton_ops.student_row_stats(logits, 3, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        triton_ops.student_row_stats(torch.zeros(10), 3, None)
    with pytest.raises(ValueError, match="block_v"):
        triton_ops.student_row_stats(logits, 3, None, block_v=24)


# ---------------------------------------------------------------- teacher_row_stats


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", SHAPES)
def test_teacher_row_stats_matches_torch(C, V):
    logits = _hard_logits(C, V, seed=V)
    gen = torch.Generator().manual_seed(C)
    # J = K + 1 columns with a repeat (the target among the top-K)
    index = torch.randint(0, V, (C, 4), generator=gen)
    index = torch.cat([index, index[:, :1]], dim=1)

    lse, gathered = triton_ops.teacher_row_stats(logits, index, block_v=BLOCK_V)
    ref_lse, ref_gathered = torch_ops.teacher_row_stats(logits, index)

    _assert_close(lse, torch.logsumexp(logits.double(), -1).float())
    _assert_close(lse, ref_lse)
    torch.testing.assert_close(gathered, ref_gathered, rtol=0, atol=0)


@pytest.mark.interpret
def test_teacher_row_stats_empty_index():
    logits = _hard_logits(2, 20, seed=3)
    lse, gathered = triton_ops.teacher_row_stats(logits, torch.empty(2, 0, dtype=torch.int64))
    assert gathered.shape == (2, 0)
    _assert_close(lse, torch.logsumexp(logits, -1))


def test_teacher_row_stats_rejects_bad_index():
    with pytest.raises(ValueError, match="index"):
        triton_ops.teacher_row_stats(torch.zeros(2, 10), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="index"):
        triton_ops.teacher_row_stats(torch.zeros(2, 10), torch.zeros(2, 1, dtype=torch.int32))


# ---------------------------------------------------------------- full_vocab_divergence


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", [(1, 7), (3, 33), (5, 100)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_full_vocab_divergence_matches_torch_and_reference(C, V, alpha):
    student, teacher = _masked_pair(C, V, seed=C + V)
    student_lse, teacher_lse = torch.logsumexp(student, -1), torch.logsumexp(teacher, -1)

    divergence, grad_sum = triton_ops.full_vocab_divergence(
        student, teacher, student_lse, teacher_lse, alpha, block_v=BLOCK_V
    )
    ref_divergence, ref_grad_sum = torch_ops.full_vocab_divergence(student, teacher, student_lse, teacher_lse, alpha)
    _assert_close(divergence, ref_divergence)
    _assert_close(grad_sum, ref_grad_sum)

    # independent oracle: the naive reference in float64 and its gradient by autograd, per row on the
    # unmasked columns (the reference's where(p > 0, ...) has a NaN gradient at -inf entries)
    for row in range(C):
        finite = torch.isfinite(student[row])
        s = torch.log_softmax(student[row].double(), -1)[finite].requires_grad_()
        t = torch.log_softmax(teacher[row].double(), -1)[finite]
        oracle = generalized_jsd(s, t, alpha)
        (oracle_grad,) = torch.autograd.grad(oracle, s)
        _assert_close(divergence[row], oracle.detach().float())
        _assert_close(grad_sum[row], oracle_grad.sum().float())


def test_full_vocab_divergence_rejects_bad_arguments():
    z = torch.zeros(2, 10)
    lse = torch.zeros(2)
    with pytest.raises(ValueError, match="alpha"):
        triton_ops.full_vocab_divergence(z, z, lse, lse, 1.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        triton_ops.full_vocab_divergence(z, torch.zeros(2, 11), lse, lse, 0.5)
    with pytest.raises(ValueError, match="teacher_lse"):
        triton_ops.full_vocab_divergence(z, z, lse, torch.zeros(3), 0.5)


# ---------------------------------------------------------------- logit_grad_


def _sparse_terms(C, V, J, seed):
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, V, (C, J), generator=gen)
    index[:, -1] = index[:, 0]  # a repeated column must accumulate
    value = torch.randn(C, J, generator=gen)
    coef = torch.randn(C, generator=gen)
    return index, value, coef


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_logit_grad_sparse_matches_torch_and_autograd(C, V, scale):
    logits, _ = _masked_pair(C, V, seed=V)
    lse = torch.logsumexp(logits, -1)
    index, value, coef = _sparse_terms(C, V, J=5, seed=C)

    out = triton_ops.logit_grad_(logits.clone(), lse, coef, index, value, scale, block_v=BLOCK_V)
    expected = torch_ops.logit_grad_(logits.clone(), lse, coef, index, value, scale)
    _assert_close(out, expected)

    # oracle: d/dz of sum_k v_k z[idx_k] - coef * lse(z) (every column finite here: -inf has no gradient)
    z = logits.double().clamp(min=-1e30).requires_grad_()
    objective = (z.gather(1, index) * value.double()).sum() - (coef.double() * torch.logsumexp(z, -1)).sum()
    (oracle,) = torch.autograd.grad(objective, z)
    _assert_close(out, (oracle * scale).float())


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", [(1, 7), (3, 33), (5, 100)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_logit_grad_full_vocab_matches_torch_and_autograd(C, V, alpha):
    student, teacher = _masked_pair(C, V, seed=2 * V)
    student_lse, teacher_lse = torch.logsumexp(student, -1), torch.logsumexp(teacher, -1)
    index, value, coef = _sparse_terms(C, V, J=2, seed=V)
    row_scale = torch.rand(C, generator=torch.Generator().manual_seed(0)) + 0.5
    teacher_args = (teacher, teacher_lse, row_scale, alpha)

    out = triton_ops.logit_grad_(student.clone(), student_lse, coef, index, value, 0.5, teacher_args, block_v=BLOCK_V)
    expected = torch_ops.logit_grad_(student.clone(), student_lse, coef, index, value, 0.5, teacher_args)
    _assert_close(out, expected)
    assert bool(torch.isfinite(out).all())

    # oracle on unmasked logits: d(row_scale * D)/dz by autograd equals row_scale * (g - S * sum g), i.e. the
    # kernel with dense_coef = row_scale * sum g and no sparse part
    clean_s, clean_t = torch.randn(C, V, dtype=torch.float64), torch.randn(C, V, dtype=torch.float64)
    clean_s_lse, clean_t_lse = torch.logsumexp(clean_s, -1), torch.logsumexp(clean_t, -1)
    _, clean_grad_sum = torch_ops.full_vocab_divergence(
        clean_s.float(), clean_t.float(), clean_s_lse.float(), clean_t_lse.float(), alpha
    )
    empty_index, empty_value = torch.empty(C, 0, dtype=torch.int64), torch.empty(C, 0)
    out = triton_ops.logit_grad_(
        clean_s.float(),
        clean_s_lse.float(),
        row_scale * clean_grad_sum,
        empty_index,
        empty_value,
        0.5,
        (clean_t.float(), clean_t_lse.float(), row_scale, alpha),
        block_v=BLOCK_V,
    )
    z = clean_s.clone().requires_grad_()
    divergence = generalized_jsd(torch.log_softmax(z, -1), torch.log_softmax(clean_t, -1), alpha)
    (oracle,) = torch.autograd.grad((row_scale.double() * divergence).sum(), z)
    _assert_close(out, (oracle * 0.5).float())


def test_logit_grad_rejects_bad_arguments():
    z, lse = torch.zeros(2, 10), torch.zeros(2)
    index, value = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dense_coef"):
        triton_ops.logit_grad_(z, lse, torch.zeros(3), index, value, 1.0)
    with pytest.raises(ValueError, match="sparse_value"):
        triton_ops.logit_grad_(z, lse, lse, index, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="teacher"):
        triton_ops.logit_grad_(z, lse, lse, index, value, 1.0, (torch.zeros(2, 9), lse, lse, 0.5))


def test_namespace_is_a_drop_in():
    import inspect

    for name in ("student_row_stats", "teacher_row_stats", "full_vocab_divergence", "logit_grad_"):
        ours, twin = inspect.signature(getattr(triton_ops, name)), inspect.signature(getattr(torch_ops, name))
        positional = [p for p in ours.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in positional] == list(twin.parameters), name


# ---------------------------------------------------------------- compiled for a GPU, without one

_COMPILE_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sdpo_ops.kernels import full_vocab_divergence, logit_grad, student_row_stats, teacher_row_stats

    def compile_sm90(fn, signature, constexprs):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

    ptr, i32, f32 = "*fp32", "i32", "fp32"
    compile_sm90(
        student_row_stats._student_row_stats_kernel,
        dict(logits_ptr=ptr, target_ids_ptr="*i64", lse_ptr=ptr, topk_logits_ptr=ptr, topk_index_ptr="*i64",
             target_logit_ptr=ptr, V=i32, K=i32, num_candidates=i32, stride_logits_c=i32, stride_logits_v=i32,
             stride_topk_logits_c=i32, stride_topk_index_c=i32),
        dict(HAS_TOPK=True, HAS_TARGET=True, BLOCK_V=2048, SUB=128, NB_PAD=2048, LOG_NB_PAD=11, GROUP=16,
             LOG_GATHER=11, K_PAD=128, LOG_K_PAD=7),
    )
    compile_sm90(
        teacher_row_stats._teacher_row_stats_kernel,
        dict(logits_ptr=ptr, index_ptr="*i64", lse_ptr=ptr, gathered_ptr=ptr, V=i32, J=i32, stride_logits_c=i32,
             stride_logits_v=i32, stride_index_c=i32, stride_index_j=i32, stride_gathered_c=i32),
        dict(BLOCK_V=4096, BLOCK_J=128),
    )
    compile_sm90(
        full_vocab_divergence._full_vocab_divergence_kernel,
        dict(student_logits_ptr=ptr, teacher_logits_ptr=ptr, student_lse_ptr=ptr, teacher_lse_ptr=ptr,
             divergence_ptr=ptr, grad_sum_ptr=ptr, V=i32, alpha=f32, log_one_minus_alpha=f32, log_alpha=f32,
             stride_student_c=i32, stride_student_v=i32, stride_teacher_c=i32, stride_teacher_v=i32),
        dict(ALPHA_MODE=2, BLOCK_V=2048),
    )
    compile_sm90(
        logit_grad._logit_grad_kernel,
        dict(student_logits_ptr=ptr, student_lse_ptr=ptr, dense_coef_ptr=ptr, teacher_logits_ptr=ptr,
             teacher_lse_ptr=ptr, row_scale_ptr=ptr, V=i32, scale=f32, alpha=f32, log_one_minus_alpha=f32,
             log_alpha=f32, stride_student_c=i32, stride_student_v=i32, stride_teacher_c=i32, stride_teacher_v=i32),
        dict(HAS_TEACHER=True, ALPHA_MODE=2, BLOCK_V=2048),
    )
    print("compiled")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter runs the kernels as Python and misses what only the compiler rejects (e.g. a reassigned
    # constexpr): compile each kernel to a cubin for sm_90 with the ptxas shipped in the triton wheel, in a
    # subprocess because TRITON_INTERPRET is fixed at import. Cached by triton after the first run.
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


# ---------------------------------------------------------------- GPU, real shape


@pytest.mark.gpu
def test_row_kernels_on_cuda_at_a_real_shape():
    C, V, K = 64, 151936, 100
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(C, V, device="cuda", generator=gen) * 4
    teacher = torch.randn(C, V, device="cuda", generator=gen) * 4
    student[:, -100:] = -math.inf  # padded vocabulary
    teacher[:, -100:] = -math.inf
    target_ids = torch.randint(0, V - 100, (C,), device="cuda", generator=gen)

    lse, topk_logits, topk_index, target_logit = triton_ops.student_row_stats(student, K, target_ids)
    ref_lse, ref_topk_logits, _, ref_target_logit = torch_ops.student_row_stats(student, K, target_ids)
    _assert_close(lse, ref_lse)
    torch.testing.assert_close(target_logit, ref_target_logit, rtol=0, atol=0)
    torch.testing.assert_close(topk_logits.sort(-1).values, ref_topk_logits.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(topk_logits, student.gather(1, topk_index), rtol=0, atol=0)

    index = torch.cat([topk_index, target_ids[:, None]], 1)
    t_lse, gathered = triton_ops.teacher_row_stats(teacher, index)
    ref_t_lse, ref_gathered = torch_ops.teacher_row_stats(teacher, index)
    _assert_close(t_lse, ref_t_lse)
    torch.testing.assert_close(gathered, ref_gathered, rtol=0, atol=0)

    for alpha in (0.0, 0.5, 1.0):
        divergence, grad_sum = triton_ops.full_vocab_divergence(student, teacher, lse, t_lse, alpha)
        ref_divergence, ref_grad_sum = torch_ops.full_vocab_divergence(student, teacher, lse, t_lse, alpha)
        _assert_close(divergence, ref_divergence, atol=1e-4)
        _assert_close(grad_sum, ref_grad_sum, atol=1e-4)

    coef, row_scale = torch.randn(C, device="cuda", generator=gen), torch.rand(C, device="cuda", generator=gen)
    value = torch.randn(C, K + 1, device="cuda", generator=gen)
    for teacher_args in (None, (teacher, t_lse, row_scale, 0.5)):
        out = triton_ops.logit_grad_(student.clone(), lse, coef, index, value, 0.5, teacher_args)
        expected = torch_ops.logit_grad_(student.clone(), lse, coef, index, value, 0.5, teacher_args)
        _assert_close(out, expected)
