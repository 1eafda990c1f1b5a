"""``sdpo_ops.adapters.trl.SDFTTrainer`` against TRL's own ``trl.experimental.sdft.SDFTTrainer``.

Code under test: ``sdpo_ops/adapters/trl_sdft.py`` and the fused forward it shares with SDPO, ``trl_fused.py``.

Same tiny Qwen2, same seed, same config, float64 throughout (model, teacher copy, served teacher): both trainers must
log the same values and end with the same weights after a few optimizer steps, to float64 rounding (TRL's
full-logits path is the oracle). Covered: top-K with the tail bucket, top-K renormalised, the full vocabulary, the
sampled token with the IS weight, ``num_loss_tokens_to_skip``, the base/EMA/live teacher, a LoRA student with its EMA
"teacher" adapter, and the vLLM-served teacher (the client replaced at its boundary, as in
test_trl_teacher_server.py). Our runs never call TRL's ``_forward_logits`` (the ``[B, T, V]`` logits). A resumed run
keeps its EMA teacher; configs TRL would fail on only after a rollout are refused in ``__init__``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from tolerances import ELEMENTWISE, TRAINER_FP32_LOG, TRAINER_FP32_WEIGHT_UPDATE

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from adapters_tiny import PROMPTS, chat_dataset, make_model, make_tokenizer, save_model, tiny_sdft_config  # noqa: E402

# The vLLM client stand-in and the checkpoint snapshots of the SDPO adapter's tests, reused rather than copied.
from test_trl_checkpoint import (  # noqa: E402
    TeacherSnapshots,
    _assert_bitwise_equal,
    student_weights,
    teacher_weights,
)
from test_trl_teacher_server import stand_in  # noqa: E402, F401 - a fixture
from transformers import AutoModelForCausalLM, set_seed  # noqa: E402
from trl.experimental.sdft import SDFTTrainer as TRLSDFTTrainer  # noqa: E402

from sdpo_ops.adapters.trl import SDFTTrainer  # noqa: E402
from sdpo_ops.adapters.trl_teacher import TEACHER_STATE_FILE  # noqa: E402

# Two implementations of the same float64 arithmetic, differing in the order of sums: measured differences are
# ~1e-16 in the logged values and the weight updates (2 to 3 steps), far inside the float64 elementwise tolerance.
FP64 = ELEMENTWISE[torch.float64]
# Except where TRL computes in float32 itself: it stores the served teacher's top-k log-probs as float32
# (``_get_teacher_token_logprobs_from_server``) and renormalises them / adds their tail bucket in float32, where the
# fused loss promotes them to the student's float64 first. That bounds the difference by an fp32 run's: the measured
# fp32 bounds of tests/tolerances.py, as in the SDPO server test (measured here, served top-K with the tail, 3 steps:
# 2.3e-6 relative in the logged losses, 5.3e-8 absolute in the weight updates; the sampled token, whose log-probs
# TRL uses in float64, agrees to 1e-16).
FP32_TEACHER_SIDE = (TRAINER_FP32_LOG, TRAINER_FP32_WEIGHT_UPDATE)
# Keys of TRL's logs that are wall-clock measurements, not results.
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
# SDFT's demonstration per prompt: the teacher sees it, the student does not.
DEMONSTRATIONS = [f"Example answer: {prompt[::-1]}" for prompt in PROMPTS]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """float64 on disk: TRL builds the base/EMA teacher copy from the path, in the student's dtype."""
    return save_model(tmp_path_factory.mktemp("sdft_qwen2"), tokenizer, make_model(len(tokenizer)).double())


def _student(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)


def _dataset(**columns):
    return chat_dataset(**{"privileged_context": DEMONSTRATIONS, **columns})


def _make_trainer(trainer_class, model_dir, tokenizer, args, **kwargs):
    return trainer_class(
        model=_student(model_dir), args=args, train_dataset=_dataset(), processing_class=tokenizer, **kwargs
    )


def _train(trainer_class, model_dir, tokenizer, args, monkeypatch, peft_config=None):
    """Train; returns (log history, weights, initial weights). Ours must never ask TRL for ``[B, T, V]`` logits."""
    trainer = _make_trainer(trainer_class, model_dir, tokenizer, args, peft_config=peft_config)
    initial = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    with monkeypatch.context() as patch:
        if trainer_class is SDFTTrainer:

            def refuse(*args, **kwargs):
                raise AssertionError("the fused trainer formed [B, T, V] logits (TRL's _forward_logits)")

            patch.setattr(TRLSDFTTrainer, "_forward_logits", refuse)
        set_seed(args.seed)
        trainer.train()
    weights = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    return trainer.state.log_history, weights, initial


def _assert_same_training(ours, theirs, tolerances=(FP64, FP64)) -> list[dict]:
    """Every value TRL logged, logged alike by us; every parameter updated alike (and some updated). Our logs.

    ``tolerances``: (logged values, weight updates)."""
    log_tolerance, update_tolerance = tolerances
    (our_logs, our_weights, our_initial), (trl_logs, trl_weights, trl_initial) = ours, theirs
    assert len(our_logs) == len(trl_logs)
    for step, (our_entry, trl_entry) in enumerate(zip(our_logs, trl_logs, strict=True)):
        for key, expected in trl_entry.items():
            if key in TIMING_KEYS:
                continue
            assert key in our_entry, f"step {step}: {key} missing from our logs"
            torch.testing.assert_close(
                torch.tensor(float(our_entry[key]), dtype=torch.float64),
                torch.tensor(float(expected), dtype=torch.float64),
                **log_tolerance,
                msg=lambda message, key=key, step=step: f"step {step}, {key}: {message}",
            )
    assert our_weights.keys() == trl_weights.keys()
    moved = 0.0
    for name, expected in trl_weights.items():
        # TRL adds the LoRA EMA "teacher" adapter at train begin, zero-initialised.
        trl_start = trl_initial.get(name, torch.zeros_like(expected))
        our_start = our_initial.get(name, torch.zeros_like(expected))
        torch.testing.assert_close(our_start, trl_start, rtol=0, atol=0)  # same seed, same start
        assert expected.dtype == torch.float64, name
        torch.testing.assert_close(
            our_weights[name] - our_start,
            expected - trl_start,
            **update_tolerance,
            msg=lambda message, name=name: f"update of {name}: {message}",
        )
        moved = max(moved, float((expected - trl_start).abs().max()))
    assert moved > 1e-3, "the weights barely moved: the comparison would not detect a wrong gradient"
    losses = [entry["loss"] for entry in our_logs if "loss" in entry]
    assert losses and all(loss != 0.0 for loss in losses), "nothing was distilled"
    return our_logs


EQUIVALENCE_CASES = {
    # SDFT's default mode: the student's top-K with the tail bucket, generalised JSD; the first completion tokens
    # skipped; the EMA teacher (a separate copy, moved fast so its updates show).
    "topk_tail_ema_skip": {
        "distillation_mode": "topk_logits",
        "distillation_topk": 5,
        "distillation_add_tail": True,
        "distillation_alpha": 0.5,
        "num_loss_tokens_to_skip": 2,
        "teacher_model_kind": "ema",
        "teacher_update_rate": 0.3,
    },
    # Top-K renormalised, reverse KL, the live teacher (the student itself, with the demonstration).
    "topk_renormalised_live": {
        "distillation_mode": "topk_logits",
        "distillation_topk": 7,
        "distillation_add_tail": False,
        "distillation_alpha": 1.0,
        "teacher_model_kind": "live",
    },
    # The whole vocabulary, forward KL, the frozen base teacher (SDFT's default); rollouts sampled from the
    # teacher's prompt, so no rollout log-probs.
    "full_logits_base_generate_from_teacher": {
        "distillation_mode": "full_logits",
        "distillation_alpha": 0.0,
        "generate_from_teacher": True,
    },
    # Token-level reverse KL from the target log-probs; two iterations per rollout so that the clipped IS weight
    # (from the fused rollout log-probs) is active.
    "sampled_token_is": {
        "distillation_mode": "sampled_token",
        "distillation_alpha": 1.0,
        "distillation_topk": None,
        "num_iterations": 2,
        "max_steps": 3,
        "distillation_is_clip": 1.05,
    },
}


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_matches_trl_losses_and_weights(case, model_dir, tokenizer, tmp_path, monkeypatch):
    overrides = EQUIVALENCE_CASES[case]
    args = tiny_sdft_config(tmp_path / "out", **overrides)
    theirs = _train(TRLSDFTTrainer, model_dir, tokenizer, args, monkeypatch)
    ours = _train(SDFTTrainer, model_dir, tokenizer, args, monkeypatch)
    our_logs = _assert_same_training(ours, theirs)[:-1]
    if overrides["distillation_mode"] == "topk_logits":
        assert all(0.0 < entry["self_distillation/topk_mass_mean"] < 1.0 for entry in our_logs)
    if overrides.get("num_iterations", 1) > 1:
        # Second iterations reuse the rollout, after an optimizer step: the weights are no longer 1.
        weights = [entry["self_distillation/is_weight_mean"] for entry in our_logs]
        assert any(abs(weight - 1.0) > 1e-4 for weight in weights)
        assert all(0.0 < weight <= args.distillation_is_clip for weight in weights)


def _lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_matches_trl_with_lora_ema_teacher(model_dir, tokenizer, tmp_path, monkeypatch):
    """PEFT: the backbone is reached below the PeftModel, the EMA teacher is TRL's "teacher" adapter."""
    args = tiny_sdft_config(
        tmp_path / "out",
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_add_tail=True,
        teacher_model_kind="ema",
        teacher_update_rate=0.3,
        learning_rate=2.0,
    )
    theirs = _train(TRLSDFTTrainer, model_dir, tokenizer, args, monkeypatch, peft_config=_lora())
    ours = _train(SDFTTrainer, model_dir, tokenizer, args, monkeypatch, peft_config=_lora())
    assert any(".teacher." in name for name in ours[1])
    _assert_same_training(ours, theirs)


SERVED_CASES = {
    "topk_tail_jsd": {"distillation_add_tail": True, "distillation_alpha": 0.5, "num_loss_tokens_to_skip": 1},
    # two optimizer steps per rollout: rollout log-probs (the IS weight) and a weight sync per step
    "sampled_token_is": {
        "distillation_mode": "sampled_token",
        "distillation_alpha": 1.0,
        "distillation_topk": None,
        "steps_per_generation": 2,
        "per_device_train_batch_size": 2,
        "distillation_is_clip": 1.5,
    },
}


@pytest.mark.parametrize("case", list(SERVED_CASES))
def test_served_teacher_matches_trl(case, stand_in, model_dir, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    options = {
        "use_vllm": True,
        "vllm_mode": "server",
        "use_teacher_server": True,
        "teacher_model_kind": "live",
        "distillation_mode": "topk_logits",
        "distillation_topk": 5,
        **SERVED_CASES[case],
    }
    runs, servers = {}, {}
    for name, trainer_class in (("trl", TRLSDFTTrainer), ("ours", SDFTTrainer)):
        servers[name] = stand_in(model_dir)
        assert servers[name].model.dtype == torch.float64
        args = tiny_sdft_config(tmp_path / name, **options)
        runs[name] = _train(trainer_class, model_dir, tokenizer, args, monkeypatch)
    for counter in ("weight_syncs", "generate_calls", "scored"):
        assert getattr(servers["ours"], counter) == getattr(servers["trl"], counter) > 0, counter
    tolerances = FP32_TEACHER_SIDE if options["distillation_mode"] == "topk_logits" else (FP64, FP64)
    our_logs = _assert_same_training(runs["ours"], runs["trl"], tolerances)
    assert any("self_distillation/server_logprob_abs_diff" in entry for entry in our_logs)


def _checkpointed_trainer(model_dir, tokenizer, output_dir, peft_config=None, **overrides):
    options = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "distillation_mode": "topk_logits",
        "distillation_topk": 5,
        "teacher_model_kind": "ema",
        "teacher_update_rate": 0.3,  # a fast EMA: the teacher moves visibly in two steps
        **overrides,
    }
    snapshots = TeacherSnapshots()
    trainer = _make_trainer(
        SDFTTrainer,
        model_dir,
        tokenizer,
        tiny_sdft_config(output_dir, **options),
        callbacks=[snapshots],
        peft_config=peft_config,
    )
    snapshots.trainer = trainer
    return trainer, snapshots


@pytest.mark.parametrize("use_lora", [False, True], ids=["ema_copy", "lora_ema_adapter"])
def test_resumed_run_keeps_the_teacher(use_lora, model_dir, tokenizer, tmp_path):
    """4 steps with a checkpoint at 2, against a fresh trainer resumed from it: the teacher it holds before its first
    step is the one saved (not the base model, not a zero adapter), and both runs end alike, bit for bit."""
    peft_config = _lora() if use_lora else None
    uninterrupted, snapshots = _checkpointed_trainer(model_dir, tokenizer, tmp_path / "full", peft_config)
    set_seed(0)
    uninterrupted.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / TEACHER_STATE_FILE).is_file()

    resumed, resumed_snapshots = _checkpointed_trainer(model_dir, tokenizer, tmp_path / "resumed", peft_config)
    initial_teacher = teacher_weights(resumed)
    set_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not [w for w in caught if TEACHER_STATE_FILE in str(w.message)]

    restored = resumed_snapshots.before_first_step
    _assert_bitwise_equal(restored, snapshots.at_save[2], "teacher right after resume")
    if use_lora:
        assert all(torch.count_nonzero(value) > 0 for value in restored.values()), "the zero adapter"
    else:
        assert any(not torch.equal(restored[n], initial_teacher[n]) for n in restored), "the base model"
    _assert_bitwise_equal(student_weights(resumed), student_weights(uninterrupted), "final student")
    _assert_bitwise_equal(teacher_weights(resumed), teacher_weights(uninterrupted), "final teacher")
    losses = [entry["loss"] for entry in uninterrupted.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in resumed.state.log_history if "loss" in entry] == losses
    assert len(losses) == 4 and all(loss != 0 for loss in losses[2:])


# Each bad value, the field the error must name; all refused in __init__ (the top-K bound right after TRL loads
# the model, from the lm_head's V), where TRL's trainer fails only after the first rollout, or silently misreads.
BAD_CONFIGS = {
    "skip_negative": ({"num_loss_tokens_to_skip": -1}, "num_loss_tokens_to_skip"),
    "skip_float": ({"num_loss_tokens_to_skip": 1.5}, "num_loss_tokens_to_skip"),
    "topk_above_vocab": ({"distillation_topk": "V+1"}, "distillation_topk"),
    "alpha_above_one": ({"distillation_alpha": 1.5}, "distillation_alpha"),
    "is_clip_zero": ({"distillation_is_clip": 0.0}, "distillation_is_clip"),
    "teacher_kind_typo": ({"teacher_model_kind": "emma"}, "teacher_model_kind"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_fail_in_init(case, model_dir, tokenizer, tmp_path):
    overrides, field = BAD_CONFIGS[case]
    overrides = {"distillation_topk": 5, **overrides}
    if overrides["distillation_topk"] == "V+1":
        overrides["distillation_topk"] = len(tokenizer) + 1
    with pytest.raises(ValueError, match=field):
        _make_trainer(SDFTTrainer, model_dir, tokenizer, tiny_sdft_config(tmp_path, **overrides))


def test_dataset_without_demonstrations_fails_in_init(model_dir, tokenizer, tmp_path):
    """TRL's teacher prompt needs ``privileged_context``; TRL notices its absence only after generating."""
    args = tiny_sdft_config(tmp_path, distillation_topk=5)
    for datasets in ({"train_dataset": chat_dataset()}, {"train_dataset": _dataset(), "eval_dataset": chat_dataset()}):
        with pytest.raises(ValueError, match="privileged_context"):
            SDFTTrainer(model=_student(model_dir), args=args, processing_class=tokenizer, **datasets)


def test_topk_warning_only_when_set_away_from_the_default(model_dir, tokenizer, tmp_path):
    """SDFTConfig's distillation_topk defaults to 100 (for its default top-K mode): another mode ignores it silently;
    a value set on purpose and ignored is warned about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _make_trainer(SDFTTrainer, model_dir, tokenizer, tiny_sdft_config(tmp_path, distillation_mode="full_logits"))
    args = tiny_sdft_config(tmp_path, distillation_mode="full_logits", distillation_topk=5)
    with pytest.warns(UserWarning, match="distillation_topk=5 is ignored"):
        _make_trainer(SDFTTrainer, model_dir, tokenizer, args)
