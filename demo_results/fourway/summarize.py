"""The four-way comparison at the demo's default budget: GRPO, pure SDPO, the 0.5 blend and sample routing.

Run from the repository root: ``python demo_results/fourway/summarize.py``. Reads the 3-seed run logs of each arm
(GRPO and routing: this directory; pure SDPO: demo_results/sdpo-8steps; the blend: demo_results/blend-8steps),
checks that they share every setting but the method's own, and writes summary.json, summary.md and curves.png here.
"""

import json
import math
from pathlib import Path

from sdpo_ops.demo import plot
from sdpo_ops.demo.report import across_seeds

HERE = Path(__file__).parent
ROOT = HERE.parent
ARMS = {
    "grpo": ROOT / "fourway" / "grpo-seed*",
    "sdpo (pure)": ROOT / "sdpo-8steps" / "sdpo-seed*",
    "blend 0.5": ROOT / "blend-8steps" / "sdpo-blend-seed*",
    "routing": ROOT / "fourway" / "routing-seed*",
}
# Everything but the method's own settings (and distillation_weight / sample_routing, which select the arm).
SHARED = (
    "model", "max_steps", "num_generations", "problems_per_generation", "steps_per_generation",
    "max_completion_length", "learning_rate", "temperature", "max_operand", "eval_problems", "eval_every",
)  # fmt: skip
SDPO_SHARED = ("topk", "alpha", "teacher_update_rate", "distillation_mode", "distillation_add_tail")


def main() -> None:
    logs = {}
    for arm, pattern in ARMS.items():
        paths = sorted(pattern.parent.glob(pattern.name + "/log.json"))
        logs[arm] = [json.loads(path.read_text()) for path in paths]
    reference = logs["grpo"][0]["config"]
    for arm, runs in logs.items():
        for run in runs:
            keys = SHARED + (SDPO_SHARED if arm != "grpo" else ())
            base = reference if arm == "grpo" else logs["sdpo (pure)"][0]["config"]
            different = {key: (run["config"][key], base[key]) for key in keys if run["config"][key] != base[key]}
            assert not different, (arm, different)
        # Same seed, same first generation batch: the first step's sampled reward is identical across arms.
        assert [r["steps"][0]["reward_mean"] for r in runs] == [r["steps"][0]["reward_mean"] for r in logs["grpo"]]
    stats = {arm: across_seeds(runs) for arm, runs in logs.items()}
    final = {arm: s["curve"][-1] for arm, s in stats.items()}
    held_out = len(logs["grpo"][0]["held_out"][0]["replies"])
    lines = [
        "| arm | seeds | step 0 | step 2 | step 4 | step 6 | step 8 | per-seed step 8 "
        "| paired diff vs GRPO at step 8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {"arms": {}, "held_out_problems": held_out}
    for arm, s in stats.items():
        cells = [f"{p['mean']:.3f} +- {p['std']:.3f}" for p in s["curve"]]
        diffs = [a - b for a, b in zip(final[arm]["values"], final["grpo"]["values"], strict=True)]
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        paired = "-" if arm == "grpo" else f"{mean:+.3f} +- {std:.3f}"
        per_seed = ", ".join(f"{v:.3f}" for v in final[arm]["values"])
        seeds = ", ".join(map(str, s["seeds"]))
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + f" | {per_seed} | {paired} |")
        summary["arms"][arm] = {
            **s,
            "paired_diff_vs_grpo_step8": diffs,
            "commands": sorted({r["command"] for r in logs[arm]}),
            "environment": logs[arm][-1]["environment"],
            "run_wall_times_s": [r["summary"]["wall_time_s"] for r in logs[arm]],
        }
    table = "\n".join(lines)
    (HERE / "summary.md").write_text(table + "\n")
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot._COLOURS.update({"sdpo (pure)": "tab:blue", "blend 0.5": "tab:green", "routing": "tab:red"})
    relabelled = [{**run, "method": arm} for arm, runs in logs.items() for run in runs]
    plot.plot_curves(relabelled, HERE / "curves.png", title="GRPO, SDPO, blend, routing: SmolLM2-135M, 8 steps")
    print(table)


if __name__ == "__main__":
    main()
