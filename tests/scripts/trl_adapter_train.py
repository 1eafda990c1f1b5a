"""Train ``sdpo_ops.adapters.trl.SDPOTrainer`` for two steps on a fixed, deterministic setup.

Run it with plain ``python`` (one process) or under ``accelerate launch --num_processes 2 --cpu`` (DDP on
gloo): with ``--global-batch`` fixed, both runs see the same prompts, the same greedy completions and the
same rewards, so they must log the same losses and end with the same weights. Each process saves its logs
and weights to ``<out>/rank<i>.pt``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, set_seed  # noqa: E402

from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer  # noqa: E402

# Same length in tokens, so no process left-pads a prompt that another run would not.
PROMPTS = ["say yes", "say nay"]


def reward_by_prompt(prompts, completion_ids, **kwargs) -> list[dict]:
    """The "yes" prompt succeeds, the other fails with feedback naming its completion (a per-sample text
    that must travel across processes to the teacher prompt)."""
    items = []
    for prompt, ids in zip(prompts, completion_ids, strict=True):
        success = "yes" in prompt[-1]["content"]
        items.append({"score": float(success), "feedback": None if success else f"Wrong: total {sum(ids)}."})
    return items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    options = parser.parse_args()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = SDPOConfig(
        output_dir=os.path.join(options.out, "trainer"),
        per_device_train_batch_size=options.global_batch // world_size,
        gradient_accumulation_steps=1,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        # The second step reuses the rollout: old log-probs and the IS weight are active.
        num_iterations=2,
        # Greedy decoding: the completions do not depend on how the random streams are split across ranks.
        generation_kwargs={"do_sample": False},
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        include_environment_feedback=True,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(options.model_dir)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": text}] for text in PROMPTS]})
    trainer = SDPOTrainer(
        model=options.model_dir,
        reward_funcs=reward_by_prompt,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    set_seed(args.seed)
    trainer.train()
    weights = {name: value.detach().cpu().clone() for name, value in trainer.model.state_dict().items()}
    rank = trainer.accelerator.process_index
    record = {"logs": trainer.state.log_history, "weights": weights, "num_processes": trainer.accelerator.num_processes}
    torch.save(record, os.path.join(options.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
