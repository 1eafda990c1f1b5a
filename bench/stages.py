"""Time each stage of one chunk: the GEMM, and every row stage in Triton and in its torch twin.

KERNELS.md asks for the time of each stage next to the floor, and for the Triton top-K to be measured
against ``torch.topk`` (a radix select) on the same buffer: this prints both, so the faster one can be
chosen from numbers. One chunk of C rows at the target shape (bf16 GEMM into an fp32 buffer):

    python -m bench.stages                      # CUDA: C=512, H=4096, V=151936, K=100
    python -m bench.stages --device cpu --rows 8 --hidden 16 --vocab 300 --namespaces torch   # smoke

Times are medians over ``--iters`` calls after ``--warmup`` (CUDA events on GPU, perf_counter on CPU).
Writes ``stages.json`` and ``stages.md`` into ``--out`` (default ``bench/results/<machine>/``; ``none``: print only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import report
from sdpo_ops import row_ops as torch_row_ops
from sdpo_ops.row_outputs import RowLossInputs, RowOutputs


def _time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _namespace(name: str):
    if name == "torch":
        return torch_row_ops
    from sdpo_ops.kernels import row_ops

    return row_ops


def _row_stages(ops, student, teacher, targets, args) -> dict[str, Callable[[], object]]:
    """The row stages of ``ops`` as zero-argument calls on the same chunk (one chunk of the top-K path)."""
    rows, device = student.shape[0], student.device
    lse, s_topk, index, s_target = ops.student_row_stats(student, args.topk, targets)
    teacher_lse, t_topk, t_target = ops.teacher_row_stats(teacher, index, targets)
    outputs = RowOutputs.allocate(rows, args.topk, torch.float32, device)
    entropy = torch.empty(rows, device=device)
    teacher_out = (torch.empty(rows, device=device), torch.empty_like(t_topk), torch.empty_like(t_target))
    outputs.student_lse.copy_(lse)
    outputs.teacher_lse.copy_(teacher_lse)
    old_logprobs, row_weight = torch.full((rows,), -2.0, device=device), torch.ones(rows, device=device)
    row_loss_args = (outputs, s_topk, t_topk, s_target, t_target, old_logprobs, row_weight)
    row_loss_options = {"add_tail": True, "alpha": args.alpha, "is_clip": 2.0}
    ops.row_loss_(*row_loss_args, **row_loss_options)
    fused_outputs = RowOutputs.allocate(rows, args.topk, torch.float32, device)
    fused_row_loss = RowLossInputs(fused_outputs, old_logprobs, row_weight, **row_loss_options)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logit_grad_out = torch.empty(student.shape, dtype=gemm_dtype, device=device)
    logit_grad_args = (student, lse, outputs.row_scale, outputs.dense_grad, index, outputs.sparse_grad, None, None)
    return {
        f"student_row_stats (lse + top-{args.topk} + target)": lambda: ops.student_row_stats(
            student, args.topk, targets
        ),
        "student_row_stats + teacher + row loss (fused, as sdpo_loss runs it: + entropy, teacher lse + gather)": (
            lambda: ops.student_row_stats(
                student,
                args.topk,
                targets,
                entropy=entropy,
                teacher_logits=teacher,
                teacher_out=teacher_out,
                row_loss=fused_row_loss,
            )  # fmt: skip
        ),
        "teacher_row_stats (lse + gather + target; the served top-K teacher's stage)": lambda: ops.teacher_row_stats(
            teacher, index, targets
        ),
        "row_loss_ ([C, K+1] math; a launch for a served teacher)": lambda: ops.row_loss_(
            *row_loss_args, **row_loss_options
        ),
        "full_vocab_divergence": lambda: ops.full_vocab_divergence(student, teacher, lse, teacher_lse, args.alpha),
        f"logit_grad (top-K, {str(gemm_dtype).removeprefix('torch.')} out)": lambda: ops.logit_grad(
            *logit_grad_args, 1.0, out=logit_grad_out
        ),
    }


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, device=device, generator=generator).to(dtype)
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=generator) * args.hidden**-0.5 * 2).to(
        dtype
    )
    student = torch.empty(args.rows, args.vocab, device=device)
    teacher = torch.randn(args.rows, args.vocab, device=device, generator=generator) * 2
    targets = torch.randint(0, args.vocab, (args.rows,), device=device, generator=generator)
    mm_kwargs = {"out_dtype": torch.float32} if device.type == "cuda" else {}

    def gemm():
        if mm_kwargs:
            torch.mm(hidden, weight.t(), out=student, **mm_kwargs)
        else:
            student.copy_(torch.mm(hidden, weight.t()))

    gemm()
    rows = [{"stage": "chunk GEMM [C,H]x[H,V] -> fp32", "namespace": "torch.mm"}]
    rows[0]["ms"] = _time_ms(gemm, device, args.warmup, args.iters)
    for name in args.namespaces.split(","):
        for stage, fn in _row_stages(_namespace(name), student, teacher, targets, args).items():
            rows.append({"stage": stage, "namespace": name, "ms": _time_ms(fn, device, args.warmup, args.iters)})
    return rows


def markdown(rows: list[dict], args, device_name: str) -> str:
    lines = [
        f"## {device_name}",
        "",
        f"C={args.rows} rows, H={args.hidden}, V={args.vocab}, K={args.topk}; median of {args.iters} calls. "
        "`logit_grad` writes the GEMM dtype (bf16 on CUDA) from the intact fp32 logits.",
        "",
        "| stage | implementation | time (ms) | vs GEMM |",
        "|---|---|---|---|",
    ]
    gemm_ms = rows[0]["ms"]
    lines += [f"| {r['stage']} | {r['namespace']} | {r['ms']:.3f} | {r['ms'] / gemm_ms:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--namespaces", default="torch,triton", help="comma-separated: torch, triton")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="results directory (default bench/results/<machine>/), or none")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = measure(args)
    text = markdown(rows, args, device_name)
    print(text)
    if args.out != "none":
        out = Path(args.out) if args.out else report.RESULTS_ROOT / report.machine_slug()
        out.mkdir(parents=True, exist_ok=True)
        env = report.environment()
        header = report.header_markdown(env, "Per-stage times of one chunk")
        (out / "stages.json").write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=2))
        (out / "stages.md").write_text(header + "\n" + text)
        print(f"wrote {out / 'stages.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
