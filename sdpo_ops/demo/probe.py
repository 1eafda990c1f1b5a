"""``python -m sdpo_ops.demo.probe``: the readiness probe (:func:`sdpo_ops.adapters.probe.readiness_probe`) on the
demo's setup: its model, training problems (seed ``--seed``), reward with feedback, group size, temperature, reply
length and SDPO loss settings. Prints the verdict line and writes ``probe.json``. For one's own model, prompts and
reward, call ``readiness_probe`` directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sdpo_ops.demo.cli import start_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo_ops.demo.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (the demo's)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output-dir", default="demo_output/probe")
    parser.add_argument("--problems", type=int, default=16, help="training problems probed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training problems (the demo's --seed)")
    parser.add_argument("--max-operand", type=int, default=10)
    args = parser.parse_args(argv)
    if args.problems < 1:
        parser.error(f"--problems must be >= 1, got {args.problems}")
    start = time.perf_counter()
    output_dir, model_path = start_run(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_ops.adapters.probe import readiness_probe
    from sdpo_ops.demo.evaluation import held_out_problems, training_problems
    from sdpo_ops.demo.task import arithmetic_reward, dataset_rows
    from sdpo_ops.demo.train import environment

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    held_out = held_out_problems(48, max_operand=args.max_operand)  # the demo's held-out set stays out
    problems = training_problems(args.problems, args.seed, max_operand=args.max_operand, held_out=held_out)
    # The demo's defaults: groups of 8, temperature 0.7, 40 tokens, top-100 + tail, alpha 0.5.
    report = readiness_probe(
        model, tokenizer, dataset_rows(problems), arithmetic_reward, group_size=8, temperature=0.7, max_new_tokens=40,
        seed=args.seed, topk=100, add_tail=True, alpha=0.5,
    )  # fmt: skip
    print(report.verdict)
    result = {
        "command": "python -m sdpo_ops.demo.probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "report": report.as_dict(),
        "environment": environment(),
        "wall_time_s": time.perf_counter() - start,
    }
    (output_dir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
