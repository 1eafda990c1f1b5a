"""Train ``sdpo_ops.adapters.trl.SDPOTrainer`` for a few steps on a fixed, deterministic setup.

Run it with plain ``python`` (one process) or under ``accelerate launch --multi_gpu --num_processes 2`` (DDP on
gloo with ``use_cpu=True``): with ``--global-batch`` fixed, both runs see the same prompts, the same greedy
completions and the same rewards, so they must log the same losses and end with the same weights. Each process
saves its logs, weights and teacher to ``<out>/rank<i>.pt``.

``--fsdp2`` shards the student and teacher with FSDP2 on CPU/gloo. accelerate has no CPU FSDP: on a machine
without a GPU its state silently turns an FSDP plugin into plain MULTI_CPU data parallelism. The narrowest
way in is at that boundary: after ``AcceleratorState`` resolved MULTI_CPU, set the FSDP distributed type and
the plugin it dropped; everything downstream (transformers, TRL, accelerate's FSDP2 preparation) then takes
its real FSDP2 path.

``--save-steps N`` checkpoints every N steps; ``--then-resume-from-step K`` then trains a fresh trainer resumed
from the checkpoint at step K, in the same processes (one launch instead of two: start-up is most of the time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback, set_seed  # noqa: E402

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


def reward_without_feedback(prompts, completion_ids, **kwargs) -> list[float]:
    """As :func:`reward_by_prompt`, without feedback: the failing prompt's group has nothing to distil (no
    demonstration, no feedback), so the process that holds it distils no token."""
    return [float("yes" in prompt[-1]["content"]) for prompt in prompts]


def force_fsdp_on_cpu() -> None:
    """Make accelerate keep the FSDP plugin it drops on a CPU-only machine (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    resolve = AcceleratorState.__init__

    def resolve_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        resolve(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does on GPUs: the process-wide state carries the type too (every later
            # AcceleratorState() copies it from there).
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = resolve_keeping_fsdp


def use_gloo_for_deepspeed_on_cpu() -> None:
    """Make accelerate pick gloo for the processes a launcher started on a CPU-only machine.

    Under DeepSpeed the state must be built with ``use_cpu=False`` (``cpu=True`` skips its DeepSpeed set-up), and
    then accelerate's backend detection finds no accelerator backend: it counts one process while DeepSpeed (whose
    CPU accelerator runs gloo) sees two. The narrowest patch is that detection's answer.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    detect = PartialState._prepare_backend

    def detect_or_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
        found, distributed_type = detect(self, cpu, sagemaker_dp, backend)
        if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return found, distributed_type

    PartialState._prepare_backend = detect_or_gloo


def deepspeed_config(stage: int) -> dict:
    """ZeRO ``stage`` on CPU, fp32; every parameter partitioned (no small one kept whole on each rank)."""
    return {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _gathered(parameters: list[torch.nn.Parameter]):
    """ZeRO-3 shards gathered whole for the duration of the context (nothing to do otherwise)."""
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters)
    return contextlib.nullcontext()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, torch.distributed.tensor.DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def _named_weights(model: torch.nn.Module, keep) -> dict[str, torch.Tensor]:
    named = [(name, p) for name, p in model.named_parameters() if keep(name)]
    with _gathered([p for _, p in named]):
        return {name: _full(p) for name, p in named}


def model_weights(trainer) -> dict[str, torch.Tensor]:
    """The student's parameters, whole (gathered from FSDP2/ZeRO-3 shards), without the LoRA teacher adapter."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return _named_weights(model, lambda name: ".teacher." not in name)


def teacher_weights(trainer) -> dict[str, torch.Tensor]:
    """The EMA teacher's tensors, whole: the LoRA "teacher" adapter, or the separate copy's parameters."""
    if trainer.teacher_model is trainer.model:
        model = trainer.accelerator.unwrap_model(trainer.model)
        return _named_weights(model, lambda name: ".teacher." in name)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    return _named_weights(teacher, lambda name: True)


class TeacherSnapshots(TrainerCallback):
    """The teacher before the first step this process takes (right after a resume: the restored one), and at
    each checkpoint save (every rank joins the FSDP2 gathers)."""

    def __init__(self):
        self.trainer = None
        self.at_first_step = None
        self.at_save = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at_first_step is None:
            self.at_first_step = teacher_weights(self.trainer)

    def on_save(self, args, state, control, **kwargs):
        self.at_save[state.global_step] = teacher_weights(self.trainer)


def train(options, output_dir: str, resume_from: str | None) -> dict:
    """One training run (a fresh trainer, as a new process builds it); returns what this rank records."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    sharding = {}
    if options.fsdp2:
        sharding = {
            "fsdp": "full_shard",
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]},
        }
    args = SDPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=options.global_batch // world_size,
        gradient_accumulation_steps=1,
        num_generations=4,
        max_completion_length=8,
        max_steps=options.max_steps,
        # The second step reuses the rollout: old log-probs and the IS weight are active.
        num_iterations=2,
        # Greedy decoding: the completions do not depend on how the random streams are split across ranks.
        generation_kwargs={"do_sample": False},
        distillation_mode=options.mode,
        distillation_topk=5 if options.mode == "topk_logits" else None,
        teacher_model_kind=options.teacher,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        include_environment_feedback=True,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        bf16=False,
        # The saved model's dtype (the test saves float64), for the student and TRL's teacher copy.
        model_init_kwargs={"dtype": "auto"},
        seed=0,
        # With checkpoints, SGD with momentum: the optimizer then has state a resume must restore (and torch's
        # FSDP2 full-state-dict optimizer loading fails on a stateless optimizer: "Expected device to be set").
        optim_args="momentum=0.5" if options.save_steps else None,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        # A fast EMA, so that the teacher moves visibly in two steps.
        teacher_update_rate=0.3,
        disable_tqdm=True,
        # DeepSpeed runs with use_cpu=False: use_cpu=True would skip accelerate's DeepSpeed set-up.
        use_cpu=not options.zero,
        deepspeed=deepspeed_config(options.zero) if options.zero else None,
        **sharding,
    )
    peft_config = None
    if options.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    tokenizer = AutoTokenizer.from_pretrained(options.model_dir)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": text}] for text in PROMPTS]})
    snapshots = TeacherSnapshots()
    trainer = SDPOTrainer(
        model=options.model_dir,
        reward_funcs=reward_without_feedback if options.no_feedback else reward_by_prompt,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[snapshots],
        peft_config=peft_config,
    )
    snapshots.trainer = trainer
    set_seed(args.seed)
    trainer.train(resume_from_checkpoint=resume_from)
    return {
        "logs": trainer.state.log_history,
        "weights": model_weights(trainer),
        "teacher": teacher_weights(trainer),
        "teacher_at_first_step": snapshots.at_first_step,
        "teacher_at_save": snapshots.at_save,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
    }


def parse_runs(argv: list[str]) -> list[argparse.Namespace]:
    """One or more runs, their options separated by ``+`` (several runs share one launch: start-up dominates)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument(
        "--then-resume-from-step",
        type=int,
        default=None,
        help="after the run, resume a fresh trainer from its checkpoint at this step (saved as rank<i>_resumed.pt)",
    )
    parser.add_argument("--fsdp2", action="store_true")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=None, help="DeepSpeed ZeRO stage")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--teacher", choices=("ema", "base"), default="ema", help="teacher_model_kind")
    parser.add_argument("--mode", choices=("topk_logits", "full_logits"), default="topk_logits")
    parser.add_argument("--no-feedback", action="store_true", help="the failing prompt's group distils nothing")
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "+":
            groups.append([])
        else:
            groups[-1].append(arg)
    return [parser.parse_args(group) for group in groups]


def main() -> None:
    runs = parse_runs(sys.argv[1:])
    if any(options.fsdp2 for options in runs):
        force_fsdp_on_cpu()
    if any(options.zero for options in runs):
        use_gloo_for_deepspeed_on_cpu()

    rank = int(os.environ.get("RANK", "0"))
    for options in runs:
        os.makedirs(options.out, exist_ok=True)
        run_dir = os.path.join(options.out, "trainer")
        torch.save(train(options, run_dir, None), os.path.join(options.out, f"rank{rank}.pt"))
        if options.then_resume_from_step is not None:
            checkpoint = os.path.join(run_dir, f"checkpoint-{options.then_resume_from_step}")
            record = train(options, os.path.join(options.out, "resumed"), checkpoint)
            torch.save(record, os.path.join(options.out, f"rank{rank}_resumed.pt"))


if __name__ == "__main__":
    main()
