"""One benchmark, timed and measured: what every bench test calls (``conftest.py`` holds only pytest hooks).

``run_case`` times one forward(+backward) with ``benchmark.pedantic`` (gradients reset untimed between
rounds, CUDA synchronised inside the timed function, warm-up rounds absorb Triton's JIT), then measures its
peak memory in a separate, untimed call (CUDA: in-process; CPU: a fresh subprocess, see memprobe.py) and
appends a record (a flat dict) to the session's records, from which the report computes the ratios.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from bench import memprobe, report
from bench.contenders import CONTENDERS, case_for, make_inputs, naive_memory_estimate
from bench.shapes import PROFILES, Case, Profile

RECORDS_KEY = pytest.StashKey[list]()
OUT_DIR_KEY = pytest.StashKey["Path | None"]()


def bench_profile(config: pytest.Config) -> Profile:
    name = config.getoption("--bench-profile") or ("gpu" if torch.cuda.is_available() else "cpu")
    return PROFILES[name]


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def session_records(config: pytest.Config) -> list[dict]:
    return config.stash[RECORDS_KEY]


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: ``MemAvailable``), or None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def base_record(test: str, contender: str, case: Case) -> dict:
    return {
        "test": test,
        "contender": contender,
        "case": case.id,
        "shape": case.shape.name,
        "n": case.shape.n,
        "h": case.shape.h,
        "v": case.shape.v,
        "topk": case.topk,
        "dtype": case.dtype,
        "mode": case.mode,
        "with_is": case.with_is,
        "note": CONTENDERS[contender].note if contender in CONTENDERS else "",
    }


def run_case(config: pytest.Config, benchmark, test: str, contender_name: str, case: Case) -> dict:
    """Time ``contender_name`` on ``case``, then measure its extra memory; record and return the result."""
    profile = bench_profile(config)
    device = bench_device()
    contender = CONTENDERS[contender_name]
    if not contender.applies_to(case):
        pytest.skip(f"{contender_name} is a full-vocabulary op (no top-K)")
    case = case_for(contender_name, case)
    entry = base_record(test, contender_name, case)
    records = session_records(config)

    def skip(status: str, reason: str):
        entry.update(status=status, reason=reason)
        records.append(entry)
        pytest.skip(reason)

    if reason := contender.unsupported(case, device):
        skip("skipped", reason)
    available = available_bytes(device)
    needed = naive_memory_estimate(case)
    if contender_name == "naive" and available is not None and needed > 0.9 * available:
        skip("skipped", f"needs ~{report.format_bytes(needed)}, {report.format_bytes(available)} free")

    inputs = make_inputs(case, device)
    step = contender.step(inputs, case)
    if device.type == "cuda":

        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step

    benchmark.group = f"{test}: {case.shape.id} {case.dtype} {case.mode}"
    benchmark.extra_info.update(entry)
    try:
        benchmark.pedantic(
            timed, setup=inputs.reset_grads, rounds=profile.rounds, warmup_rounds=profile.warmup_rounds, iterations=1
        )
    except torch.cuda.OutOfMemoryError:
        del inputs, step
        gc.collect()
        torch.cuda.empty_cache()
        skip("oom", "out of memory")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        # The fastest round is the ratio's statistic: other processes on a shared machine only ever add time.
        entry.update(time_s=stats.stats.min, time_median_s=stats.stats.median, rounds=stats.stats.rounds)

    if not config.getoption("--bench-no-memory"):
        grad_bytes = inputs.grad_bytes() if case.mode == "fwd+bwd" else 0
        if device.type == "cuda":
            try:
                memory = memprobe.measure_cuda_step(step, inputs, grad_bytes)
            except torch.cuda.OutOfMemoryError:
                memory = {}
        elif not profile.memory_in_subprocess:
            memory = memprobe.measure_cpu_step(step, inputs, grad_bytes)
        else:
            del inputs, step  # the subprocess builds its own copy of the inputs
            gc.collect()
            memory = memprobe.measure(contender_name, case, device)
        for key in ("extra_bytes", "peak_minus_baseline", "grad_bytes", "peak_reset_exact"):
            if key in memory:
                entry[key] = memory[key]
                benchmark.extra_info[key] = memory[key]
    entry["status"] = "ok"
    records.append(entry)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return entry
