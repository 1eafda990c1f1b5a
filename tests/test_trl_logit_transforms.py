"""Heads that post-process their logits, in ``sdpo_ops.adapters.trl.SDPOTrainer`` against TRL's own trainer.

Tiny Gemma 2 (``final_logit_softcapping``), Cohere (``logit_scale``) and Granite (``logits_scaling``, a divisor):
TRL's ``trl.experimental.sdpo.SDPOTrainer`` runs them on CPU and computes its loss from the models' own logits
(``model(...).logits / temperature``), so it is the oracle as in test_trl_adapter.py: same logged losses, same
weight updates, float64 (Gemma 2: fp32, see tolerances.py). Ours reads the transform from the config and applies
it inside the fused loss; a transform the config does not declare is refused at the first step.
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import TRAINER_DTYPE, TRAINER_FP32_LOG, TRAINER_FP32_WEIGHT_UPDATE, TRAINER_LOG, TRAINER_WEIGHT_UPDATE

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from adapters_tiny import (  # noqa: E402
    LOGIT_TRANSFORMS,
    chat_dataset,
    make_tokenizer,
    make_transformed_head_model,
    save_model,
    tiny_sdpo_config,
)

# The equivalence harness of test_trl_adapter.py, reused rather than copied.
from test_trl_adapter import ScheduledReward, _assert_same_training, _initial_weights, _train  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer  # noqa: E402

from sdpo_ops.adapters.trl import SDPOTrainer  # noqa: E402

DISTILLATION_MODES = {
    # The official SDPO setting: top-K with the tail bucket, generalised JSD.
    "topk_logits_tail": {
        "distillation_mode": "topk_logits",
        "distillation_topk": 5,
        "distillation_add_tail": True,
        "distillation_alpha": 0.5,
    },
    # The whole vocabulary, forward KL, at a temperature (divides after the transform, in both trainers).
    "full_logits": {"distillation_mode": "full_logits", "distillation_alpha": 0.0, "temperature": 0.8},
}


# float64 where TRL's run allows it; Gemma 2's eager attention turns a float64 model's left-padded rows into NaN.
DTYPES = {model_type: torch.float32 if model_type == "gemma2" else TRAINER_DTYPE for model_type in LOGIT_TRANSFORMS}
TOLERANCES = {
    torch.float32: (TRAINER_FP32_LOG, TRAINER_FP32_WEIGHT_UPDATE),
    TRAINER_DTYPE: (TRAINER_LOG, TRAINER_WEIGHT_UPDATE),
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """One saved tiny model per transform (TRL builds the EMA teacher from the path), in its dtype."""
    root = tmp_path_factory.mktemp("tiny_transformed_heads")
    return {
        model_type: save_model(
            root / model_type,
            tokenizer,
            make_transformed_head_model(model_type, len(tokenizer), dtype=DTYPES[model_type]),
        )
        for model_type in LOGIT_TRANSFORMS
    }


@pytest.mark.parametrize("mode", list(DISTILLATION_MODES))
@pytest.mark.parametrize("model_type", list(LOGIT_TRANSFORMS))
def test_matches_trl_losses_and_weights(model_type, mode, model_dirs, tokenizer, tmp_path):
    model_dir = model_dirs[model_type]
    args = tiny_sdpo_config(tmp_path / "out", **DISTILLATION_MODES[mode])
    theirs = _train(TRLSDPOTrainer, model_dir, tokenizer, args, ScheduledReward(), chat_dataset())
    ours = _train(SDPOTrainer, model_dir, tokenizer, args, ScheduledReward(), chat_dataset())
    dtype = DTYPES[model_type]
    _assert_same_training(ours, theirs, _initial_weights(model_dir), dtype, *TOLERANCES[dtype])


def _live_teacher_trainer(model, tokenizer, tmp_path) -> SDPOTrainer:
    """Our trainer on an in-memory model (the live student is its own teacher: no path needed), one step."""
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    args = tiny_sdpo_config(
        tmp_path / "out", distillation_mode="topk_logits", distillation_topk=5, teacher_model_kind="live", max_steps=1
    )
    return SDPOTrainer(
        model=model, reward_funcs=ScheduledReward(), args=args, train_dataset=chat_dataset(), processing_class=tokenizer
    )


def test_refuses_a_softcapped_model_that_also_scales_its_logits_undeclared(tokenizer, tmp_path):
    """The config declares the softcap; the forward also halves the logits: caught by the first step's head check,
    whose message names what the config does declare."""
    from transformers import Gemma2ForCausalLM

    class HalvedLogitsGemma2(Gemma2ForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 0.5
            return output

    plain = make_transformed_head_model("gemma2", len(tokenizer))
    model = HalvedLogitsGemma2(plain.config)
    model.load_state_dict(plain.state_dict())
    trainer = _live_teacher_trainer(model.eval(), tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"lm_head\.weight.*config\.final_logit_softcapping=3\.0.*does not declare"):
        trainer.train()


@pytest.mark.parametrize(
    ("model_type", "attribute", "value"),
    [("granite", "logits_scaling", 0.0), ("cohere", "logit_scale", -1.5), ("gemma2", "final_logit_softcapping", 0.0)],
)
def test_bad_transform_in_config_fails_in_init(model_type, attribute, value, tokenizer, tmp_path):
    """TRL's trainer would divide by zero or train on negated logits; ours names the field before any rollout."""
    model = make_transformed_head_model(model_type, len(tokenizer))
    setattr(model.config, attribute, value)
    with pytest.raises(ValueError, match=f"config.{attribute}="):
        _live_teacher_trainer(model, tokenizer, tmp_path)
