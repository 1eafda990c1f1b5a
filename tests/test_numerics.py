"""Numerics of the torch backend: low-precision inputs, masked-out batches, huge and -inf logits, odd shapes.

bf16/fp16 follow CCE's principle: the error of the chunked path against an fp64 ground truth (the
reference on the same, already-rounded inputs, in fp64) is bounded by a small margin times the error
of the naive same-dtype path, with an absolute floor (``tests/tolerances.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import ELEMENTWISE, LOW_PRECISION_FLOOR, LOW_PRECISION_MARGIN, norm_relative_error

from sdpo_ops import sdpo_loss

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "none")
F32 = ELEMENTWISE[torch.float32]


def _inputs(seed: int, shape=(2, 5), hidden=8, teacher_hidden=6, vocab=40, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "student_hidden": torch.randn(*shape, hidden, generator=generator),
        "student_weight": torch.randn(vocab, hidden, generator=generator) * (2.0 / math.sqrt(hidden)),
        "teacher_hidden": torch.randn(*shape, teacher_hidden, generator=generator),
        "teacher_weight": torch.randn(vocab, teacher_hidden, generator=generator) * (2.0 / math.sqrt(teacher_hidden)),
        "student_bias": torch.randn(vocab, generator=generator) * 0.5,
    }
    per_token = {
        "target_ids": torch.randint(vocab, shape, generator=generator),
        "old_logprobs": -torch.rand(shape, generator=generator) * 6,
        "mask": (torch.rand(shape, generator=generator) < 0.8).float(),
    }
    return {k: v.to(dtype) for k, v in tensors.items()}, per_token


def _loss_and_grads(backend: str, tensors: dict, per_token: dict, dtype: torch.dtype, **options):
    """Loss and student grads (as fp64) of ``sdpo_loss`` on copies of ``tensors`` cast to ``dtype``."""
    leaves = {k: v.detach().to(dtype).requires_grad_(k.startswith("student")) for k, v in tensors.items()}
    per_token = {k: (v.to(dtype) if v.is_floating_point() and k != "mask" else v) for k, v in per_token.items()}
    loss = sdpo_loss(
        leaves["student_hidden"],
        leaves["student_weight"],
        leaves["teacher_hidden"],
        leaves["teacher_weight"],
        student_bias=leaves["student_bias"],
        backend=backend,
        **per_token,
        **options,
    )
    generator = torch.Generator().manual_seed(99)
    upstream = torch.randn(loss.shape, generator=generator, dtype=torch.float64).to(loss.dtype)
    (loss * upstream).sum().backward()
    grads = [leaves[name].grad for name in ("student_hidden", "student_weight", "student_bias")]
    for grad, name in zip(grads, ("student_hidden", "student_weight", "student_bias"), strict=True):
        assert grad.dtype == dtype, f"{name}.grad is {grad.dtype}, its input {dtype}"
    return [loss.detach().double(), *(grad.double() for grad in grads)]


# ----------------------------------------------------------------------------------------------- bf16 / fp16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("topk", "add_tail"), [(None, True), (5, True), (5, False)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["token-mean", "none"])
def test_low_precision_error_is_bounded_by_the_naive_paths(dtype, topk, add_tail, alpha, reduction):
    tensors, per_token = _inputs(seed=int(alpha * 10) + (topk or 0))
    rounded = {k: v.to(dtype).double() for k, v in tensors.items()}  # the exact inputs both paths see
    options = {
        "topk": topk,
        "add_tail": add_tail,
        "alpha": alpha,
        "is_clip": 2.0,
        "temperature": 0.9,
        "reduction": reduction,
        "chunk_size": 3,
    }
    truth = _loss_and_grads("reference", rounded, per_token, torch.float64, **options)
    naive = _loss_and_grads("reference", tensors, per_token, dtype, **options)
    fused = _loss_and_grads("torch", tensors, per_token, dtype, **options)
    names = ("loss", "hidden", "weight", "bias")
    for name, fused_value, naive_value, true_value in zip(names, fused, naive, truth, strict=True):
        assert bool(torch.isfinite(fused_value).all()), name
        bound = max(LOW_PRECISION_MARGIN * norm_relative_error(naive_value, true_value), LOW_PRECISION_FLOOR[dtype])
        error = norm_relative_error(fused_value, true_value)
        assert error <= bound, f"{name}: error {error:.3e} > bound {bound:.3e}"


# ----------------------------------------------------------------------------------------------- empty masks


REDUCTION_NORMALIZER = [(reduction, None) for reduction in REDUCTIONS] + [
    (reduction, 4.0) for reduction in REDUCTIONS if reduction not in ("sum", "none")
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(("reduction", "normalizer"), REDUCTION_NORMALIZER)
@pytest.mark.parametrize("topk", [None, 3])
def test_all_zero_mask_gives_exact_zeros(backend, reduction, normalizer, topk):
    tensors, per_token = _inputs(seed=3)
    per_token["mask"] = torch.zeros_like(per_token["mask"])
    loss, *grads = _loss_and_grads(
        backend, tensors, per_token, torch.float32, topk=topk, reduction=reduction, normalizer=normalizer, chunk_size=4
    )
    assert bool((loss == 0).all()), loss
    for name, grad in zip(("student_hidden", "student_weight", "student_bias"), grads, strict=True):
        assert bool((grad == 0).all()), f"{name}: {grad}"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_all_zero_mask_in_low_precision(backend):
    tensors, per_token = _inputs(seed=4)
    per_token["mask"] = torch.zeros_like(per_token["mask"])
    for dtype in (torch.bfloat16, torch.float16):
        loss, *grads = _loss_and_grads(backend, tensors, per_token, dtype, topk=5, reduction="token-mean")
        assert float(loss) == 0.0
        assert all(bool((grad == 0).all()) for grad in grads)


# ----------------------------------------------------------------------------------------------- large logits


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(None, True), (5, True), (5, False), (40, True)])
def test_logits_of_1e4_are_finite_and_match_the_reference(alpha, topk, add_tail):
    tensors, per_token = _inputs(seed=5)
    for side in ("student", "teacher"):
        logits = tensors[f"{side}_hidden"] @ tensors[f"{side}_weight"].T
        tensors[f"{side}_weight"] = tensors[f"{side}_weight"] * (1e4 / logits.abs().max())
    tensors["student_bias"] = torch.zeros_like(tensors["student_bias"])
    options = {
        "topk": topk,
        "add_tail": add_tail,
        "alpha": alpha,
        "is_clip": 2.0,
        "chunk_size": 4,
        "reduction": "seq-mean-token-mean",
    }
    fused = _loss_and_grads("torch", tensors, per_token, torch.float32, **options)
    expected = _loss_and_grads("reference", tensors, per_token, torch.float32, **options)
    for name, value, reference in zip(("loss", "hidden", "weight", "bias"), fused, expected, strict=True):
        assert bool(torch.isfinite(value).all()), name
        torch.testing.assert_close(value, reference, **F32, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------- -inf logits

MASKED_VOCABULARY = [3, 7, 11, 20, 21, 22, 39]


def _with_infinite_bias(seed: int, fill: float):
    """Inputs whose student and teacher biases are ``fill`` on the same vocabulary entries."""
    tensors, per_token = _inputs(seed=seed)
    bias = torch.zeros(40)
    bias[MASKED_VOCABULARY] = fill
    tensors["student_bias"] = tensors["student_bias"] + bias
    tensors["teacher_bias"] = bias.clone()
    allowed = torch.tensor([v for v in range(40) if v not in MASKED_VOCABULARY])
    per_token["target_ids"] = allowed[per_token["target_ids"] % len(allowed)]  # a sampled token is never masked
    return tensors, per_token


def _call_with_teacher_bias(backend, tensors, per_token, dtype, **options):
    teacher_bias = tensors.pop("teacher_bias").to(dtype)
    try:
        return _loss_and_grads(backend, tensors, per_token, dtype, teacher_bias=teacher_bias, **options)
    finally:
        tensors["teacher_bias"] = teacher_bias


INF_CASES = [(None, True), (5, True), (5, False), (36, True), (40, True), (40, False)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), INF_CASES)
def test_minus_inf_logits_are_finite_and_exact(alpha, topk, add_tail):
    """The torch backend against the fp64 reference with -inf replaced by -1e4: exp underflows to exactly 0."""
    options = {
        "topk": topk,
        "add_tail": add_tail,
        "alpha": alpha,
        "is_clip": 2.0,
        "chunk_size": 4,
        "reduction": "token-mean",
    }
    tensors, per_token = _with_infinite_bias(seed=6, fill=-math.inf)
    fused = _call_with_teacher_bias("torch", tensors, per_token, torch.float32, **options)
    surrogate, _ = _with_infinite_bias(seed=6, fill=-1e4)
    expected = _call_with_teacher_bias(
        "reference", {k: v.double() for k, v in surrogate.items()}, per_token, torch.float64, **options
    )
    for name, value, reference in zip(("loss", "hidden", "weight", "bias"), fused, expected, strict=True):
        assert bool(torch.isfinite(value).all()), f"{name} is not finite"
        torch.testing.assert_close(value, reference, **F32, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), INF_CASES)
def test_minus_inf_logits_reference_is_finite_and_matches(alpha, topk, add_tail):
    """SPEC 3 promises finite results for -inf logits from every backend, the reference included."""
    options = {
        "topk": topk,
        "add_tail": add_tail,
        "alpha": alpha,
        "is_clip": 2.0,
        "chunk_size": 4,
        "reduction": "token-mean",
    }
    tensors, per_token = _with_infinite_bias(seed=6, fill=-math.inf)
    fused = _call_with_teacher_bias("torch", tensors, per_token, torch.float32, **options)
    expected = _call_with_teacher_bias("reference", tensors, per_token, torch.float32, **options)
    for name, value, reference in zip(("loss", "hidden", "weight", "bias"), fused, expected, strict=True):
        assert bool(torch.isfinite(reference).all()), f"reference {name} is not finite"
        torch.testing.assert_close(value, reference, **F32, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------- odd shapes


@pytest.mark.parametrize(
    ("shape", "vocab", "topk"),
    [
        ((1,), 40, 40),  # N = 1, K = V
        ((1,), 37, 5),  # N = 1, V prime
        ((1, 1), 13, None),
        ((7,), 37, 37),  # K = V, V not a power of two
        ((3, 3), 33, 1),
        ((5,), 1, 1),  # a one-token vocabulary: K = V = 1
        ((5,), 1, None),
        ((2, 3), 2, 2),
    ],
)
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_odd_shapes_match_the_reference(shape, vocab, topk, add_tail, alpha):
    tensors, per_token = _inputs(seed=7, shape=shape, vocab=vocab)
    options = {"topk": topk, "add_tail": add_tail, "alpha": alpha, "is_clip": 1.5, "chunk_size": 2, "reduction": "none"}
    fused = _loss_and_grads("torch", tensors, per_token, torch.float32, **options)
    expected = _loss_and_grads("reference", tensors, per_token, torch.float32, **options)
    for name, value, reference in zip(("loss", "hidden", "weight", "bias"), fused, expected, strict=True):
        assert bool(torch.isfinite(value).all()), name
        torch.testing.assert_close(value, reference, **F32, msg=lambda m, n=name: f"{n}: {m}")
