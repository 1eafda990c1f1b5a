"""``make gpu-smoke``: everything a first GPU run must show, in at most 8 minutes on an H100 (issue 17).

Each step runs in its own subprocess under a hard timeout (the budget holds by construction: a step that overruns
is killed, reported, and the next one runs). Expected times on an H100 (estimates until measured; compile time of
the Triton kernels included where they first run):

1. ``probe``        fp32-output ``addmm`` from bf16/fp16 operands on CUDA: ``beta=0`` into a NaN-filled
                    accumulator, then ``beta=1``, against an fp32 reference (items 1, 3)      ~10 s   (cap  45 s)
2. ``pytest``       ``pytest -m gpu`` (test_gpu)                                                  ~150 s  (cap 180 s)
3. ``stages``       ``bench.stages`` at 384 rows (V=151936, H=4096)                            ~30 s   (cap  60 s)
4. ``profile``      a ``torch.profiler`` table of one fwd+bwd at N=8192 (H=4096, V=151936, K=100, bf16) beside
                    ``bench.cost_model``'s steps                                               ~30 s   (cap  60 s)
5. ``targets``      ``bench.gpu_targets`` with 1 warm-up and 3 timed iterations               ~60 s   (cap  75 s)
6. ``gemm``         the GEMM microbenchmark behind ``CUDA_POLICY.chunk_bytes`` (logits GEMM at C rows) and
                    ``DevicePolicy.stage_rows`` (fp32 dW accumulation at R rows per pass, beta=1, and
                    the first pass's beta=0, priced as not reading the accumulator)           ~20 s   (cap  45 s)

Caps sum to 465 s; with interpreter start-up per step (~3 s each) under 8 minutes. Results go to
``bench/results/<gpu>/`` (``smoke.md`` plus each step's own files).

    python -m bench.gpu_smoke [--only probe,gemm] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("probe", "pytest", "stages", "profile", "targets", "gemm")
PYTEST_FILES = ("tests/test_gpu.py", "tests/test_kernel_launch.py")
CAPS_S = {"probe": 45, "pytest": 180, "stages": 60, "profile": 60, "targets": 75, "gemm": 45}


def _out_dir() -> Path:
    import torch

    name = torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "no-gpu"
    return Path("bench/results") / name


def probe(out: Path) -> str:
    """The fp32-output GEMM the multi-pass dW uses, on CUDA, from bf16 and fp16 operands."""
    import torch

    from sdpo_ops.device_policy import mm_into_fp32

    lines = ["| operands | max abs error vs fp32 | NaN left |", "|---|---:|---:|"]
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        a1, a2 = (torch.randn(4096, 1536, device="cuda", generator=generator).to(dtype) for _ in range(2))
        b1, b2 = (torch.randn(1536, 4096, device="cuda", generator=generator).to(dtype) for _ in range(2))
        accumulator = torch.full((4096, 4096), float("nan"), device="cuda")
        mm_into_fp32(accumulator, a1, b1, beta=0.0)
        mm_into_fp32(accumulator, a2, b2, beta=1.0)
        expected = a1.float() @ b1.float() + a2.float() @ b2.float()
        error = (accumulator - expected).abs().max().item()
        lines.append(f"| {dtype} | {error:.3e} | {int(accumulator.isnan().sum())} |")
        assert not accumulator.isnan().any() and error < 1e-2 * expected.abs().max().item(), lines[-1]
    return "\n".join(lines)


def profile(out: Path) -> str:
    """One fwd+bwd at the SPEC shape under torch.profiler, then the cost model's steps for the same call."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sdpo_ops import sdpo_loss

    n, h, v = 8192, 4096, 151936
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * h**-0.5 * 2.5).to(torch.bfloat16).requires_grad_()
    teacher_hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    teacher_weight = (torch.randn(v, h, device="cuda") * h**-0.5 * 2.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")

    def step():
        loss = sdpo_loss(hidden, weight, teacher_hidden, teacher_weight, target_ids=targets, topk=100)
        loss.backward()

    step()  # compile and warm up
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out / "profile_fwd_bwd_n8192.txt").write_text(table + "\n")
    from bench import cost_model

    cost_model.main(["--tokens", str(n), "--hidden", str(h), "--vocab", str(v), "--out", str(out)])
    return "```\n" + table + "\n```\n(cost model: cost_model.md beside it)"


def gemm(out: Path) -> str:
    """Time the two GEMMs whose shapes the CUDA policy sets, at the SPEC shape (H=4096, V=151936, bf16)."""
    import torch

    from sdpo_ops.device_policy import mm_into_fp32

    h, v = 4096, 151936
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16)

    def time_ms(fn, iters=5):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    lines = ["logits GEMM `[C, H] x [H, V]` into fp32 (chunk_bytes):", "", "| C | ms | TFLOP/s |", "|---:|---:|---:|"]
    for rows in (128, 256, 384, 512, 768, 1024):
        hidden = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(rows, v, device="cuda")
        ms = time_ms(lambda hidden=hidden, logits=logits: mm_into_fp32(logits, hidden, weight.t()))
        lines.append(f"| {rows} | {ms:.3f} | {2 * rows * h * v / ms / 1e9:.0f} |")
    del logits
    accumulator = torch.zeros(v, h, device="cuda")
    lines += ["", "dW pass `acc (+)= dZ^T [V, R] x [R, H]` into the fp32 accumulator (stage_rows: passes of 2304,",
              "2304, 1920, 1664 rows at N=8192); beta=0 is the first pass:", "",
              "| R | beta=1 ms | TFLOP/s | beta=0 ms |", "|---:|---:|---:|---:|"]  # fmt: skip
    for rows in (384, 768, 1664, 2304, 3072):
        dz = torch.randn(rows, v, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        ms = time_ms(lambda dz=dz, hidden=hidden: mm_into_fp32(accumulator, dz.t(), hidden, beta=1.0))
        first = time_ms(lambda dz=dz, hidden=hidden: mm_into_fp32(accumulator, dz.t(), hidden, beta=0.0))
        lines.append(f"| {rows} | {ms:.3f} | {2 * rows * h * v / ms / 1e9:.0f} | {first:.3f} |")
    return "\n".join(lines)


def _run_step(step: str, out: Path) -> tuple[str, float, str]:
    commands = {
        # the GPU tests that need neither trl nor liger (the smoke path runs on a bare torch + triton)
        "pytest": [sys.executable, "-m", "pytest", *PYTEST_FILES, "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
        "stages": [sys.executable, "-m", "bench.stages", "--rows", "384", "--iters", "5", "--out", str(out)],
        "targets": [sys.executable, "-m", "bench.gpu_targets", "--warmup", "1", "--iters", "3", "--out", str(out)],
    }
    command = commands.get(step, [sys.executable, "-m", "bench.gpu_smoke", "--in-process", step, "--out", str(out)])
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CAPS_S[step])
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        text = done.stdout[-6000:] + ("\n" + done.stderr[-3000:] if done.returncode else "")
    except subprocess.TimeoutExpired as expired:
        status, text = f"killed at its {CAPS_S[step]} s cap", str(expired.stdout or "")[-3000:]
    return status, time.monotonic() - start, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {STEPS}")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-process", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    if args.in_process:  # one step's body, inside the subprocess _run_step started
        print({"probe": probe, "profile": profile, "gemm": gemm}[args.in_process](out))
        return 0
    report, failed = ["# make gpu-smoke", ""], False
    for step in args.only.split(","):
        status, seconds, text = _run_step(step, out)
        failed |= status != "ok"
        print(f"{step}: {status} in {seconds:.0f} s", flush=True)
        report += [f"## {step}: {status}, {seconds:.0f} s (cap {CAPS_S[step]} s)", "", text.strip(), ""]
    (out / "smoke.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out / 'smoke.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
