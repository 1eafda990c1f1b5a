"""``sdpo_ops.adapters.heads``: the logit transform read from a config is the one the model's own forward applies.

The oracle is each model's forward in transformers (``modeling_<type>.py``), on tiny random models: its logits
must equal the declared transform of ``lm_head(backbone(x))``, and differ from the untransformed head output
(else the case would not test the reading).
"""

from __future__ import annotations

import pytest
import torch
from adapters_tiny import make_model, make_tokenizer, make_transformed_head_model

from sdpo_ops.adapters.heads import logit_transform, shared_logit_transform

# model type -> config overrides beyond adapters_tiny.LOGIT_TRANSFORMS (which covers gemma2, cohere, granite).
MODEL_TYPES = {
    "gemma2": {},  # final_logit_softcapping
    "gemma3_text": {"final_logit_softcapping": 3.0, "head_dim": 8},
    "cohere": {},  # logit_scale multiplies
    "cohere2": {"logit_scale": 0.25},
    "granite": {},  # logits_scaling divides
    "granitemoe": {"logits_scaling": 4.0, "num_local_experts": 2, "num_experts_per_tok": 1},
    "hyperclovax": {"logits_scaling": 4.0},  # the one model whose logits_scaling multiplies
    "falcon_h1": {"lm_head_multiplier": 1.5},
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_declared_transform_reproduces_the_models_own_logits(model_type, tokenizer):
    model = make_transformed_head_model(model_type, len(tokenizer), **MODEL_TYPES[model_type])
    transform = logit_transform(model)
    inputs = tokenizer(["add 2 and 3, then spell cat"], return_tensors="pt")
    with torch.no_grad():
        own = model(**inputs).logits
        raw = model.get_output_embeddings()(model.base_model(**inputs).last_hidden_state)
    # Same ops up to Granite's `/ s` read as `* (1 / s)`: one rounding of logits of size ~10.
    torch.testing.assert_close(transform.apply(raw), own, rtol=1e-6, atol=1e-5)
    assert (own - raw).abs().max() > 0.5, "the transform does not change these logits: the case tests nothing"


def test_plain_head_declares_nothing(tokenizer):
    transform = logit_transform(make_model(len(tokenizer)))
    assert transform.loss_options() == {"logit_scale": 1.0, "logit_softcap": None}
    assert transform.declared_by == ()


# (transformers 5 configs already refuse a value of another type on assignment.)
@pytest.mark.parametrize("value", [0.0, -2.0, float("inf"), float("nan")])
@pytest.mark.parametrize(
    ("model_type", "attribute"),
    [("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale"), ("granite", "logits_scaling")],
)
def test_bad_config_value_is_refused_naming_the_attribute(model_type, attribute, value, tokenizer):
    model = make_transformed_head_model(model_type, len(tokenizer))
    setattr(model.config, attribute, value)
    with pytest.raises(ValueError, match=f"config.{attribute}="):
        logit_transform(model)


def test_student_and_teacher_with_different_transforms_are_refused(tokenizer):
    student = make_transformed_head_model("cohere", len(tokenizer))
    teacher = make_transformed_head_model("cohere", len(tokenizer), logit_scale=2.0)
    with pytest.raises(ValueError, match=r"config.logit_scale=0.25.*config.logit_scale=2.0"):
        shared_logit_transform(student, teacher)
    assert shared_logit_transform(student, student).logit_scale == 0.25
