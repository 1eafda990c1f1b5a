"""EMA teacher: TRL's SyncRefModelCallback as the oracle of the copy update, hand-computed EMA for LoRA shadows."""

import copy
import doctest

import pytest
import torch
from adapters_tiny import make_model

import sdpo_ops.adapters.teacher as teacher_module
from sdpo_ops.adapters import EMATeacher


def _perturb(model, scale=0.1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _input_ids():
    return torch.tensor([[5, 9, 13, 20, 31, 7], [40, 41, 42, 43, 44, 45]])


def test_copy_is_frozen_and_separate():
    student = make_model(64)
    student.train()
    teacher = EMATeacher(student)
    assert teacher.mode == "copy" and teacher.model is not student
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (name, t), (_, s) in zip(teacher.model.named_parameters(), student.named_parameters(), strict=True):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr(), name


@pytest.mark.parametrize("rate", [0.05, 0.01, 0.5, 1.0])
def test_copy_update_matches_trl_sync(rate):
    from trl.trainer.callbacks import SyncRefModelCallback

    student = make_model(64)
    teacher = EMATeacher(student, update_rate=rate)
    expected = copy.deepcopy(teacher.model)
    for step in range(3):
        _perturb(student, seed=step)
        assert teacher.update(student)
        SyncRefModelCallback._sync_target_model(student, expected, rate)
    for (name, got), (_, want) in zip(teacher.model.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_rate_zero_is_the_frozen_initial_student():
    student = make_model(64)
    initial = copy.deepcopy(student)
    teacher = EMATeacher(student, update_rate=0.0)
    _perturb(student)
    assert teacher.update(student)
    for got, want in zip(teacher.model.parameters(), initial.parameters(), strict=True):
        assert torch.equal(got, want)


def test_update_every():
    student = make_model(64)
    teacher = EMATeacher(student, update_rate=1.0, update_every=3)
    applied = []
    for step in range(6):
        _perturb(student, seed=step)
        applied.append(teacher.update(student))
        same = all(torch.equal(t, s) for t, s in zip(teacher.model.parameters(), student.parameters(), strict=True))
        assert same == applied[-1]
    assert applied == [False, False, True, False, False, True]
    assert teacher.num_updates == 2 and teacher.num_events == 6


@pytest.mark.parametrize(("sync_on", "expected_updates"), [("optimizer_step", 6), ("generation_batch", 2)])
def test_schedules(sync_on, expected_updates):
    """Two generation batches of three optimizer steps: TRL averages 6 times, the official code twice."""
    student = make_model(64)
    rate = 0.1
    teacher = EMATeacher(student, update_rate=rate, sync_on=sync_on)
    weight = student.model.embed_tokens.weight
    expected = weight.detach().clone()
    for batch in range(2):
        for step in range(3):
            with torch.no_grad():
                weight.add_(float(batch * 3 + step + 1))
            if teacher.on_optimizer_step(student):
                expected = (1 - rate) * expected + rate * weight.detach()
        if teacher.on_generation_batch_end(student):
            expected = (1 - rate) * expected + rate * weight.detach()
    assert teacher.num_updates == expected_updates
    torch.testing.assert_close(teacher.model.model.embed_tokens.weight, expected)


def test_buffers_follow_the_student():
    student = torch.nn.BatchNorm1d(3)
    teacher = EMATeacher(student, update_rate=0.5)
    with torch.no_grad():
        student.running_mean.fill_(2.0)
    teacher.update(student)
    assert torch.equal(teacher.model.running_mean, torch.full((3,), 2.0))


def test_call_runs_without_gradient():
    student = make_model(64)
    teacher = EMATeacher(student)
    logits = teacher(input_ids=_input_ids()).logits
    assert logits.grad_fn is None and not logits.requires_grad
    torch.testing.assert_close(logits, student(input_ids=_input_ids()).logits.detach())


def test_state_dict_round_trip():
    student = make_model(64)
    teacher = EMATeacher(student, update_rate=0.3)
    _perturb(student)
    teacher.update(student)
    state = teacher.state_dict()
    other = EMATeacher(make_model(64, seed=5), update_rate=0.3)
    other.load_state_dict(state)
    assert other.num_updates == 1
    for got, want in zip(other.model.parameters(), teacher.model.parameters(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_rate": 1.5}, "update_rate"),
        ({"update_every": 0}, "update_every"),
        ({"sync_on": "epoch"}, "sync_on"),
        ({"mode": "clone"}, "mode"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMATeacher(torch.nn.Linear(2, 2), **kwargs)


def test_shadow_needs_trainable_parameters():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        EMATeacher(frozen, mode="shadow")


# ----------------------------------------------------------------------------- PEFT (LoRA)


def _lora_student(seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_model(64, seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    # LoRA's B starts at zero (adapter = identity); give it a value so the adapter matters.
    _perturb(model, scale=0.5, seed=11)
    return model


def _lora_params(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _model_with_adapter_values(model, values):
    """Independent oracle: a deep copy of the PEFT model with its LoRA weights overwritten."""
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if name in values:
                param.copy_(values[name])
    return clone


def test_lora_shadow_tracks_adapter_only():
    student = _lora_student()
    teacher = EMATeacher(student, update_rate=0.2)
    assert teacher.mode == "shadow" and teacher.model is student
    lora = _lora_params(student)
    assert set(teacher.shadow) == set(lora) and all("lora_" in name for name in lora)
    initial = {name: p.detach().clone() for name, p in lora.items()}
    _perturb(student, scale=0.3, seed=3)
    after_one = {name: p.detach().clone() for name, p in lora.items()}
    teacher.update(student)
    _perturb(student, scale=0.3, seed=4)
    teacher.update(student)
    for name, shadow in teacher.shadow.items():
        expected = 0.8 * (0.8 * initial[name] + 0.2 * after_one[name]) + 0.2 * lora[name].detach()
        torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_lora_teacher_forward_uses_the_shadow_and_restores_the_student():
    student = _lora_student()
    student.train()
    teacher = EMATeacher(student, update_rate=0.5)
    _perturb(student, scale=0.5, seed=7)
    teacher.update(student)
    originals = {name: p for name, p in student.named_parameters()}
    grad_flags = {name: p.requires_grad for name, p in originals.items()}
    expected = _model_with_adapter_values(student, teacher.shadow)(input_ids=_input_ids()).logits
    got = teacher(input_ids=_input_ids()).logits
    torch.testing.assert_close(got, expected)
    assert got.grad_fn is None
    # The student is itself again: same parameter objects, flags, and training mode.
    assert all(p is originals[name] for name, p in student.named_parameters())
    assert {name: p.requires_grad for name, p in student.named_parameters()} == grad_flags
    assert all(module.training for module in student.modules())
    student.eval()
    student_logits = student(input_ids=_input_ids()).logits
    assert not torch.allclose(student_logits, got)
    torch.testing.assert_close(
        student_logits, _model_with_adapter_values(student, _lora_params(student))(input_ids=_input_ids()).logits
    )


def test_lora_teacher_forward_between_student_forward_and_backward():
    """The swap must not corrupt a student graph built before it (no in-place writes to student tensors)."""
    student = _lora_student()
    teacher = EMATeacher(student, update_rate=0.5)
    _perturb(student, scale=0.5, seed=8)
    teacher.update(student)

    def student_grads(with_teacher_in_between):
        student.zero_grad()
        loss = student(input_ids=_input_ids()).logits.square().mean()
        if with_teacher_in_between:
            teacher(input_ids=_input_ids())
        loss.backward()
        return {name: p.grad.clone() for name, p in _lora_params(student).items()}

    reference = student_grads(False)
    interleaved = student_grads(True)
    for name in reference:
        torch.testing.assert_close(interleaved[name], reference[name], rtol=0, atol=0, msg=name)


def test_lora_rate_zero_keeps_the_initial_adapter():
    student = _lora_student()
    initial = {name: p.detach().clone() for name, p in _lora_params(student).items()}
    teacher = EMATeacher(student, update_rate=0.0)
    _perturb(student, seed=9)
    teacher.update(student)
    for name, shadow in teacher.shadow.items():
        assert torch.equal(shadow, initial[name])


def test_lora_state_dict_round_trip():
    student = _lora_student()
    teacher = EMATeacher(student, update_rate=0.5)
    _perturb(student, seed=10)
    teacher.update(student)
    state = teacher.state_dict()
    fresh = EMATeacher(_lora_student(), update_rate=0.5)
    fresh.load_state_dict(state)
    for name, shadow in fresh.shadow.items():
        assert torch.equal(shadow, teacher.shadow[name])


def test_docstring_examples():
    assert doctest.testmod(teacher_module).failed == 0
