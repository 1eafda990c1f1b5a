"""How far each trainer's bf16-autocast run lands from the fp32 run: TRL's ``SDPOTrainer`` against ours.

For each seed: a tiny Qwen2 (``tests/adapters_tiny.py``, seeded), 4 SDPO steps (top-K 5 + tail, GJSD 0.5,
plain SGD) in fp32 with TRL's trainer (the oracle; ours equals it in fp32), then under bf16 autocast with
TRL's trainer, with ours, and with ours forced to run its head on bf16 operands as TRL's lm_head does (what the
adapter did before; ``bf16_head``). Reported against the fp32 run:

- step 1 (same weights, same batch: the numerics alone): relative error of the loss, of the gradient norm, and
  of the weight update (``||dW - dW_fp32|| / ||dW_fp32||`` over all parameters);
- steps 1-4: relative error of each logged loss, and whether the run sampled the fp32 run's completions (once it
  does not, the two runs train on different data and the difference is no longer numerical).

    PYTHONPATH=. python tests/scripts/measure_trl_bf16.py --seeds 0 1 2 3 4 --out bf16.json
    PYTHONPATH=. python tests/scripts/measure_trl_bf16.py --device cuda   # the Triton kernels (needs a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from adapters_tiny import chat_dataset, make_model, make_tokenizer, save_model, tiny_sdpo_config  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer  # noqa: E402

from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402


def reward(completion_ids, **kwargs) -> list[float]:
    return [float(sum(ids) % 3 != 0) for ids in completion_ids]


class BF16HeadSDPOTrainer(SDPOTrainer):
    """Ours with the fused head's operands in bf16, as TRL's lm_head computes under autocast."""

    def _head_dtype(self, hidden, weight):
        return torch.bfloat16 if self.args.bf16 else hidden.dtype


class Record(TrainerCallback):
    """The completions of every generation batch, and the weights after the first optimizer step."""

    def __init__(self):
        self.completions = []
        self.weights_after_step1 = None

    def on_teacher_context_built(self, args, state, control, teacher_input_ids=None, **kwargs):
        self.completions.append(teacher_input_ids.tolist())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.weights_after_step1 = {n: v.detach().float().clone() for n, v in model.state_dict().items()}


def train(trainer_class, model_dir, tokenizer, output_dir, seed, bf16, use_cpu=True):
    args = tiny_sdpo_config(
        output_dir,
        use_cpu=use_cpu,
        max_steps=4,
        bf16=bf16,
        seed=seed,
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_add_tail=True,
        distillation_alpha=0.5,
    )
    recorder = Record()
    trainer = trainer_class(
        model=model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    set_seed(seed)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": [entry["loss"] for entry in logs],
        "grad_norm_step1": logs[0]["grad_norm"],
        "weights_after_step1": recorder.weights_after_step1,
        "completions": recorder.completions,
    }


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(run, reference, initial) -> dict:
    after, expected = run["weights_after_step1"], reference["weights_after_step1"]
    update_error = sum(float((after[n] - expected[n]).pow(2).sum()) for n in initial)
    update_norm = sum(float((expected[n] - initial[n]).pow(2).sum()) for n in initial)
    return {
        "step1_loss_relative_error": _relative(run["losses"][0], reference["losses"][0]),
        "step1_grad_norm_relative_error": _relative(run["grad_norm_step1"], reference["grad_norm_step1"]),
        "step1_update_relative_error": (update_error / update_norm) ** 0.5,
        "loss_relative_error": [_relative(a, b) for a, b in zip(run["losses"], reference["losses"], strict=True)],
        "same_completions": [a == b for a, b in zip(run["completions"], reference["completions"], strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the Triton path")
    options = parser.parse_args()
    use_cpu = options.device == "cpu"
    tokenizer = make_tokenizer()
    results = []
    with tempfile.TemporaryDirectory() as root:
        for seed in options.seeds:
            model_dir = save_model(Path(root) / f"model{seed}", tokenizer, make_model(len(tokenizer), seed=seed))
            initial = {n: v.float().clone() for n, v in make_model(len(tokenizer), seed=seed).state_dict().items()}
            fp32 = train(TRLSDPOTrainer, model_dir, tokenizer, Path(root) / "o", seed, False, use_cpu)
            ours_fp32 = train(SDPOTrainer, model_dir, tokenizer, Path(root) / "o", seed, False, use_cpu)
            row = {"seed": seed, "fp32_losses": fp32["losses"], "ours_fp32": compare(ours_fp32, fp32, initial)}
            for name, trainer_class in (
                ("trl_bf16", TRLSDPOTrainer),
                ("ours_bf16", SDPOTrainer),
                ("ours_bf16_with_bf16_head", BF16HeadSDPOTrainer),
            ):
                row[name] = compare(
                    train(trainer_class, model_dir, tokenizer, Path(root) / "o", seed, True, use_cpu), fp32, initial
                )
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name in ("ours_fp32", "trl_bf16", "ours_bf16", "ours_bf16_with_bf16_head"):
        summary[name] = {
            key: sum(row[name][key] for row in results) / len(results)
            for key in ("step1_loss_relative_error", "step1_grad_norm_relative_error", "step1_update_relative_error")
        }
        matched = [
            error
            for row in results
            for error, same in zip(row[name]["loss_relative_error"], row[name]["same_completions"], strict=True)
            if same
        ]
        same = [s for row in results for s in row[name]["same_completions"]]
        summary[name]["steps_with_fp32_completions"] = f"{sum(same)}/{len(same)}"
        summary[name]["loss_relative_error_on_those_steps"] = sum(matched) / max(len(matched), 1)
    print(json.dumps(summary, indent=2))
    if options.out:
        Path(options.out).write_text(json.dumps({"runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
