"""``python -m sdpo_ops.demo.ttsd``: test-time self-distillation (TTSD) against best-of-k sampling.

For each problem the base model fails greedily, TTSD repeats: sample ``--group-size`` attempts, score them
with the task's feedback, take one SDPO step on that single problem (plain-PyTorch adapters: an
:class:`~sdpo_ops.adapters.EMATeacher` re-prompted with the feedback, :func:`~sdpo_ops.adapters.sdpo_step`),
until an attempt succeeds or ``--budget`` attempts are spent; every problem starts again from the base
weights. Best-of-k samples ``--budget`` attempts from the untouched model. The measure (the paper's) is
discovery@k: the fraction of problems with a success among their first k attempts; for best-of-k it is the
unbiased estimate ``1 - C(n - c, k) / C(n, k)`` from ``n`` samples with ``c`` successes.

Loss settings as the paper's TTSD (SPEC section 4.1): reverse KL (``alpha=1``), top-K 20 with the tail, EMA
rate 0.01, IS clip 2 (inactive: every step is on its own fresh samples). Every attempt of a failed group
fails, so no group has a demonstration: the teacher always sees the feedback. With ``--feedback solution``
(the training demo's reward) that feedback quotes the worked result, so the teacher knows the answer;
``--feedback verdict`` says only what was wrong ("Your answer 12 is wrong."), closer to the paper's setting
where the environment reports failures but not the solution.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdpo_ops.demo.task import SCORE_CORRECT, Problem, build_prompt, generate_problems, score_completion

RESULTS_FILENAME = "ttsd.json"
TABLE_FILENAME = "ttsd.md"
PLOT_FILENAME = "discovery.png"
# The TTSD study draws its own problems, apart from the training demo's training and held-out sets.
PROBLEM_SEED = 2_000_003

# sample(model, prompt_ids, count) -> completion token ids (EOS kept): the generation boundary.
Sampler = Callable[[object, list[int], int], list[list[int]]]


@dataclass(frozen=True)
class TTSDSettings:
    group_size: int = 8
    budget: int = 32
    learning_rate: float = 5e-5
    topk: int = 20
    alpha: float = 1.0
    teacher_update_rate: float = 0.01
    is_clip: float = 2.0
    # The loss sees the distribution the attempts were sampled from (TRL divides by it too).
    temperature: float = 0.7
    reveal_solution: bool = True


def discovery_at_k(first_successes: Sequence[int | None], k: int) -> float:
    """Fraction of runs whose first success (1-based attempt number, None: none) came within ``k`` attempts."""
    if not first_successes:
        raise ValueError("need at least one run")
    return sum(1 for first in first_successes if first is not None and first <= k) / len(first_successes)


def best_of_k_estimate(samples: int, successes: int, k: int) -> float:
    """Unbiased probability that ``k`` of the model's attempts include a success, from ``samples`` attempts."""
    if not 0 <= successes <= samples or not 1 <= k <= samples:
        raise ValueError(f"need 0 <= successes <= samples and 1 <= k <= samples, got {successes}, {samples}, {k}")
    if samples - successes < k:
        return 1.0
    return 1.0 - math.comb(samples - successes, k) / math.comb(samples, k)


def make_sampler(tokenizer, *, temperature: float, max_new_tokens: int) -> Sampler:
    """Sample ``count`` completions of one prompt from a model at ``temperature`` (no top-k/top-p)."""
    import torch

    def sample(model, prompt_ids: list[int], count: int) -> list[list[int]]:
        from sdpo_ops.adapters import split_completions

        was_training = model.training
        model.eval()
        input_ids = torch.tensor([prompt_ids] * count, device=model.device)
        try:
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
        finally:
            model.train(was_training)
        return split_completions(output, input_ids.shape[1], tokenizer.eos_token_id)

    return sample


def _score(tokenizer, problem: Problem, completions: list[list[int]], reveal_solution: bool):
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    verdicts = [score_completion(t, problem.answer, problem.solution, reveal_solution=reveal_solution) for t in texts]
    return [score for score, _ in verdicts], [feedback for _, feedback in verdicts], texts


def _prompt_ids(tokenizer, problem: Problem) -> list[int]:
    encoded = tokenizer.apply_chat_template(build_prompt(problem), add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def run_ttsd(model, tokenizer, problem: Problem, settings: TTSDSettings, sample: Sampler) -> dict:
    """Run TTSD on ``problem`` from ``model``'s current weights (which it changes): first success, attempts, steps.

    Returns ``{"first_success": 1-based attempt number or None, "attempts", "steps", "losses", "example"}``.
    """
    import torch

    from sdpo_ops.adapters import EMATeacher, build_sdpo_batch, build_teacher_batch, sdpo_step

    prompt = build_prompt(problem)
    prompt_ids = _prompt_ids(tokenizer, problem)
    teacher = EMATeacher(model, update_rate=settings.teacher_update_rate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    attempts, losses, example = 0, [], None
    while attempts < settings.budget:
        count = min(settings.group_size, settings.budget - attempts)
        completions = sample(model, prompt_ids, count)
        scores, feedback, texts = _score(tokenizer, problem, completions, settings.reveal_solution)
        for index, score in enumerate(scores):
            if score == SCORE_CORRECT:
                return {
                    "first_success": attempts + index + 1,
                    "attempts": attempts + count,
                    "steps": len(losses),
                    "losses": losses,
                    "example": {"reply": texts[index], "feedback": None},
                }
        attempts += count
        example = {"reply": texts[0], "feedback": feedback[0]}
        if attempts >= settings.budget or count < 2:
            break
        # A failed group has no demonstration: each attempt's teacher is re-prompted with its own feedback.
        teacher_batch = build_teacher_batch(
            tokenizer, [prompt] * count, completions, scores, count, feedback=feedback, device=model.device
        )
        batch = build_sdpo_batch([prompt_ids] * count, teacher_batch, pad_token_id=tokenizer.pad_token_id)
        model.train()
        result = sdpo_step(
            model,
            teacher,
            batch,
            topk=settings.topk,
            alpha=settings.alpha,
            is_clip=settings.is_clip,
            temperature=settings.temperature,
        )
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.on_optimizer_step(model)
        losses.append(float(result.loss.detach()))
    return {"first_success": None, "attempts": attempts, "steps": len(losses), "losses": losses, "example": example}


def best_of_k(model, tokenizer, problem: Problem, settings: TTSDSettings, sample: Sampler) -> dict:
    """``settings.budget`` attempts from the untouched ``model``: ``{"samples", "successes", "first_success"}``."""
    prompt_ids = _prompt_ids(tokenizer, problem)
    scores: list[float] = []
    while len(scores) < settings.budget:
        count = min(settings.group_size, settings.budget - len(scores))
        scores.extend(_score(tokenizer, problem, sample(model, prompt_ids, count), settings.reveal_solution)[0])
    successes = [index + 1 for index, score in enumerate(scores) if score == SCORE_CORRECT]
    return {
        "samples": len(scores),
        "successes": len(successes),
        "first_success": successes[0] if successes else None,
    }


def hard_problems(model, tokenizer, count: int, *, max_operand: int, max_new_tokens: int, pool: int) -> list:
    """The first ``count`` of ``pool`` drawn problems that ``model`` answers wrongly when greedy."""
    from sdpo_ops.demo.evaluation import evaluate

    candidates = generate_problems(pool, seed=PROBLEM_SEED, max_operand=max_operand)
    verdicts = evaluate(model, tokenizer, candidates, max_new_tokens=max_new_tokens)["replies"]
    return [problem for problem, verdict in zip(candidates, verdicts, strict=True) if not verdict["correct"]][:count]


def discovery_table(results: dict, ks: Sequence[int]) -> str:
    """Markdown: discovery@k of TTSD (over problems x seeds) and of best-of-k (estimate over problems)."""
    ttsd = [run["first_success"] for run in results["ttsd"]]
    baseline = results["best_of_k"]
    lines = [
        "| k (attempts) | " + " | ".join(str(k) for k in ks) + " |",
        "|" + "---|" * (len(ks) + 1),
        f"| TTSD ({len(ttsd)} runs) | " + " | ".join(f"{discovery_at_k(ttsd, k):.3f}" for k in ks) + " |",
        f"| best-of-k ({len(baseline)} problems) | "
        + " | ".join(f"{_mean_best_of_k(baseline, k):.3f}" for k in ks)
        + " |",
    ]
    return "\n".join(lines)


def _mean_best_of_k(baseline: Sequence[dict], k: int) -> float:
    return sum(best_of_k_estimate(run["samples"], run["successes"], k) for run in baseline) / len(baseline)


def describe_run(run: dict) -> str:
    """One line for a TTSD run's outcome: where it first succeeded, or that it never did within its attempts."""
    outcome = (
        f"no success in {run['attempts']} attempts"
        if run["first_success"] is None
        else f"first success at attempt {run['first_success']}"
    )
    return f"{outcome} after {run['steps']} SDPO steps ({run['time_s']:.0f} s)"


def plot_discovery(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = results["settings"]["budget"]
    ks = list(range(1, budget + 1))
    ttsd = [run["first_success"] for run in results["ttsd"]]
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    axis.plot(ks, [discovery_at_k(ttsd, k) for k in ks], "-", color="tab:blue", label=f"TTSD ({len(ttsd)} runs)")
    axis.plot(
        ks,
        [_mean_best_of_k(results["best_of_k"], k) for k in ks],
        "--",
        color="tab:orange",
        label=f"best-of-k, untouched model ({len(results['best_of_k'])} problems)",
    )
    for k in range(results["settings"]["group_size"], budget, results["settings"]["group_size"]):
        axis.axvline(k, color="gray", alpha=0.2)  # where TTSD takes an SDPO step
    axis.set_xlabel("attempts k")
    axis.set_ylabel("discovery@k (problems solved within k attempts)")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdpo_ops.demo.ttsd",
        description="Test-time self-distillation on problems the base model fails greedily, against best-of-k.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="Hugging Face id or local path; default: SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", default=None, help="de-quantised SmolLM2 copy (default ~/.cache/sdpo_ops/...)")
    parser.add_argument("--output-dir", default="demo_output/ttsd")
    parser.add_argument("--problems", type=int, default=8, help="hard problems (greedy failures) to study")
    parser.add_argument("--pool", type=int, default=64, help="problems screened for greedy failures")
    parser.add_argument("--max-operand", type=int, default=50, help="problems use operands 1..max-operand")
    parser.add_argument("--group-size", type=int, default=8, help="attempts sampled per TTSD step")
    parser.add_argument("--budget", type=int, default=32, help="attempts per problem")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-completion-length", type=int, default=40, help="tokens per attempt")
    parser.add_argument("--feedback", choices=("solution", "verdict"), default="solution", help="see the module doc")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="TTSD runs per problem, one per seed")
    args = parser.parse_args(argv)
    for name in ("problems", "pool", "max_operand", "group_size", "budget", "max_completion_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        parser.error(f"--group-size must be >= 2 (one SDPO step learns from a group), got {args.group_size}")
    if args.budget < args.group_size:
        parser.error(f"--budget must be >= --group-size, got {args.budget} < {args.group_size}")
    if args.learning_rate <= 0 or args.temperature <= 0:
        parser.error("--learning-rate and --temperature must be > 0")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_ops.demo.cli import start_run
    from sdpo_ops.demo.train import environment

    output_dir, model_path = start_run(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    settings = TTSDSettings(
        group_size=args.group_size,
        budget=args.budget,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        reveal_solution=args.feedback == "solution",
    )
    sample = make_sampler(tokenizer, temperature=args.temperature, max_new_tokens=args.max_completion_length)

    problems = hard_problems(
        model, tokenizer, args.problems, max_operand=args.max_operand, max_new_tokens=args.max_completion_length,
        pool=args.pool,
    )  # fmt: skip
    if not problems:
        print(f"the model answers all {args.pool} screened problems greedily; nothing hard to study", file=sys.stderr)
        return 1
    print(f"TTSD: {len(problems)} problems the model fails greedily (of {args.pool} screened)", flush=True)

    results = {
        "command": "python -m sdpo_ops.demo.ttsd " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model_path,
        "settings": {**vars(settings), "max_new_tokens": args.max_completion_length, "max_operand": args.max_operand},
        "problems": [problem.solution for problem in problems],
        "best_of_k": [],
        "ttsd": [],
    }
    for index, problem in enumerate(problems):
        torch.manual_seed(PROBLEM_SEED + index)
        baseline = best_of_k(model, tokenizer, problem, settings, sample)
        results["best_of_k"].append({"problem": problem.solution, **baseline})
        print(f"[{problem.solution}] best-of-{settings.budget}: {baseline['successes']} successes", flush=True)
        for seed in args.seeds:
            model.load_state_dict(base_state)  # every TTSD run starts from the base weights
            torch.manual_seed(seed * 100_003 + index)
            run_start = time.perf_counter()
            run = run_ttsd(model, tokenizer, problem, settings, sample)
            run.update(problem=problem.solution, seed=seed, time_s=time.perf_counter() - run_start)
            results["ttsd"].append(run)
            print(f"[{problem.solution}] TTSD seed {seed}: {describe_run(run)}", flush=True)
        model.load_state_dict(base_state)

    results["environment"] = environment()
    results["wall_time_s"] = time.perf_counter() - start
    ks = sorted({*range(settings.group_size, settings.budget + 1, settings.group_size), 1, settings.budget})
    table = discovery_table(results, ks)
    (output_dir / RESULTS_FILENAME).write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / TABLE_FILENAME).write_text(table + "\n")
    plot_discovery(
        results,
        output_dir / PLOT_FILENAME,
        title=f"TTSD vs best-of-k, {Path(model_path).name}, feedback={args.feedback}, operands 1..{args.max_operand}",
    )
    print(table)
    print(f"wrote {output_dir / RESULTS_FILENAME}, {output_dir / TABLE_FILENAME}, {output_dir / PLOT_FILENAME} "
          f"in {results['wall_time_s']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
