"""A teacher given as its top-K log-probs, on CPU: ``sdpo_loss_from_teacher_topk`` against TRL's materialised path.

The materialised contender is TRL's served-teacher loss itself (``SDPOTrainer._compute_server_distillation_loss``,
``distillation_mode="topk_logits"``, tail on, alpha 0.5, IS clip 2): the student's full ``[N, V]`` logits,
``log_softmax``, the gather at the teacher's ids, ``loss_utils.add_tail_bucket`` / ``compute_divergence`` /
``apply_importance_sampling_clipping``, a masked token mean (one sequence: TRL's per-sequence mean). Ours is
``sdpo_loss_from_teacher_topk(backend="torch")`` on the same inputs. Both get the same student (hidden ``[N, H]``
and lm_head ``[V, H]`` with gradient, ``bench.contenders.make_inputs``) and the same teacher reply: the top-K
log-probs and ids of a second model close to the student, computed before the measurement (what a server sends).

Each contender runs in its own fresh subprocess (the ``bench.memprobe`` method: a tiny warm-up, call 1 gives the
memory as peak RSS beyond the inputs, calls 2.. the time), repetitions interleaved; medians reported, and the two
losses of each call checked against each other. Time is reported twice: wall-clock, and the process's CPU seconds
(``time.process_time``, all threads) per call, which a machine shared with other jobs disturbs far less.

    python -m bench.teacher_topk [--repeats 3] [--calls 2] [--n 4096 --h 256 --v 32768 --k 100] [--out DIR]

Writes ``teacher_topk.json`` and ``teacher_topk.md`` into ``DIR`` (default ``bench/results/<machine>``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import report
from bench.contenders import make_inputs
from bench.memprobe import measure_cpu_step, measure_in_subprocess
from bench.shapes import Case, Shape

CONTENDERS = ("topk_teacher_torch", "trl_materialised")
DESCRIPTIONS = {
    "topk_teacher_torch": 'sdpo_loss_from_teacher_topk(backend="torch")',
    "trl_materialised": "TRL's server loss on full logits",
}
# fp32 losses of the same computation by two summation orders
LOSS_RTOL = 1e-4


def served_inputs(case: Case, seed: int = 0):
    """``(inputs, teacher_topk_logprobs [N, K], teacher_topk_ids [N, K])``: the teacher's reply is its own top-K of
    ``log_softmax(teacher_hidden @ teacher_weight^T)``, formed in row chunks (no ``[N, V]`` left behind)."""
    inputs = make_inputs(case, "cpu", seed)
    logprobs, ids = [], []
    with torch.no_grad():
        for rows in torch.split(torch.arange(case.shape.n), 512):
            logits = inputs.teacher_hidden[rows] @ inputs.teacher_weight.t()
            top = torch.log_softmax(logits.float(), -1).topk(case.topk, dim=-1)
            logprobs.append(top.values)
            ids.append(top.indices)
    return inputs, torch.cat(logprobs), torch.cat(ids)


def topk_teacher_loss(inputs, logprobs, ids, case: Case) -> torch.Tensor:
    from sdpo_ops import sdpo_loss_from_teacher_topk

    return sdpo_loss_from_teacher_topk(
        inputs.student_hidden, inputs.student_weight, logprobs, ids, mask=inputs.mask, target_ids=inputs.target_ids,
        old_logprobs=inputs.old_logprobs, add_tail=case.add_tail, alpha=case.alpha, is_clip=case.is_clip,
        backend="torch",
    )  # fmt: skip


def trl_materialised_loss(inputs, logprobs, ids, case: Case) -> torch.Tensor:
    """TRL's ``_compute_server_distillation_loss`` (``topk_logits``) from the student logits on, line by line."""
    from trl.experimental.sdpo.loss_utils import (
        add_tail_bucket,
        apply_importance_sampling_clipping,
        compute_divergence,
    )
    from trl.trainer.utils import selective_log_softmax

    student_logits = inputs.student_hidden @ inputs.student_weight.t()
    loss_mask = inputs.mask
    keep = loss_mask.bool().unsqueeze(-1)
    student_per_token_logps = selective_log_softmax(student_logits, inputs.target_ids)
    student_topk_logps = torch.gather(torch.log_softmax(student_logits, dim=-1), dim=-1, index=ids)
    student_topk_logps = torch.where(keep, student_topk_logps, torch.zeros_like(student_topk_logps))
    teacher_topk_logps = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    if case.add_tail:
        student_topk_logps, teacher_topk_logps = (
            add_tail_bucket(student_topk_logps),
            add_tail_bucket(teacher_topk_logps),
        )
    else:
        student_topk_logps = student_topk_logps - torch.logsumexp(student_topk_logps, dim=-1, keepdim=True)
        teacher_topk_logps = teacher_topk_logps - torch.logsumexp(teacher_topk_logps, dim=-1, keepdim=True)
    per_token_loss = compute_divergence(student_topk_logps, teacher_topk_logps, case.alpha)
    per_token_loss = apply_importance_sampling_clipping(
        per_token_loss, student_per_token_logps, inputs.old_logprobs, case.is_clip
    )
    return (per_token_loss * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


LOSSES = {"topk_teacher_torch": topk_teacher_loss, "trl_materialised": trl_materialised_loss}


def probe(spec: dict) -> dict:
    """One contender in this (fresh) process: a warm-up on a tiny copy, then ``calls`` measured fwd+bwd calls."""
    case = Case.from_dict(spec["case"])
    loss_fn = LOSSES[spec["contender"]]
    seed = int(spec.get("seed", 0))

    def step_of(inputs, logprobs, ids, case, values):
        def step():
            loss = loss_fn(inputs, logprobs, ids, case)
            loss.backward()
            values.append(float(loss.detach()))

        return step

    tiny = case.replace(shape=Shape(case.shape.name, 8, 8, max(64, case.topk + 1)))
    step_of(*served_inputs(tiny, seed), tiny, [])()

    inputs, logprobs, ids = served_inputs(case, seed)
    losses: list[float] = []
    step = step_of(inputs, logprobs, ids, case, losses)
    result: dict = {"contender": spec["contender"], "case": case.id, "times_s": [], "cpu_s": []}
    for call in range(int(spec.get("calls", 2))):
        cpu_start = time.process_time()
        measured = measure_cpu_step(step, inputs, inputs.grad_bytes())
        result["cpu_s"].append(time.process_time() - cpu_start)
        result["times_s"].append(measured.pop("time_s"))
        if call == 0:  # the first full-size call is the memory figure
            input_bytes = inputs.input_bytes() + sum(t.numel() * t.element_size() for t in (logprobs, ids))
            result.update(measured, input_bytes=input_bytes)
    result["losses"] = losses
    result["threads"] = torch.get_num_threads()
    return result


def run(case: Case, repeats: int, calls: int, log=print) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for repeat in range(repeats):
        for name in CONTENDERS:
            spec = {"contender": name, "case": case.to_dict(), "seed": 0, "calls": calls}
            result = measure_in_subprocess(spec, module="bench.teacher_topk")
            runs[name].append(result)
            log(
                f"  repeat {repeat + 1}/{repeats} {name:>18}: times "
                + ", ".join(f"{t:.2f}" for t in result["times_s"])
                + " s, CPU "
                + ", ".join(f"{t:.2f}" for t in result["cpu_s"])
                + f" s, extra {report.format_bytes(result['extra_bytes'])}, loss {result['losses'][0]:.6f}"
            )
    summary = {}
    for name, results in runs.items():

        def steady(key: str, results=results) -> float:
            return statistics.median(min(r[key][1:]) if len(r[key]) > 1 else r[key][0] for r in results)

        summary[name] = {
            "time_s": steady("times_s"),
            "cpu_s": steady("cpu_s"),
            "extra_bytes": statistics.median(r["extra_bytes"] for r in results),
            "peak_minus_baseline": statistics.median(r["peak_minus_baseline"] for r in results),
            "grad_bytes": results[0]["grad_bytes"],
            "input_bytes": results[0]["input_bytes"],
            "peak_reset_exact": all(r["peak_reset_exact"] for r in results),
            "threads": results[0]["threads"],
            "loss": results[0]["losses"][0],
            "runs": results,
        }
    ours, theirs = summary["topk_teacher_torch"], summary["trl_materialised"]
    agree = abs(ours["loss"] - theirs["loss"]) <= LOSS_RTOL * abs(theirs["loss"])
    return {
        "case": case.to_dict(),
        "repeats": repeats,
        "calls": calls,
        "summary": summary,
        "ratios": {
            "memory_extra": ours["extra_bytes"] / theirs["extra_bytes"],
            "memory_peak_minus_baseline": ours["peak_minus_baseline"] / theirs["peak_minus_baseline"],
            "time": ours["time_s"] / theirs["time_s"],
            "cpu_time": ours["cpu_s"] / theirs["cpu_s"],
        },
        "losses_agree": agree,
    }


def markdown(result: dict, env: dict) -> str:
    case = Case.from_dict(result["case"])
    ours, theirs = result["summary"]["topk_teacher_torch"], result["summary"]["trl_materialised"]
    ratios = result["ratios"]
    rows = [
        ["extra peak memory (minus returned grads)", report.format_bytes(ours["extra_bytes"]),
         report.format_bytes(theirs["extra_bytes"]), f"{ratios['memory_extra']:.3f}"],
        ["peak RSS minus baseline after inputs", report.format_bytes(ours["peak_minus_baseline"]),
         report.format_bytes(theirs["peak_minus_baseline"]), f"{ratios['memory_peak_minus_baseline']:.3f}"],
        ["fwd+bwd wall time (median)", report.format_seconds(ours["time_s"]),
         report.format_seconds(theirs["time_s"]), f"{ratios['time']:.3f}"],
        ["fwd+bwd CPU seconds (median)", report.format_seconds(ours["cpu_s"]),
         report.format_seconds(theirs["cpu_s"]), f"{ratios['cpu_time']:.3f}"],
        ["loss (call 1)", f"{ours['loss']:.6f}", f"{theirs['loss']:.6f}",
         "agree" if result["losses_agree"] else "DISAGREE"],
    ]  # fmt: skip
    return "\n".join(
        [
            report.header_markdown(env, "A teacher given as its top-K log-probs: fused vs TRL's materialised path"),
            f"N={case.shape.n}, H={case.shape.h}, V={case.shape.v}, teacher K={case.topk}, tail, alpha {case.alpha}, "
            f"IS clip {case.is_clip}, 10% masked, fp32, forward+backward; {result['repeats']} fresh subprocesses per "
            f"contender (interleaved), {ours['threads']} torch threads, medians. Returned gradients: "
            f"{report.format_bytes(ours['grad_bytes'])}; inputs (teacher reply included): "
            f"{report.format_bytes(ours['input_bytes'])}.",
            "",
            report.markdown_table(
                ("measure", DESCRIPTIONS["topk_teacher_torch"], DESCRIPTIONS["trl_materialised"], "ours / TRL"), rows
            ),  # fmt: skip
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].startswith("{"):  # a probe started by `run`
        print(json.dumps(probe(json.loads(argv[0]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per contender")
    parser.add_argument("--calls", type=int, default=2, help="calls per subprocess (1: memory; 2..: time)")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=256)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results/<machine>)")
    args = parser.parse_args(argv)
    case = Case(Shape("served-teacher", args.n, args.h, args.v), topk=args.k, dtype="float32")
    env = report.environment()
    out_dir = args.out or report.RESULTS_ROOT / env["machine"]
    print(f"teacher top-K on {env['cpu']} ({env['cpu_cores']} cores), case {case.id}")
    result = run(case, args.repeats, args.calls)
    result["environment"] = report.environment()  # load average after the run
    text = markdown(result, result["environment"])
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "teacher_topk.json").write_text(json.dumps(result, indent=2))
    (out_dir / "teacher_topk.md").write_text(text)
    print(f"written: {out_dir / 'teacher_topk.json'}, {out_dir / 'teacher_topk.md'}")
    return 0 if result["losses_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
