"""The served-teacher example trains: run it as a user would, for two small steps, and read its JSON summary."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_distill_from_served_teacher_two_steps(tmp_path):
    output = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "examples" / "distill_from_served_teacher.py"), "--steps", "2", "--batch",
               "4", "--max-new-tokens", "6", "--output", str(output)]  # fmt: skip
    # this checkout's sdpo_ops, whichever one the interpreter has installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(output.read_text())
    assert len(summary["losses"]) == 2
    assert all(math.isfinite(loss) and loss >= 0 for loss in summary["losses"])
    assert all(0 < mass <= 1 for mass in summary["topk_mass"])
    printed = [line for line in completed.stdout.splitlines() if line.startswith("step ")]
    for line, loss in zip(printed, summary["losses"], strict=True):
        assert float(line.split("loss ")[1].split()[0]) == pytest.approx(loss, abs=1e-6)
    # at a real vocabulary the materialised student logits dwarf the fused loss's chunk buffer
    at_scale = summary["memory_mib"]["at_scale"]
    assert at_scale["reference"] > 4 * at_scale["torch"] > 0
    assert "saves" in completed.stdout
