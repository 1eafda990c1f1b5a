"""One training run of the demo, SDPO or GRPO, on one shared setup.

Both methods get the same problems (drawn from the seed, none of them a held-out question), the same
reward (SDPO also reads its feedback, GRPO only the scores), the same model, generations per problem,
generation batches, optimizer steps, sampling temperature, optimizer and learning-rate schedule: only the
loss differs. :func:`build_config` is the one place that says which settings are the method's own.

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
  optimizer steps, so the second one is off-policy; on the first the weight is 1.

GRPO: TRL's ``GRPOTrainer`` with its defaults for everything the demo does not share (``beta=0``, no
reference model; ``loss_type="dapo"``; rewards scaled by the group's std; PPO clip 0.2 on the off-policy
step).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

from sdpo_ops.demo.evaluation import evaluate, held_out_problems, training_problems
from sdpo_ops.demo.report import finite_or_none, format_step_line, summarize
from sdpo_ops.demo.task import arithmetic_reward, completion_text, dataset_rows

METHODS = ("sdpo", "grpo")

# Keys of TRL's (and the adapter's) per-step logs -> the demo's names; a method logs only some of them.
_METRIC_KEYS = {
    "self_distillation/reward_mean": "reward_mean",
    "reward": "reward_mean",
    "self_distillation/distillation_loss": "distillation_loss",
    "self_distillation/is_weight_mean": "is_weight_mean",
    "self_distillation/is_clipped_fraction": "is_clipped_fraction",
    "self_distillation/topk_mass_mean": "topk_mass_mean",
    "self_distillation/success_sample_fraction": "demonstration_fraction",
    "self_distillation/feedback_used_fraction": "feedback_fraction",
    "self_distillation/reprompt_sample_fraction": "reprompt_fraction",
    "self_distillation/routed_to_distillation_fraction": "routed_to_distillation_fraction",
    "clip_ratio/region_mean": "ppo_clipped_fraction",
    "completions/mean_length": "completion_mean_length",
    "completions/clipped_ratio": "completion_truncated_fraction",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
}


class RecordingReward:
    """The task's reward for a trainer, remembering the scores and per-problem details of its last call.

    ``scores_only`` returns floats (GRPO); otherwise ``{"score", "feedback"}`` dicts (SDPO reads the feedback).
    """

    def __init__(self, success_threshold: float, *, scores_only: bool):
        self.success_threshold = success_threshold
        self.scores_only = scores_only
        self.__name__ = arithmetic_reward.__name__  # TRL names the reward's metric after it
        self.last_scores: list[float] = []
        self.last_problems: list[dict] = []

    def __call__(self, *args, **kwargs):
        results = arithmetic_reward(*args, **kwargs)
        self.last_scores = [float(item["score"]) for item in results]
        self.last_problems = per_problem(
            kwargs.get("prompts"), kwargs.get("solution"), kwargs.get("completions"), results, self.success_threshold
        )
        return self.last_scores if self.scores_only else results

    def take(self) -> tuple[float | None, list[dict]]:
        """``(success fraction, per-problem details)`` of the last reward call; ``(None, [])`` if already taken."""
        if not self.last_scores:
            return None, []
        scores, problems = self.last_scores, self.last_problems
        self.last_scores, self.last_problems = [], []
        return sum(score >= self.success_threshold for score in scores) / len(scores), problems


def per_problem(prompts, solutions, completions, results, threshold: float) -> list[dict]:
    """Per problem of a generation batch: its solution, success count, and one reply (a failed one if any)."""
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


def evaluation_steps(max_steps: int, eval_every: int) -> list[int]:
    """Optimizer steps after which the held-out set is scored: 0 (before training), every ``eval_every``, the end."""
    steps = list(range(0, max_steps, eval_every)) if eval_every > 0 else [0]
    return [*steps, max_steps] if steps[-1] != max_steps else steps


def _make_callback(recorder: RecordingReward, held_out, args, label: str, *, show_progress: bool):
    """A TrainerCallback scoring the held-out set on schedule and keeping one record per optimizer step."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    scheduled = set(evaluation_steps(args.max_steps, args.eval_every)) if held_out else set()

    class DemoCallback(TrainerCallback):
        def __init__(self):
            self.records: list[dict] = []
            self.held_out: list[dict] = []
            self._bar = None
            self._step_start = None
            self._step_time = None

        def _evaluate(self, step: int, model, processing_class) -> None:
            start = time.perf_counter()
            result = evaluate(model, processing_class, held_out, max_new_tokens=args.max_completion_length)
            self.held_out.append({"step": step, **result, "time_s": time.perf_counter() - start})
            self._write(
                f"{label} step {step:>3}: held-out greedy accuracy {result['accuracy']:.3f} "
                f"({sum(r['correct'] for r in result['replies'])}/{len(held_out)}, {time.perf_counter() - start:.0f} s)"
            )

        def on_train_begin(self, args_, state, control, model=None, processing_class=None, **kwargs):
            self._bar = tqdm(total=args.max_steps, desc=label, unit="step", disable=not show_progress, file=sys.stdout)
            if 0 in scheduled:
                self._evaluate(0, model, processing_class)

        def on_step_begin(self, args_, state, control, **kwargs):
            self._step_start = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, processing_class=None, **kwargs):
            if self._step_start is not None:
                self._step_time = time.perf_counter() - self._step_start
            if self._bar is not None:
                self._bar.update(1)
            if state.global_step in scheduled:
                self._evaluate(state.global_step, model, processing_class)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:  # the end-of-training summary (train_runtime, ...), not a step
                return
            record = {"step": int(state.global_step)}
            for source, name in _METRIC_KEYS.items():
                if record.get(name) is None:
                    record[name] = finite_or_none(logs.get(source))
            record["success_fraction"], record["problems"] = recorder.take()
            # Rewards are computed once per generation batch; steps reusing its rollouts log none.
            record["generated"] = record["reward_mean"] is not None
            record["step_time_s"] = self._step_time
            self.records.append(record)
            self._write(format_step_line(record, args.max_steps, label))

        def on_train_end(self, args_, state, control, **kwargs):
            if self._bar is not None:
                self._bar.close()

        def _write(self, line: str) -> None:
            if self._bar is not None and show_progress:
                self._bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    return DemoCallback()


def build_config(method: str, args, output_dir: Path, use_cuda: bool):
    """The trainer config of ``method``: the shared settings, then the method's own."""
    batch = args.problems_per_generation * args.num_generations
    shared = {
        "output_dir": str(output_dir / "trainer"),
        "max_steps": args.max_steps,
        "per_device_train_batch_size": batch // args.steps_per_generation,
        "steps_per_generation": args.steps_per_generation,
        "gradient_accumulation_steps": 1,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "temperature": args.temperature,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "seed": args.seed,
        "disable_dropout": True,
        # TRL's defaults (checkpointing on, cache off) trade speed for memory a 135M model does not need;
        # without the KV cache every sampled token re-runs the whole prefix.
        "activation_checkpointing": False,
        "use_cache": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not use_cuda,
        "bf16": use_cuda,
        "dataloader_num_workers": 0,
        "model_init_kwargs": {"dtype": "bfloat16" if use_cuda else "float32"},
    }
    if method == "grpo":
        from trl import GRPOConfig

        return GRPOConfig(**shared)
    if method != "sdpo":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    from sdpo_ops.adapters.trl import SDPOConfig

    return SDPOConfig(
        **shared,
        max_prompt_length=256,
        # SDPO loss: the official defaults, computed by sdpo_ops' fused loss.
        distillation_weight=args.distillation_weight,
        sample_routing=args.sample_routing,
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


def train_once(method: str, args, model_path: str, output_dir: Path, *, show_progress: bool = True) -> dict:
    """Train with ``method`` and return the run's log (config, environment, steps, held-out curve, summary)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    start = time.perf_counter()
    use_cuda = torch.cuda.is_available()
    held_out = held_out_problems(args.eval_problems, max_operand=args.max_operand)
    # Enough distinct problems that no problem repeats within the run.
    generation_batches = math.ceil(args.max_steps / args.steps_per_generation)
    problems = training_problems(
        max(64, generation_batches * args.problems_per_generation),
        args.seed,
        max_operand=args.max_operand,
        held_out=held_out,
    )
    config = build_config(method, args, output_dir, use_cuda)
    recorder = RecordingReward(0.5, scores_only=method == "grpo")
    label = method.upper()
    callback = _make_callback(recorder, held_out, args, label, show_progress=show_progress)
    if method == "grpo":
        from trl import GRPOTrainer as trainer_class
    else:
        from sdpo_ops.adapters.trl import SDPOTrainer as trainer_class
    trainer = trainer_class(
        model=model_path,
        reward_funcs=[recorder],
        args=config,
        train_dataset=Dataset.from_list(dataset_rows(problems)),
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # it would print every raw log dict
    batch = args.problems_per_generation * args.num_generations
    print(
        f"{label}: {args.max_steps} steps, {args.problems_per_generation} problems x {args.num_generations} replies "
        f"per generation batch, {batch // args.steps_per_generation} replies per step, up to "
        f"{args.max_completion_length} tokens each; held-out set of {len(held_out)} problems; "
        f"setup took {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    trainer.train()
    wall_time = time.perf_counter() - start
    return {
        "method": method,
        "config": {
            **vars(args),
            "model": model_path,
            **{
                key: getattr(config, key)
                for key in (
                    "distillation_mode",
                    "distillation_add_tail",
                    "distillation_is_clip",
                    "teacher_model_kind",
                    "success_reward_threshold",
                    "beta",
                    "loss_type",
                    "scale_rewards",
                    "epsilon",
                )
                if hasattr(config, key)
            },
        },
        "environment": environment(),
        "steps": callback.records,
        "held_out": callback.held_out,
        "summary": summarize(callback.records, callback.held_out, wall_time),
    }


def environment() -> dict:
    """Where a run ran: versions and the machine, for the committed results."""
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
