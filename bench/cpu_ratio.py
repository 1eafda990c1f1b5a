"""The CPU acceptance measurement: ``sdpo_loss(backend="torch")`` against the naive reference.

Shape: N=4096, H=256, V=32768, K=100, tail, alpha 0.5, IS on, 10% masked, fp32, forward+backward. Each
contender runs in its own fresh subprocess (``bench.memprobe``), several repetitions interleaved
(ours, naive, ours, naive, ...) so that a change of machine load hits both alike. In each subprocess:
a tiny warm-up, then call 1 gives the memory (peak RSS minus the RSS after the inputs were built) and
calls 2.. give the time. Reported: the medians over repetitions, and

- extra peak memory, ours / naive: target <= 0.15 (both the KERNELS.md definition, returned gradients
  excluded, and the raw peak-minus-baseline);
- time, ours / naive: target <= 1.5.

    python -m bench.cpu_ratio [--repeats 3] [--calls 2] [--out bench/results/<machine>]

Writes ``cpu_ratio.json`` and ``cpu_ratio.md`` into the output directory; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import report
from bench.memprobe import measure_in_subprocess
from bench.shapes import Case, Shape

CASE = Case(Shape("cpu-acceptance", 4096, 256, 32768), topk=100, dtype="float32")
CONTENDERS = ("sdpo_torch", "naive")
MEMORY_TARGET = 0.15
TIME_TARGET = 1.5


def measure_interleaved(contenders: tuple[str, ...], repeats: int, calls: int, log=print) -> dict[str, dict]:
    """Each contender in fresh subprocesses, interleaved (A, B, A, B, ...); medians per contender."""
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for repeat in range(repeats):
        for name in contenders:
            spec = {"contender": name, "case": CASE.to_dict(), "seed": 0, "calls": calls, "device": "cpu"}
            result = measure_in_subprocess(spec)
            results[name].append(result)
            times = ", ".join(f"{t:.2f}" for t in result["times_s"])
            log(
                f"  repeat {repeat + 1}/{repeats} {name:>10}: times {times} s, "
                f"extra {report.format_bytes(result['extra_bytes'])}, "
                f"peak-baseline {report.format_bytes(result['peak_minus_baseline'])}"
            )
    summary = {}
    for name, runs in results.items():
        # Call 1 of each subprocess carries the memory figure; the steady-state time comes from calls 2..
        steady = [min(r["times_s"][1:]) if len(r["times_s"]) > 1 else r["times_s"][0] for r in runs]
        summary[name] = {
            "time_s": statistics.median(steady),
            "extra_bytes": statistics.median(r["extra_bytes"] for r in runs),
            "peak_minus_baseline": statistics.median(r["peak_minus_baseline"] for r in runs),
            "grad_bytes": runs[0]["grad_bytes"],
            "input_bytes": runs[0]["input_bytes"],
            "peak_reset_exact": all(r["peak_reset_exact"] for r in runs),
            "threads": runs[0]["threads"],
            "runs": runs,
        }
    return summary


def run(repeats: int, calls: int, log=print) -> dict:
    summary = measure_interleaved(CONTENDERS, repeats, calls, log)
    ours, naive = summary["sdpo_torch"], summary["naive"]
    ratios = {
        "memory_extra": ours["extra_bytes"] / naive["extra_bytes"],
        "memory_peak_minus_baseline": ours["peak_minus_baseline"] / naive["peak_minus_baseline"],
        "time": ours["time_s"] / naive["time_s"],
    }
    passed = {
        "memory_extra": ratios["memory_extra"] <= MEMORY_TARGET,
        "memory_peak_minus_baseline": ratios["memory_peak_minus_baseline"] <= MEMORY_TARGET,
        "time": ratios["time"] <= TIME_TARGET,
    }
    return {
        "case": CASE.to_dict(),
        "repeats": repeats,
        "calls": calls,
        "summary": summary,
        "ratios": ratios,
        "passed": passed,
    }


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def markdown(result: dict, env: dict) -> str:
    ours, naive = result["summary"]["sdpo_torch"], result["summary"]["naive"]
    ratios, passed = result["ratios"], result["passed"]
    rows = [
        [
            "extra peak memory (minus returned grads)",
            report.format_bytes(ours["extra_bytes"]),
            report.format_bytes(naive["extra_bytes"]),
            f"{ratios['memory_extra']:.3f}",
            f"<= {MEMORY_TARGET}",
            _verdict(passed["memory_extra"]),
        ],
        [
            "peak RSS minus baseline after inputs",
            report.format_bytes(ours["peak_minus_baseline"]),
            report.format_bytes(naive["peak_minus_baseline"]),
            f"{ratios['memory_peak_minus_baseline']:.3f}",
            f"<= {MEMORY_TARGET}",
            _verdict(passed["memory_peak_minus_baseline"]),
        ],
        [
            "fwd+bwd time (median)",
            report.format_seconds(ours["time_s"]),
            report.format_seconds(naive["time_s"]),
            f"{ratios['time']:.3f}",
            f"<= {TIME_TARGET}",
            _verdict(passed["time"]),
        ],
    ]
    return "\n".join(
        [
            report.header_markdown(env, 'CPU acceptance: sdpo_loss(backend="torch") vs the naive reference'),
            f"N={CASE.shape.n}, H={CASE.shape.h}, V={CASE.shape.v}, K={CASE.topk}, tail, alpha {CASE.alpha}, "
            f"IS clip {CASE.is_clip}, fp32, forward+backward; {result['repeats']} fresh subprocesses per contender "
            f"(interleaved), {ours['threads']} torch threads, medians. Returned gradients: "
            f"{report.format_bytes(ours['grad_bytes'])}; inputs: {report.format_bytes(ours['input_bytes'])}.",
            "",
            report.markdown_table(("measure", "sdpo_torch", "naive", "ours / naive", "target", "verdict"), rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per contender")
    parser.add_argument("--calls", type=int, default=2, help="calls per subprocess (1: memory; 2..: time)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results/<machine>)")
    args = parser.parse_args(argv)
    env = report.environment()
    out_dir = args.out or report.RESULTS_ROOT / env["machine"]
    print(f"CPU acceptance on {env['cpu']} ({env['cpu_cores']} cores), case {CASE.id}")
    result = run(args.repeats, args.calls)
    result["environment"] = report.environment()  # load average after the run
    text = markdown(result, result["environment"])
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cpu_ratio.json").write_text(json.dumps(result, indent=2))
    (out_dir / "cpu_ratio.md").write_text(text)
    print(f"written: {out_dir / 'cpu_ratio.json'}, {out_dir / 'cpu_ratio.md'}")
    return 0 if all(result["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
