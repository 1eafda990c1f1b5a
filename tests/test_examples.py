"""The plain-PyTorch example trains: run it as a user would, for two steps, and read its JSON summary."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
