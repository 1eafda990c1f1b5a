"""``sdpo_ops.adapters.head_inputs`` / ``sdpo_loss_arguments``: a Hugging Face model's own logits, without forming them.

Code under test: ``sdpo_ops/adapters/model_inputs.py``.

The oracle is each model's own forward (``model(...).logits``, transformers' ``modeling_<type>.py``) on tiny random
models of four architectures, three of them with a logit transform (Gemma 2's softcap, Cohere's scale, Granite's
divisor): the helpers' hidden states and head must reproduce those logits at the positions that predict the
completion, and ``sdpo_loss`` on the helpers' arguments must equal the naive loss on the models' own logits, loss and
lm_head gradient, in float64. Prompts are left-padded and completions right-padded, as a batch from ``generate``.
"""

from __future__ import annotations

import pytest
import torch
from adapters_tiny import make_model, make_tokenizer, make_transformed_head_model
from tolerances import ELEMENTWISE

from sdpo_ops import sdpo_loss, sdpo_loss_from_logits
from sdpo_ops.adapters import head_inputs, sdpo_loss_arguments

ARCHITECTURES = ["qwen2", "gemma2", "cohere", "granite"]
PROMPTS = (["add 2 and 3", "spell cat"], ["Solve it. add 2 and 3", "A hint: c-a-t. spell cat"])  # student, teacher
COMPLETIONS = ["5", "c a t"]


# transformers' Gemma 2 forward returns NaN in float64 for left-padded rows (its eager attention): fp32 there.
DTYPES = {"gemma2": torch.float32}


def _model(architecture: str, vocab_size: int, seed: int):
    if architecture == "qwen2":
        model = make_model(vocab_size, seed=seed)
    else:
        model = make_transformed_head_model(architecture, vocab_size, seed=seed)
    return model.to(DTYPES.get(architecture, torch.float64))


def _batch(tokenizer, prompts: list[str]):
    """``(input_ids, attention_mask, completion_ids, completion_mask)``: left-padded prompts, right-padded
    completions, joined."""
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    completion = tokenizer(COMPLETIONS, return_tensors="pt", padding=True, padding_side="right")
    input_ids = torch.cat([prompt.input_ids, completion.input_ids], 1)
    attention_mask = torch.cat([prompt.attention_mask, completion.attention_mask], 1)
    return input_ids, attention_mask, completion.input_ids, completion.attention_mask


def _own_logits(model, input_ids, attention_mask, num_completion_tokens):
    """The model's own logits at the columns predicting the completion (positions counted from the mask, as
    ``generate`` counts them)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    length = input_ids.shape[1]
    return logits[:, length - num_completion_tokens - 1 : length - 1]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_head_inputs_reproduce_the_models_own_logits(architecture, tokenizer):
    model = _model(architecture, len(tokenizer), seed=0)
    input_ids, attention_mask, completion_ids, _ = _batch(tokenizer, PROMPTS[0])
    num_completion = completion_ids.shape[1]
    inputs = head_inputs(model, input_ids, attention_mask, num_completion)
    assert inputs.hidden.shape == (2, num_completion, 32)
    assert inputs.weight is model.get_output_embeddings().weight  # the parameter itself: it gets the gradient
    with torch.no_grad():
        own = _own_logits(model, input_ids, attention_mask, num_completion)
        torch.testing.assert_close(inputs.logits(), own, **ELEMENTWISE[own.dtype])
        raw = torch.nn.functional.linear(inputs.hidden, inputs.weight, inputs.bias)
    if architecture != "qwen2":  # the transform matters here: without it the logits would differ
        assert (raw - own).abs().max() > 0.5


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sdpo_loss_on_the_arguments_equals_the_loss_on_the_models_own_logits(architecture, tokenizer):
    student, teacher = _model(architecture, len(tokenizer), seed=0), _model(architecture, len(tokenizer), seed=1)
    input_ids, attention_mask, completion_ids, completion_mask = _batch(tokenizer, PROMPTS[0])
    teacher_ids, teacher_mask, _, _ = _batch(tokenizer, PROMPTS[1])
    num_completion = completion_ids.shape[1]
    options = {"mask": completion_mask, "target_ids": completion_ids, "topk": 8, "is_clip": None}

    student_side = head_inputs(student, input_ids, attention_mask, num_completion)
    with torch.no_grad():
        teacher_side = head_inputs(teacher, teacher_ids, teacher_mask, num_completion)
    loss = sdpo_loss(**sdpo_loss_arguments(student_side, teacher_side), **options)
    (weight_grad,) = torch.autograd.grad(loss, student_side.weight)

    own = _own_logits(student, input_ids, attention_mask, num_completion)
    with torch.no_grad():
        teacher_own = _own_logits(teacher, teacher_ids, teacher_mask, num_completion)
    expected = sdpo_loss_from_logits(own, teacher_own, **options)  # the logits already carry the transform
    (expected_grad,) = torch.autograd.grad(expected, student.get_output_embeddings().weight)
    tolerance = ELEMENTWISE[DTYPES.get(architecture, torch.float64)]
    torch.testing.assert_close(loss, expected, **tolerance)
    torch.testing.assert_close(weight_grad, expected_grad, **tolerance)
    assert loss > 0


def test_sdpo_loss_arguments_refuses_heads_with_different_transforms(tokenizer):
    input_ids, attention_mask, completion_ids, _ = _batch(tokenizer, PROMPTS[0])
    batch = (input_ids, attention_mask, completion_ids.shape[1])
    with torch.no_grad():
        gemma, qwen = (head_inputs(_model(name, len(tokenizer), seed=0), *batch) for name in ("gemma2", "qwen2"))
    with pytest.raises(ValueError, match="final_logit_softcapping=3.0.*no logit transform"):
        sdpo_loss_arguments(gemma, qwen)
