"""One SDPO training step, TRL's ``SDPOTrainer`` vs ours (``sdpo_ops.adapters.trl.SDPOTrainer``), on CPU.

Same tiny model, same batch (built once by TRL's trainer), ``distillation_mode="topk_logits"``, K=100, tail,
alpha 0.5, IS on; see e2e.py. Before timing ours, its loss is checked against TRL's on that batch, so the
two rows of the table are the same objective. A shared CPU changes speed between seconds (other processes),
so besides each trainer's own rounds the ratio is also measured with the two steps interleaved.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import e2e, memprobe
from bench.harness import RECORDS_KEY, bench_profile


@pytest.fixture(scope="module")
def e2e_setup(request, tmp_path_factory):
    if not bench_profile(request.config).e2e:
        pytest.skip("the end-to-end step is not part of this profile")
    workdir = tmp_path_factory.mktemp("e2e")
    e2e.build_model_dir(workdir / "model")
    trl_trainer = e2e.make_trainer("trl", workdir / "model", workdir / "out-trl")
    batch = e2e.prepare_batch(trl_trainer)
    torch.save(batch, workdir / "batch.pt")
    return {"workdir": workdir, "batch": batch, "trainers": {"trl": trl_trainer}}


def _trainer(setup: dict, kind: str):
    if kind not in setup["trainers"]:
        setup["trainers"][kind] = e2e.make_trainer(kind, setup["workdir"] / "model", setup["workdir"] / f"out-{kind}")
    return setup["trainers"][kind]


def _memory(request, setup: dict, kind: str, step) -> dict:
    if request.config.getoption("--bench-no-memory"):
        return {}
    if not bench_profile(request.config).memory_in_subprocess:
        return memprobe.measure_cpu_step(step, _NoInputs(), 0)
    env = dict(os.environ, PYTHONPATH=str(memprobe.REPO_ROOT))
    spec = json.dumps({"trainer": kind, "workdir": str(setup["workdir"])})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e", spec], cwd=memprobe.REPO_ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"e2e memory probe failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _interleaved_best(steps: dict, rounds: int) -> dict[str, float]:
    """Fastest time of each step over ``rounds`` rounds that run every step once, in turn."""
    best = dict.fromkeys(steps, math.inf)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class _NoInputs:
    """The trainer's step resets its own gradients."""

    def reset_grads(self) -> None:
        pass


@pytest.mark.parametrize("kind", list(e2e.TRAINERS))
def test_e2e_step(request, benchmark, e2e_setup, kind):
    profile = bench_profile(request.config)
    batch = e2e_setup["batch"]
    entry = {
        "test": "e2e",
        "contender": e2e.TRAINERS[kind],
        "case": "tiny-qwen2",
        "shape": "tiny-qwen2",
        "n": e2e.batch_tokens(batch),
        "h": e2e.HIDDEN_SIZE,
        "v": e2e.VOCAB_SIZE,
        "topk": e2e.TOPK,
        "dtype": "float32",
        "mode": "fwd+bwd",
        "batch": f"{tuple(batch['completion_ids'].shape)} completion tokens",
        "note": "",
    }
    records = request.config.stash[RECORDS_KEY]
    if kind == "sdpo_ops" and (reason := e2e.adapter_missing()):
        records.append({**entry, "status": "skipped", "reason": reason})
        pytest.skip(reason)

    trainer = _trainer(e2e_setup, kind)
    step = e2e.loss_step(trainer, batch)
    loss = step()
    if kind != "trl":
        expected = e2e.loss_step(e2e_setup["trainers"]["trl"], batch)()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    entry["loss"] = float(loss.detach())

    benchmark.group = "e2e: one SDPO step (loss fwd+bwd)"
    benchmark.extra_info.update(entry)
    # At least 5 rounds: the step is short and a shared CPU is noisy.
    benchmark.pedantic(step, rounds=max(5, profile.rounds), warmup_rounds=1, iterations=1)
    if getattr(benchmark, "stats", None) is not None:
        entry.update(time_s=benchmark.stats.stats.min, time_median_s=benchmark.stats.stats.median)
    if kind != "trl":
        trl_step = e2e.loss_step(e2e_setup["trainers"]["trl"], batch)
        best = _interleaved_best({"trl": trl_step, kind: step}, rounds=max(5, profile.rounds))
        entry.update(
            interleaved_min_s=best[kind],
            trl_interleaved_min_s=best["trl"],
            time_vs_trl_interleaved=best[kind] / best["trl"],
        )
    memory = _memory(request, e2e_setup, kind, step)
    if "extra_bytes" in memory:
        entry["extra_bytes"] = memory["extra_bytes"]
        benchmark.extra_info["extra_bytes"] = memory["extra_bytes"]
    entry["status"] = "ok"
    records.append(entry)
