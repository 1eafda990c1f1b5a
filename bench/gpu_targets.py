"""The GPU acceptance measurement (H100, bf16): ``sdpo_loss`` against the floor, the naive path and TRL.

Shape (Qwen3-8B's head): N=8192, H=4096, V=151936, bf16; K=100, tail, alpha 0.5, IS on, 10% masked,
forward+backward. All timings with CUDA events in this one process (median of ``--iters`` after
``--warmup`` calls, gradients reset between calls outside the timed window). Targets:

- time / the 4-GEMM floor (student and teacher logits, dH, dW by ``torch.mm`` on the same chunks) <= 1.3;
- naive reference time / ours >= 3;
- TRL ``ChunkedDivergenceFunction`` time / ours, both full-vocabulary without IS (TRL has no top-K and no
  IS correction; the masked token-mean is taken after TRL's per-token divergence) >= 1.3;
- extra peak memory (``max_memory_allocated`` beyond the inputs, minus the returned dH and dW) <= 1 GiB,
  at N=8192 and at N=16384 (flat in N). The fp32 ``[V, H]`` dW accumulator that a bf16 weight needs
  (2.32 GiB here; KERNELS.md counts it as part of the gradient) is reported on its own line and taken out
  of the extra memory before the comparison.

    python -m bench.gpu_targets [--backend triton] [--warmup 3] [--iters 10] [--out DIR]

Writes ``gpu_targets.json`` and ``gpu_targets.md`` into ``bench/results/<gpu-name>/``; exits 1 when a
target is missed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from bench import report
from bench.contenders import CONTENDERS, Inputs, floor_chunk_rows, make_inputs
from bench.memprobe import measure_cuda_step
from bench.shapes import Case, Shape

SHAPE = Shape("qwen3-8b", 8192, 4096, 151936)
FLAT_N = 16384
TARGETS = {"floor_ratio": 1.3, "naive_speedup": 3.0, "trl_speedup": 1.3, "extra_memory_bytes": 2**30}


def cuda_time(step, inputs: Inputs, warmup: int, iters: int) -> dict:
    """Median and min of ``iters`` timed calls (CUDA events), after ``warmup`` untimed calls (Triton JIT)."""
    for _ in range(warmup):
        inputs.reset_grads()
        step()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        inputs.reset_grads()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times_ms = [start.elapsed_time(end) for start, end in events]
    inputs.reset_grads()
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "times_ms": times_ms}


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure(name: str, contender: str, inputs: Inputs, case: Case, args, log) -> dict:
    """Time ``contender`` on ``case``; an out-of-memory is recorded, not raised."""
    step = CONTENDERS[contender].step(inputs, case)
    try:
        result = cuda_time(step, inputs, args.warmup, args.iters)
    except torch.cuda.OutOfMemoryError as err:
        inputs.reset_grads()
        _free()
        log(f"  {name:<28} out of memory ({str(err).splitlines()[0]})")
        return {"contender": contender, "case": case.id, "oom": True}
    _free()
    log(f"  {name:<28} {result['median_ms']:9.2f} ms (min {result['min_ms']:.2f})")
    return {"contender": contender, "case": case.id, "oom": False, **result}


def extra_memory(contender: str, inputs: Inputs, case: Case) -> dict:
    step = CONTENDERS[contender].step(inputs, case)
    step()  # warm: JIT and cuBLAS workspaces are not the loss's memory
    _free()
    memory = measure_cuda_step(step, inputs, inputs.grad_bytes())
    _free()
    weight = inputs.student_weight
    # A bf16/fp16 weight's gradient is accumulated in an fp32 [V, H] buffer across chunks (KERNELS.md);
    # an fp32 weight accumulates straight into its own gradient.
    accumulator = weight.numel() * 4 if weight.dtype != torch.float32 else 0
    memory["fp32_dw_accumulator_bytes"] = accumulator
    memory["extra_minus_accumulator_bytes"] = max(0, memory["extra_bytes"] - accumulator)
    return memory


def run(args, log=print) -> dict:
    backend = f"sdpo_{args.backend}"
    case = Case(dataclasses.replace(SHAPE, n=args.n), topk=100, dtype="bfloat16")
    # The TRL comparison: same math on both sides (full vocabulary, no IS correction).
    full_case = case.replace(topk=None, with_is=False)
    device = torch.device("cuda")
    inputs = make_inputs(case, device)
    full_inputs = dataclasses.replace(inputs, old_logprobs=None)
    chunk = floor_chunk_rows(case.shape.n, case.shape.v, case.shape.h, device)
    log(f"inputs: {report.format_bytes(inputs.input_bytes())}; token chunk of the floor: {chunk} rows")

    timings = {
        "floor": measure("floor (4 GEMMs)", "floor", inputs, case, args, log),
        "ours_topk": measure(f"{backend} K=100", backend, inputs, case, args, log),
        "naive_topk": measure("naive K=100", "naive", inputs, case, args, log),
        "ours_full": measure(f"{backend} full vocab, no IS", backend, full_inputs, full_case, args, log),
        "trl_full": measure("TRL chunked full vocab", "trl_chunked", full_inputs, full_case, args, log),
    }
    if args.backend != "torch":
        timings["ours_torch_topk"] = measure("sdpo_torch K=100 (info)", "sdpo_torch", inputs, case, args, log)

    memory = {args.n: extra_memory(backend, inputs, case)}
    del inputs, full_inputs
    _free()
    flat_case = case.replace(shape=dataclasses.replace(case.shape, n=args.flat_n))
    flat_inputs = make_inputs(flat_case, device)
    memory[args.flat_n] = extra_memory(backend, flat_inputs, flat_case)
    del flat_inputs
    _free()

    def ratio(a: str, b: str) -> float | None:
        ta, tb = timings[a], timings[b]
        if ta.get("oom") or tb.get("oom"):
            return None
        return ta["median_ms"] / tb["median_ms"]

    ratios = {
        "floor_ratio": ratio("ours_topk", "floor"),
        "naive_speedup": ratio("naive_topk", "ours_topk"),
        "trl_speedup": ratio("trl_full", "ours_full"),
        "extra_memory_bytes": max(m["extra_minus_accumulator_bytes"] for m in memory.values()),
    }
    passed = {
        "floor_ratio": ratios["floor_ratio"] is not None and ratios["floor_ratio"] <= TARGETS["floor_ratio"],
        "naive_speedup": ratios["naive_speedup"] is not None and ratios["naive_speedup"] >= TARGETS["naive_speedup"],
        "trl_speedup": ratios["trl_speedup"] is not None and ratios["trl_speedup"] >= TARGETS["trl_speedup"],
        "extra_memory_bytes": ratios["extra_memory_bytes"] <= TARGETS["extra_memory_bytes"],
    }
    if timings["naive_topk"].get("oom"):
        # The naive path not fitting is a win on memory, not a miss on time.
        passed["naive_speedup"] = True
    return {
        "case": case.to_dict(),
        "backend": args.backend,
        "timings": timings,
        "memory": {str(n): m for n, m in memory.items()},
        "ratios": ratios,
        "targets": TARGETS,
        "passed": passed,
    }


def _fmt_ms(timing: dict) -> str:
    return "out of memory" if timing.get("oom") else f"{timing['median_ms']:.2f} ms"


def _fmt(value: float | None, suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def markdown(result: dict, env: dict) -> str:
    t, r, p, m = result["timings"], result["ratios"], result["passed"], result["memory"]
    verdict = {True: "PASS", False: "FAIL"}
    backend = f"sdpo_{result['backend']}"
    n_values = sorted(m, key=int)
    rows = [
        [
            "time, ours / 4-GEMM floor",
            f"{_fmt_ms(t['ours_topk'])} / {_fmt_ms(t['floor'])}",
            _fmt(r["floor_ratio"]),
            "<= 1.3x",
            verdict[p["floor_ratio"]],
        ],
        [
            "speedup vs naive reference",
            f"{_fmt_ms(t['naive_topk'])} / {_fmt_ms(t['ours_topk'])}",
            _fmt(r["naive_speedup"]),
            ">= 3x",
            verdict[p["naive_speedup"]],
        ],
        [
            "speedup vs TRL ChunkedDivergenceFunction (full vocab, no IS)",
            f"{_fmt_ms(t['trl_full'])} / {_fmt_ms(t['ours_full'])}",
            _fmt(r["trl_speedup"]),
            ">= 1.3x",
            verdict[p["trl_speedup"]],
        ],
    ]
    for n in n_values:
        extra = m[n]["extra_minus_accumulator_bytes"]
        rows.append(
            [
                f"extra peak memory at N={n} (fp32 dW accumulator excluded)",
                report.format_bytes(extra),
                "",
                "<= 1 GiB",
                verdict[extra <= TARGETS["extra_memory_bytes"]],
            ]
        )
    shape = result["case"]["shape"]
    lines = [
        report.header_markdown(env, "GPU acceptance: sdpo_loss vs the floor, the naive path and TRL"),
        f"{backend}; N={shape['n']}, H={shape['h']}, V={shape['v']}, bf16, K=100, tail, alpha 0.5, IS clip 2, "
        "10% masked, forward+backward; CUDA events, median of the timed calls.",
        "",
        report.markdown_table(("measure", "times", "ratio", "target", "verdict"), rows),
        "",
        "Memory detail (bytes beyond the inputs; the returned dH and dW are excluded):",
        "",
    ]
    for n in n_values:
        lines.append(
            f"- N={n}: peak minus inputs {report.format_bytes(m[n]['peak_minus_baseline'])}, returned gradients "
            f"{report.format_bytes(m[n]['grad_bytes'])}, extra {report.format_bytes(m[n]['extra_bytes'])}, "
            f"of which the fp32 dW accumulator {report.format_bytes(m[n]['fp32_dw_accumulator_bytes'])}"
        )
    if len(n_values) == 2:
        first, second = n_values
        growth = m[second]["extra_bytes"] - m[first]["extra_bytes"]
        lines.append(f"- growth of the extra memory from N={first} to N={second}: {report.format_bytes(growth)}")
    lines += ["", "All timings (median / min, ms):", ""]
    for name, timing in t.items():
        value = "out of memory" if timing.get("oom") else f"{timing['median_ms']:.2f} / {timing['min_ms']:.2f}"
        lines.append(f"- {name} ({timing['contender']}): {value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=("triton", "torch"), help="sdpo_loss backend")
    parser.add_argument("--n", type=int, default=SHAPE.n, help="tokens of the timed shape")
    parser.add_argument("--flat-n", type=int, default=FLAT_N, help="second N of the memory flatness check")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results/<gpu>)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench/gpu_targets.py needs a CUDA GPU (the targets are defined on an H100, bf16); "
            "torch.cuda.is_available() is False here. On a CPU machine run `python -m bench.cpu_ratio`.",
            file=sys.stderr,
        )
        return 2
    for name in (f"sdpo_{args.backend}", "trl_chunked"):
        if reason := CONTENDERS[name].unsupported(Case(SHAPE, None), torch.device("cuda")):
            print(f"cannot run {name}: {reason}", file=sys.stderr)
            return 2
    env = report.environment()
    if "H100" not in (env["gpu"] or ""):
        print(f"note: the targets are set for an H100; this is {env['gpu']}", file=sys.stderr)
    print(f"GPU acceptance on {env['gpu']}, torch {env['torch']}, triton {env['triton']}")
    result = run(args)
    result["environment"] = env
    text = markdown(result, env)
    print(text)
    out_dir = args.out or report.RESULTS_ROOT / env["machine"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_targets.json").write_text(json.dumps(result, indent=2))
    (out_dir / "gpu_targets.md").write_text(text)
    print(f"written: {out_dir / 'gpu_targets.json'}, {out_dir / 'gpu_targets.md'}")
    return 0 if all(result["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
