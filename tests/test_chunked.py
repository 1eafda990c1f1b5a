"""The chunked torch backend (``sdpo_loss(backend="torch")``) against the naive reference and autograd.

Loss, every output of ``SDPOOutput`` and the gradients of the student's hidden states, lm_head weight
and bias, over hypothesis-drawn configurations; fp64 gradcheck of the chunked Function itself; the
module form, the logits entry point, the metrics, and the memory bound (no ``[N, V]`` tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import ELEMENTWISE
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sdpo_ops import SDPOLoss, SDPOOutput, sdpo_loss, sdpo_loss_from_logits
from sdpo_ops.device_policy import CPU_POLICY, use_policy

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "none")


# ----------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    leading_shape: tuple[int, ...]
    hidden: int
    teacher_hidden: int
    vocab: int
    topk: int | None
    add_tail: bool
    alpha: float
    temperature: float
    is_mode: str  # "off" | "on" | "clip_only" (is_clip without old_logprobs) | "old_only" (is_clip=None)
    is_clip: float
    with_targets: bool
    blend_targets: bool
    reduction: str
    mask_kind: str  # "none" | "random" | "bool" | "empty_sequence" | "all_zero"
    student_bias: bool
    teacher_bias: bool
    token_weights: bool
    normalizer: str | None  # None | "float" | "tensor"
    chunk_size: int | None
    seed: int

    @property
    def num_tokens(self) -> int:
        return math.prod(self.leading_shape)


@st.composite
def cases(draw) -> Case:
    if draw(st.booleans(), label="3-D"):
        leading_shape = (draw(st.integers(1, 3), label="B"), draw(st.integers(1, 4), label="T"))
    else:
        leading_shape = (draw(st.integers(1, 12), label="N"),)
    num_tokens = math.prod(leading_shape)
    vocab = draw(st.integers(2, 40), label="V")
    reduction = draw(st.sampled_from(REDUCTIONS), label="reduction")
    is_mode = draw(st.sampled_from(["off", "on", "on", "clip_only", "old_only"]), label="is_mode")
    with_targets = is_mode in ("on", "old_only") or draw(st.booleans(), label="targets")
    return Case(
        leading_shape=leading_shape,
        hidden=draw(st.integers(1, 8), label="H"),
        teacher_hidden=draw(st.integers(1, 8), label="Ht"),
        vocab=vocab,
        topk=draw(st.one_of(st.none(), st.just(1), st.integers(1, vocab), st.just(vocab)), label="topk"),
        add_tail=draw(st.booleans(), label="add_tail"),
        alpha=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.95)), label="alpha"),
        temperature=draw(st.sampled_from([1.0, 0.7, 1.9]), label="temperature"),
        is_mode=is_mode,
        is_clip=draw(st.sampled_from([0.8, 1.5, 2.0]), label="is_clip"),
        with_targets=with_targets,
        blend_targets=with_targets and draw(st.booleans(), label="blend target_logprobs"),
        reduction=reduction,
        mask_kind=draw(st.sampled_from(["none", "random", "bool", "empty_sequence", "all_zero"]), label="mask"),
        student_bias=draw(st.booleans(), label="student_bias"),
        teacher_bias=draw(st.booleans(), label="teacher_bias"),
        token_weights=draw(st.booleans(), label="token_weights"),
        normalizer=None if reduction in ("sum", "none") else draw(st.sampled_from([None, "float", "tensor"])),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, num_tokens + 2)), label="chunk_size"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"),
    )


def make_inputs(case: Case, dtype: torch.dtype) -> dict:
    """Leaf tensors (student and teacher side require grad) and per-token inputs of one case."""
    generator = torch.Generator().manual_seed(case.seed)
    shape, vocab = case.leading_shape, case.vocab

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(dtype)

    student_hidden = randn(*shape, case.hidden)
    student_weight = randn(vocab, case.hidden, scale=2.0 / math.sqrt(case.hidden))
    teacher_hidden = randn(*shape, case.teacher_hidden)
    teacher_weight = randn(vocab, case.teacher_hidden, scale=2.0 / math.sqrt(case.teacher_hidden))
    inputs = {
        "student_hidden": student_hidden.requires_grad_(),
        "student_weight": student_weight.requires_grad_(),
        "teacher_hidden": teacher_hidden.requires_grad_(),
        "teacher_weight": teacher_weight.requires_grad_(),
        "student_bias": randn(vocab).requires_grad_() if case.student_bias else None,
        "teacher_bias": randn(vocab).requires_grad_() if case.teacher_bias else None,
    }
    target_ids = torch.randint(vocab, shape, generator=generator)
    if case.with_targets:
        inputs["target_ids"] = target_ids
    if case.is_mode in ("on", "old_only"):
        # Ratios exp(lp - old) spread over [e^-1.5, e^1.5] (both sides of every is_clip), plus a few rows
        # beyond the +/-20 clamp of the log-ratio.
        logits = torch.nn.functional.linear(
            student_hidden.double(),
            student_weight.double(),
            None if inputs["student_bias"] is None else inputs["student_bias"].double(),
        )
        target_logprobs = torch.log_softmax(logits / case.temperature, -1).gather(-1, target_ids[..., None])[..., 0]
        offset = torch.rand(shape, generator=generator, dtype=torch.float64) * 3 - 1.5
        far = torch.rand(shape, generator=generator) < 0.1
        offset = torch.where(far, torch.sign(offset) * 30.0, offset)
        inputs["old_logprobs"] = (target_logprobs - offset).to(dtype)
    if case.mask_kind != "none":
        mask = torch.rand(shape, generator=generator) < 0.7
        if case.mask_kind == "empty_sequence":
            mask.reshape(-1, shape[-1])[0] = False
        elif case.mask_kind == "all_zero":
            mask[...] = False
        inputs["mask"] = mask if case.mask_kind == "bool" else mask.to(dtype)
    if case.token_weights:
        inputs["token_weights"] = torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype) * 2
    if case.normalizer == "float":
        inputs["normalizer"] = 3.7
    elif case.normalizer == "tensor":
        inputs["normalizer"] = torch.tensor(5.5, dtype=dtype)
    return inputs


def options_of(case: Case) -> dict:
    return {
        "topk": case.topk,
        "add_tail": case.add_tail,
        "alpha": case.alpha,
        "is_clip": None if case.is_mode == "old_only" else case.is_clip,
        "temperature": case.temperature,
        "reduction": case.reduction,
        "chunk_size": case.chunk_size,
    }


def run(case: Case, inputs: dict, backend: str, dtype: torch.dtype) -> tuple[SDPOOutput, dict]:
    """Fresh leaves, forward, backward of ``loss (+ target-logprob blend)``; returns output and grads."""
    leaves = {
        k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.requires_grad else v)
        for k, v in inputs.items()
    }
    options = options_of(case)
    if backend == "reference":
        options.pop("chunk_size")
    sides = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
    out = sdpo_loss(
        *(leaves[name] for name in sides),
        **{k: v for k, v in leaves.items() if k not in sides},
        backend=backend,
        return_outputs=True,
        **options,
    )
    generator = torch.Generator().manual_seed(case.seed + 1)
    if case.reduction == "none":
        upstream = torch.randn(case.leading_shape, generator=generator, dtype=torch.float64).to(out.loss.dtype)
        objective = (out.loss * upstream).sum()
    else:
        objective = out.loss * 1.7  # the not-last case: an upstream gradient != 1
    if case.blend_targets:
        coefficient = torch.randn(case.leading_shape, generator=generator, dtype=torch.float64)
        objective = objective + (out.target_logprobs * coefficient.to(out.target_logprobs.dtype)).sum()
    objective.backward()
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert leaves[name] is None or leaves[name].grad is None, f"{backend}: {name} got a gradient"
    grads = {
        name: leaves[name].grad
        for name in ("student_hidden", "student_weight", "student_bias")
        if leaves[name] is not None
    }
    return out, grads


def hand_target_logprobs(inputs: dict, side: str, temperature: float) -> torch.Tensor:
    bias = inputs[f"{side}_bias"]
    logits = torch.nn.functional.linear(
        inputs[f"{side}_hidden"].detach().double(),
        inputs[f"{side}_weight"].detach().double(),
        None if bias is None else bias.detach().double(),
    )
    return torch.log_softmax(logits / temperature, -1).gather(-1, inputs["target_ids"][..., None])[..., 0]


def assert_matches_reference(case: Case, dtype: torch.dtype) -> None:
    tolerance = ELEMENTWISE[dtype]
    inputs = make_inputs(case, dtype)
    out, grads = run(case, inputs, "torch", dtype)
    expected, expected_grads = run(case, inputs, "reference", dtype)

    torch.testing.assert_close(out.loss, expected.loss, **tolerance)
    assert out.loss.shape == (case.leading_shape if case.reduction == "none" else ())
    # Diagnostics have no documented dtype (the reference keeps the full-vocabulary mass of 1 in fp32).
    torch.testing.assert_close(out.topk_mass, expected.topk_mass, **tolerance, check_dtype=False)
    torch.testing.assert_close(out.entropy, expected.entropy, **tolerance)
    assert not out.entropy.requires_grad and out.entropy.shape == case.leading_shape
    if case.is_mode == "on":
        torch.testing.assert_close(out.is_weight, expected.is_weight, **tolerance)
    else:
        assert out.is_weight is None
    if case.with_targets:
        torch.testing.assert_close(out.target_logprobs, expected.target_logprobs, **tolerance)
        torch.testing.assert_close(
            out.teacher_target_logprobs.double(), hand_target_logprobs(inputs, "teacher", case.temperature), **tolerance
        )
        assert not out.teacher_target_logprobs.requires_grad
    else:
        assert out.target_logprobs is None and out.teacher_target_logprobs is None
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------- vs reference


@settings(max_examples=40)
@given(case=cases())
def test_torch_backend_matches_reference_fp64(case):
    assert_matches_reference(case, torch.float64)


@settings(max_examples=15)
@given(case=cases())
def test_torch_backend_matches_reference_fp32(case):
    assert_matches_reference(case, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("topk", "add_tail"), [(None, True), (5, True), (5, False), (11, True)])
def test_torch_backend_chunking_edge_cases(reduction, topk, add_tail):
    """Chunks that do not divide N, a chunk of one row, a chunk larger than N; 3-D input, all options on."""
    for chunk_size in (1, 4, 7, 100):
        case = Case(
            leading_shape=(3, 5),
            hidden=4,
            teacher_hidden=6,
            vocab=11,
            topk=topk,
            add_tail=add_tail,
            alpha=0.35,
            temperature=1.3,
            is_mode="on",
            is_clip=1.2,
            with_targets=True,
            blend_targets=True,
            reduction=reduction,
            mask_kind="empty_sequence",
            student_bias=True,
            teacher_bias=True,
            token_weights=True,
            normalizer=None if reduction in ("sum", "none") else "tensor",
            chunk_size=chunk_size,
            seed=chunk_size,
        )
        assert_matches_reference(case, torch.float64)


@pytest.mark.parametrize("entry", ["torch", "reference", "from_logits"])
def test_teacher_target_logprobs_of_every_entry_point(entry):
    """``teacher_target_logprobs`` is documented for every backend: detached, set with target_ids, exact in fp64."""
    case = Case(
        leading_shape=(6,),
        hidden=4,
        teacher_hidden=4,
        vocab=9,
        topk=3,
        add_tail=True,
        alpha=0.5,
        temperature=1.4,
        is_mode="off",
        is_clip=2.0,
        with_targets=True,
        blend_targets=False,
        reduction="token-mean",
        mask_kind="none",
        student_bias=False,
        teacher_bias=True,
        token_weights=False,
        normalizer=None,
        chunk_size=4,
        seed=0,
    )
    inputs = make_inputs(case, torch.float64)
    expected = hand_target_logprobs(inputs, "teacher", case.temperature)
    if entry == "from_logits":
        teacher_logits = torch.nn.functional.linear(
            inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"]
        )
        out = sdpo_loss_from_logits(
            inputs["student_hidden"] @ inputs["student_weight"].T,
            teacher_logits,
            target_ids=inputs["target_ids"],
            topk=3,
            temperature=1.4,
            return_outputs=True,
        )
    else:
        out, _ = run(case, inputs, entry, torch.float64)
    assert out.teacher_target_logprobs is not None, f"{entry}: teacher_target_logprobs is None"
    assert not out.teacher_target_logprobs.requires_grad
    torch.testing.assert_close(out.teacher_target_logprobs, expected, **ELEMENTWISE[torch.float64])


# ----------------------------------------------------------------------------------------------- gradcheck


GRADCHECK_CASES = [
    # (topk, add_tail, alpha, reduction, blend target_logprobs)
    (3, True, 0.5, "token-mean", False),
    (3, True, 0.5, "none", True),
    (3, False, 0.0, "seq-mean-token-mean", True),
    (3, False, 1.0, "none", False),
    (None, True, 0.5, "sum", True),
    (None, True, 1.0, "none", True),
    (None, True, 0.0, "token-mean", False),
    (1, True, 0.3, "seq-mean-token-sum", False),
    (7, True, 0.5, "token-mean", True),  # K = V, clamped tail
]


@pytest.mark.parametrize(("topk", "add_tail", "alpha", "reduction", "blend"), GRADCHECK_CASES)
def test_torch_backend_gradcheck(topk, add_tail, alpha, reduction, blend):
    generator = torch.Generator().manual_seed(2)
    shape = (2, 3)
    hidden = torch.randn(*shape, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(*shape, 4, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    target_ids = torch.randint(7, shape, generator=generator)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # log-ratio far above the clamp: every weight equals is_clip, a constant finite differences also see.
    old_logprobs = torch.full(shape, -60.0, dtype=torch.float64)

    def function(hidden, weight, bias):
        out = sdpo_loss(
            hidden,
            weight,
            teacher_hidden,
            teacher_weight,
            student_bias=bias,
            mask=mask,
            target_ids=target_ids,
            old_logprobs=old_logprobs,
            topk=topk,
            add_tail=add_tail,
            alpha=alpha,
            is_clip=1.5,
            temperature=0.8,
            reduction=reduction,
            backend="torch",
            chunk_size=4,
            return_outputs=True,
        )
        return (out.loss, out.target_logprobs) if blend else out.loss

    assert torch.autograd.gradcheck(function, (hidden, weight, bias))


# ----------------------------------------------------------------------------------------------- autograd modes


def _small_inputs(dtype=torch.float32, seed=0, shape=(5,), hidden=6, vocab=13):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*shape, hidden, generator=generator).to(dtype),
        torch.randn(vocab, hidden, generator=generator).to(dtype) * 0.7,
        torch.randn(*shape, hidden + 1, generator=generator).to(dtype),
        torch.randn(vocab, hidden + 1, generator=generator).to(dtype) * 0.7,
        torch.randint(vocab, shape, generator=generator),
    )


@pytest.mark.parametrize("reduction", ["token-mean", "none"])
def test_no_grad_gives_the_same_loss_and_no_grads(reduction):
    hidden, weight, teacher_hidden, teacher_weight, target_ids = _small_inputs()
    hidden.requires_grad_()
    weight.requires_grad_()
    options = {"topk": 4, "target_ids": target_ids, "old_logprobs": torch.full((5,), -2.5), "reduction": reduction}
    expected = sdpo_loss(hidden, weight, teacher_hidden, teacher_weight, backend="reference", **options)
    with torch.no_grad():
        out = sdpo_loss(
            hidden,
            weight,
            teacher_hidden,
            teacher_weight,
            backend="torch",
            chunk_size=2,
            return_outputs=True,
            **options,
        )
    assert not out.loss.requires_grad and not out.target_logprobs.requires_grad
    torch.testing.assert_close(out.loss, expected.detach(), **ELEMENTWISE[torch.float32])
    assert hidden.grad is None and weight.grad is None


def test_frozen_lm_head_still_gives_the_hidden_grad():
    hidden, weight, teacher_hidden, teacher_weight, target_ids = _small_inputs(seed=1)
    grads = {}
    for backend in ("torch", "reference"):
        leaf = hidden.clone().requires_grad_()
        frozen = weight.clone()  # requires_grad False
        bias = torch.zeros(13, requires_grad=True)
        loss = sdpo_loss(
            leaf,
            frozen,
            teacher_hidden,
            teacher_weight,
            student_bias=bias,
            topk=3,
            backend=backend,
            target_ids=target_ids,
            old_logprobs=torch.full((5,), -1.0),
        )
        loss.backward()
        assert frozen.grad is None
        grads[backend] = (leaf.grad, bias.grad)
    torch.testing.assert_close(grads["torch"], grads["reference"], **ELEMENTWISE[torch.float32])
    assert grads["torch"][0].abs().sum() > 0


def test_only_weight_requires_grad():
    hidden, weight, teacher_hidden, teacher_weight, _ = _small_inputs(seed=4)
    grads = {}
    for backend in ("torch", "reference"):
        leaf = weight.clone().requires_grad_()
        sdpo_loss(hidden, leaf, teacher_hidden, teacher_weight, topk=None, backend=backend, reduction="sum").backward()
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["torch"], grads["reference"], **ELEMENTWISE[torch.float32])


def test_backward_twice_with_retain_graph_accumulates():
    hidden, weight, teacher_hidden, teacher_weight, _ = _small_inputs(seed=5)
    for backend in ("torch", "reference"):
        leaf = hidden.clone().requires_grad_()
        loss = sdpo_loss(leaf, weight, teacher_hidden, teacher_weight, topk=3, backend=backend)
        loss.backward(retain_graph=True)
        once = leaf.grad.clone()
        loss.backward()
        torch.testing.assert_close(leaf.grad, 2 * once, **ELEMENTWISE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_backward_of_a_retained_graph_recomputes_what_the_first_handed_over(dtype):
    # the gradients formed in forward go to the first backward (scaled in place, no second [V, H] buffer);
    # the second one must recompute them, not reuse or lose them
    hidden, weight, teacher_hidden, teacher_weight, target_ids = _small_inputs(dtype=dtype, seed=6)
    leaf_hidden, leaf_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sdpo_loss(leaf_hidden, leaf_weight, teacher_hidden, teacher_weight, topk=4, backend="torch")
    loss.backward(retain_graph=True)
    once = (leaf_hidden.grad.clone(), leaf_weight.grad.clone())
    loss.backward()
    tolerance = ELEMENTWISE[torch.float32] if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for twice, single in zip((leaf_hidden.grad, leaf_weight.grad), once, strict=True):
        torch.testing.assert_close(twice.float(), 2 * single.float(), **tolerance)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_dz_staged_over_several_chunks_per_dw_pass(backend):
    # CUDA stages several chunks per dW pass (2304 rows at the SPEC shape), CPU one: make the CPU stage 3 chunks of 2
    # rows, with a last, partial pass, so the staging that runs on GPUs is checked against the reference here
    policy = replace(CPU_POLICY, dw_stage_rows=5)
    hidden, weight, teacher_hidden, teacher_weight, target_ids = _small_inputs(seed=7, shape=(9,))
    bias = torch.randn(weight.shape[0])
    grads = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with use_policy(policy):
            loss = sdpo_loss(leaves[0], leaves[1], teacher_hidden, teacher_weight, student_bias=leaves[2],
                             target_ids=target_ids, topk=4, backend=name, chunk_size=2)  # fmt: skip
        loss.backward()
        grads[name] = [leaf.grad for leaf in leaves]
    assert policy.stage_rows(2, 9, row_bytes=weight.shape[0] * 4, held_bytes=0) == 6
    for actual, expected in zip(grads[backend], grads["reference"], strict=True):
        torch.testing.assert_close(actual, expected, **ELEMENTWISE[torch.float32])


# ----------------------------------------------------------------------------------------------- other forms


def test_module_equals_function():
    hidden, weight, teacher_hidden, teacher_weight, target_ids = _small_inputs(seed=2, shape=(2, 3))
    options = {
        "topk": 5,
        "add_tail": False,
        "alpha": 0.2,
        "is_clip": 1.3,
        "temperature": 0.9,
        "reduction": "seq-mean-token-mean",
        "backend": "torch",
        "chunk_size": 4,
    }
    old_logprobs = torch.full((2, 3), -2.0)
    criterion = SDPOLoss(**options)
    assert list(criterion.parameters()) == []
    results = []
    for call in (
        lambda h, w: criterion(h, w, teacher_hidden, teacher_weight, target_ids=target_ids, old_logprobs=old_logprobs),
        lambda h, w: sdpo_loss(
            h, w, teacher_hidden, teacher_weight, target_ids=target_ids, old_logprobs=old_logprobs, **options
        ),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = call(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    # A call-time override wins over the stored option.
    overridden = criterion(hidden, weight, teacher_hidden, teacher_weight, reduction="sum")
    expected = sdpo_loss(hidden, weight, teacher_hidden, teacher_weight, **{**options, "reduction": "sum"})
    torch.testing.assert_close(overridden, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6,), (2, 4)])
@pytest.mark.parametrize("topk", [None, 4, 9])
def test_from_logits_matches_the_hidden_state_paths(shape, topk):
    """``sdpo_loss_from_logits(z, u)`` equals ``sdpo_loss(z, I, u, I)``: the identity lm_head gives back z."""
    generator = torch.Generator().manual_seed(6)
    vocab = 9
    student = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 2
    target_ids = torch.randint(vocab, shape, generator=generator)
    old_logprobs = -torch.rand(shape, generator=generator, dtype=torch.float64) * 4
    mask = torch.rand(shape, generator=generator) < 0.8
    options = {
        "mask": mask,
        "target_ids": target_ids,
        "old_logprobs": old_logprobs,
        "topk": topk,
        "alpha": 0.6,
        "is_clip": 1.4,
        "temperature": 1.2,
        "reduction": "none",
        "return_outputs": True,
    }
    identity = torch.eye(vocab, dtype=torch.float64)
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    coefficient = torch.randn(shape, generator=generator, dtype=torch.float64)

    results = {}
    for name in ("from_logits", "torch", "reference"):
        logits = student.clone().requires_grad_()
        if name == "from_logits":
            out = sdpo_loss_from_logits(logits, teacher, **options)
        else:
            out = sdpo_loss(logits, identity, teacher, identity, backend=name, **options)
        ((out.loss * upstream).sum() + (out.target_logprobs * coefficient).sum()).backward()
        results[name] = (out, logits.grad)
    expected_out, expected_grad = results["reference"]
    for name in ("from_logits", "torch"):
        out, grad = results[name]
        tolerance = ELEMENTWISE[torch.float64]
        torch.testing.assert_close(out.loss, expected_out.loss, **tolerance)
        torch.testing.assert_close(out.target_logprobs, expected_out.target_logprobs, **tolerance)
        torch.testing.assert_close(out.is_weight, expected_out.is_weight, **tolerance)
        torch.testing.assert_close(grad, expected_grad, **tolerance)


# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("entry", ["torch", "reference", "from_logits"])
@pytest.mark.parametrize("topk", [None, 3])
def test_metrics_match_hand_computation(entry, topk):
    generator = torch.Generator().manual_seed(8)
    shape, hidden_size, vocab, is_clip, temperature = (3, 4), 5, 10, 1.5, 0.9
    hidden = torch.randn(*shape, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(*shape, hidden_size, generator=generator, dtype=torch.float64)
    target_ids = torch.randint(vocab, shape, generator=generator)
    mask = (torch.rand(shape, generator=generator) < 0.7).double()
    logits = hidden @ weight.T
    target_logprobs = torch.log_softmax(logits / temperature, -1).gather(-1, target_ids[..., None])[..., 0]
    old_logprobs = target_logprobs - (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1)
    options = {
        "mask": mask,
        "target_ids": target_ids,
        "old_logprobs": old_logprobs,
        "topk": topk,
        "is_clip": is_clip,
        "temperature": temperature,
        "return_outputs": True,
    }
    if entry == "from_logits":
        out = sdpo_loss_from_logits(logits, teacher_hidden @ weight.T, **options)
    else:
        out = sdpo_loss(hidden, weight, teacher_hidden, weight, backend=entry, **options)

    ratio = torch.exp(target_logprobs - old_logprobs)
    probs = torch.softmax(logits / temperature, -1)
    entropy = -(probs * probs.log()).sum(-1)
    mass = (
        torch.ones(shape, dtype=torch.float64)
        if topk is None
        else probs.sort(-1, descending=True).values[..., :topk].sum(-1)
    )
    count = mask.sum()
    expected = {
        "is_weight_mean": (torch.clamp(ratio, max=is_clip) * mask).sum() / count,
        "is_clipped_fraction": ((ratio > is_clip).double() * mask).sum() / count,
        "topk_mass_mean": (mass * mask).sum() / count,
        "entropy_mean": (entropy * mask).sum() / count,
    }
    assert 0 < float(expected["is_clipped_fraction"]) < 1, "the draw must put ratios on both sides of is_clip"
    assert out.metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert out.metrics[key].dim() == 0 and not out.metrics[key].requires_grad, key
        torch.testing.assert_close(out.metrics[key].double(), value, **ELEMENTWISE[torch.float32], msg=key)
    torch.testing.assert_close(out.is_weight.double(), torch.clamp(ratio, max=is_clip), **ELEMENTWISE[torch.float32])
    torch.testing.assert_close(out.topk_mass.double(), mass, **ELEMENTWISE[torch.float32])
    torch.testing.assert_close(out.entropy.double(), entropy * mask, **ELEMENTWISE[torch.float32])


def test_metrics_without_importance_sampling():
    hidden, weight, teacher_hidden, teacher_weight, _ = _small_inputs(seed=9)
    for backend in ("torch", "reference"):
        out = sdpo_loss(hidden, weight, teacher_hidden, teacher_weight, topk=None, backend=backend, return_outputs=True)
        assert out.is_weight is None and out.target_logprobs is None
        assert float(out.metrics["is_weight_mean"]) == 1.0
        assert float(out.metrics["is_clipped_fraction"]) == 0.0
        torch.testing.assert_close(out.metrics["topk_mass_mean"].double(), torch.tensor(1.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.calls += 1
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


@pytest.mark.parametrize(
    ("topk", "reduction", "blend"),
    [(8, "token-mean", False), (8, "none", True), (None, "token-mean", True), (None, "none", False)],
)
def test_no_tensor_of_n_times_v_elements(topk, reduction, blend):
    num_tokens, hidden_size, vocab, chunk_size = 96, 4, 48, 8
    generator = torch.Generator().manual_seed(10)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    target_ids = torch.randint(vocab, (num_tokens,), generator=generator)
    old_logprobs = torch.full((num_tokens,), -3.0)

    def forward_backward(backend):
        recorder = _LargestTensor()
        with recorder:
            out = sdpo_loss(
                hidden,
                weight,
                teacher_hidden,
                weight.detach(),
                target_ids=target_ids,
                old_logprobs=old_logprobs,
                topk=topk,
                reduction=reduction,
                backend=backend,
                chunk_size=chunk_size,
                return_outputs=True,
            )
            objective = out.loss.sum() + (out.target_logprobs.sum() if blend else 0.0)
            forward_calls = recorder.calls
            objective.backward()
        assert recorder.calls > forward_calls, "the recorder must see the backward pass"
        return recorder.largest

    assert forward_backward("reference") >= num_tokens * vocab  # the recorder sees a materialised [N, V]
    largest = forward_backward("torch")
    # Everything else is [C, V], [N, H], [V, H] or [N, K + 1]: far below N*V.
    assert largest <= max(chunk_size * vocab, num_tokens * hidden_size, vocab * hidden_size, num_tokens * 9), largest
    assert largest < num_tokens * vocab // 4


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "none"])
@pytest.mark.parametrize("topk", [3, None])
def test_per_token_loss_equals_the_reference_unreduced_loss(backend, reduction, topk):
    generator = torch.Generator().manual_seed(7)
    batch, length, hidden, vocab = 2, 4, 6, 11
    inputs = {
        "student_hidden": torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64),
        "student_weight": torch.randn(vocab, hidden, generator=generator, dtype=torch.float64),
        "teacher_hidden": torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64),
        "teacher_weight": torch.randn(vocab, hidden, generator=generator, dtype=torch.float64),
    }
    options = {
        "mask": torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]),
        "target_ids": torch.randint(0, vocab, (batch, length), generator=generator),
        "old_logprobs": torch.randn(batch, length, generator=generator, dtype=torch.float64) - 2.0,
        "token_weights": torch.rand(batch, length, generator=generator, dtype=torch.float64),
        "topk": topk,
    }
    expected = sdpo_loss(**inputs, **options, reduction="none", backend="reference")
    output = sdpo_loss(**inputs, **options, reduction=reduction, backend=backend, return_outputs=True)
    torch.testing.assert_close(output.per_token_loss, expected, rtol=1e-10, atol=1e-12)
    assert not output.per_token_loss.requires_grad
