"""Inputs as a Hugging Face loop produces them (SPEC 3.0): autocast's mixed dtypes, ``-100`` ids at masked positions.

- Under ``torch.autocast`` the head runs in autocast's dtype, as ``F.linear`` would: the call equals the same call
  with the operands cast by hand, the fp32 weight gets an fp32 gradient, and the loss is the naive loss on the
  logits ``F.linear`` returns under autocast. Outside autocast the mismatch is refused with the fix.
- Target ids at masked positions are never validated nor read: ``-100`` there gives the loss and gradients of any
  valid id there, while an out-of-range id at an unmasked position is still refused.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import ELEMENTWISE

from sdpo_ops import sdpo_loss, sdpo_loss_from_logits, sdpo_loss_from_teacher_topk
from sdpo_ops.reference import sdpo_loss_reference_from_logits

B, T, H, V, K = 2, 5, 16, 40, 6
IGNORE_INDEX = -100  # Hugging Face's label padding
BF16 = torch.bfloat16


def _batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0  # right padding of the first sequence
    mask[1, 0] = 0
    return {
        "student_hidden": torch.randn(B, T, H, generator=generator),
        "student_weight": torch.randn(V, H, generator=generator) / H**0.5 * 3,
        "teacher_hidden": torch.randn(B, T, H, generator=generator),
        "teacher_weight": torch.randn(V, H, generator=generator) / H**0.5 * 3,
        "target_ids": torch.randint(V, (B, T), generator=generator),
        "old_logprobs": -torch.rand(B, T, generator=generator) * 3,
        "mask": mask,
    }


# ------------------------------------------------------------------------------------------------------ autocast


def _leaves(batch: dict, hidden_dtype: torch.dtype) -> dict:
    """The batch as an autocast forward leaves it: hidden states in ``hidden_dtype``, fp32 weights (with grad)."""
    return {
        **batch,
        "student_hidden": batch["student_hidden"].to(hidden_dtype).requires_grad_(),
        "student_weight": batch["student_weight"].clone().requires_grad_(),
        "teacher_hidden": batch["teacher_hidden"].to(hidden_dtype),
    }


def _call_sdpo_loss(inputs: dict, **options):
    inputs = dict(inputs)
    operands = [inputs.pop(name) for name in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    return sdpo_loss(*operands, **inputs, topk=K, return_outputs=True, **options)


@pytest.mark.parametrize("hidden_dtype", [BF16, torch.float32])
def test_under_autocast_the_head_runs_in_autocast_dtype_as_f_linear_would(hidden_dtype):
    batch = _batch()
    inside = _leaves(batch, hidden_dtype)
    with torch.autocast("cpu", dtype=BF16):
        out = _call_sdpo_loss(inside, backend="torch")
        out.loss.backward()

    # The same call with the casts F.linear's autocast would make written out, autocast off.
    by_hand = _leaves(batch, hidden_dtype)
    cast = {
        **by_hand,
        "student_hidden": by_hand["student_hidden"].to(BF16),
        "student_weight": by_hand["student_weight"].to(BF16),
        "teacher_hidden": by_hand["teacher_hidden"].to(BF16),
        "teacher_weight": by_hand["teacher_weight"].to(BF16),
    }
    expected = _call_sdpo_loss(cast, backend="torch")
    expected.loss.backward()
    assert torch.equal(out.loss, expected.loss)
    assert inside["student_weight"].grad.dtype == torch.float32  # reaches the fp32 master weight in fp32
    assert torch.equal(inside["student_weight"].grad, by_hand["student_weight"].grad)
    assert inside["student_hidden"].grad.dtype == hidden_dtype
    assert torch.equal(inside["student_hidden"].grad, by_hand["student_hidden"].grad)

    # Against the naive path as autocast runs it: F.linear's bf16 logits, then the loss in fp64. A call that ignored
    # autocast (fp32 head) lands ~1e-3 relative away from it, 5x this tolerance (measured on seeds 0-4).
    with torch.autocast("cpu", dtype=BF16):
        logits = [
            torch.nn.functional.linear(batch[f"{side}_hidden"].to(hidden_dtype), batch[f"{side}_weight"])
            for side in ("student", "teacher")
        ]
    assert logits[0].dtype == BF16
    oracle = sdpo_loss_reference_from_logits(
        *(side.double() for side in logits), mask=batch["mask"].double(), target_ids=batch["target_ids"],
        old_logprobs=batch["old_logprobs"].double(), topk=K,
    )["loss"]  # fmt: skip
    torch.testing.assert_close(out.loss.detach().double(), oracle, **ELEMENTWISE[torch.float32])


def test_autocast_reaches_the_teacher_topk_entry_point():
    batch = _batch()
    served = torch.log_softmax(batch["teacher_hidden"] @ batch["teacher_weight"].T, -1).topk(K, dim=-1)
    options = {"mask": batch["mask"], "target_ids": batch["target_ids"], "old_logprobs": batch["old_logprobs"]}
    hidden = batch["student_hidden"].to(BF16).requires_grad_()
    weight = batch["student_weight"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        loss = sdpo_loss_from_teacher_topk(hidden, weight, served.values, served.indices, **options)
    loss.backward()
    expected = sdpo_loss_from_teacher_topk(hidden.detach(), weight.detach().to(BF16), served.values, served.indices,
                                           **options)  # fmt: skip
    assert torch.equal(loss.detach(), expected)
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_outside_autocast_mixed_dtypes_are_refused_with_the_fix():
    inputs = _leaves(_batch(), BF16)
    with pytest.raises(TypeError, match=r"student_weight dtype torch.float32 differs.*torch\.autocast"):
        _call_sdpo_loss(inputs)
    batch = _batch()
    with pytest.raises(TypeError, match=r"student_weight dtype .*torch\.autocast"):
        sdpo_loss_from_teacher_topk(
            batch["student_hidden"].to(BF16), batch["student_weight"], torch.zeros(B, T, K), torch.zeros(B, T, K).long()
        )


def test_autocast_leaves_fp64_alone_as_f_linear_does():
    """fp64 is not an autocast dtype: an fp64 call inside autocast is the fp64 call."""
    batch = {name: value.double() if value.is_floating_point() else value for name, value in _batch().items()}
    with torch.autocast("cpu", dtype=BF16):
        inside = _call_sdpo_loss(batch, backend="reference").loss
    assert inside.dtype == torch.float64
    assert torch.equal(inside, _call_sdpo_loss(batch, backend="reference").loss)


# -------------------------------------------------------------------------------- target ids at masked positions


def _with_ignore_index(batch: dict) -> dict:
    return {**batch, "target_ids": batch["target_ids"].masked_fill(batch["mask"] == 0, IGNORE_INDEX)}


def _loss_and_grads(inputs: dict, dtype: torch.dtype = torch.float64, **options):
    inputs = {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}
    inputs = _leaves(inputs, dtype)
    out = _call_sdpo_loss(inputs, **options)
    out.loss.backward()
    return out, inputs["student_hidden"].grad, inputs["student_weight"].grad


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's masked lanes
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_ignore_index_at_masked_positions_is_accepted_and_changes_nothing(backend):
    batch = _batch()
    dtype = torch.float32 if backend == "triton" else torch.float64  # the kernels compute in fp32
    out, hidden_grad, weight_grad = _loss_and_grads(_with_ignore_index(batch), dtype, backend=backend)
    expected, expected_hidden_grad, expected_weight_grad = _loss_and_grads(batch, dtype, backend=backend)
    tolerance = ELEMENTWISE[dtype]
    torch.testing.assert_close(out.loss, expected.loss, **tolerance)
    torch.testing.assert_close(hidden_grad, expected_hidden_grad, **tolerance)
    torch.testing.assert_close(weight_grad, expected_weight_grad, **tolerance)
    unmasked = batch["mask"] != 0
    torch.testing.assert_close(out.target_logprobs[unmasked], expected.target_logprobs[unmasked], **tolerance)


def test_in_range_ids_at_masked_positions_keep_their_log_probs():
    """A policy loss reads ``target_logprobs`` where the distillation mask is 0: those stay the ids' own."""
    batch = _batch()
    out, _, _ = _loss_and_grads(batch, backend="torch")
    full, _, _ = _loss_and_grads({**batch, "mask": torch.ones(B, T)}, backend="torch")
    torch.testing.assert_close(out.target_logprobs, full.target_logprobs, **ELEMENTWISE[torch.float64])


def test_ignore_index_reaches_every_entry_point():
    batch = _batch()
    ignored = _with_ignore_index(batch)
    options = {"mask": batch["mask"], "old_logprobs": batch["old_logprobs"]}
    student_logits = batch["student_hidden"] @ batch["student_weight"].T
    teacher_logits = batch["teacher_hidden"] @ batch["teacher_weight"].T
    torch.testing.assert_close(
        sdpo_loss_from_logits(student_logits, teacher_logits, target_ids=ignored["target_ids"], topk=K, **options),
        sdpo_loss_from_logits(student_logits, teacher_logits, target_ids=batch["target_ids"], topk=K, **options),
        **ELEMENTWISE[torch.float32],
    )
    served = torch.log_softmax(teacher_logits, -1).topk(K, dim=-1)
    hidden, weight = batch["student_hidden"], batch["student_weight"]
    torch.testing.assert_close(
        sdpo_loss_from_teacher_topk(hidden, weight, *served, target_ids=ignored["target_ids"], **options),
        sdpo_loss_from_teacher_topk(hidden, weight, *served, target_ids=batch["target_ids"], **options),
        **ELEMENTWISE[torch.float32],
    )


@pytest.mark.parametrize("bad_id", [IGNORE_INDEX, V])
def test_out_of_range_ids_at_unmasked_positions_are_still_refused(bad_id):
    batch = _batch()
    target_ids = batch["target_ids"].clone()
    target_ids[1, 2] = bad_id  # unmasked
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V=40\) at unmasked positions"):
        _call_sdpo_loss({**batch, "target_ids": target_ids})
