"""An ESTIMATE of where one fused call spends its time on an H100 / H200, traced without a GPU.

``python -m bench.cost_model`` runs ``sdpo_loss(...).backward()`` on ``meta`` tensors at the SPEC's target
shape (``bench.trace``: every aten op and Triton launch of the real host code, nothing computed), then
prices each kernel as ``max(FLOPs / GEMM rate, bytes / bandwidth) + launch gap`` and sums them per step.
The 4-GEMM floor (student and teacher logits, dH, dW: ``4 * 2 N H V`` FLOP) is priced at the same GEMM rate,
so the ratio says how much the non-GEMM work and the GEMMs' own memory traffic add.

Assumptions (public figures, not measurements): dense bf16 989 TFLOP/s on both GPUs, of which a large cuBLAS
GEMM reaches ~728 TFLOP/s (KERNELS.md); HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200), of which streaming
kernels reach 85%; 2 us between back-to-back kernels. The student row-stats kernel is priced at its
instruction-issue estimate from the sm_90 SASS (``sdpo_ops.kernels.student_row_stats``: ~0.22 ms per
512-row chunk at V=151936) when that exceeds its bytes. Host syncs (one per call on CUDA, the target-id
range check) are listed, not priced. A GPU run (``make gpu-check``) replaces these numbers.
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
    gemm_flops: float  # sustained bf16 GEMM FLOP/s
    bandwidth: float  # sustained streaming bytes/s
    launch_gap: float = 2e-6


GPUS = (
    Gpu("H100 SXM", gemm_flops=728e12, bandwidth=0.85 * 3.35e12),
    Gpu("H200", gemm_flops=728e12, bandwidth=0.85 * 4.8e12),
)
STUDENT_STATS_ISSUE_SECONDS_PER_ROW = 0.22e-3 / 512 * (1 / 151936)  # per row per vocabulary entry


def _step_name(step: Step, vocab: int, hidden: int) -> str:
    if step.kind == "triton":
        return step.name.strip("_").removesuffix("_kernel")
    out = step.shapes[0] if step.shapes else ()
    if step.name in ("mm", "addmm") and len(out) == 2 and out[1] == vocab:
        return "chunk logits GEMMs (student, teacher)"
    if step.name == "addmm_" and len(out) == 2 and out[1] == hidden:
        return "dH GEMM (staged rows)"
    if step.name == "addmm" and out == (vocab, hidden):
        return "dW GEMM into the fp32 accumulator (staged rows)"
    if out == (vocab, hidden) and step.phase == "backward":
        return "backward: scale dW into its dtype"
    return "small torch ops (validation, weights, metrics)"


def _seconds(step: Step, gpu: Gpu, vocab: int) -> float:
    memory = step.bytes / gpu.bandwidth
    compute = step.flops / gpu.gemm_flops
    if step.name == "_student_row_stats_kernel":
        compute = step.shapes[0] * vocab * STUDENT_STATS_ISSUE_SECONDS_PER_ROW
    return max(memory, compute) + gpu.launch_gap


def estimate(traced: Trace, gpu: Gpu, num_tokens: int, hidden: int, vocab: int) -> dict:
    per_step: dict[str, dict] = defaultdict(lambda: {"launches": 0, "bytes": 0, "flops": 0, "seconds": 0.0})
    for step in traced.steps:
        row = per_step[_step_name(step, vocab, hidden)]
        row["launches"] += 1
        row["bytes"] += step.bytes
        row["flops"] += step.flops
        row["seconds"] += _seconds(step, gpu, vocab)
    floor = 4 * 2 * num_tokens * hidden * vocab / gpu.gemm_flops
    total = sum(row["seconds"] for row in per_step.values())
    return {"gpu": gpu.name, "steps": dict(per_step), "total": total, "floor": floor, "ratio": total / floor}


def trace_call(num_tokens: int, hidden: int, vocab: int, **options) -> Trace:
    def empty(*shape, dtype=torch.bfloat16, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    hs, ws = empty(num_tokens, hidden, grad=True), empty(vocab, hidden, grad=True)
    ht, wt = empty(num_tokens, hidden), empty(vocab, hidden)
    targets, old = empty(num_tokens, dtype=torch.int64), empty(num_tokens, dtype=torch.float32)
    return trace(lambda: sdpo_loss(hs, ws, ht, wt, target_ids=targets, old_logprobs=old, backend="triton", **options))


def markdown(results: list[dict], shape: str, traced: Trace) -> str:
    lines = [
        f"## ESTIMATE (not a measurement): {shape}",
        "",
        "Priced from a meta-device trace of the real host code (`python -m bench.cost_model`); assumptions in",
        "`bench/cost_model.py`'s docstring. Host syncs per call on CUDA: 1 (target-id range check; not priced).",
        "",
    ]
    names = list(results[0]["steps"])
    header = "| step | launches | GB moved | TFLOP | " + " | ".join(f"{r['gpu']} ms" for r in results) + " |"
    lines += [header, "|---|---:|---:|---:|" + "---:|" * len(results)]
    for name in names:
        first = results[0]["steps"][name]
        times = " | ".join(f"{r['steps'][name]['seconds'] * 1e3:.2f}" for r in results)
        lines.append(
            f"| {name} | {first['launches']} | {first['bytes'] / 1e9:.2f} | {first['flops'] / 1e12:.2f} | {times} |"
        )
    lines.append(
        f"| **total** | {traced.launches()} | | | " + " | ".join(f"**{r['total'] * 1e3:.1f}**" for r in results) + " |"
    )
    lines.append("| 4-GEMM floor | | | | " + " | ".join(f"{r['floor'] * 1e3:.1f}" for r in results) + " |")
    lines.append("| **ratio to the floor** | | | | " + " | ".join(f"**{r['ratio']:.3f}x**" for r in results) + " |")
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
    results = [estimate(traced, gpu, args.tokens, args.hidden, args.vocab) for gpu in GPUS]
    shape = f"N={args.tokens}, H={args.hidden}, V={args.vocab}, K={args.topk or 'full vocabulary'}, bf16, fwd+bwd"
    if args.softcap is not None:
        shape += f", logit_softcap={args.softcap}"
    table = markdown(results, shape, traced)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "cost_model.md").open("a") as results:
            results.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
