"""The TRL adapter under DDP and FSDP2 (2 CPU processes, gloo): equal to one process, equal to each other, and
resumable with the EMA teacher intact.

``tests/scripts/trl_adapter_train.py`` trains two steps with greedy generation and prompt-determined
rewards, so the data, the completions and the rewards do not depend on how the work is split. With the
global batch fixed, TRL's per-sequence mean in each process, averaged by DDP's gradient all-reduce,
equals the one-process mean: same logged losses, same weights (the second step reuses the rollout, so
the importance weights and the first step's synchronised update both enter it). Without the gradient
sync (the loss computed outside the DDP wrapper's forward) the second step's loss differs by ~10%.

FSDP2 runs on CPU only through the script's ``--fsdp2``, which keeps the FSDP plugin accelerate's state drops
without a GPU (the narrowest patch that reaches accelerate's real FSDP2 path; see the script). There the student
and the teacher copy are DTensor shards and the LoRA EMA shadow is gathered from them (TRL's own callback fails
there: "aten.copy_.default got mixed torch.Tensor and DTensor"). Each run checkpoints at step 2 of 4 and is
resumed from it: the teacher the checkpoint holds is one consolidated file, written by the main process and read
by every rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import (
    DDP_VS_ONE_PROCESS_LOG,
    DDP_VS_ONE_PROCESS_WEIGHT_UPDATE,
    TRAINER_DTYPE,
    TRAINER_LOG,
    TRAINER_WEIGHT_UPDATE,
)

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from adapters_tiny import make_model, make_tokenizer, save_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sdpo_ops.adapters.trl_teacher import TEACHER_STATE_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "trl_adapter_train.py"
# float64 (the script trains in the saved model's dtype), so reduction order is the only difference: tolerances.py.
COMPARED_LOG_KEYS = (
    "loss",
    "grad_norm",
    "self_distillation/is_weight_mean",
    "self_distillation/topk_mass_mean",
    "self_distillation/feedback_used_fraction",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_args() -> list[str]:
    # `accelerate launch --cpu` takes accelerate's simple launcher, which starts a single process unless
    # mpirun is installed; the torch-elastic launcher (`--multi_gpu`) starts two, and the script's
    # `use_cpu=True` makes accelerate run them as MULTI_CPU on gloo.
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]


def _save_tiny_model(directory: Path):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), dtype=TRAINER_DTYPE)
    save_model(directory, tokenizer, model)
    return model


def _run(command: list[str], out: Path) -> None:
    out.mkdir()
    # One thread per process: two processes on a small CI machine would otherwise oversubscribe it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    model_dir = tmp_path / "model"
    model = _save_tiny_model(model_dir)
    script_args = [str(SCRIPT), "--model-dir", str(model_dir), "--global-batch", "8"]

    _run([sys.executable, *script_args, "--out", str(tmp_path / "one")], tmp_path / "one")
    _run([*_launch_args(), *script_args, "--out", str(tmp_path / "two")], tmp_path / "two")

    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / "two" / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert one["num_processes"] == 1 and all(rank["num_processes"] == 2 for rank in ranks)

    train_logs = [entry for entry in one["logs"] if "loss" in entry]
    assert len(train_logs) == 2
    for step, (expected, actual) in enumerate(
        zip(train_logs, [e for e in ranks[0]["logs"] if "loss" in e], strict=True)
    ):
        for key in COMPARED_LOG_KEYS:
            if key in expected:
                torch.testing.assert_close(
                    torch.tensor(float(actual[key]), dtype=torch.float64),
                    torch.tensor(float(expected[key]), dtype=torch.float64),
                    **DDP_VS_ONE_PROCESS_LOG,
                    msg=lambda message, key=key, step=step: f"step {step}, {key}: {message}",
                )
    # The reward function's feedback for the failing prompt reached the teacher across processes.
    assert train_logs[0]["self_distillation/feedback_used_fraction"] == 0.5
    initial = model.state_dict()
    for name, expected in one["weights"].items():
        torch.testing.assert_close(
            ranks[0]["weights"][name] - initial[name],
            expected - initial[name],
            **DDP_VS_ONE_PROCESS_WEIGHT_UPDATE,
            msg=lambda message, name=name: f"update of {name}: {message}",
        )
        # DDP keeps the replicas bit-identical.
        torch.testing.assert_close(ranks[1]["weights"][name], ranks[0]["weights"][name], rtol=0, atol=0)
    assert max(float((one["weights"][name] - value).abs().max()) for name, value in initial.items()) > 1e-3


def _assert_close_logs(actual_logs, expected_logs, **tolerance):
    actual = [entry for entry in actual_logs if "loss" in entry]
    expected = [entry for entry in expected_logs if "loss" in entry]
    assert len(actual) == len(expected) > 0
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        for key in COMPARED_LOG_KEYS:
            if key in want:
                torch.testing.assert_close(
                    torch.tensor(float(got[key]), dtype=torch.float64),
                    torch.tensor(float(want[key]), dtype=torch.float64),
                    **tolerance,
                    msg=lambda message, key=key, step=step: f"step {step}, {key}: {message}",
                )


def _assert_equal_tensors(actual: dict, expected: dict, what: str, **tolerance):
    tolerance = tolerance or {"rtol": 0, "atol": 0}
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **tolerance, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Per (parallelism, teacher): a 4-step run checkpointing at step 2, and a run resumed from that checkpoint."""
    root = tmp_path_factory.mktemp("distributed")
    initial = _save_tiny_model(root / "model").state_dict()
    runs = {}
    for parallelism, teacher in (("ddp", "ema_copy"), ("fsdp2", "ema_copy"), ("ddp", "lora"), ("fsdp2", "lora")):
        name = f"{parallelism}_{teacher}"
        options = ["--max-steps", "4", "--save-steps", "2"]
        options += ["--fsdp2"] if parallelism == "fsdp2" else []
        options += ["--lora"] if teacher == "lora" else []
        script = [str(SCRIPT), "--model-dir", str(root / "model"), "--global-batch", "8", *options]
        _run([*_launch_args(), *script, "--then-resume-from-step", "2", "--out", str(root / name)], root / name)
        runs[name] = {
            "full": [torch.load(root / name / f"rank{r}.pt", weights_only=False) for r in (0, 1)],
            "resumed": [torch.load(root / name / f"rank{r}_resumed.pt", weights_only=False) for r in (0, 1)],
            "teacher_file": load_file(root / name / "trainer" / "checkpoint-2" / TEACHER_STATE_FILE),
        }
    runs["initial"] = initial
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["ema_copy", "lora"])
def test_fsdp2_equals_ddp(teacher, distributed_runs):
    ddp, fsdp2 = distributed_runs[f"ddp_{teacher}"]["full"], distributed_runs[f"fsdp2_{teacher}"]["full"]
    assert "FSDP" in fsdp2[0]["distributed_type"] and "MULTI_CPU" in ddp[0]["distributed_type"]
    _assert_close_logs(fsdp2[0]["logs"], ddp[0]["logs"], **TRAINER_LOG)
    initial = distributed_runs["initial"]
    for what in ("weights", "teacher"):
        expected, actual = ddp[0][what], fsdp2[0][what]
        reference = {name: initial.get(name, torch.zeros_like(value)) for name, value in expected.items()}
        updates = {name: actual[name] - reference[name] for name in expected}
        expected_updates = {name: expected[name] - reference[name] for name in expected}
        _assert_equal_tensors(updates, expected_updates, f"FSDP2 vs DDP, {what} update", **TRAINER_WEIGHT_UPDATE)
        # Both ranks hold the same whole model (gathered from the shards).
        _assert_equal_tensors(fsdp2[1][what], actual, f"FSDP2 rank 1 vs rank 0, {what}")
    moved = max(float((ddp[0]["teacher"][n] - reference[n]).abs().max()) for n in ddp[0]["teacher"])
    assert moved > 1e-3, "the EMA teacher barely moved: the comparison would not see a wrong EMA"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ddp_ema_copy", "fsdp2_ema_copy", "fsdp2_lora"])
def test_distributed_resume_keeps_the_teacher(case, distributed_runs):
    """Every rank resumes with the checkpoint's teacher (one consolidated file) and ends as the uninterrupted run."""
    run = distributed_runs[case]
    full, resumed = run["full"], run["resumed"]
    saved = full[0]["teacher_at_save"][2]
    teacher_file = run["teacher_file"]
    if case.endswith("lora"):
        # The file holds the EMA shadow under PEFT's adapter-free keys; the model's "teacher" adapter holds it too.
        assert len(teacher_file) == len(saved) and all(torch.count_nonzero(v) > 0 for v in teacher_file.values())
    else:
        _assert_equal_tensors(teacher_file, saved, "the consolidated teacher file vs the teacher at save")
    for rank in (0, 1):
        _assert_equal_tensors(resumed[rank]["teacher_at_first_step"], saved, f"rank {rank}: teacher after resume")
        _assert_equal_tensors(resumed[rank]["teacher"], full[rank]["teacher"], f"rank {rank}: final teacher")
        _assert_equal_tensors(resumed[rank]["weights"], full[rank]["weights"], f"rank {rank}: final student")
    initial_teacher = full[0]["teacher_at_first_step"]
    assert any(not torch.equal(saved[n], initial_teacher[n]) for n in saved), "the saved teacher is the initial one"
    _assert_close_logs(resumed[0]["logs"], full[0]["logs"], rtol=0, atol=0)
