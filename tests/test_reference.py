"""The naive reference (``sdpo_ops.reference``) against TRL, hand-written fp64 math and autograd.

The reference is the oracle of every other test, so it is checked here against oracles that share no
code with it: TRL's ``trl.experimental.sdpo.loss_utils`` (the official math), divergences written out in
probability space in fp64, the reduction formulas written by hand, and ``torch.autograd.gradcheck``.
The closed-form gradient of SPEC section 2 (``sdpo_ops.divergence``) is checked against autograd of the
reference here too, since both fused backends build their backward on it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import ELEMENTWISE, FP64_NONNEGATIVE_SLACK, FP64_ZERO_ATOL
from torch import Tensor

from sdpo_ops.divergence import generalized_jsd_and_grad, topk_divergence
from sdpo_ops.reference import (
    TAIL_LOG_MASS_MAX,
    per_token_divergence,
    sdpo_loss_reference,
    sdpo_loss_reference_from_logits,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
loss_utils = pytest.importorskip("trl.experimental.sdpo.loss_utils")

F64 = ELEMENTWISE[torch.float64]
REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "none")


# ----------------------------------------------------------------------------------------------- helpers


def _alphas():
    return st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.95))


@st.composite
def _support(draw, vocab: int):
    """(topk, add_tail) covering the full vocabulary, K = 1, a random K and K = V."""
    topk = draw(st.one_of(st.none(), st.just(1), st.integers(1, vocab), st.just(vocab)))
    return topk, draw(st.booleans())


def _random_logits(generator: torch.Generator, shape, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _hand_divergence(student_logits, teacher_logits, *, topk, add_tail, alpha, temperature) -> torch.Tensor:
    """SPEC section 2 in probability space, row by row, fp64, sharing nothing with the reference.

    Args:
        student_logits, teacher_logits: [N, V] fp64 raw logits (divided by the temperature here).
    Returns:
        [N] fp64 divergence.
    """
    clamp_mass = math.exp(TAIL_LOG_MASS_MAX)
    rows = []
    for z, u in zip(student_logits.double() / temperature, teacher_logits.double() / temperature, strict=True):
        p_full = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        q_full = torch.exp(u - u.max()) / torch.exp(u - u.max()).sum()
        if topk is None:
            p, q = p_full, q_full
        else:
            index = torch.argsort(z, descending=True, stable=True)[:topk]
            p, q = p_full[index], q_full[index]
            if add_tail:
                p = torch.cat([p, (1.0 - torch.clamp(p.sum(), max=clamp_mass)).reshape(1)])
                q = torch.cat([q, (1.0 - torch.clamp(q.sum(), max=clamp_mass)).reshape(1)])
            else:
                p, q = p / p.sum(), q / q.sum()

        def kl(a, b):
            live = a > 0
            return (a[live] * torch.log(a[live] / b[live])).sum()

        if alpha == 0.0:
            rows.append(kl(q, p))
        elif alpha == 1.0:
            rows.append(kl(p, q))
        else:
            m = (1.0 - alpha) * p + alpha * q
            rows.append((1.0 - alpha) * kl(p, m) + alpha * kl(q, m))
    return torch.stack(rows)


def _trl_per_token(student_logits, teacher_logits, *, topk, add_tail, alpha, temperature) -> torch.Tensor:
    """TRL's per-token divergence; TRL divides by the temperature before calling these helpers."""
    z, u = student_logits / temperature, teacher_logits / temperature
    if topk is None:
        return loss_utils.compute_full_logit_self_distillation_loss(z, u, distillation_alpha=alpha)
    return loss_utils.compute_topk_self_distillation_loss(
        z, u, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail
    )


def _hand_target_logprobs(student_logits, target_ids, temperature) -> torch.Tensor:
    z = student_logits.double() / temperature
    shift = z.max(-1, keepdim=True).values
    log_z = z - shift - torch.log(torch.exp(z - shift).sum(-1, keepdim=True))
    return log_z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------- TRL


@settings(max_examples=40)
@given(data=st.data())
def test_reference_matches_trl(data):
    num_tokens = data.draw(st.integers(1, 8), label="N")
    vocab = data.draw(st.integers(2, 30), label="V")
    topk, add_tail = data.draw(_support(vocab), label="support")
    alpha = data.draw(_alphas(), label="alpha")
    temperature = data.draw(st.sampled_from([1.0, 0.6, 1.7]), label="temperature")
    use_is = data.draw(st.booleans(), label="use_is")
    is_clip = data.draw(st.sampled_from([0.5, 1.5, 2.0]), label="is_clip")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    student = _random_logits(generator, (num_tokens, vocab))
    teacher = _random_logits(generator, (num_tokens, vocab))
    target_ids = torch.randint(vocab, (num_tokens,), generator=generator)
    target_logprobs = _hand_target_logprobs(student, target_ids, temperature)
    # Ratios exp(lp - old) in [e^-2, e^2]: both sides of every is_clip drawn above.
    old_logprobs = target_logprobs + (torch.rand(num_tokens, generator=generator, dtype=torch.float64) * 4 - 2)
    mask = (torch.rand(num_tokens, generator=generator) < 0.8).double()

    expected = _trl_per_token(student, teacher, topk=topk, add_tail=add_tail, alpha=alpha, temperature=temperature)
    if use_is:
        expected = loss_utils.apply_importance_sampling_clipping(expected, target_logprobs, old_logprobs, is_clip)
    expected = expected * mask

    result = sdpo_loss_reference_from_logits(
        student,
        teacher,
        mask=mask,
        target_ids=target_ids,
        old_logprobs=old_logprobs if use_is else None,
        topk=topk,
        add_tail=add_tail,
        alpha=alpha,
        is_clip=is_clip,
        temperature=temperature,
        reduction="none",
    )
    torch.testing.assert_close(result["loss"], expected, **F64)
    torch.testing.assert_close(result["target_logprobs"], target_logprobs, **F64)
    if use_is:
        ones = torch.ones(num_tokens, dtype=torch.float64)
        expected_weight = loss_utils.apply_importance_sampling_clipping(ones, target_logprobs, old_logprobs, is_clip)
        torch.testing.assert_close(result["is_weight"], expected_weight, **F64)
    else:
        assert result["is_weight"] is None


# ----------------------------------------------------------------------------------------------- properties


@settings(max_examples=40)
@given(data=st.data())
def test_reference_matches_hand_divergence_and_is_nonnegative(data):
    num_tokens = data.draw(st.integers(1, 6), label="N")
    vocab = data.draw(st.integers(2, 24), label="V")
    topk, add_tail = data.draw(_support(vocab), label="support")
    alpha = data.draw(_alphas(), label="alpha")
    temperature = data.draw(st.sampled_from([1.0, 0.5, 2.5]), label="temperature")
    scale = data.draw(st.sampled_from([0.1, 2.0, 8.0]), label="logit scale")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    student = _random_logits(generator, (num_tokens, vocab), scale)
    teacher = _random_logits(generator, (num_tokens, vocab), scale)

    divergence, _, topk_mass = per_token_divergence(
        student, teacher, topk=topk, add_tail=add_tail, alpha=alpha, temperature=temperature
    )
    expected = _hand_divergence(student, teacher, topk=topk, add_tail=add_tail, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(divergence, expected, **F64)
    assert bool((divergence >= -FP64_NONNEGATIVE_SLACK).all()), divergence

    p_full = torch.softmax(student / temperature, -1)
    expected_mass = (
        torch.ones(num_tokens, dtype=torch.float64)
        if topk is None
        else p_full.sort(-1, descending=True).values[:, :topk].sum(-1)
    )
    torch.testing.assert_close(topk_mass.double(), expected_mass, **F64)


@settings(max_examples=30)
@given(data=st.data())
def test_reference_is_zero_when_teacher_equals_student(data):
    num_tokens = data.draw(st.integers(1, 6), label="N")
    vocab = data.draw(st.integers(2, 24), label="V")
    topk, add_tail = data.draw(_support(vocab), label="support")
    alpha = data.draw(_alphas(), label="alpha")
    reduction = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    logits = _random_logits(generator, (num_tokens, vocab), 4.0)
    target_ids = torch.randint(vocab, (num_tokens,), generator=generator)

    loss = sdpo_loss_reference_from_logits(
        logits,
        logits.clone(),
        target_ids=target_ids,
        old_logprobs=torch.full((num_tokens,), -1.0, dtype=torch.float64),
        topk=topk,
        add_tail=add_tail,
        alpha=alpha,
        temperature=1.3,
        reduction=reduction,
    )["loss"]
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0.0, atol=FP64_ZERO_ATOL)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(None, True), (3, True), (3, False), (7, True)])
def test_reference_alpha_endpoints_are_the_two_kls(alpha, topk, add_tail):
    generator = torch.Generator().manual_seed(7)
    student, teacher = _random_logits(generator, (5, 7)), _random_logits(generator, (5, 7))
    divergence = per_token_divergence(student, teacher, topk=topk, add_tail=add_tail, alpha=alpha, temperature=1.0)[0]

    # The two KLs, one formula each, over the support built by hand.
    p_full, q_full = torch.softmax(student, -1), torch.softmax(teacher, -1)
    expected = []
    for row in range(5):
        p, q = p_full[row], q_full[row]
        if topk is not None:
            index = torch.argsort(student[row], descending=True)[:topk]
            p, q = p[index], q[index]
            if add_tail:
                p = torch.cat([p, torch.clamp(1 - p.sum(), min=-math.expm1(TAIL_LOG_MASS_MAX)).reshape(1)])
                q = torch.cat([q, torch.clamp(1 - q.sum(), min=-math.expm1(TAIL_LOG_MASS_MAX)).reshape(1)])
            else:
                p, q = p / p.sum(), q / q.sum()
        forward_kl = float(sum(qi * math.log(qi / pi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True)))
        reverse_kl = float(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True)))
        expected.append(forward_kl if alpha == 0.0 else reverse_kl)
    torch.testing.assert_close(divergence, torch.tensor(expected, dtype=torch.float64), **F64)


@settings(max_examples=25)
@given(data=st.data())
def test_reference_is_invariant_to_padding(data):
    batch = data.draw(st.integers(1, 3), label="B")
    length = data.draw(st.integers(1, 4), label="T")
    padding = data.draw(st.integers(1, 3), label="padding")
    vocab = data.draw(st.integers(2, 16), label="V")
    topk, add_tail = data.draw(_support(vocab), label="support")
    alpha = data.draw(_alphas(), label="alpha")
    reduction = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    student = _random_logits(generator, (batch, length, vocab))
    teacher = _random_logits(generator, (batch, length, vocab))
    target_ids = torch.randint(vocab, (batch, length), generator=generator)
    old_logprobs = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 4
    mask = (torch.rand(batch, length, generator=generator) < 0.8).double()

    def padded(x, fill):
        return torch.cat([x, fill], dim=1)

    # Padding holds garbage: huge logits and arbitrary targets, all masked.
    pad_student = padded(student, _random_logits(generator, (batch, padding, vocab), 1e3))
    pad_teacher = padded(teacher, _random_logits(generator, (batch, padding, vocab), 1e3))
    pad_targets = padded(target_ids, torch.randint(vocab, (batch, padding), generator=generator))
    pad_old = padded(old_logprobs, torch.full((batch, padding), 50.0, dtype=torch.float64))
    pad_mask = padded(mask, torch.zeros(batch, padding, dtype=torch.float64))

    options = {"topk": topk, "add_tail": add_tail, "alpha": alpha, "reduction": reduction, "temperature": 0.9}
    loss = sdpo_loss_reference_from_logits(
        student, teacher, mask=mask, target_ids=target_ids, old_logprobs=old_logprobs, **options
    )["loss"]
    padded_loss = sdpo_loss_reference_from_logits(
        pad_student, pad_teacher, mask=pad_mask, target_ids=pad_targets, old_logprobs=pad_old, **options
    )["loss"]
    if reduction == "none":
        torch.testing.assert_close(padded_loss[:, :length], loss, **F64)
        assert bool((padded_loss[:, length:] == 0).all())
    else:
        torch.testing.assert_close(padded_loss, loss, **F64)


def test_reference_token_mean_ignores_fully_masked_sequences():
    generator = torch.Generator().manual_seed(3)
    student, teacher = _random_logits(generator, (2, 3, 9)), _random_logits(generator, (2, 3, 9))
    extra_student, extra_teacher = _random_logits(generator, (1, 3, 9)), _random_logits(generator, (1, 3, 9))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    loss = sdpo_loss_reference_from_logits(student, teacher, mask=mask, topk=4)["loss"]
    padded_loss = sdpo_loss_reference_from_logits(
        torch.cat([student, extra_student]),
        torch.cat([teacher, extra_teacher]),
        mask=torch.cat([mask, torch.zeros(1, 3, dtype=torch.float64)]),
        topk=4,
    )["loss"]
    torch.testing.assert_close(padded_loss, loss, **F64)


# ----------------------------------------------------------------------------------------------- reductions


@settings(max_examples=30)
@given(data=st.data())
def test_reference_reductions_match_hand_formulas(data):
    batch = data.draw(st.integers(1, 3), label="B")
    length = data.draw(st.integers(1, 5), label="T")
    vocab = data.draw(st.integers(2, 12), label="V")
    use_token_weights = data.draw(st.booleans(), label="token_weights")
    normalizer = data.draw(st.sampled_from([None, 3.0, 0.5]), label="normalizer")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    student = _random_logits(generator, (batch, length, vocab))
    teacher = _random_logits(generator, (batch, length, vocab))
    mask = (torch.rand(batch, length, generator=generator) < 0.7).double()
    target_ids = torch.randint(vocab, (batch, length), generator=generator)
    old_logprobs = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 4
    token_weights = torch.rand(batch, length, generator=generator, dtype=torch.float64) if use_token_weights else None
    options = {
        "topk": min(3, vocab),
        "alpha": 0.3,
        "is_clip": 1.5,
        "temperature": 1.0,
        "target_ids": target_ids,
        "old_logprobs": old_logprobs,
        "token_weights": token_weights,
        "mask": mask,
    }

    # The per-token loss built by hand: D * w * token_weight, masked.
    divergence = _hand_divergence(
        student.reshape(-1, vocab),
        teacher.reshape(-1, vocab),
        topk=min(3, vocab),
        add_tail=True,
        alpha=0.3,
        temperature=1.0,
    ).reshape(batch, length)
    ratio = torch.exp(_hand_target_logprobs(student, target_ids, 1.0) - old_logprobs)
    per_token = divergence * torch.clamp(ratio, max=1.5) * mask
    if token_weights is not None:
        per_token = per_token * token_weights

    per_sequence_count = mask.sum(-1)
    expected = {
        "none": per_token,
        "sum": per_token.sum(),
        "token-mean": per_token.sum() / (max(float(mask.sum()), 1.0) if normalizer is None else normalizer),
        "seq-mean-token-mean": (per_token.sum(-1) / per_sequence_count.clamp(min=1.0)).sum()
        / (batch if normalizer is None else normalizer),
        "seq-mean-token-sum": per_token.sum(-1).sum() / (batch if normalizer is None else normalizer),
    }
    for reduction, value in expected.items():
        norm = normalizer if reduction not in ("none", "sum") else None
        loss = sdpo_loss_reference_from_logits(student, teacher, reduction=reduction, normalizer=norm, **options)
        torch.testing.assert_close(loss["loss"], value, **F64, msg=f"reduction={reduction}")


def test_reference_two_dimensional_input_is_one_sequence():
    generator = torch.Generator().manual_seed(11)
    student, teacher = _random_logits(generator, (5, 6)), _random_logits(generator, (5, 6))
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    token_mean = sdpo_loss_reference_from_logits(student, teacher, mask=mask, topk=2, reduction="token-mean")["loss"]
    seq_mean = sdpo_loss_reference_from_logits(student, teacher, mask=mask, topk=2, reduction="seq-mean-token-mean")[
        "loss"
    ]
    seq_sum = sdpo_loss_reference_from_logits(student, teacher, mask=mask, topk=2, reduction="seq-mean-token-sum")
    total = sdpo_loss_reference_from_logits(student, teacher, mask=mask, topk=2, reduction="sum")["loss"]
    torch.testing.assert_close(seq_mean, token_mean, **F64)
    torch.testing.assert_close(seq_sum["loss"], total, **F64)


# ----------------------------------------------------------------------------------------------- gradients


GRADCHECK_CASES = [
    # (topk, add_tail, alpha, reduction)
    (None, True, 0.5, "token-mean"),
    (None, True, 0.0, "none"),
    (3, True, 0.5, "seq-mean-token-mean"),
    (3, True, 1.0, "sum"),
    (3, False, 0.0, "token-mean"),
    (3, False, 0.7, "none"),
    (1, True, 0.5, "token-mean"),
    (7, True, 0.5, "token-mean"),  # K = V: the tail is clamped
    (7, False, 1.0, "seq-mean-token-sum"),
]


@pytest.mark.parametrize(("topk", "add_tail", "alpha", "reduction"), GRADCHECK_CASES)
def test_reference_gradcheck(topk, add_tail, alpha, reduction):
    generator = torch.Generator().manual_seed(5)
    student = _random_logits(generator, (2, 2, 7)).requires_grad_()
    teacher = _random_logits(generator, (2, 2, 7))
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    target_ids = torch.randint(7, (2, 2), generator=generator)
    # Every ratio clipped at is_clip: the detached weight is then a constant and finite differences see it too.
    old_logprobs = torch.full((2, 2), -60.0, dtype=torch.float64)

    def loss_and_target_logprobs(logits):
        result = sdpo_loss_reference_from_logits(
            logits,
            teacher,
            mask=mask,
            target_ids=target_ids,
            old_logprobs=old_logprobs,
            topk=topk,
            add_tail=add_tail,
            alpha=alpha,
            is_clip=1.5,
            temperature=0.8,
            reduction=reduction,
        )
        return result["loss"], result["target_logprobs"]

    assert torch.autograd.gradcheck(loss_and_target_logprobs, (student,))


def test_reference_from_hidden_gradcheck():
    generator = torch.Generator().manual_seed(9)
    hidden = _random_logits(generator, (3, 4), 1.0).requires_grad_()
    weight = _random_logits(generator, (6, 4), 1.0).requires_grad_()
    bias = _random_logits(generator, (6,), 1.0).requires_grad_()
    teacher_hidden = _random_logits(generator, (3, 5), 1.0).requires_grad_()
    teacher_weight = _random_logits(generator, (6, 5), 1.0).requires_grad_()

    def loss(hidden, weight, bias):
        return sdpo_loss_reference(
            hidden, weight, teacher_hidden, teacher_weight, student_bias=bias, topk=3, alpha=0.4, is_clip=None
        )["loss"]

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))
    loss(hidden, weight, bias).backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None


def _closed_form_logit_grad(student_logits, teacher_logits, *, topk, add_tail, alpha) -> tuple[Tensor, Tensor]:
    """(divergence [N], dD/dz [N, V]) from ``sdpo_ops.divergence``, assembled as SPEC section 2 says."""
    student_lse = torch.logsumexp(student_logits, -1)
    teacher_lse = torch.logsumexp(teacher_logits, -1)
    probs = torch.exp(student_logits - student_lse[:, None])
    if topk is None:
        divergence, grad = generalized_jsd_and_grad(
            student_logits - student_lse[:, None], teacher_logits - teacher_lse[:, None], alpha
        )
        return divergence, grad - probs * grad.sum(-1, keepdim=True)
    values, index = torch.topk(student_logits, topk, dim=-1)
    support = topk_divergence(
        student_lse, values, teacher_lse, teacher_logits.gather(-1, index), add_tail=add_tail, alpha=alpha
    )
    logit_grad = -probs * support.dense_grad[:, None]
    logit_grad.scatter_add_(1, index, support.sparse_grad)
    return support.divergence, logit_grad


@settings(max_examples=40)
@given(data=st.data())
def test_closed_form_gradient_matches_autograd_of_reference(data):
    num_tokens = data.draw(st.integers(1, 6), label="N")
    vocab = data.draw(st.integers(2, 20), label="V")
    topk, add_tail = data.draw(_support(vocab), label="support")
    alpha = data.draw(_alphas(), label="alpha")
    scale = data.draw(st.sampled_from([0.5, 2.0, 10.0]), label="logit scale")
    peaked = data.draw(st.booleans(), label="peaked rows")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    student = _random_logits(generator, (num_tokens, vocab), scale)
    teacher = _random_logits(generator, (num_tokens, vocab), scale)
    if peaked:
        # One logit far above the rest: the top-K holds all the mass in fp64, the tail is clamped.
        student[0, 0] += 60.0

    logits = student.clone().requires_grad_()
    divergence = per_token_divergence(logits, teacher, topk=topk, add_tail=add_tail, alpha=alpha, temperature=1.0)[0]
    row_weight = torch.rand(num_tokens, generator=generator, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((divergence * row_weight).sum(), logits)

    closed_divergence, closed_grad = _closed_form_logit_grad(
        student, teacher, topk=topk, add_tail=add_tail, alpha=alpha
    )
    torch.testing.assert_close(closed_divergence, divergence.detach(), **F64)
    torch.testing.assert_close(closed_grad * row_weight[:, None], expected_grad, **F64)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", ["k_equals_v", "peaked", "near_clamp"])
def test_closed_form_gradient_at_the_tail_clamp(alpha, case):
    generator = torch.Generator().manual_seed(1)
    student, teacher = _random_logits(generator, (3, 8)), _random_logits(generator, (3, 8))
    topk = 8 if case == "k_equals_v" else 2
    if case == "peaked":
        student[:, 1] += 40.0  # top-2 mass 1 - O(e^-40): clamped
    elif case == "near_clamp":
        student[:, 1] += 14.0  # top-2 mass 1 - O(e^-14) ~ 1 - 1e-6: just below the clamp, tail gradient alive
    logits = student.clone().requires_grad_()
    divergence = per_token_divergence(logits, teacher, topk=topk, add_tail=True, alpha=alpha, temperature=1.0)[0]
    (expected_grad,) = torch.autograd.grad(divergence.sum(), logits)
    closed_divergence, closed_grad = _closed_form_logit_grad(student, teacher, topk=topk, add_tail=True, alpha=alpha)
    torch.testing.assert_close(closed_divergence, divergence.detach(), **F64)
    torch.testing.assert_close(closed_grad, expected_grad, **F64)
    assert bool(torch.isfinite(closed_grad).all())
