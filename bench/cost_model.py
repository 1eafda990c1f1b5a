"""An ESTIMATE of where one fused call spends its time on an H100 / H200, traced without a GPU: a range.

``python -m bench.cost_model`` runs ``sdpo_loss(...).backward()`` on ``meta`` tensors at the SPEC's target
shape (``bench.trace``: every aten op and Triton launch of the real host code, nothing computed), then
prices each kernel under three sets of assumptions (low / central / high) and sums them per step. Two ratios:
against the honest floor ``4 x 2 N H V`` FLOP at the large-GEMM rate, and against the *staged* floor that
``bench.gpu_targets`` runs (the same GEMMs on the same chunks and staged rows, with the same fp32 accumulator
passes: it flatters the loss).

Public figures, not measurements: dense bf16 989 TFLOP/s, of which a large cuBLAS GEMM reaches ~728 TFLOP/s
(KERNELS.md); HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200), 85% of it for streaming kernels; 132 SMs at a
sustained 1.755 GHz, 4 warp-instructions issued per SM and cycle at most. Assumptions, low / central / high:

- GEMM rate at small M (the chunk logits GEMMs, M = C = 384 rows; dH, M = staged rows): 100% / 96% / 90% of
  the large-GEMM rate for M = 384 (128 x 256 tiles: 3 x 594 = 1782 tiles over 132 SMs = 13.5 waves, central
  rounds up to 14), 100% / 93% / 87% for dH (K = V = 151936 deep, few output tiles).
- dW accumulator read-modify-write (fp32 [V, H], ~5 GB per pass with beta = 1, ~2.5 GB written by the first, whose
  beta = 0 reads nothing: BLAS/cuBLAS, "C need not be set on input"): fully hidden under the GEMM (time = max) /
  half hidden / not hidden (time = GEMM + accumulator traffic). The GEMM's operands (dZ, the hidden rows) stream
  under its MMAs, as every GEMM here is priced (max of FLOPs and bytes). The passes are the loss's own
  (``DevicePolicy.stage_rows``: 4 at the SPEC shape, of 2304, 2304, 1920 and 1664 rows).
- student_row_stats (the teacher's log-sum-exp and gather and the row loss fused in: both rows stream through it) is
  issue-bound: SASS instructions per thread and row (``bench.compile_report``, triton 3.7.1, sm_90) x 8 warps,
  issued at IPC 4 / 2.8 / 2 per SM; 2 CTAs per SM (120 registers, 16 KB shared); rows per SM: C / 132 evenly
  (low), ceil(C / 132) (central), whole waves of 264 CTAs (high: 1.45 waves of a 384-row chunk round up to 2,
  i.e. 4 rows per SM); never below its bytes (both rows) at 85% of HBM.
- softcap (only with ``--softcap``): ~20 SASS instructions per logit per row for ``tanh`` from ``exp``, on the
  three [C, V] rows that apply it (student and teacher in the student's stats, the logit gradient): hidden under
  the memory time / at IPC 2.8 / at IPC 2 on top of it.
- a 2 / 4 / 6 us gap between back-to-back kernels; host syncs are not priced (none per call on CUDA).

Every figure is an estimate until a GPU measures it (``make gpu-check``, ``bench.gpu_targets``).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.trace import Step, Trace, trace
from sdpo_ops import sdpo_loss


@dataclass(frozen=True)
class Gpu:
    name: str
    gemm_flops: float  # sustained bf16 GEMM FLOP/s of a large GEMM
    bandwidth: float  # sustained streaming bytes/s
    sms: int = 132
    clock: float = 1.755e9


GPUS = (
    Gpu("H100 SXM", gemm_flops=728e12, bandwidth=0.85 * 3.35e12),
    Gpu("H200", gemm_flops=728e12, bandwidth=0.85 * 4.8e12),
)


@dataclass(frozen=True)
class Scenario:
    """One set of assumptions (see the module docstring)."""

    name: str
    logits_gemm_rate: float  # fraction of the large-GEMM rate at M = C
    dh_gemm_rate: float
    accumulator_hidden: float  # fraction of the dW accumulator traffic hidden under its GEMM
    student_ipc: float  # warp-instructions per SM and cycle
    student_rows_per_sm: str  # "even" | "ceil" | "waves"
    softcap_ipc: float | None  # None: tanh hidden under the memory time
    launch_gap: float


SCENARIOS = (
    Scenario("low", 1.00, 1.00, 1.0, 4.0, "even", None, 2e-6),
    Scenario("central", 0.96, 0.93, 0.5, 2.8, "ceil", 2.8, 4e-6),
    Scenario("high", 0.90, 0.87, 0.0, 2.0, "waves", 2.0, 6e-6),
)
# SASS instructions per thread and row of _student_row_stats_kernel (topk100, the teacher's statistics and the row
# loss fused in; bench/results/sm90-compile/3.7.1.md, "per row"), 8 warps per CTA, 2 CTAs per SM (120 registers; pass 2
# merges only the K-th block maximum's survivors; pass 1's log-sum-exps in base 2 from a -FLT_MAX floor).
STUDENT_INSTRUCTIONS_PER_ROW = 28657
STUDENT_WARPS, STUDENT_CTAS_PER_SM = 8, 2
# Extra SASS instructions per logit for a softcap's tanh (expm1 polynomial and a division), per [C, V] pass.
SOFTCAP_INSTRUCTIONS_PER_LOGIT = 20
# [C, V] rows each kernel applies it to: the student's stats stream the teacher's row beside the student's
SOFTCAP_ROWS = {"_student_row_stats_kernel": 2, "_teacher_row_stats_kernel": 1, "_logit_grad_kernel": 1}

LOGITS, DH, DW = (
    "chunk logits GEMMs (student, teacher)",
    "dH GEMM (staged rows)",
    "dW GEMM + fp32 accumulator passes (staged rows)",
)
FLOOR_STEPS = (LOGITS, DH, DW)  # what bench.gpu_targets' staged floor runs


def _step_name(step: Step, vocab: int, hidden: int) -> str:
    if step.kind == "triton":
        return step.name.strip("_").removesuffix("_kernel")
    out = step.shapes[0] if step.shapes else ()
    if step.name in ("mm", "addmm") and len(out) == 2 and out[1] == vocab:
        return LOGITS
    if step.name == "addmm_" and len(out) == 2 and out[1] == hidden:
        return DH
    if step.name == "addmm" and out == (vocab, hidden):
        return DW
    if out == (vocab, hidden) and step.phase == "backward":
        return "backward: scale dW into its dtype"
    return "small torch ops (validation, weights, metrics)"


def _seconds(step: Step, name: str, gpu: Gpu, scenario: Scenario, vocab: int, softcap: bool) -> float:
    memory = step.bytes / gpu.bandwidth
    compute = step.flops / gpu.gemm_flops
    if name == LOGITS:
        compute /= scenario.logits_gemm_rate
    elif name == DH:
        compute /= scenario.dh_gemm_rate
    elif name == DW:
        # the operands (dZ, hidden rows) stream under the MMAs as in every other GEMM here (max of the two); the
        # risk is the fp32 accumulator's read-modify-write in the epilogue, hidden under the GEMM or not
        gemm = max(compute, (step.bytes - step.output_bytes) / gpu.bandwidth)
        accumulator = step.output_bytes / gpu.bandwidth
        hidden = min(accumulator, gemm) * scenario.accumulator_hidden
        return gemm + accumulator - hidden + scenario.launch_gap
    issue_rate = gpu.sms * gpu.clock  # warp-instruction issue slots per second at IPC 1, all SMs
    if step.name == "_student_row_stats_kernel":
        rows = step.shapes[0]  # the grid: one program per row
        rows_per_sm = {
            "even": rows / gpu.sms,
            "ceil": -(-rows // gpu.sms),
            "waves": -(-rows // (gpu.sms * STUDENT_CTAS_PER_SM)) * STUDENT_CTAS_PER_SM,
        }[scenario.student_rows_per_sm]
        instructions = rows_per_sm * STUDENT_INSTRUCTIONS_PER_ROW * STUDENT_WARPS
        compute = instructions / (scenario.student_ipc * gpu.clock)
    seconds = max(memory, compute)
    if softcap and step.name in SOFTCAP_ROWS and scenario.softcap_ipc is not None:
        elements = step.shapes[0] * vocab * SOFTCAP_ROWS[step.name]
        seconds += elements * SOFTCAP_INSTRUCTIONS_PER_LOGIT / 32 / (scenario.softcap_ipc * issue_rate)
    return seconds + scenario.launch_gap


def estimate(traced: Trace, gpu: Gpu, scenario: Scenario, num_tokens: int, hidden: int, vocab: int,
             softcap: bool = False) -> dict:  # fmt: skip
    per_step: dict[str, dict] = defaultdict(lambda: {"launches": 0, "bytes": 0, "flops": 0, "seconds": 0.0})
    for step in traced.steps:
        name = _step_name(step, vocab, hidden)
        row = per_step[name]
        row["launches"] += 1
        row["bytes"] += step.bytes
        row["flops"] += step.flops
        row["seconds"] += _seconds(step, name, gpu, scenario, vocab, softcap)
    floor = 4 * 2 * num_tokens * hidden * vocab / gpu.gemm_flops
    staged_floor = sum(per_step[name]["seconds"] for name in FLOOR_STEPS)
    total = sum(row["seconds"] for row in per_step.values())
    return {
        "gpu": gpu.name,
        "scenario": scenario.name,
        "steps": dict(per_step),
        "total": total,
        "floor": floor,
        "ratio": total / floor,
        "staged_floor": staged_floor,
        "staged_ratio": total / staged_floor,
    }


def trace_call(num_tokens: int, hidden: int, vocab: int, **options) -> Trace:
    def empty(*shape, dtype=torch.bfloat16, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    hs, ws = empty(num_tokens, hidden, grad=True), empty(vocab, hidden, grad=True)
    ht, wt = empty(num_tokens, hidden), empty(vocab, hidden)
    targets, old = empty(num_tokens, dtype=torch.int64), empty(num_tokens, dtype=torch.float32)
    return trace(lambda: sdpo_loss(hs, ws, ht, wt, target_ids=targets, old_logprobs=old, backend="triton", **options))


def markdown(results: list[dict], shape: str, traced: Trace, vocab: int, hidden: int) -> str:
    """One table per GPU: each step's low / central / high milliseconds, the totals and both ratios."""
    lines = [
        f"## ESTIMATE (not a measurement; no GPU measured this): {shape}",
        "",
        "Priced from a meta-device trace of the real host code (`python -m bench.cost_model`); the assumptions of",
        "each column are in `bench/cost_model.py`'s docstring. Host syncs per call on CUDA: 0.",
        f"dW accumulator passes: {len(traced.dw_pass_rows(vocab, hidden))}, of "
        + ", ".join(str(rows) for rows in traced.dw_pass_rows(vocab, hidden))
        + " rows of dZ.",
        "",
    ]
    for gpu in GPUS:
        mine = [r for r in results if r["gpu"] == gpu.name]
        names = list(mine[0]["steps"])
        lines += [
            f"### {gpu.name}",
            "",
            "| step | launches | GB moved | TFLOP | low ms | central ms | high ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            first = mine[0]["steps"][name]
            times = " | ".join(f"{r['steps'][name]['seconds'] * 1e3:.2f}" for r in mine)
            lines.append(
                f"| {name} | {first['launches']} | {first['bytes'] / 1e9:.2f} | {first['flops'] / 1e12:.2f} | {times} |"
            )
        lines += [
            f"| **total** | {traced.launches()} | | | "
            + " | ".join(f"**{r['total'] * 1e3:.1f}**" for r in mine)
            + " |",
            "| 4 x 2NHV floor | | | | " + " | ".join(f"{r['floor'] * 1e3:.1f}" for r in mine) + " |",
            "| **ratio to 4 x 2NHV** | | | | " + " | ".join(f"**{r['ratio']:.3f}x**" for r in mine) + " |",
            "| staged floor (gpu_targets) | | | | " + " | ".join(f"{r['staged_floor'] * 1e3:.1f}" for r in mine) + " |",
            "| ratio to the staged floor | | | | " + " | ".join(f"{r['staged_ratio']:.3f}x" for r in mine) + " |",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--softcap", type=float, default=None, help="logit_softcap (Gemma 2: 30)")
    parser.add_argument("--out", type=Path, default=None, help="write the table to OUT/cost_model.md")
    args = parser.parse_args(argv)
    traced = trace_call(args.tokens, args.hidden, args.vocab, topk=args.topk or None, logit_softcap=args.softcap)
    results = [
        estimate(traced, gpu, scenario, args.tokens, args.hidden, args.vocab, softcap=args.softcap is not None)
        for gpu in GPUS
        for scenario in SCENARIOS
    ]
    shape = f"N={args.tokens}, H={args.hidden}, V={args.vocab}, K={args.topk or 'full vocabulary'}, bf16, fwd+bwd"
    if args.softcap is not None:
        shape += f", logit_softcap={args.softcap}"
    table = markdown(results, shape, traced, args.vocab, args.hidden)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "cost_model.md").open("a") as results:
            results.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
