"""Bad input raises a ValueError/TypeError naming the argument, before any computation (SPEC section 3)."""

from __future__ import annotations

import pytest
import torch

from sdpo_ops import SDPOLoss, sdpo_loss, sdpo_loss_from_logits

N, H, HT, V = 4, 3, 5, 7
BAD = (ValueError, TypeError)


def good_inputs() -> dict:
    """A valid call; each test breaks one thing."""
    return {
        "student_hidden": torch.randn(N, H),
        "student_weight": torch.randn(V, H),
        "teacher_hidden": torch.randn(N, HT),
        "teacher_weight": torch.randn(V, HT),
        "target_ids": torch.randint(V, (N,)),
        "old_logprobs": torch.full((N,), -1.0),
        "mask": torch.ones(N),
        "topk": 3,
    }


def call(backend: str = "torch", **changes):
    kwargs = {**good_inputs(), **changes}
    kwargs = {key: value for key, value in kwargs.items() if not (isinstance(value, str) and value == "drop")}
    hidden, weight = kwargs.pop("student_hidden"), kwargs.pop("student_weight")
    teacher_hidden, teacher_weight = kwargs.pop("teacher_hidden"), kwargs.pop("teacher_weight")
    return sdpo_loss(hidden, weight, teacher_hidden, teacher_weight, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_good_call_is_accepted(backend):
    loss = call(backend)
    assert loss.dim() == 0 and torch.isfinite(loss)


# Each entry: (what is changed, the name the message must contain).
BAD_CALLS = {
    # shapes and vocabularies
    "student_weight hidden size": ({"student_weight": torch.randn(V, H + 1)}, "student_weight"),
    "teacher_weight hidden size": ({"teacher_weight": torch.randn(V, H)}, "teacher_weight"),
    "vocab mismatch": ({"teacher_weight": torch.randn(V + 1, HT)}, "teacher_weight|vocab"),
    "teacher leading shape": ({"teacher_hidden": torch.randn(N + 1, HT)}, "teacher_hidden"),
    "student_hidden 1-D": ({"student_hidden": torch.randn(H)}, "student_hidden"),
    "student_hidden 4-D": ({"student_hidden": torch.randn(1, 1, N, H)}, "student_hidden"),
    "student_weight 3-D": ({"student_weight": torch.randn(1, V, H)}, "student_weight"),
    "student_bias shape": ({"student_bias": torch.randn(V + 1)}, "student_bias"),
    "teacher_bias shape": ({"teacher_bias": torch.randn(V, 1)}, "teacher_bias"),
    "mask shape": ({"mask": torch.ones(N + 1)}, "mask"),
    "mask 2-D for 1-D tokens": ({"mask": torch.ones(1, N)}, "mask"),
    "target_ids shape": ({"target_ids": torch.zeros(N - 1, dtype=torch.long)}, "target_ids"),
    "old_logprobs shape": ({"old_logprobs": torch.zeros(N, 1)}, "old_logprobs"),
    "token_weights shape": ({"token_weights": torch.ones(2 * N)}, "token_weights"),
    # options
    "topk > V": ({"topk": V + 1}, "topk"),
    "topk 0": ({"topk": 0}, "topk"),
    "topk negative": ({"topk": -2}, "topk"),
    "topk float": ({"topk": 2.5}, "topk"),
    "topk integral float": ({"topk": 2.0}, "topk"),
    "topk bool": ({"topk": True}, "topk"),
    "topk string": ({"topk": "3"}, "topk"),
    "alpha negative": ({"alpha": -0.1}, "alpha"),
    "alpha above 1": ({"alpha": 1.5}, "alpha"),
    "alpha nan": ({"alpha": float("nan")}, "alpha"),
    "is_clip 0": ({"is_clip": 0.0}, "is_clip"),
    "is_clip negative": ({"is_clip": -1.0}, "is_clip"),
    "temperature 0": ({"temperature": 0.0}, "temperature"),
    "temperature negative": ({"temperature": -1.0}, "temperature"),
    "temperature nan": ({"temperature": float("nan")}, "temperature"),
    "unknown reduction": ({"reduction": "mean"}, "reduction"),
    "normalizer with sum": ({"reduction": "sum", "normalizer": 4.0}, "normalizer"),
    "normalizer with none": ({"reduction": "none", "normalizer": 4.0}, "normalizer"),
    "normalizer zero": ({"normalizer": 0.0}, "normalizer"),
    "chunk_size zero": ({"chunk_size": 0}, "chunk_size"),
    # devices (meta: a second device every machine has)
    "teacher_hidden on meta": ({"teacher_hidden": torch.randn(N, HT, device="meta")}, "teacher_hidden"),
    "student_weight on meta": ({"student_weight": torch.randn(V, H, device="meta")}, "student_weight"),
    "teacher_weight on meta": ({"teacher_weight": torch.randn(V, HT, device="meta")}, "teacher_weight"),
    "student_bias on meta": ({"student_bias": torch.randn(V, device="meta")}, "student_bias"),
    "mask on meta": ({"mask": torch.ones(N, device="meta")}, "mask"),
    "target_ids on meta": ({"target_ids": torch.zeros(N, dtype=torch.long, device="meta")}, "target_ids"),
    "old_logprobs on meta": ({"old_logprobs": torch.zeros(N, device="meta")}, "old_logprobs"),
    "token_weights on meta": ({"token_weights": torch.ones(N, device="meta")}, "token_weights"),
    # dtypes
    "integer student_hidden": ({"student_hidden": torch.ones(N, H, dtype=torch.long)}, "student_hidden"),
    "integer teacher_hidden": ({"teacher_hidden": torch.ones(N, HT, dtype=torch.int32)}, "teacher_hidden"),
    "integer student_weight": ({"student_weight": torch.ones(V, H, dtype=torch.long)}, "student_weight"),
    "weight dtype differs": ({"student_weight": torch.randn(V, H, dtype=torch.float64)}, "student_weight"),
    "student_hidden not a tensor": ({"student_hidden": [[0.0] * H] * N}, "student_hidden"),
    "teacher_weight not a tensor": ({"teacher_weight": None}, "teacher_weight"),
    # targets
    "target_ids == V": ({"target_ids": torch.tensor([0, 1, V, 2])}, "target_ids"),
    "target_ids negative": ({"target_ids": torch.tensor([0, -1, 1, 2])}, "target_ids"),
    "target_ids float": ({"target_ids": torch.zeros(N)}, "target_ids"),
    "target_ids bool": ({"target_ids": torch.zeros(N, dtype=torch.bool)}, "target_ids"),
    "old_logprobs without target_ids": ({"target_ids": "drop"}, "old_logprobs"),
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(name, backend):
    changes, argument = BAD_CALLS[name]
    with pytest.raises(BAD, match=argument):
        call(backend, **changes)


@pytest.mark.parametrize(
    ("changes", "argument"),
    [
        ({"backend": "cuda"}, "backend"),
        ({"backend": "Torch"}, "backend"),
        ({"backend": None}, "backend"),
    ],
)
def test_unknown_backend(changes, argument):
    inputs = good_inputs()
    with pytest.raises(BAD, match=argument):
        sdpo_loss(
            inputs.pop("student_hidden"),
            inputs.pop("student_weight"),
            inputs.pop("teacher_hidden"),
            inputs.pop("teacher_weight"),
            **inputs,
            **changes,
        )


def test_types_of_the_main_errors():
    """The kinds SPEC section 3 implies: wrong dtype/type is a TypeError, a wrong value a ValueError."""
    with pytest.raises(TypeError, match="student_hidden"):
        call(student_hidden=torch.ones(N, H, dtype=torch.long))
    with pytest.raises(TypeError, match="target_ids"):
        call(target_ids=torch.zeros(N))
    with pytest.raises(TypeError, match="topk"):
        call(topk=2.5)
    for changes in (
        {"topk": V + 1},
        {"alpha": 2.0},
        {"is_clip": 0.0},
        {"temperature": 0.0},
        {"reduction": "x"},
        {"target_ids": torch.full((N,), V)},
        {"target_ids": "drop"},
    ):
        with pytest.raises(ValueError):
            call(**changes)


def test_three_dimensional_masks_must_match():
    hidden, teacher = torch.randn(2, 3, H), torch.randn(2, 3, HT)
    weight, teacher_weight = torch.randn(V, H), torch.randn(V, HT)
    with pytest.raises(BAD, match="mask"):
        sdpo_loss(hidden, weight, teacher, teacher_weight, mask=torch.ones(6), topk=3, backend="torch")
    with pytest.raises(BAD, match="teacher_hidden"):
        sdpo_loss(hidden, weight, torch.randn(3, 2, HT), teacher_weight, topk=3, backend="torch")
    # The valid [B, T] mask is accepted.
    assert torch.isfinite(
        sdpo_loss(hidden, weight, teacher, teacher_weight, mask=torch.ones(2, 3), topk=3, backend="torch")
    )


def test_validation_runs_before_any_work():
    """A bad option is refused even when the tensors would make the computation itself fail."""
    with pytest.raises(BAD, match="alpha"):
        sdpo_loss(
            torch.randn(N, H, device="meta"),
            torch.randn(V, H, device="meta"),
            torch.randn(N, HT, device="meta"),
            torch.randn(V, HT, device="meta"),
            topk=3,
            alpha=3.0,
            backend="torch",
        )


FROM_LOGITS_BAD = {
    "shape mismatch": ({"teacher_logits": torch.randn(N, V + 1)}, "teacher_logits"),
    "1-D logits": ({"student_logits": torch.randn(V), "teacher_logits": torch.randn(V)}, "student_logits"),
    "integer logits": (
        {"student_logits": torch.ones(N, V, dtype=torch.long), "teacher_logits": torch.ones(N, V, dtype=torch.long)},
        "student_logits",
    ),
    "teacher on meta": ({"teacher_logits": torch.randn(N, V, device="meta")}, "teacher_logits"),
    "topk > V": ({"topk": V + 1}, "topk"),
    "alpha": ({"alpha": -1.0}, "alpha"),
    "is_clip": ({"is_clip": -1.0}, "is_clip"),
    "temperature": ({"temperature": 0.0}, "temperature"),
    "reduction": ({"reduction": "avg"}, "reduction"),
    "target out of range": ({"target_ids": torch.full((N,), V)}, "target_ids"),
    "old without target": ({"target_ids": None}, "old_logprobs"),
    "mask shape": ({"mask": torch.ones(N, 1)}, "mask"),
    "normalizer with sum": ({"reduction": "sum", "normalizer": 2.0}, "normalizer"),
}


@pytest.mark.parametrize("name", list(FROM_LOGITS_BAD))
def test_from_logits_bad_input(name):
    changes, argument = FROM_LOGITS_BAD[name]
    kwargs = {
        "student_logits": torch.randn(N, V),
        "teacher_logits": torch.randn(N, V),
        "topk": 3,
        "target_ids": torch.randint(V, (N,)),
        "old_logprobs": torch.full((N,), -1.0),
        **changes,
    }
    with pytest.raises(BAD, match=argument):
        sdpo_loss_from_logits(kwargs.pop("student_logits"), kwargs.pop("teacher_logits"), **kwargs)


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="topkk"):
        SDPOLoss(topkk=3)
    with pytest.raises(TypeError, match="student_hidden"):
        SDPOLoss(student_hidden=torch.randn(N, H))
    # Known options are stored and validated at call time like the function's.
    criterion = SDPOLoss(topk=V + 1)
    inputs = good_inputs()
    with pytest.raises(BAD, match="topk"):
        criterion(
            inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"]
        )
