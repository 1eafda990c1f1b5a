"""The Triton row kernels against their torch twins (``sdpo_ops.row_ops``) and independent oracles.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) on tiny CPU shapes; the block
width is forced small (``block_v=16``) so rows span several tiles and V is not a multiple of the tile.
Oracles: ``torch.topk`` (up to ties: the *multiset* of selected values), ``torch.logsumexp``, the naive
``sdpo_ops.reference.generalized_jsd`` and float64 autograd for the gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import ELEMENTWISE

from sdpo_ops import row_ops as torch_ops
from sdpo_ops.kernels import row_ops as triton_ops
from sdpo_ops.kernels.launch import readable_width
from sdpo_ops.reference import entropy_of, generalized_jsd
from sdpo_ops.row_outputs import RowLossInputs, RowOutputs

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
@pytest.mark.parametrize("block_v", [2, 16])
def test_student_row_stats_ties_between_signed_zeros_follow_the_lower_column(block_v):
    # -0.0 == +0.0: a tie, so the lower column wins, whichever of them carries the sign (issue 17, item 9); with
    # block_v=2 the zeros are the maxima of different sub-blocks, so the block selection meets the tie as well
    for first, second in ((0.0, -0.0), (-0.0, 0.0)):
        logits = torch.tensor([[-3.0, first, -1.0, second, -2.0, -5.0]])
        _, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, 1, None, block_v=block_v)
        assert topk_index.tolist() == [[1]], (first, second)
        assert topk_logits.tolist() == [[0.0]]
        _, _, topk_index, _ = triton_ops.student_row_stats(logits, 2, None, block_v=block_v)
        assert topk_index.tolist() == [[1, 3]], (first, second)


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


@pytest.mark.interpret
@pytest.mark.parametrize("path", ["few survivors", "overflow: ties", "K = V", "-inf", "overflow: -inf"])
def test_student_topk_ties_k_equals_v_and_inf(path):
    # block_v=16 gives SUB=2: many candidate blocks; ties, K = V and K past the finite entries
    V, K = 96, 5
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(V, generator=gen)
    if path == "overflow: ties":
        row = torch.randint(0, 2, (V,), generator=gen).float()
    elif path == "K = V":
        K = V
    elif path == "-inf":
        row[torch.rand(V, generator=gen) < 0.3] = -math.inf
    elif path == "overflow: -inf":  # fewer finite values than K: the threshold is -inf
        row[torch.rand(V, generator=gen) < 0.97] = -math.inf
    logits = row[None].repeat(2, 1)
    logits[1] = logits[1].flip(0)
    entropy = torch.empty(2)
    lse, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, K, None, entropy=entropy, block_v=16)
    for r in range(2):
        order = sorted(range(V), key=lambda j: (-logits[r, j].item(), j))[:K]
        assert topk_index[r].tolist() == order
    torch.testing.assert_close(topk_logits, logits.gather(1, topk_index), rtol=0, atol=0)
    _assert_close(lse, torch.logsumexp(logits.double(), -1).float())
    _assert_close(entropy, _fp64_entropy(logits))


def _survivor_merges(row: torch.Tensor, K: int, sub: int, group: int, batch: int) -> list[int]:
    """Batches per merge of pass 2's survivors, simulated from the kernel's docstring: which path a row takes.

    Keys order by (value, lower column); the threshold starts at the K-th largest sub-block maximum (any column)
    and rises to the K-th largest survivor after each merge; a merge runs once ``batch`` survivors wait, and at the
    end."""
    values = row.tolist()
    maxima = [max(values[start : start + sub]) for start in range(0, len(values), sub)]
    candidates = sorted(range(len(maxima)), key=lambda b: (-maxima[b], b))[:K]
    threshold = (maxima[candidates[-1]], -math.inf) if len(maxima) >= K else None
    merges, waiting, merged = [], 0, []
    for first in range(0, len(candidates), group):
        for block in candidates[first : first + group]:
            for col in range(block * sub, min((block + 1) * sub, len(values))):
                if threshold is None or (values[col], -col) >= threshold:
                    waiting += 1
                    merged.append((values[col], -col))
        if waiting >= batch:
            merges.append(-(-waiting // batch))
            waiting = 0
            if len(merged) >= K:
                threshold = sorted(merged, reverse=True)[K - 1]
    return [*merges, -(-waiting // batch)]


@pytest.mark.interpret
@pytest.mark.parametrize(
    "case, merges",
    [
        ("all equal", [1, 0]),  # the first group fills a batch; the raised threshold drops every later key
        ("equal maxima, two batches", [2, 0]),  # 63 survivors wait, the next group brings 64 more
        ("a later group beats the raised threshold", [1, 1]),  # column 0 ties the K-th value, in the second group
        ("ties and -inf", None),
    ],
)
def test_student_topk_survivor_merges(case, merges):
    # block_v=64 on the interpreter: SUB=8, 8 blocks per group; K=20: K_PAD=32, batches of 64 keys
    V, K, sub, group, batch = 192, 20, 8, 8, 64
    gen = torch.Generator().manual_seed(3)
    row = torch.zeros(V)
    if case == "equal maxima, two batches":
        row += 1.0
        row[5] = 0.0  # the first group holds 63 keys at the threshold value
    elif case == "a later group beats the raised threshold":
        # blocks 1-8 (the first group): 10 and seven 5s; blocks 0 and 9-19: 5 at their first column (block 0 ranks
        # ninth: a smaller maximum, the lowest id); the rest 0. The first merge keeps the 5s up to column 21, so
        # the 5 at column 0 must still pass the threshold it raised.
        row[sub : 9 * sub] = 5.0
        row[sub : 9 * sub : sub] = 10.0
        row[0 : 20 * sub : sub][[0, *range(9, 20)]] = 5.0
    elif case == "ties and -inf":
        row = torch.randint(0, 3, (V,), generator=gen).float()
        row[torch.rand(V, generator=gen) < 0.5] = -math.inf
    if merges is not None:
        assert _survivor_merges(row, K, sub, group, batch) == merges
    logits = torch.stack([row, row.flip(0)])
    entropy = torch.empty(2)
    lse, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, K, None, entropy=entropy, block_v=64)
    for r in range(2):
        order = sorted(range(V), key=lambda j: (-logits[r, j].item(), j))[:K]
        assert topk_index[r].tolist() == order
    torch.testing.assert_close(topk_logits, logits.gather(1, topk_index), rtol=0, atol=0)
    _assert_close(lse, torch.logsumexp(logits.double(), -1).float())
    _assert_close(entropy, _fp64_entropy(logits))


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


# ---------------------------------------------------------------- entropy, from the log-sum-exp's pass


def _fp64_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The oracle: ``-sum p log p`` of the materialised fp64 softmax (``sdpo_ops.reference``), in fp32."""
    return entropy_of(torch.log_softmax(logits.double(), -1)).float()


def _entropy_cases(C: int, V: int, seed: int) -> torch.Tensor:
    """``_hard_logits`` (ties, masked vocabulary, +-1e4) plus two rows of known entropy: uniform (log V) and a single
    finite logit among -inf (0)."""
    logits = _hard_logits(C, V, seed)
    uniform = torch.full((1, V), 1e4)
    single = torch.full((1, V), -math.inf)
    single[0, V // 2] = -3.0
    return torch.cat([logits, uniform, single])


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", SHAPES)
@pytest.mark.parametrize("K", [0, 3])
def test_entropy_of_every_row_stage_matches_fp64(C, V, K):
    logits = _entropy_cases(C, V, seed=V + K)
    expected = _fp64_entropy(logits)
    assert expected[-2].item() == pytest.approx(math.log(V)) and expected[-1].item() == 0.0
    index = torch.zeros(logits.shape[0], 2, dtype=torch.int64)
    # the student's stage, and the teacher's stage when it reads the student's buffer (a top-K teacher)
    stages = {
        "triton student": lambda out: triton_ops.student_row_stats(logits, K, None, entropy=out, block_v=BLOCK_V),
        "triton teacher": lambda out: triton_ops.teacher_row_stats(logits, index, entropy=out, block_v=BLOCK_V),
        "torch student": lambda out: torch_ops.student_row_stats(logits, K, None, entropy=out),
        "torch teacher": lambda out: torch_ops.teacher_row_stats(logits, index, entropy=out),
    }
    for name, stage in stages.items():
        entropy = torch.full((logits.shape[0],), math.nan)
        lse = stage(entropy)[0]
        _assert_close(entropy, expected, msg=lambda m, n=name: f"{n}: {m}")
        _assert_close(lse, torch.logsumexp(logits.double(), -1).float(), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.interpret
def test_entropy_of_a_fully_masked_row_is_nan_like_its_softmax():
    # undefined (no distribution): NaN, as the materialised softmax gives; the loss reports 0 at masked positions
    logits = torch.randn(2, 20)
    logits[1] = -math.inf
    for stage in (triton_ops.student_row_stats, torch_ops.student_row_stats):
        entropy = torch.zeros(2)
        stage(logits, 2, None, entropy=entropy)
        _assert_close(entropy[0], _fp64_entropy(logits[:1])[0])
        assert entropy[1].isnan()


def test_entropy_output_is_checked():
    logits = torch.zeros(2, 10)
    for bad in (torch.zeros(3), torch.zeros(2, dtype=torch.int64), torch.zeros(4)[::2]):
        with pytest.raises(ValueError, match="entropy"):
            triton_ops.student_row_stats(logits, 3, None, entropy=bad)
        with pytest.raises(ValueError, match="entropy"):
            triton_ops.teacher_row_stats(logits, torch.zeros(2, 1, dtype=torch.int64), entropy=bad)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "C,V,K,softcap_bound", [(1, 7, 0, None), (3, 33, 3, 5.0), (5, 64, 8, None), (5, 100, 8, 5.0), (5, 100, 0, 5.0)]
)
def test_student_row_stats_fuses_the_teacher_stats(C, V, K, softcap_bound):
    # the teacher's log-sum-exp streamed beside the student's row, its logits at the student's top-K and target: the
    # separate teacher_row_stats kernel's results (and the twin's), to the bit where both read the same element
    K = min(K, V)
    student, teacher = _masked_pair(C, V, seed=C * 100 + V)
    if C > 2:
        teacher[2] = -math.inf  # a fully masked teacher row: lse -inf, no NaN
    # the teacher in a row stride padded to 16 (as the dZ staging holds it), garbage in the padding
    padded = torch.full((C, -(-V // 16) * 16), 1e4)
    padded[:, :V] = teacher
    teacher = padded[:, :V]
    assert readable_width(teacher) > V or V % 16 == 0
    target_ids = torch.randint(0, V, (C,), generator=torch.Generator().manual_seed(C))
    on_load = {"pre_scale": 0.7, "softcap_bound": softcap_bound}
    teacher_out = (torch.empty(C), torch.empty(C, K), torch.empty(C))
    stats = triton_ops.student_row_stats(
        student, K, target_ids, teacher_logits=teacher, teacher_out=teacher_out, block_v=BLOCK_V, **on_load
    )
    alone = triton_ops.student_row_stats(student, K, target_ids, block_v=BLOCK_V, **on_load)
    for fused, single in zip(stats, alone, strict=True):
        torch.testing.assert_close(fused, single, rtol=0, atol=0, equal_nan=True)
    separate = triton_ops.teacher_row_stats(teacher, stats[2], target_ids, block_v=BLOCK_V, **on_load)
    _assert_close(teacher_out[0], separate[0], equal_nan=True)
    torch.testing.assert_close(teacher_out[1], separate[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(teacher_out[2], separate[2], rtol=0, atol=0, equal_nan=True)

    twin_out = (torch.empty(C), torch.empty(C, K), torch.empty(C))
    torch_ops.student_row_stats(student, K, target_ids, teacher_logits=teacher, teacher_out=twin_out, **on_load)
    transformed = teacher * 0.7 if softcap_bound is None else softcap_bound * torch.tanh(teacher * 0.7)
    _assert_close(teacher_out[0], torch.logsumexp(transformed.double(), -1).float())
    _assert_close(teacher_out[0], twin_out[0])
    _assert_close(teacher_out[2], twin_out[2])
    # the twin's top-K may break ties differently (a saturated softcap ties many): the teacher at the kernel's columns
    _assert_close(teacher_out[1], transformed.gather(1, stats[2]))


def test_student_row_stats_rejects_a_bad_teacher():
    logits = torch.zeros(2, 10)
    good_out = (torch.empty(2), torch.empty(2, 3), torch.empty(2))
    with pytest.raises(ValueError, match="teacher_logits"):
        triton_ops.student_row_stats(logits, 3, None, teacher_logits=torch.zeros(2, 11), teacher_out=good_out)
    with pytest.raises(ValueError, match="teacher_out"):
        triton_ops.student_row_stats(logits, 3, None, teacher_logits=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="teacher_out"):
        bad_out = (torch.empty(2), torch.empty(2, 4), torch.empty(2))
        triton_ops.student_row_stats(logits, 3, None, teacher_logits=torch.zeros(2, 10), teacher_out=bad_out)
    with pytest.raises(ValueError, match="teacher_out"):
        torch_ops.student_row_stats(logits, 3, None, teacher_logits=torch.zeros(2, 10))


# ---------------------------------------------------------------- teacher_row_stats


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", SHAPES)
def test_teacher_row_stats_matches_torch(C, V):
    logits = _hard_logits(C, V, seed=V)
    gen = torch.Generator().manual_seed(C)
    index = torch.randint(0, V, (C, 4), generator=gen)
    target_ids = index[:, 0].clone()  # the target among the gathered columns

    lse, gathered, target_logit = triton_ops.teacher_row_stats(logits, index, target_ids, block_v=BLOCK_V)
    ref_lse, ref_gathered, ref_target_logit = torch_ops.teacher_row_stats(logits, index, target_ids)

    _assert_close(lse, torch.logsumexp(logits.double(), -1).float())
    _assert_close(lse, ref_lse)
    torch.testing.assert_close(gathered, logits.gather(1, index), rtol=0, atol=0)
    torch.testing.assert_close(gathered, ref_gathered, rtol=0, atol=0)
    torch.testing.assert_close(target_logit, logits[torch.arange(C), target_ids], rtol=0, atol=0)
    torch.testing.assert_close(target_logit, ref_target_logit, rtol=0, atol=0)


@pytest.mark.interpret
def test_teacher_row_stats_empty_index_writes_into_out():
    logits = _hard_logits(2, 20, seed=3)
    out = (torch.full((2,), 7.0), torch.empty(2, 0), torch.full((2,), 7.0))
    returned = triton_ops.teacher_row_stats(logits, torch.empty(2, 0, dtype=torch.int64), out=out)
    assert all(a is b for a, b in zip(returned, out, strict=True))
    _assert_close(out[0], torch.logsumexp(logits, -1))
    assert out[2].eq(0).all()  # no targets: written as zeros


def test_teacher_row_stats_rejects_bad_index():
    with pytest.raises(ValueError, match="index"):
        triton_ops.teacher_row_stats(torch.zeros(2, 10), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="index"):
        triton_ops.teacher_row_stats(torch.zeros(2, 10), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="target_ids"):
        triton_ops.teacher_row_stats(torch.zeros(2, 10), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(3).long())


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


# ---------------------------------------------------------------- row_loss_


def _row_loss_inputs(C, V, K, seed, *, full_vocab=False):
    """Row statistics of random logit rows (some masked, one with a NaN-garbage padding row) and an empty
    ``RowOutputs`` for them."""
    student, teacher = _masked_pair(C, V, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    s_lse, t_lse = torch.logsumexp(student, -1), torch.logsumexp(teacher, -1)
    s_topk, index = torch.topk(student, K, -1) if K else (torch.empty(C, 0), torch.empty(C, 0, dtype=torch.int64))
    target_ids = torch.randint(0, V, (C,), generator=gen)
    stats = {
        "student_topk_logits": None if full_vocab else s_topk,
        "teacher_topk_logits": None if full_vocab else teacher.gather(1, index),
        "student_target_logit": student[torch.arange(C), target_ids],
        "teacher_target_logit": teacher[torch.arange(C), target_ids],
        "old_logprobs": -torch.rand(C, generator=gen) * 6,
        "row_weight": (torch.rand(C, generator=gen) > 0.3).float() * torch.rand(C, generator=gen),
    }
    outputs = RowOutputs.allocate(C, K, torch.float32, torch.device("cpu"))
    outputs.student_lse.copy_(s_lse)
    outputs.teacher_lse.copy_(t_lse)
    # written by the student's row stats, not by row_loss: set, so that the twins compare values, not garbage
    outputs.entropy.copy_(-(student.log_softmax(-1).exp() * student.log_softmax(-1)).nan_to_num().sum(-1))
    if full_vocab:
        torch_ops.full_vocab_divergence(
            student, teacher, s_lse, t_lse, 0.5, out=(outputs.divergence, outputs.dense_grad)
        )
    return outputs, stats


def _clone_outputs(outputs: RowOutputs) -> RowOutputs:
    return RowOutputs(*(field.clone() for field in outputs))


@pytest.mark.interpret
@pytest.mark.parametrize("C,V,K", [(1, 7, 3), (5, 33, 8), (4, 100, 20), (3, 12, 12)])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("is_clip", [2.0, None])
def test_row_loss_matches_torch_twin(C, V, K, add_tail, alpha, is_clip):
    outputs, stats = _row_loss_inputs(C, V, K, seed=C * V + K)
    expected = _clone_outputs(outputs)
    options = {"add_tail": add_tail, "alpha": alpha, "is_clip": is_clip}
    triton_ops.row_loss_(outputs, *stats.values(), **options)
    torch_ops.row_loss_(expected, *stats.values(), **options)
    # at K = V the top-K mass sits on the clamp at -1e-7, where rounding decides whether the tail has a gradient
    on_the_clamp = {"sparse_grad", "dense_grad"} if K == V and add_tail else set()
    for name, actual, wanted in zip(RowOutputs._fields, outputs, expected, strict=True):
        if name not in on_the_clamp:
            _assert_close(actual, wanted, msg=name)
    assert outputs.loss[stats["row_weight"] == 0].eq(0).all()
    assert outputs.row_scale[stats["row_weight"] == 0].eq(0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("has_target", [True, False])
def test_row_loss_full_vocabulary_and_without_targets(has_target):
    outputs, stats = _row_loss_inputs(4, 30, 0, seed=11, full_vocab=True)
    if not has_target:
        stats.update(student_target_logit=None, teacher_target_logit=None, old_logprobs=None)
    expected = _clone_outputs(outputs)
    triton_ops.row_loss_(outputs, *stats.values(), add_tail=True, alpha=0.5, is_clip=2.0)
    torch_ops.row_loss_(expected, *stats.values(), add_tail=True, alpha=0.5, is_clip=2.0)
    for name, actual, wanted in zip(RowOutputs._fields, outputs, expected, strict=True):
        _assert_close(actual, wanted, msg=name)
    assert outputs.topk_mass.eq(1).all()
    if not has_target:
        assert outputs.is_weight.eq(1).all() and outputs.target_logprobs.eq(0).all()


@pytest.mark.interpret
def test_row_loss_tail_is_exact_near_full_mass():
    # the top-K holds all but ~1e-6 of the mass: log(1 - P) needs expm1, not 1 - exp
    K = 5
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -15.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, -12.0]])
    outputs = RowOutputs.allocate(1, K, torch.float32, torch.device("cpu"))
    outputs.student_lse.copy_(torch.logsumexp(student, -1))
    outputs.teacher_lse.copy_(torch.logsumexp(teacher, -1))
    stats = (student[:, :K], teacher[:, :K], None, None, None, torch.ones(1))
    triton_ops.row_loss_(outputs, *stats, add_tail=True, alpha=0.5, is_clip=None)
    s = torch.log_softmax(student.double(), -1)
    t = torch.log_softmax(teacher.double(), -1)
    expected = generalized_jsd(s, t, 0.5)  # the tail bin is the sixth column itself
    _assert_close(outputs.divergence, expected.float(), rtol=1e-5, atol=1e-9)


@pytest.mark.interpret
@pytest.mark.parametrize("C,V,K", [(5, 33, 8), (4, 100, 20)])
@pytest.mark.parametrize("add_tail,alpha,is_clip", [(True, 0.5, 2.0), (False, 1.0, None), (True, 0.0, 2.0)])
@pytest.mark.parametrize("has_target", [True, False])
def test_row_loss_in_the_stats_epilogue_equals_its_own_launch(C, V, K, add_tail, alpha, is_clip, has_target):
    # student_row_stats(..., row_loss=) computes the row loss from its registers; the same math as row_loss_ reading
    # the statistics back from memory, and as the torch twin (masked rows, NaN-garbage padding rows included)
    student, teacher = _masked_pair(C, V, seed=C + V + K)
    gen = torch.Generator().manual_seed(K)
    targets = torch.randint(0, V, (C,), generator=gen) if has_target else None
    old_logprobs = -torch.rand(C, generator=gen) * 6
    row_weight = (torch.rand(C, generator=gen) > 0.3).float() * torch.rand(C, generator=gen)

    def stats(ops, fused: bool) -> RowOutputs:
        rows = RowOutputs.allocate(C, K, torch.float32, torch.device("cpu"))
        s_topk, s_target, t_topk, t_target = torch.empty(C, K), torch.empty(C), torch.empty(C, K), torch.empty(C)
        inputs = RowLossInputs(rows, old_logprobs, row_weight, add_tail, alpha, is_clip)
        ops.student_row_stats(
            student, K, targets, out=(rows.student_lse, s_topk, rows.topk_index, s_target), entropy=rows.entropy,
            teacher_logits=teacher, teacher_out=(rows.teacher_lse, t_topk, t_target),
            row_loss=inputs if fused else None,
        )  # fmt: skip
        if not fused:
            ops.row_loss_(rows, s_topk, t_topk, s_target if has_target else None, t_target if has_target else None,
                          old_logprobs, row_weight, add_tail=add_tail, alpha=alpha, is_clip=is_clip)  # fmt: skip
        return rows

    fused, separate, twin = stats(triton_ops, True), stats(triton_ops, False), stats(torch_ops, True)
    for name, actual, one_by_one in zip(RowOutputs._fields, fused, separate, strict=True):
        # the interpreter evaluates both with the same numpy ops in the same order: equal, NaN where NaN
        assert torch.equal(actual.nan_to_num(7.0), one_by_one.nan_to_num(7.0)), name
    # the twin's top-K comes unsorted (torch.topk): compare what does not depend on the order of the support
    for name in ("loss", "divergence", "target_logprobs", "is_weight", "topk_mass", "row_scale", "dense_grad"):
        _assert_close(getattr(fused, name), getattr(twin, name), msg=name)
    assert fused.loss[row_weight == 0].eq(0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("add_tail,alpha,is_clip", [(True, 0.5, 2.0), (False, 1.0, None)])
@pytest.mark.parametrize("has_target", [True, False])
def test_row_loss_in_the_served_teacher_stage_equals_its_own_launch(add_tail, alpha, is_clip, has_target):
    # a served teacher: teacher_row_stats reads the student's row at the teacher's ids; its row loss against the
    # teacher's log-probs (log-sum-exp and target logit 0) equals row_loss_ launched after it, and the torch twin
    C, V, K = 5, 40, 6
    student, _ = _masked_pair(C, V, seed=3)
    gen = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(C)])
    logprobs = torch.log_softmax(torch.randn(C, V, generator=gen), -1).gather(1, ids)
    targets = torch.randint(0, V, (C,), generator=gen) if has_target else None
    old_logprobs, row_weight = -torch.rand(C, generator=gen) * 6, (torch.rand(C, generator=gen) > 0.3).float()

    def stats(ops, fused: bool) -> RowOutputs:
        rows = RowOutputs.allocate(C, K, torch.float32, torch.device("cpu"), topk_index=ids)
        rows.teacher_lse.zero_()
        s_topk, s_target = torch.empty(C, K), torch.empty(C)
        inputs = RowLossInputs(rows, old_logprobs, row_weight, add_tail, alpha, is_clip, logprobs)
        ops.teacher_row_stats(student, ids, targets, out=(rows.student_lse, s_topk, s_target), entropy=rows.entropy,
                              row_loss=inputs if fused else None)  # fmt: skip
        if not fused:
            ops.row_loss_(rows, s_topk, logprobs, s_target if has_target else None,
                          rows.teacher_lse if has_target else None, old_logprobs, row_weight, add_tail=add_tail,
                          alpha=alpha, is_clip=is_clip)  # fmt: skip
        return rows

    fused, separate, twin = stats(triton_ops, True), stats(triton_ops, False), stats(torch_ops, True)
    for name, actual, one_by_one, wanted in zip(RowOutputs._fields, fused, separate, twin, strict=True):
        assert torch.equal(actual.nan_to_num(7.0), one_by_one.nan_to_num(7.0)), name
        _assert_close(actual, wanted, msg=name)  # the support is the teacher's ids, in the same order on both
    with pytest.raises(ValueError, match="served_teacher_logprobs"):
        triton_ops.teacher_row_stats(student, ids, targets, row_loss=RowLossInputs(fused, None, row_weight, True,
                                                                                   0.5, None))  # fmt: skip


def test_row_loss_in_the_stats_needs_a_teacher_and_a_support():
    logits = torch.randn(2, 9)
    rows = RowOutputs.allocate(2, 3, torch.float32, torch.device("cpu"))
    inputs = RowLossInputs(rows, None, torch.ones(2), True, 0.5, None)
    for ops in (torch_ops, triton_ops):
        with pytest.raises(ValueError, match="row_loss needs teacher_logits"):
            ops.student_row_stats(logits, 3, None, row_loss=inputs)


# ---------------------------------------------------------------- logit_grad


def _logit_grad_terms(C, V, K, seed):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(C)])  # distinct per row
    target_ids = torch.randint(0, V, (C,), generator=gen)
    target_ids[0] = index[0, 0]  # the target among the top-K: its terms must add up, deterministically
    return {
        "row_scale": torch.where(torch.arange(C) % 3 == 2, 0.0, torch.rand(C, generator=gen) + 0.5),
        "dense_grad": torch.randn(C, generator=gen),
        "topk_index": index,
        "sparse_grad": torch.randn(C, K, generator=gen),
        "target_ids": target_ids,
        "target_scale": torch.randn(C, generator=gen),
    }


def _logit_grad_oracle(logits, terms, scale, with_target):
    """d/dz of sum_rows r * (sum_k sparse_k z[idx_k] - dense * lse(z)) + c * (z[target] - lse(z)), float64."""
    z = logits.double().clamp(min=-1e30).requires_grad_()
    lse = torch.logsumexp(z, -1)
    r = terms["row_scale"].double()
    objective = (r * ((z.gather(1, terms["topk_index"]) * terms["sparse_grad"].double()).sum(-1)
                      - terms["dense_grad"].double() * lse)).sum()  # fmt: skip
    if with_target:
        c = terms["target_scale"].double()
        objective = objective + (c * (z.gather(1, terms["target_ids"][:, None]).squeeze(1) - lse)).sum()
    (grad,) = torch.autograd.grad(objective, z)
    return (grad * scale).float()


@pytest.mark.interpret
@pytest.mark.parametrize("C,V,K", [(1, 7, 3), (3, 33, 5), (5, 100, 9)])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_logit_grad_sparse_matches_torch_and_autograd(C, V, K, with_target, scale):
    logits, _ = _masked_pair(C, V, seed=V)
    lse = torch.logsumexp(logits, -1)
    terms = _logit_grad_terms(C, V, K, seed=C + K)
    if not with_target:
        terms.update(target_ids=None, target_scale=None)
    args = (logits, lse, *terms.values(), scale)

    out = triton_ops.logit_grad(*args, out=torch.full((C, V), math.nan), block_v=BLOCK_V)
    expected = torch_ops.logit_grad(*args, out=torch.full((C, V), math.nan))
    _assert_close(out, expected)
    _assert_close(out, _logit_grad_oracle(logits, terms, scale, with_target))
    if not with_target:
        assert out[terms["row_scale"] == 0].eq(0).all()  # masked rows: exact zeros, no NaN from the logits


@pytest.mark.interpret
def test_logit_grad_masked_row_with_nan_logits_is_zero():
    C, V, K = 3, 20, 4
    logits = torch.randn(C, V)
    logits[1] = math.nan  # a padding row of garbage
    terms = _logit_grad_terms(C, V, K, seed=1)
    terms["row_scale"][1] = 0.0
    terms.update(target_ids=None, target_scale=None)
    lse = torch.logsumexp(logits, -1)
    for ops in (triton_ops, torch_ops):
        out = ops.logit_grad(logits, lse, *terms.values(), 1.0, out=torch.empty(C, V))
        assert out[1].eq(0).all(), ops.__name__
        assert torch.isfinite(out).all(), ops.__name__


@pytest.mark.interpret
@pytest.mark.parametrize("C,V", [(1, 7), (3, 33), (5, 100)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_logit_grad_full_vocab_matches_torch_and_autograd(C, V, alpha):
    clean_s, clean_t = torch.randn(C, V, dtype=torch.float64), torch.randn(C, V, dtype=torch.float64)
    s_lse, t_lse = torch.logsumexp(clean_s, -1), torch.logsumexp(clean_t, -1)
    row_scale = torch.rand(C, generator=torch.Generator().manual_seed(0)).double() + 0.5
    _, grad_sum = torch_ops.full_vocab_divergence(clean_s.float(), clean_t.float(), s_lse.float(), t_lse.float(), alpha)
    empty_index, empty_value = torch.empty(C, 0, dtype=torch.int64), torch.empty(C, 0)
    args = (clean_s.float(), s_lse.float(), row_scale.float(), grad_sum, empty_index, empty_value, None, None, 0.5)
    teacher = (clean_t.float(), t_lse.float(), alpha)
    out = triton_ops.logit_grad(*args, teacher, out=torch.empty(C, V), block_v=BLOCK_V)
    expected = torch_ops.logit_grad(*args, teacher, out=torch.empty(C, V))
    _assert_close(out, expected)
    # oracle: d(row_scale * D)/dz by autograd = row_scale * (g - S * sum g)
    z = clean_s.clone().requires_grad_()
    divergence = generalized_jsd(torch.log_softmax(z, -1), torch.log_softmax(clean_t, -1), alpha)
    (oracle,) = torch.autograd.grad((row_scale * divergence).sum(), z)
    _assert_close(out, (oracle * 0.5).float())


def test_logit_grad_rejects_bad_arguments():
    z, lse = torch.zeros(2, 10), torch.zeros(2)
    index, value = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dense_grad"):
        triton_ops.logit_grad(z, lse, lse, torch.zeros(3), index, value, None, None, 1.0, out=z.clone())
    with pytest.raises(ValueError, match="sparse_grad"):
        triton_ops.logit_grad(z, lse, lse, lse, index, torch.zeros(2, 4), None, None, 1.0, out=z.clone())
    with pytest.raises(ValueError, match="together"):
        triton_ops.logit_grad(z, lse, lse, lse, index, value, torch.zeros(2).long(), None, 1.0, out=z.clone())
    with pytest.raises(ValueError, match="teacher"):
        triton_ops.logit_grad(z, lse, lse, lse, index, value, None, None, 1.0, (torch.zeros(2, 9), lse, 0.5), out=z)
    with pytest.raises(ValueError, match="out"):
        triton_ops.logit_grad(z, lse, lse, lse, index, value, None, None, 1.0, out=torch.zeros(2, 9))


# ---------------------------------------------------------------- the softcap, applied on load


@pytest.mark.interpret
def test_softcap_on_load_gives_the_statistics_of_the_capped_logits():
    C, V, K, bound = 4, 37, 5, 3.0
    gen = torch.Generator().manual_seed(7)
    raw = torch.randn(C, V, generator=gen) * 4
    raw[0, 3] = -math.inf  # a masked vocabulary entry: capped to -bound, as tanh(-inf) = -1 gives
    raw[1, :5] = torch.tensor([1e-9, -1e-9, 0.0, 40.0, -40.0])  # tanh's exact regions
    capped = bound * torch.tanh(raw.double())
    target_ids = torch.randint(0, V, (C,), generator=gen)
    entropy, teacher_entropy = torch.empty(C), torch.empty(C)
    lse, topk_logits, topk_index, target_logit = triton_ops.student_row_stats(
        raw, K, target_ids, softcap_bound=bound, entropy=entropy, block_v=BLOCK_V
    )
    _assert_close(lse, torch.logsumexp(capped, -1).float())
    _assert_close(entropy, _fp64_entropy(capped))
    _assert_close(topk_logits, capped.gather(1, topk_index).float())
    _assert_close(topk_logits.sort(-1).values, torch.topk(capped, K, -1).values.sort(-1).values.float())
    _assert_close(target_logit, capped[torch.arange(C), target_ids].float())
    t_lse, gathered, t_target = triton_ops.teacher_row_stats(
        raw, topk_index, target_ids, softcap_bound=bound, entropy=teacher_entropy
    )
    _assert_close(t_lse, lse)
    _assert_close(teacher_entropy, entropy)
    _assert_close(gathered, topk_logits)
    _assert_close(t_target, target_logit)
    divergence, _ = triton_ops.full_vocab_divergence(raw, raw, lse, lse, 0.5, softcap_bound=bound)
    _assert_close(divergence, torch.zeros(C), atol=1e-6)


@pytest.mark.interpret
def test_logit_grad_chains_through_the_softcap():
    C, V, K, bound, scale = 3, 20, 4, 2.5, 0.7
    gen = torch.Generator().manual_seed(8)
    raw = torch.randn(C, V, generator=gen, dtype=torch.float64) * 2
    terms = _logit_grad_terms(C, V, K, seed=3)
    capped = (bound * torch.tanh(raw)).requires_grad_()
    z_lse = torch.logsumexp(capped, -1)
    args = (raw.float(), z_lse.detach().float(), *terms.values(), scale)
    out = triton_ops.logit_grad(*args, out=torch.empty(C, V), softcap_bound=bound, block_v=BLOCK_V)
    expected = torch_ops.logit_grad(*args, out=torch.empty(C, V), softcap_bound=bound)
    _assert_close(out, expected)
    # oracle: the gradient w.r.t. the capped logits, chained by autograd through bound * tanh(raw)
    raw_leaf = raw.clone().requires_grad_()
    dz = _logit_grad_oracle((bound * torch.tanh(raw_leaf)).detach(), terms, scale, with_target=True).double()
    (oracle,) = torch.autograd.grad(bound * torch.tanh(raw_leaf), raw_leaf, grad_outputs=dz / bound)
    _assert_close(out, oracle.float(), atol=1e-6)


def test_namespace_is_a_drop_in():
    import inspect

    for name in triton_ops.__all__:
        ours, twin = inspect.signature(getattr(triton_ops, name)), inspect.signature(getattr(torch_ops, name))
        positional = [p for p in ours.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in positional] == [
            p.name for p in twin.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY
        ], name


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

    t_lse, gathered, t_target = triton_ops.teacher_row_stats(teacher, topk_index, target_ids)
    ref_t_lse, ref_gathered, ref_t_target = torch_ops.teacher_row_stats(teacher, topk_index, target_ids)
    _assert_close(t_lse, ref_t_lse)
    torch.testing.assert_close(gathered, ref_gathered, rtol=0, atol=0)
    torch.testing.assert_close(t_target, ref_t_target, rtol=0, atol=0)

    for alpha in (0.0, 0.5, 1.0):
        divergence, grad_sum = triton_ops.full_vocab_divergence(student, teacher, lse, t_lse, alpha)
        ref_divergence, ref_grad_sum = torch_ops.full_vocab_divergence(student, teacher, lse, t_lse, alpha)
        _assert_close(divergence, ref_divergence, atol=1e-4)
        _assert_close(grad_sum, ref_grad_sum, atol=1e-4)

    row_scale, dense = torch.rand(C, device="cuda", generator=gen), torch.randn(C, device="cuda", generator=gen)
    sparse, target_scale = torch.randn(C, K, device="cuda", generator=gen), torch.randn(C, device="cuda", generator=gen)
    target_ids[0] = topk_index[0, 0]  # the target among the top-K
    args = (student, lse, row_scale, dense, topk_index, sparse, target_ids, target_scale, 0.5)
    for teacher_args in (None, (teacher, t_lse, 0.5)):
        for dtype in (torch.float32, torch.bfloat16):
            out = triton_ops.logit_grad(*args, teacher_args, out=torch.empty(C, V, dtype=dtype, device="cuda"))
            again = triton_ops.logit_grad(*args, teacher_args, out=torch.empty(C, V, dtype=dtype, device="cuda"))
            expected = torch_ops.logit_grad(*args, teacher_args, out=torch.empty(C, V, device="cuda"))
            torch.testing.assert_close(out, again, rtol=0, atol=0)  # deterministic, bit for bit
            _assert_close(out, expected.to(dtype), **({} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}))


@pytest.mark.interpret
def test_row_kernels_read_a_padded_row_stride_and_ignore_the_padding():
    # the CUDA policy pads the [C, V] row stride to 16 elements (V=37: 48) and the kernels load up to it (128-bit
    # accesses at an odd V): whatever the padding holds (NaN, inf) the results equal those of unpadded rows, and
    # logit_grad writes zeros into out's padding
    C, V, K, width = 5, 37, 4, 48
    gen = torch.Generator().manual_seed(17)

    def padded(values: torch.Tensor, fill: float) -> torch.Tensor:
        buffer = torch.full((C, width), fill)
        buffer[:, :V] = values
        return buffer[:, :V]

    student, teacher = _hard_logits(C, V, seed=17), torch.randn(C, V, generator=gen)
    student_padded, teacher_padded = padded(student, math.nan), padded(teacher, math.inf)
    assert readable_width(student_padded) == width and readable_width(student) == V
    assert readable_width(torch.empty_strided((C, V), (width, 1))) == V  # the last row has no padding
    targets = torch.randint(0, V, (C,), generator=gen)
    exact = dict(rtol=0, atol=0, equal_nan=True)

    entropy, entropy_padded = torch.empty(C), torch.empty(C)
    stats = triton_ops.student_row_stats(student, K, targets, entropy=entropy, block_v=BLOCK_V)
    stats_padded = triton_ops.student_row_stats(student_padded, K, targets, entropy=entropy_padded, block_v=BLOCK_V)
    torch.testing.assert_close(stats_padded, stats, **exact)
    torch.testing.assert_close(entropy_padded, entropy, **exact)
    index = stats[2]
    torch.testing.assert_close(
        triton_ops.teacher_row_stats(teacher_padded, index, targets, block_v=BLOCK_V),
        triton_ops.teacher_row_stats(teacher, index, targets, block_v=BLOCK_V),
        **exact,
    )
    lse, teacher_lse = stats[0], torch.logsumexp(teacher, -1)
    torch.testing.assert_close(
        triton_ops.full_vocab_divergence(student_padded, teacher_padded, lse, teacher_lse, 0.5, block_v=BLOCK_V),
        triton_ops.full_vocab_divergence(student, teacher, lse, teacher_lse, 0.5, block_v=BLOCK_V),
        **exact,
    )
    ones = torch.ones(C)
    args = (ones, torch.rand(C, generator=gen), torch.zeros(C, 0, dtype=torch.int64), torch.zeros(C, 0), None, None)
    out_padded = padded(torch.full((C, V), 7.0), 7.0)
    triton_ops.logit_grad(student_padded, lse, *args, 1.0, (teacher_padded, teacher_lse, 0.5), out=out_padded,
                          block_v=BLOCK_V)  # fmt: skip
    out = triton_ops.logit_grad(student, lse, *args, 1.0, (teacher, teacher_lse, 0.5), out=torch.empty(C, V),
                                block_v=BLOCK_V)  # fmt: skip
    torch.testing.assert_close(out_padded, out, **exact)
    assert out_padded.as_strided((C, width), (width, 1))[:, V:].eq(0).all()
