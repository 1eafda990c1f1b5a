"""A resumed ``sdpo_ops.adapters.trl.SDPOTrainer`` run keeps its EMA teacher (full copy and LoRA shadow).

The oracle is the same run uninterrupted: 4 steps with a checkpoint at step 2, then a fresh trainer resumed
from that checkpoint must hold, before its first step, the teacher the first run saved (bit for bit, and not
the base model), and end with the same student and teacher, bit for bit. The reward depends only on the
sampled completion, and the checkpoint carries TRL's RNG state, so the resumed run samples the same rollouts.
(TRL's own trainer fails this: its teacher restarts from the base model, or from a zero adapter.)
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from adapters_tiny import chat_dataset, make_model, make_tokenizer, save_model, tiny_sdpo_config  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402

from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402
from sdpo_ops.adapters.trl_teacher import TEACHER_STATE_FILE  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_model(tmp_path_factory.mktemp("tiny_qwen2"), tokenizer, make_model(len(tokenizer)))


def parity_reward(completion_ids, **kwargs) -> list[float]:
    """A function of the completion alone (no call counter), so a resumed run scores its rollouts alike.

    About two in three succeed: most groups mix successes (demonstrations) and failures."""
    return [float(sum(ids) % 3 != 0) for ids in completion_ids]


def _is_teacher_adapter(name: str) -> bool:
    return ".teacher." in name


def teacher_weights(trainer) -> dict[str, torch.Tensor]:
    """The teacher's tensors: the LoRA "teacher" adapter, or the separate EMA model."""
    if trainer.teacher_model is trainer.model:
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if _is_teacher_adapter(n)}
    return {n: v.detach().clone() for n, v in trainer.teacher_model.state_dict().items()}


def student_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not _is_teacher_adapter(n)}


class TeacherSnapshots(TrainerCallback):
    """The teacher when each checkpoint is saved, and before the first step a (resumed) run takes."""

    def __init__(self):
        self.trainer = None
        self.at_save: dict[int, dict[str, torch.Tensor]] = {}
        self.before_first_step: dict[str, torch.Tensor] | None = None

    def on_save(self, args, state, control, **kwargs):
        self.at_save[state.global_step] = teacher_weights(self.trainer)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.before_first_step is None:
            self.before_first_step = teacher_weights(self.trainer)


def _trainer(model_dir, tokenizer, output_dir: Path, peft_config=None, **overrides):
    options = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "distillation_mode": "topk_logits",
        "distillation_topk": 5,
        "distillation_alpha": 0.5,
        "teacher_model_kind": "ema",
        # A fast EMA, so the teacher moves visibly in two steps.
        "teacher_update_rate": 0.3,
    }
    args = tiny_sdpo_config(output_dir, **{**options, **overrides})
    snapshots = TeacherSnapshots()
    trainer = SDPOTrainer(
        model=model_dir,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=chat_dataset(),
        processing_class=tokenizer,
        callbacks=[snapshots],
        peft_config=peft_config,
    )
    snapshots.trainer = trainer
    return trainer, snapshots


def _assert_bitwise_equal(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{what} {n}: {m}")


def _lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


# A LoRA checkpoint holds the EMA adapter twice: in our file, and in the "teacher/" folder PEFT writes for every
# adapter (which transformers loads back on resume, and TRL's callback then fails to add again). Each alone must
# restore it: our file (the one that exists under FSDP2/DDP by design), or PEFT's folder (a TRL-written checkpoint).
RESUME_CASES = {
    "ema_copy": (False, None),
    "lora_from_teacher_file": (True, "teacher"),
    "lora_from_peft_adapter_folder": (True, TEACHER_STATE_FILE),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resumed_run_keeps_the_teacher_and_ends_like_the_uninterrupted_one(case, model_dir, tokenizer, tmp_path):
    use_lora, removed = RESUME_CASES[case]
    peft_config = _lora() if use_lora else None
    uninterrupted, snapshots = _trainer(model_dir, tokenizer, tmp_path / "full", peft_config)
    set_seed(0)
    uninterrupted.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / TEACHER_STATE_FILE).is_file()
    if removed is not None:
        shutil.rmtree(checkpoint / removed) if (checkpoint / removed).is_dir() else (checkpoint / removed).unlink()

    resumed, resumed_snapshots = _trainer(model_dir, tokenizer, tmp_path / "resumed", peft_config)
    initial_teacher = teacher_weights(resumed)  # the base model (TRL's copy), or the zero adapter after train begin
    set_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(checkpoint))
    # The teacher is restored: no "checkpoint has no teacher state" warning.
    assert not [w for w in caught if TEACHER_STATE_FILE in str(w.message)]

    restored = resumed_snapshots.before_first_step
    _assert_bitwise_equal(restored, snapshots.at_save[2], "teacher right after resume")
    if peft_config is None:
        assert any(not torch.equal(restored[n], initial_teacher[n]) for n in restored), "teacher is the base model"
    else:
        # TRL's teacher adapter starts at zero (the base model's outputs); ours resumed from a non-zero EMA.
        assert all(torch.count_nonzero(value) > 0 for value in restored.values())

    _assert_bitwise_equal(student_weights(resumed), student_weights(uninterrupted), "final student")
    _assert_bitwise_equal(teacher_weights(resumed), teacher_weights(uninterrupted), "final teacher")
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    resumed_losses = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    # The resumed run carries the logs of steps 1-2 from the checkpoint, then logs steps 3-4 alike.
    assert resumed_losses == losses and len(losses) == 4
    # The resumed steps distilled something (a zero loss would make the teacher's effect invisible).
    assert all(loss > 0 for loss in losses[2:])


def test_resume_without_teacher_state_warns(model_dir, tokenizer, tmp_path):
    first, _ = _trainer(model_dir, tokenizer, tmp_path / "first", max_steps=2)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-2"
    (checkpoint / TEACHER_STATE_FILE).unlink()  # as a checkpoint written by TRL's own SDPOTrainer

    resumed, snapshots = _trainer(model_dir, tokenizer, tmp_path / "resumed", max_steps=3)
    base = teacher_weights(resumed)
    with pytest.warns(UserWarning, match=TEACHER_STATE_FILE):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_bitwise_equal(snapshots.before_first_step, base, "teacher without saved state")
