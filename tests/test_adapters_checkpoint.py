"""``save_checkpoint``/``load_checkpoint``: a resumed loop equals the uninterrupted one; a killed save loses nothing.

The oracle is the loop run without interruption: 4 steps in one go against 2 steps, a checkpoint, fresh objects
(as a new process builds them), a restore and 2 more steps. The loop draws from Python's, torch's and NumPy's
generators and averages an EMA teacher (full copy, and the shadow of the trainable weights), so a missing piece
of state (RNG, optimizer moments, teacher, its counters) shows as a difference.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sdpo_ops.adapters import EMATeacher, load_checkpoint, save_checkpoint

SCRIPT = Path(__file__).resolve().parent / "scripts" / "save_checkpoint_then_hang.py"
REPO = Path(__file__).resolve().parents[1]


def _build(mode: str):
    """A fresh student, teacher and optimizer, as a new process would build them."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    if mode == "shadow":
        student[0].requires_grad_(False)  # a frozen base, like a LoRA student's
    teacher = EMATeacher(student, update_rate=0.3, update_every=2, mode=mode)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=0.05)
    return student, teacher, optimizer


def _step(student, teacher, optimizer) -> float:
    inputs = torch.randn(5, 4) + random.random() + float(np.random.rand())
    with teacher.forward_context() as teacher_model:
        target = teacher_model(inputs).softmax(-1)
    loss = -(target * student(inputs).log_softmax(-1)).sum(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    teacher.on_optimizer_step(student)
    return loss.item()


def _seed_everything():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)


def _state(student, teacher, optimizer):
    return {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict()}


@pytest.mark.parametrize("mode", ["copy", "shadow"])
def test_resumed_loop_equals_uninterrupted(mode, tmp_path):
    student, teacher, optimizer = _build(mode)
    _seed_everything()
    losses = [_step(student, teacher, optimizer) for _ in range(4)]
    expected = _state(student, teacher, optimizer)

    student, teacher, optimizer = _build(mode)
    _seed_everything()
    first_losses = [_step(student, teacher, optimizer) for _ in range(2)]
    save_checkpoint(tmp_path / "ckpt.pt", model=student, teacher=teacher, optimizer=optimizer, step=2, extra={"a": 1})
    _ = [random.random(), np.random.rand(), torch.randn(3)]  # the generators move on after the save

    student, teacher, optimizer = _build(mode)
    restored = load_checkpoint(tmp_path / "ckpt.pt", model=student, teacher=teacher, optimizer=optimizer)
    assert restored.step == 2 and restored.extra == {"a": 1}
    resumed_losses = [_step(student, teacher, optimizer) for _ in range(2)]

    assert first_losses + resumed_losses == losses
    torch.testing.assert_close(_state(student, teacher, optimizer), expected, rtol=0, atol=0)
    # The teacher did average (update_every=2: once in each half) and was restored, not rebuilt.
    assert teacher.num_updates == 2


def test_load_refuses_missing_parts_and_foreign_files(tmp_path):
    student, teacher, optimizer = _build("copy")
    save_checkpoint(tmp_path / "ckpt.pt", model=student, step=0)
    with pytest.raises(ValueError, match="no teacher state"):
        load_checkpoint(tmp_path / "ckpt.pt", model=student, teacher=teacher)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an sdpo_ops checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model=student)


def test_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL while the second save is being written: the first checkpoint still loads, whole."""
    path = tmp_path / "ckpt.pt"
    writing = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, str(SCRIPT), str(path), str(writing)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not writing.exists():
            assert child.poll() is None, f"the child exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the child never reached the second save"
            time.sleep(0.05)
        # The second save is under way (its state is being serialised): kill it there.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    student = nn.Linear(3, 2)
    restored = load_checkpoint(path, model=student)
    assert restored.step == 1
    torch.testing.assert_close(student.weight, torch.full((2, 3), 1.0), rtol=0, atol=0)
