"""``backend="triton"`` end to end under the interpreter: the kernels inside the chunked Function.

Every option family against the naive reference, loss and gradients, at tiny shapes (V not a power of
two, chunks that do not divide N). The row kernels alone are tested in test_kernels_interpret.py.
"""

import pytest
import torch
from tolerances import ELEMENTWISE, LOW_PRECISION_FLOOR, norm_relative_error

from sdpo_ops import sdpo_loss

pytestmark = pytest.mark.interpret

N, H, H_TEACHER, V = 5, 8, 6, 37

OPTION_FAMILIES = {
    "topk-tail-gjsd": {"topk": 4, "alpha": 0.5},
    "topk-renormalised-forward-kl": {"topk": 3, "add_tail": False, "alpha": 0.0},
    "topk-tail-reverse-kl-temperature": {"topk": 4, "alpha": 1.0, "temperature": 0.6},
    "topk-equals-vocab": {"topk": V, "alpha": 0.5},
    "topk-one": {"topk": 1, "alpha": 0.5},
    "full-vocab-gjsd": {"topk": None, "alpha": 0.3},
    "full-vocab-forward-kl": {"topk": None, "alpha": 0.0},
    "full-vocab-reverse-kl": {"topk": None, "alpha": 1.0},
    "no-is": {"topk": 4, "is_clip": None},
    "seq-mean-token-mean": {"topk": 4, "reduction": "seq-mean-token-mean"},
    "sum": {"topk": 4, "reduction": "sum"},
    "none": {"topk": 4, "reduction": "none"},
    "full-vocab-none": {"topk": None, "reduction": "none"},
}


def _inputs(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": torch.randn(N, H, generator=generator).to(dtype),
        "student_weight": torch.randn(V, H, generator=generator).to(dtype),
        "student_bias": torch.randn(V, generator=generator).to(dtype),
        "teacher_hidden": torch.randn(N, H_TEACHER, generator=generator).to(dtype),
        "teacher_weight": torch.randn(V, H_TEACHER, generator=generator).to(dtype),
        "target_ids": torch.randint(0, V, (N,), generator=generator),
        # Ratios on both sides of the clip.
        "old_logprobs": torch.randn(N, generator=generator) * 3 - 3,
        "mask": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]),
    }


def _run(inputs, backend, dtype=None, upstream=None, logprob_weights=None, **options):
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    leaves = [tensors[name].detach().requires_grad_() for name in ("student_hidden", "student_weight", "student_bias")]
    out = sdpo_loss(
        *leaves[:2],
        tensors["teacher_hidden"],
        tensors["teacher_weight"],
        student_bias=leaves[2],
        mask=inputs["mask"],
        target_ids=inputs["target_ids"],
        old_logprobs=inputs["old_logprobs"],
        backend=backend,
        return_outputs=True,
        chunk_size=2,
        **options,
    )
    total = (out.loss * (1.0 if upstream is None else upstream)).sum()
    if logprob_weights is not None:
        total = total + (out.target_logprobs * logprob_weights).sum()
    total.backward()
    assert not out.entropy.requires_grad
    return [out.loss.detach(), out.target_logprobs.detach(), out.entropy] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("family", list(OPTION_FAMILIES))
def test_triton_matches_reference_fp32(family):
    options = OPTION_FAMILIES[family]
    inputs = _inputs(torch.float32)
    upstream = torch.linspace(-1.0, 2.0, N) if options.get("reduction") == "none" else None
    expected = _run(inputs, "reference", upstream=upstream, **options)
    actual = _run(inputs, "triton", upstream=upstream, **options)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize("topk", [4, None])
def test_triton_policy_term_on_target_logprobs_matches_reference(topk):
    inputs = _inputs(torch.float32, seed=1)
    weights = torch.linspace(-1.0, 1.0, N)
    expected = _run(inputs, "reference", logprob_weights=weights, topk=topk)
    actual = _run(inputs, "triton", logprob_weights=weights, topk=topk)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("topk", [4, None])
def test_triton_low_precision_inputs_match_torch_backend(topk, dtype):
    # Both backends round the chunk's logits the same way (matmul in the input dtype, fp32 buffer), so
    # they must agree to fp32 accuracy; the torch backend's own bf16/fp16 error against the fp64
    # reference is bounded in test_numerics.py.
    inputs = _inputs(torch.float32, seed=2)
    expected = _run(inputs, "torch", dtype=dtype, topk=topk)
    actual = _run(inputs, "triton", dtype=dtype, topk=topk)
    names = ("loss", "logprobs", "entropy", "d hidden", "d weight", "d bias")
    for name, a, e in zip(names, actual, expected, strict=True):
        assert norm_relative_error(a, e) <= LOW_PRECISION_FLOOR[dtype] / 10, name


def test_triton_all_masked_gives_exact_zero():
    inputs = {**_inputs(torch.float32), "mask": torch.zeros(N)}
    loss, _, entropy, *grads = _run(inputs, "triton", topk=4)
    assert entropy.eq(0).all()  # masked positions: exactly 0
    assert loss.item() == 0.0
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


def test_triton_refuses_topk_beyond_kernel_limit():
    hidden, weight = torch.randn(2, 4), torch.randn(300, 4)
    with pytest.raises(ValueError, match="topk"):
        sdpo_loss(hidden, weight, hidden, weight, topk=257, backend="triton")
