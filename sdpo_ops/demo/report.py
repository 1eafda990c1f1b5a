"""What a demo run prints and summarises: one line per optimizer step, and the held-out gain with its error."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from sdpo_ops.demo.evaluation import paired_gain


def finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def training_loss(record: dict) -> float | None:
    """The loss a method optimises: SDPO's distillation loss, else the trainer's loss (GRPO's policy loss)."""
    distillation = record.get("distillation_loss")
    return distillation if distillation is not None else record["loss"]


def format_step_line(record: dict, max_steps: int, label: str = "SDPO") -> str:
    """One line per optimizer step, e.g. ``SDPO step  3/12 | reward 0.31 | success 0.19 | loss 0.0123 | ...``."""
    line = (
        f"{label} step {record['step']:>3}/{max_steps}"
        f" | reward {_fmt(record['reward_mean'], '.3f', '  -  ')}"
        f" | success {_fmt(record['success_fraction'], '.2f', ' -  ')}"
    )
    if record.get("distillation_loss") is not None:
        line += (
            f" | teacher demo/fb {_fmt(record.get('demonstration_fraction'), '.2f', ' -  ')}"
            f"/{_fmt(record.get('feedback_fraction'), '.2f', ' -  ')}"
            f" | distill {_fmt(record['distillation_loss'], '.4f')}"
            f" | IS {_fmt(record.get('is_weight_mean'), '.3f')}"
        )
    else:
        line += f" | loss {_fmt(record['loss'], '.4f')}"
    return line + (
        f" | len {_fmt(record['completion_mean_length'], '.1f', ' - ')} | {_fmt(record['step_time_s'], '.1f')} s"
    )


def summarize(records: Sequence[dict], held_out: Sequence[dict], wall_time_s: float) -> dict:
    """Held-out accuracy before/after with its paired error, then the sampled reward and the loss by half."""
    generated = [r for r in records if r["generated"]]
    half = max(1, len(records) // 2)
    half_batches = max(1, len(generated) // 2)
    summary = {
        "steps": len(records),
        "generation_batches": len(generated),
        "wall_time_s": wall_time_s,
        "reward_mean_first_half": _mean(r["reward_mean"] for r in generated[:half_batches]),
        "reward_mean_second_half": _mean(r["reward_mean"] for r in generated[half_batches:]),
        "loss_first_half": _mean(training_loss(r) for r in records[:half]),
        "loss_second_half": _mean(training_loss(r) for r in records[half:]),
        "all_losses_finite": all(r["loss"] is not None for r in records),
    }
    if len(held_out) >= 2:
        first, last = held_out[0], held_out[-1]
        gain, error = paired_gain([r["correct"] for r in first["replies"]], [r["correct"] for r in last["replies"]])
        summary.update(
            held_out_problems=len(first["replies"]),
            held_out_accuracy_before=first["accuracy"],
            held_out_accuracy_after=last["accuracy"],
            held_out_gain=gain,
            held_out_gain_stderr=error,
        )
    return summary


def format_summary(summary: dict, label: str = "SDPO") -> str:
    lines = [
        f"{label}: {summary['steps']} steps ({summary['generation_batches']} generation batches) "
        f"in {summary['wall_time_s']:.0f} s"
    ]
    if "held_out_gain" in summary:
        lines.append(
            f"  held-out greedy accuracy ({summary['held_out_problems']} problems): "
            f"{summary['held_out_accuracy_before']:.3f} -> {summary['held_out_accuracy_after']:.3f}, "
            f"gain {summary['held_out_gain']:+.3f} +- {summary['held_out_gain_stderr']:.3f} (paired standard error)"
        )
    lines.append(
        f"  sampled reward: first half {_fmt(summary['reward_mean_first_half'], '.3f')}, second half "
        f"{_fmt(summary['reward_mean_second_half'], '.3f')}; loss: first half "
        f"{_fmt(summary['loss_first_half'], '.4f')}, second half {_fmt(summary['loss_second_half'], '.4f')}"
    )
    return "\n".join(lines)


def across_seeds(logs: Sequence[dict]) -> dict:
    """Mean and sample std over runs (seeds) of the held-out accuracy at every evaluated step, and of the gain."""

    def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
        mean = sum(values) / len(values)
        if len(values) < 2:
            return mean, None
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    steps = sorted(set.intersection(*({e["step"] for e in log["held_out"]} for log in logs))) if logs else []
    curve = []
    for step in steps:
        values = [next(e["accuracy"] for e in log["held_out"] if e["step"] == step) for log in logs]
        mean, std = mean_std(values)
        curve.append({"step": step, "mean": mean, "std": std, "values": values})
    gains = [log["summary"]["held_out_gain"] for log in logs if "held_out_gain" in log["summary"]]
    result = {"runs": len(logs), "seeds": [log["config"]["seed"] for log in logs], "curve": curve}
    if gains:
        result["gain_mean"], result["gain_std"] = mean_std(gains)
        result["gains"] = gains
    return result
