"""What Gemma 2's final-logit softcap costs inside the fused loss on CPU: ``logit_softcap=30`` against none.

Same shape and method as ``bench.cpu_ratio`` (N=4096, H=256, V=32768, K=100, fp32, fwd+bwd; fresh subprocesses,
interleaved, medians). The softcap adds a ``tanh_`` and a ``mul_`` per chunk and side, and one factor in the
logit gradient.

    python -m bench.softcap_cost [--repeats 3] [--out bench/results/<machine>]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import report
from bench.cpu_ratio import CASE, measure_interleaved

PAIR = ("sdpo_torch_softcap", "sdpo_torch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    env = report.environment()
    summary = measure_interleaved(PAIR, args.repeats, args.calls)
    capped, plain = (summary[name] for name in PAIR)
    ratios = {
        "time": capped["time_s"] / plain["time_s"],
        "extra_memory": capped["extra_bytes"] / plain["extra_bytes"],
    }
    rows = [
        ["fwd+bwd time (median)", report.format_seconds(capped["time_s"]), report.format_seconds(plain["time_s"]),
         f"{ratios['time']:.3f}"],
        ["extra peak memory", report.format_bytes(capped["extra_bytes"]), report.format_bytes(plain["extra_bytes"]),
         f"{ratios['extra_memory']:.3f}"],
    ]  # fmt: skip
    text = "\n".join(
        [
            report.header_markdown(report.environment(), "The softcap's cost: logit_softcap=30 vs none (CPU)"),
            f"N={CASE.shape.n}, H={CASE.shape.h}, V={CASE.shape.v}, K={CASE.topk}, fp32, forward+backward; "
            f"{args.repeats} fresh subprocesses per contender (interleaved), medians.",
            "",
            report.markdown_table(("measure", "softcap 30", "no softcap", "ratio"), rows),
            "",
        ]
    )
    print(text)
    out_dir = args.out or report.RESULTS_ROOT / env["machine"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "softcap_cost.md").write_text(text)
    (out_dir / "softcap_cost.json").write_text(json.dumps({"ratios": ratios, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
