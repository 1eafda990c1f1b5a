"""The TRL adapter under DDP (2 CPU processes, gloo) equals the same training in one process.

``tests/scripts/trl_adapter_train.py`` trains two steps with greedy generation and prompt-determined
rewards, so the data, the completions and the rewards do not depend on how the work is split. With the
global batch fixed, TRL's per-sequence mean in each process, averaged by DDP's gradient all-reduce,
equals the one-process mean: same logged losses, same weights (the second step reuses the rollout, so
the importance weights and the first step's synchronised update both enter it). Without the gradient
sync (the loss computed outside the DDP wrapper's forward) the second step's loss differs by ~10%.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import TRAINER_LOG, TRAINER_WEIGHT_UPDATE

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from adapters_tiny import make_model, make_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "trl_adapter_train.py"
# Same reasoning as tests/test_trl_adapter.py: fp32 reduction-order noise only.
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


def _run(command: list[str], out: Path) -> None:
    out.mkdir()
    # One thread per process: two processes on a small CI machine would otherwise oversubscribe it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    script_args = [str(SCRIPT), "--model-dir", str(model_dir), "--global-batch", "8"]

    _run([sys.executable, *script_args, "--out", str(tmp_path / "one")], tmp_path / "one")
    # `accelerate launch --cpu` takes accelerate's simple launcher, which starts a single process unless
    # mpirun is installed; the torch-elastic launcher (`--multi_gpu`) starts two, and the script's
    # `use_cpu=True` makes accelerate run them as MULTI_CPU on gloo.
    launch = [
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
    _run([*launch, *script_args, "--out", str(tmp_path / "two")], tmp_path / "two")

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
                    **TRAINER_LOG,
                    msg=lambda message, key=key, step=step: f"step {step}, {key}: {message}",
                )
    # The reward function's feedback for the failing prompt reached the teacher across processes.
    assert train_logs[0]["self_distillation/feedback_used_fraction"] == 0.5
    initial = model.state_dict()
    for name, expected in one["weights"].items():
        torch.testing.assert_close(
            ranks[0]["weights"][name] - initial[name],
            expected - initial[name],
            **TRAINER_WEIGHT_UPDATE,
            msg=lambda message, name=name: f"update of {name}: {message}",
        )
        # DDP keeps the replicas bit-identical.
        torch.testing.assert_close(ranks[1]["weights"][name], ranks[0]["weights"][name], rtol=0, atol=0)
    assert max(float((one["weights"][name] - value).abs().max()) for name, value in initial.items()) > 1e-3
