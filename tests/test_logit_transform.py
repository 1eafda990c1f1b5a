"""Heads that are not ``h W^T + b``: ``logit_scale`` and ``logit_softcap`` inside the fused loss (issue 10).

Oracles: TRL's own transform (``trl.kernels.chunked_logprob._torch_transform``) for the reference's
``transform_logits``; the reference (full logits, autograd) for the loss and the gradients of the torch
backend and of the Triton kernels under the interpreter; fp64 gradcheck; for bf16, the error of the naive
bf16 path against the fp64 truth bounds ours (CCE's principle).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import ELEMENTWISE, LOW_PRECISION_FLOOR, LOW_PRECISION_MARGIN, norm_relative_error

from sdpo_ops import sdpo_loss, sdpo_loss_from_logits
from sdpo_ops.reference import transform_logits

TRANSFORMS = {
    "scale": {"logit_scale": 0.25},
    "softcap": {"logit_softcap": 3.0},
    "scale+softcap": {"logit_scale": 1.7, "logit_softcap": 5.0},
}
FAMILIES = {
    "top-K + tail, GJSD": {"topk": 5, "alpha": 0.5},
    "top-K renormalised, forward KL": {"topk": 4, "add_tail": False, "alpha": 0.0},
    "full vocabulary, reverse KL": {"topk": None, "alpha": 1.0},
}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


def _inputs(num_tokens=7, hidden=6, vocab=19, *, scale=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    return {
        "student_hidden": randn(num_tokens, hidden),
        "student_weight": randn(vocab, hidden, std=scale),
        "student_bias": randn(vocab),
        "teacher_hidden": randn(num_tokens, hidden),
        "teacher_weight": randn(vocab, hidden, std=scale),
        "target_ids": torch.randint(0, vocab, (num_tokens,), generator=gen),
        "old_logprobs": -torch.rand(num_tokens, generator=gen, dtype=torch.float64).to(dtype) * 3,
        "mask": (torch.rand(num_tokens, generator=gen) > 0.2).to(dtype),
    }


def _run(inputs, backend, **options):
    leaves = {
        name: inputs[name].clone().requires_grad_() for name in ("student_hidden", "student_weight", "student_bias")
    }
    out = sdpo_loss(**{**inputs, **leaves}, backend=backend, return_outputs=True, temperature=0.8, **options)
    # a policy-gradient term on the same call: the target log-prob gradient runs through the transform too
    (out.loss + 0.3 * out.target_logprobs.sum()).backward()
    return out, {name: leaf.grad for name, leaf in leaves.items()}


def test_reference_transform_is_trls():
    trl_chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob")
    raw = torch.randn(4, 30, dtype=torch.float64) * 40
    for options in TRANSFORMS.values():
        scale, softcap = options.get("logit_scale", 1.0), options.get("logit_softcap")
        expected = trl_chunked_logprob._torch_transform(raw, scale, softcap or 1.0, 1 / 0.7, softcap is not None)
        actual = transform_logits(raw, logit_scale=scale, logit_softcap=softcap, temperature=0.7)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fused_matches_reference(backend, family, transform):
    # weights scaled so that raw logits reach ~+-20: the softcap (3 or 5) saturates on many entries
    inputs = _inputs(scale=4.0, seed=len(family) + len(transform))
    options = {**FAMILIES[family], **TRANSFORMS[transform]}
    expected, expected_grads = _run(inputs, "reference", **options)
    actual, actual_grads = _run(inputs, backend, **options)
    tolerance = ELEMENTWISE[torch.float32]
    torch.testing.assert_close(actual.loss, expected.loss, **tolerance)
    torch.testing.assert_close(actual.target_logprobs, expected.target_logprobs, **tolerance)
    torch.testing.assert_close(actual.teacher_target_logprobs, expected.teacher_target_logprobs, **tolerance)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, **tolerance, msg=name)


def test_the_transform_changes_the_loss():
    # guards the tests above against a transform that is silently ignored everywhere
    inputs = _inputs(scale=4.0)
    plain = sdpo_loss(**inputs, topk=5, backend="torch")
    for options in TRANSFORMS.values():
        assert not torch.allclose(sdpo_loss(**inputs, topk=5, backend="torch", **options), plain)


def test_softcap_saturation_is_as_exact_as_the_naive_path():
    # raw logits ~ +-1e3 against a softcap of 30: tanh is +-1 to fp32 rounding and 1 - tanh^2 cancels, for the
    # naive path as for ours; both are held to the float64 truth, ours within the naive fp32 error
    inputs = _inputs(scale=1e3)
    options = {"topk": 5, "logit_softcap": 30.0}
    fused, fused_grads = _run(inputs, "torch", **options)
    naive, naive_grads = _run(inputs, "reference", **options)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    truth, truth_grads = _run(inputs64, "reference", **options)
    assert torch.isfinite(fused.loss) and all(torch.isfinite(g).all() for g in fused_grads.values())
    # saturated logits tie in fp32, so even the top-K set is the naive path's own: compare with it, then the truth
    torch.testing.assert_close(fused.loss, naive.loss, **ELEMENTWISE[torch.float32])
    for name, expected in truth_grads.items():
        bound = 1.1 * norm_relative_error(naive_grads[name].double(), expected) + 1e-6
        assert norm_relative_error(fused_grads[name].double(), expected) <= bound, name


@pytest.mark.parametrize("topk", [4, None])
def test_gradcheck_through_the_softcap(topk):
    inputs = _inputs(num_tokens=4, hidden=3, vocab=9, scale=3.0, dtype=torch.float64)
    hidden, weight = inputs["student_hidden"].requires_grad_(), inputs["student_weight"].requires_grad_()

    def loss(hidden, weight):
        # no IS weight: it is detached by definition, so finite differences would see what autograd must not
        excluded = ("student_hidden", "student_weight", "old_logprobs", "target_ids")
        rest = {k: v for k, v in inputs.items() if k not in excluded}
        return sdpo_loss(hidden, weight, **rest, topk=topk, logit_scale=1.3, logit_softcap=2.0, backend="torch")

    assert torch.autograd.gradcheck(loss, (hidden, weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_naive_same_dtype_error(dtype):
    inputs = _inputs(num_tokens=32, hidden=32, vocab=64, scale=1.0, seed=3)
    options = {"topk": 8, "logit_scale": 1.5, "logit_softcap": 4.0}

    def loss_and_weight_grad(dtype, backend):
        cast = {k: v.to(dtype) if v.is_floating_point() and k != "mask" else v for k, v in inputs.items()}
        weight = cast["student_weight"].requires_grad_()
        loss = sdpo_loss(**{**cast, "student_weight": weight}, backend=backend, **options)
        loss.backward()
        return loss.detach().double(), weight.grad.double()

    truth = loss_and_weight_grad(torch.float64, "reference")
    naive = loss_and_weight_grad(dtype, "reference")
    fused = loss_and_weight_grad(dtype, "torch")
    for name, expected, baseline, actual in zip(("loss", "grad weight"), truth, naive, fused, strict=True):
        bound = max(LOW_PRECISION_MARGIN * norm_relative_error(baseline, expected), LOW_PRECISION_FLOOR[dtype])
        assert norm_relative_error(actual, expected) <= bound, name


def test_from_logits_applies_the_transform_to_raw_head_outputs():
    inputs = _inputs()
    student = torch.nn.functional.linear(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
    teacher = torch.nn.functional.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    options = {"topk": 5, "logit_scale": 0.5, "logit_softcap": 2.0, "temperature": 0.8}
    per_token = {k: inputs[k] for k in ("target_ids", "old_logprobs", "mask")}
    from_logits = sdpo_loss_from_logits(student, teacher, **per_token, **options)
    fused = sdpo_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
        student_bias=inputs["student_bias"], **per_token, backend="torch", **options,
    )  # fmt: skip
    torch.testing.assert_close(from_logits, fused, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"logit_scale": 0.0}, ValueError, "logit_scale"),
        ({"logit_scale": float("inf")}, ValueError, "logit_scale"),
        ({"logit_scale": -1.0}, ValueError, "logit_scale"),
        ({"logit_softcap": 0.0}, ValueError, "logit_softcap"),
        ({"logit_softcap": float("nan")}, ValueError, "logit_softcap"),
        ({"logit_softcap": "30"}, TypeError, "logit_softcap"),
        ({"logit_scale": True}, TypeError, "logit_scale"),
    ],
)
def test_bad_transform_is_rejected_naming_the_argument(options, error, match):
    inputs = _inputs()
    with pytest.raises(error, match=match):
        sdpo_loss(**inputs, topk=5, **options)
    student = torch.randn(3, 7)
    with pytest.raises(error, match=match):
        sdpo_loss_from_logits(student, student, topk=5, **options)
