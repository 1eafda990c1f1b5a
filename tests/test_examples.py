"""The plain-PyTorch example trains: run it as a user would, for two steps, and read its JSON summary."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The examples import this checkout's sdpo_ops, not whichever copy the interpreter has installed.
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.slow
def test_train_plain_pytorch_two_steps(tmp_path):
    output = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_plain_pytorch.py"),
            "--steps",
            "2",
            "--sync-on",
            "optimizer_step",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(output.read_text())
    assert len(summary["losses"]) == 2
    assert all(math.isfinite(loss) and loss >= 0 for loss in summary["losses"])
    # The printed per-step losses are the ones in the summary.
    printed = [line for line in completed.stdout.splitlines() if line.startswith("step ")]
    assert len(printed) == 2
    for line, loss in zip(printed, summary["losses"], strict=True):
        assert float(line.split("loss ")[1].split()[0]) == pytest.approx(loss, abs=1e-6)
    # The optimizer moved the student, and the EMA teacher followed it after each optimizer step.
    assert summary["student_change"] > 0
    assert summary["teacher_change"] > 0


def _run_example_in_process(monkeypatch, capsys, *arguments: str) -> str:
    """The example's ``main`` as ``python examples/train_plain_pytorch.py ARGS`` runs it, minus the interpreter
    start-up (seconds on a busy CI machine); returns what it printed."""
    monkeypatch.setattr(sys, "argv", ["train_plain_pytorch.py", *arguments])
    runpy.run_path(str(EXAMPLES / "train_plain_pytorch.py"), run_name="__main__")
    return capsys.readouterr().out


def test_train_plain_pytorch_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    """4 steps in one go == 2 steps, stop, ``--resume`` to 4: same losses, same student and teacher movement."""
    common = ["--prompts-per-step", "2", "--group-size", "4", "--sync-on", "optimizer_step"]
    _run_example_in_process(
        monkeypatch, capsys, *common, "--steps", "4", "--output", str(tmp_path / "uninterrupted.json")
    )
    checkpoint = tmp_path / "run" / "ckpt.pt"
    _run_example_in_process(monkeypatch, capsys, *common, "--steps", "2", "--checkpoint", str(checkpoint))
    printed = _run_example_in_process(
        monkeypatch,
        capsys,
        *common,
        "--steps",
        "4",
        "--checkpoint",
        str(checkpoint),
        "--resume",
        "--output",
        str(tmp_path / "resumed.json"),
    )
    assert "resumed from" in printed
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("step ")] == ["step 3", "step 4"]

    expected = json.loads((tmp_path / "uninterrupted.json").read_text())
    actual = json.loads((tmp_path / "resumed.json").read_text())
    assert len(expected["losses"]) == 4 and any(loss > 0 for loss in expected["losses"][2:])
    for key in ("losses", "mean_rewards", "student_change", "teacher_change"):
        assert actual[key] == expected[key], key
