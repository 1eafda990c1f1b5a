"""The plain-PyTorch example trains: run it as a user would, for two steps, and read its JSON summary."""

import json
import math
import os
import re
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


README = REPO / "README.md"
README_MODEL_LINE = 'model = "HuggingFaceTB/SmolLM2-135M-Instruct"'
README_OUTPUT_LINE = 'output_dir="sdpo-out",'
README_TOPK = "distillation_topk=100"  # the tiny model's vocabulary has 84 tokens


def _readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    matching = [block for block in blocks if containing in block]
    assert len(matching) == 1, f"README.md should have one python block with {containing!r}"
    return matching[0]


def test_readme_trl_example_runs(tmp_path):
    """The README's TRL block as written, on a tiny local model for one CPU step instead of SmolLM2 on a GPU.

    Its dataset is in chat format, so the reward function receives message lists: the block's reward must
    handle them (and plain strings, checked directly)."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from adapters_tiny import make_model, make_tokenizer, save_model

    code = _readme_block("SDPOTrainer(model=model")
    assert all(line in code for line in (README_MODEL_LINE, README_OUTPUT_LINE, README_TOPK)), "update this test"
    tokenizer = make_tokenizer()
    model_dir = save_model(tmp_path / "tiny", tokenizer, make_model(len(tokenizer)))
    code = code.replace(README_MODEL_LINE, f"model = {model_dir!r}")
    cpu_step = f'output_dir={str(tmp_path / "out")!r}, use_cpu=True, bf16=False, report_to="none", max_steps=1,'
    code = code.replace(README_OUTPUT_LINE, cpu_step).replace(README_TOPK, "distillation_topk=20")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is this repository's own file
    assert namespace["trainer"].state.global_step == 1

    result = namespace["reward"](["7 + 8 = 15", [{"role": "assistant", "content": "It is 6"}]], answer=["15", "7"])
    assert result.scores == [1.0, 0.0]
    assert result.feedback[0] is None and "7" in result.feedback[1]
