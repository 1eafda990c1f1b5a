"""Peak memory of one contender on one case: in-process on CUDA, in a fresh subprocess on CPU.

CPU: the child builds the inputs, runs a tiny warm-up (lazy imports, thread pools), returns freed heap to
the OS, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``: ``5``), reads the RSS (the
baseline, inputs included), runs the step and reads the peak (``VmHWM``). A child's ``ru_maxrss`` is not
used: after ``fork``+``exec`` it may carry the parent's high-water mark. The peak-RSS reset is exact on
Linux >= 4.0; elsewhere the child falls back to ``ru_maxrss``, which also counts import-time peaks.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before
the step (the inputs).

"Extra" memory (KERNELS.md): peak minus the baseline minus the gradients the step returns (dH, dW).

Run as ``python -m bench.memprobe '<json>'`` with ``{"contender", "case", "seed", "calls"}``; prints one
JSON line ``{"extra_bytes", "peak_minus_baseline", "grad_bytes", "baseline_bytes", "times_s", ...}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:  # no procfs: the best available stand-in
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so that they do not hide in the baseline."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _memory_record(baseline: int, peak: int, grad_bytes: int, exact: bool, seconds: float) -> dict:
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_minus_baseline": max(0, peak - baseline),
        "grad_bytes": grad_bytes,
        "extra_bytes": max(0, peak - baseline - grad_bytes),
        "peak_reset_exact": exact,
        "time_s": seconds,
    }


def measure_cpu_step(step, inputs, grad_bytes: int) -> dict:
    """One call of ``step`` on CPU, its peak RSS beyond the RSS before it (inputs included)."""
    inputs.reset_grads()
    _trim_heap()
    exact = _reset_peak_rss()
    baseline = _rss_bytes()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return _memory_record(baseline, _peak_rss_bytes(), grad_bytes, exact, seconds)


def measure_cuda_step(step, inputs, grad_bytes: int) -> dict:
    """One untimed-for-the-benchmark call of ``step`` on CUDA, its peak allocation beyond the inputs."""
    import torch

    inputs.reset_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    record = _memory_record(baseline, torch.cuda.max_memory_allocated(), grad_bytes, True, seconds)
    inputs.reset_grads()
    return record


def probe(spec: dict) -> dict:
    """Measure ``spec["contender"]`` on ``spec["case"]`` in this process (a fresh one on CPU)."""
    import torch

    from bench.contenders import CONTENDERS, make_inputs
    from bench.shapes import Case

    contender = CONTENDERS[spec["contender"]]
    case = Case.from_dict(spec["case"])
    device = torch.device(spec.get("device", "cpu"))
    calls = int(spec.get("calls", 1))
    seed = int(spec.get("seed", 0))

    # Warm-up on a tiny copy of the case: first-call costs (imports, allocator and thread-pool setup).
    tiny = case.replace(shape=type(case.shape)(case.shape.name, 8, 8, max(64, (case.topk or 0) + 1)))
    tiny_inputs = make_inputs(tiny, device, seed)
    contender.step(tiny_inputs, tiny)()
    del tiny_inputs

    inputs = make_inputs(case, device, seed)
    step = contender.step(inputs, case)
    grad_bytes = inputs.grad_bytes() if case.mode == "fwd+bwd" else 0
    times = []
    result: dict = {"contender": contender.name, "case": case.id, "device": str(device)}
    for call in range(calls):
        if device.type == "cuda":
            measured = measure_cuda_step(step, inputs, grad_bytes)
        else:
            measured = measure_cpu_step(step, inputs, grad_bytes)
        times.append(measured.pop("time_s"))
        if call == 0:  # the first full-size call is the memory figure; later calls only add timings
            result.update(measured, input_bytes=inputs.input_bytes())
    result["times_s"] = times
    result["threads"] = torch.get_num_threads()
    return result


def measure_in_subprocess(spec: dict, timeout: float = 1800.0, module: str = "bench.memprobe") -> dict:
    """Run ``probe(spec)`` in a fresh Python process (CPU peak RSS) and return its result; ``module``: another
    probe with the same command line (``python -m <module> '<json>'`` printing one JSON line last)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({proc.returncode}) for {spec}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(contender: str, case, device, seed: int = 0) -> dict:
    """Peak memory of one fwd(+bwd): in-process on CUDA, in a subprocess on CPU."""
    spec = {"contender": contender, "case": case.to_dict(), "seed": seed, "calls": 1, "device": str(device)}
    if str(device).startswith("cuda"):
        return probe(spec)
    return measure_in_subprocess(spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(probe(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
