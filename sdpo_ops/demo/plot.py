"""``curves.png``: the held-out accuracy curve first, the sampled reward and the training loss beside it.

One figure for one run or many: runs are grouped by method, one colour per method, each seed a thin
line and, with several seeds, their mean a thick one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sdpo_ops.demo.report import training_loss

_COLOURS = {"sdpo": "tab:blue", "grpo": "tab:orange"}


def _series(rows, value):
    points = [(row["step"], value(row)) for row in rows if value(row) is not None]
    return tuple(zip(*points, strict=True)) if points else ((), ())


def _mean_curve(curves: Sequence[tuple[Sequence[int], Sequence[float]]]):
    """Pointwise mean over the steps all curves share."""
    shared = sorted(set.intersection(*(set(steps) for steps, _ in curves)))
    lookups = [dict(zip(steps, values, strict=True)) for steps, values in curves]
    return shared, [sum(lookup[step] for lookup in lookups) / len(lookups) for step in shared]


def plot_curves(logs: Sequence[dict], path: Path, title: str) -> None:
    """Draw the held-out accuracy, per-batch sampled reward and loss of ``logs`` (run logs) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (accuracy_axis, reward_axis, loss_axis) = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (
        (accuracy_axis, lambda log: _series(log["held_out"], lambda e: e["accuracy"]), "o"),
        (
            reward_axis,
            lambda log: _series([r for r in log["steps"] if r["generated"]], lambda r: r["reward_mean"]),
            ".",
        ),
        (loss_axis, lambda log: _series(log["steps"], training_loss), "."),
    )
    methods = list(dict.fromkeys(log["method"] for log in logs))
    for method in methods:
        runs = [log for log in logs if log["method"] == method]
        colour = _COLOURS.get(method, "tab:gray")
        for axis, series, marker in panels:
            curves = [series(log) for log in runs]
            curves = [curve for curve in curves if curve[0]]
            if not curves:
                continue
            single = len(curves) == 1
            for steps, values in curves:
                if single:
                    axis.plot(steps, values, marker + "-", color=colour, markersize=4)
                else:
                    axis.plot(steps, values, "-", color=colour, alpha=0.3)
            if not single:
                axis.plot(*_mean_curve(curves), "-", color=colour, linewidth=2.5)
            # One legend entry per method, whatever the number of seeds.
            axis.plot([], [], "-", color=colour, linewidth=2.5, label=f"{method.upper()} ({len(curves)} seed(s))")
    if len(logs) == 1 and "held_out_gain" in logs[0]["summary"]:
        summary = logs[0]["summary"]
        accuracy_axis.text(
            0.02,
            0.97,
            f"gain {summary['held_out_gain']:+.3f} +- {summary['held_out_gain_stderr']:.3f} (paired s.e.)",
            transform=accuracy_axis.transAxes,
            va="top",
            fontsize=9,
        )
    held_out_size = len(logs[0]["held_out"][0]["replies"]) if logs and logs[0]["held_out"] else 0
    accuracy_axis.set_title(f"held-out greedy accuracy ({held_out_size} fixed problems)")
    accuracy_axis.set_ylim(-0.02, 1.02)
    reward_axis.set_title("sampled reward per generation batch")
    reward_axis.set_ylim(-0.02, 1.02)
    loss_axis.set_title("training loss (SDPO: distillation; GRPO: policy)")
    for axis in (accuracy_axis, reward_axis, loss_axis):
        axis.set_xlabel("optimizer step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
