"""sdpo_step against the naive reference on the models' full logits: same loss, same student gradients."""

import copy

import pytest
import torch
from adapters_tiny import LOGIT_TRANSFORMS, make_model, make_tokenizer, make_transformed_head_model

from sdpo_ops.adapters import EMATeacher, build_sdpo_batch, build_teacher_batch, positions_from_mask, sdpo_step
from sdpo_ops.reference import sdpo_loss_reference_from_logits

PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a color."}],
]
COMPLETIONS = ["4", "<think>hm</think>4.", "five!", "blue", "red", "green, sure"]
REWARDS = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
FEEDBACK = [None, None, "You said five.", None, None, "Too long."]
GROUP = 3


def _batch(tokenizer, *, old_logprobs=None, rewards=REWARDS, feedback=FEEDBACK):
    prompts = [prompt for prompt in PROMPTS for _ in range(GROUP)]
    completions = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in COMPLETIONS]
    teacher = build_teacher_batch(tokenizer, prompts, completions, rewards, GROUP, feedback=feedback)
    prompt_ids = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]
    return build_sdpo_batch(prompt_ids, teacher, pad_token_id=tokenizer.pad_token_id, old_logprobs=old_logprobs)


def _completion_logits(model, input_ids, attention_mask, width):
    """Oracle: the model's own full logits (its lm_head applied), at the positions predicting the completion."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
    ).logits
    return logits[:, -width - 1 : -1]


def _reference(student, teacher_model, batch, **options):
    width = batch.completion_ids.shape[1]
    student_logits = _completion_logits(student, batch.input_ids, batch.attention_mask, width)
    with torch.no_grad():
        teacher_logits = _completion_logits(teacher_model, batch.teacher_input_ids, batch.teacher_attention_mask, width)
    mask = batch.completion_mask.float() * batch.self_distillation_mask.unsqueeze(1)
    options.setdefault("reduction", "seq-mean-token-mean")
    return sdpo_loss_reference_from_logits(
        student_logits,
        teacher_logits,
        mask=mask,
        target_ids=batch.completion_ids,
        old_logprobs=batch.old_logprobs,
        **options,
    )


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _setup(seed=0, model_type=None, **model_kwargs):
    """Tokenizer, student (a tiny Qwen2, or a tiny ``model_type`` with its logit transform), perturbed EMA teacher."""
    tokenizer = make_tokenizer()
    if model_type is None:
        student = make_model(len(tokenizer), seed=seed, **model_kwargs)
    else:
        student = make_transformed_head_model(model_type, len(tokenizer), seed=seed, **model_kwargs)
    teacher = EMATeacher(student, update_rate=0.5)
    # Make the teacher differ from the student, as after a few EMA updates.
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in teacher.model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return tokenizer, student, teacher


def _compare(student, teacher_arg, teacher_model, batch, **options):
    student.zero_grad()
    result = sdpo_step(student, teacher_arg, batch, **options)
    result.loss.backward()
    got_grads = _grads(student)
    student.zero_grad()
    reference_options = {key: value for key, value in options.items() if key != "backend"}
    expected = _reference(student, teacher_model, batch, **reference_options)
    expected["loss"].backward()
    expected_grads = _grads(student)
    torch.testing.assert_close(result.loss, expected["loss"], rtol=2e-5, atol=2e-6)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=2e-4, atol=2e-6, msg=name)
    return result, expected


LOSS_OPTIONS = [
    {"topk": 50},  # the other options at their defaults (topk=100 exceeds this vocabulary of 84)
    {"topk": 5},
    {"topk": 5, "add_tail": False, "alpha": 1.0},
    {"topk": None, "alpha": 0.0},
    {"topk": 7, "alpha": 0.3, "temperature": 0.7},
    {"topk": 5, "reduction": "token-mean"},
    {"topk": 5, "reduction": "sum"},
    {"topk": 5, "backend": "reference"},
]


@pytest.mark.parametrize(
    "options", LOSS_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_matches_reference_on_full_logits(options):
    tokenizer, student, teacher = _setup()
    batch = _batch(tokenizer)
    result, expected = _compare(student, teacher, teacher.model, batch, **options)
    assert result.loss.item() > 0
    assert (
        result.loss_mask.sum().item()
        == (batch.completion_mask.float() * batch.self_distillation_mask[:, None]).sum().item()
    )


def test_importance_sampling_with_old_logprobs():
    tokenizer, student, teacher = _setup()
    width = _batch(tokenizer).completion_ids.shape[1]
    generator = torch.Generator().manual_seed(5)
    old = -torch.rand(len(COMPLETIONS), width, generator=generator) * 6
    batch = _batch(tokenizer, old_logprobs=old)
    result, expected = _compare(student, teacher, teacher.model, batch, topk=5, is_clip=2.0)
    torch.testing.assert_close(result.output.is_weight, expected["is_weight"])
    assert (result.output.is_weight < 2.0).any() and (result.output.is_weight == 2.0).any()


def test_target_logprobs_are_aligned_with_the_next_token():
    """Position p predicts token p + 1: check each completion token against an explicit index walk."""
    tokenizer, student, teacher = _setup()
    batch = _batch(tokenizer)
    result = sdpo_step(student, teacher, batch, topk=5)
    with torch.no_grad():
        logits = student(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions_from_mask(batch.attention_mask),
        ).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    length, width = batch.input_ids.shape[1], batch.completion_ids.shape[1]
    for row in range(batch.input_ids.shape[0]):
        for t in range(width):
            column = length - width + t  # where completion token t sits in the input
            token = batch.input_ids[row, column]
            assert token == batch.completion_ids[row, t]
            expected = log_probs[row, column - 1, token]
            assert abs(result.output.target_logprobs[row, t].item() - expected.item()) < 1e-4
    # And the teacher's, on its own (longer) input.
    with torch.no_grad():
        teacher_logits = teacher.model(
            input_ids=batch.teacher_input_ids,
            attention_mask=batch.teacher_attention_mask,
            position_ids=positions_from_mask(batch.teacher_attention_mask),
        ).logits
    teacher_log_probs = torch.log_softmax(teacher_logits.double(), dim=-1)
    teacher_length = batch.teacher_input_ids.shape[1]
    for row in range(batch.input_ids.shape[0]):
        for t in range(width):
            column = teacher_length - width + t
            expected = teacher_log_probs[row, column - 1, batch.teacher_input_ids[row, column]]
            assert abs(result.output.teacher_target_logprobs[row, t].item() - expected.item()) < 1e-4


def test_extra_left_padding_does_not_change_the_loss():
    tokenizer, student, teacher = _setup()
    batch = _batch(tokenizer)
    base = sdpo_step(student, teacher, batch, topk=5).loss
    pad = torch.full((batch.input_ids.shape[0], 4), tokenizer.pad_token_id)
    zeros = torch.zeros_like(pad)
    padded = copy.copy(batch)
    padded.input_ids = torch.cat([pad, batch.input_ids], 1)
    padded.attention_mask = torch.cat([zeros, batch.attention_mask], 1)
    padded.teacher_input_ids = torch.cat([pad, pad, batch.teacher_input_ids], 1)
    padded.teacher_attention_mask = torch.cat([zeros, zeros, batch.teacher_attention_mask], 1)
    torch.testing.assert_close(sdpo_step(student, teacher, padded, topk=5).loss, base, rtol=1e-5, atol=1e-6)


def test_live_student_teacher():
    tokenizer, student, _ = _setup()
    batch = _batch(tokenizer)
    _compare(student, None, student, batch, topk=5)


def test_separate_frozen_teacher_module():
    tokenizer, student, teacher = _setup()
    batch = _batch(tokenizer)
    _compare(student, teacher.model, teacher.model, batch, topk=5)


def test_tied_embeddings():
    tokenizer, student, teacher = _setup(tie_word_embeddings=True)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    _compare(student, teacher, teacher.model, _batch(tokenizer), topk=5)


def test_lm_head_bias():
    tokenizer, student, teacher = _setup()
    for model in (student, teacher.model):
        head = torch.nn.Linear(32, len(tokenizer), bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.uniform_(-1.0, 1.0)
        head.requires_grad_(model is student)
        model.lm_head = head
    _compare(student, teacher, teacher.model, _batch(tokenizer), topk=5)  # compares the bias gradient too
    assert student.lm_head.bias.grad.abs().sum() > 0


def test_lora_student_with_shadow_teacher():
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    student = get_peft_model(
        make_model(len(tokenizer)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    teacher = EMATeacher(student, update_rate=0.5)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in student.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    teacher.update(student)  # the shadow is now half-way between the initial and current adapter
    oracle_teacher = copy.deepcopy(student)
    with torch.no_grad():
        for name, param in oracle_teacher.named_parameters():
            if name in teacher.shadow:
                param.copy_(teacher.shadow[name])
    result, _ = _compare(student, teacher, oracle_teacher, _batch(tokenizer), topk=5)
    assert all(p.grad is None for n, p in student.named_parameters() if "lora_" not in n)


def test_no_teacher_signal_gives_zero_loss_and_zero_gradients():
    tokenizer, student, teacher = _setup()
    batch = _batch(tokenizer, rewards=[0.0] * 6, feedback=[None] * 6)
    assert batch.self_distillation_mask.sum() == 0
    result = sdpo_step(student, teacher, batch, topk=5)
    result.loss.backward()
    assert result.loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in student.parameters())


@pytest.mark.parametrize("options", [{"topk": 5}, {"topk": None, "alpha": 0.3, "temperature": 0.7}], ids=str)
@pytest.mark.parametrize("model_type", list(LOGIT_TRANSFORMS))
def test_heads_with_logit_transforms_match_reference_on_their_own_logits(model_type, options):
    """Gemma 2 softcapping, Cohere's logit_scale, Granite's logits_scaling: read from the config, applied in the
    fused loss; the oracle is the reference on the models' own (transformed) logits."""
    tokenizer, student, teacher = _setup(model_type=model_type)
    result, _ = _compare(student, teacher, teacher.model, _batch(tokenizer), **options)
    assert result.loss.item() > 0


def test_bad_logit_transform_in_config_is_refused():
    tokenizer, student, teacher = _setup(model_type="granite")
    student.config.logits_scaling = 0.0
    with pytest.raises(ValueError, match="config.logits_scaling=0.0"):
        sdpo_step(student, None, _batch(tokenizer))


def test_refuses_an_undeclared_logit_transform():
    """The forward halves the softcapped logits, the config declares only the cap: refused at the first step."""
    tokenizer, student, teacher = _setup(model_type="gemma2")
    linear_forward = student.lm_head.forward
    student.lm_head.forward = lambda hidden: 0.5 * linear_forward(hidden)
    with pytest.raises(ValueError, match=r"config\.final_logit_softcapping=3\.0.*does not declare"):
        sdpo_step(student, teacher, _batch(tokenizer), topk=5)


def test_head_check_ignores_dropout_and_leaves_the_random_stream():
    """In training mode with live dropout, the first step's check passes and draws no random numbers: the first
    step (checked) and the second (not) give the same loss from the same seed."""
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), attention_dropout=0.5).train()
    batch = _batch(tokenizer)
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(sdpo_step(student, None, batch, topk=5).loss)
    torch.manual_seed(8)
    other_draw = sdpo_step(student, None, batch, topk=5).loss
    assert other_draw != losses[0], "dropout is not live: the test would not see a consumed random draw"
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


def test_refuses_an_adapter_on_the_lm_head():
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    student = get_peft_model(make_model(len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="plain torch.nn.Linear"):
        sdpo_step(student, None, _batch(tokenizer))


def test_reserved_options():
    tokenizer, student, teacher = _setup()
    with pytest.raises(TypeError, match="mask"):
        sdpo_step(student, teacher, _batch(tokenizer), mask=None)
    with pytest.raises(TypeError, match="logit_scale.*configs"):
        sdpo_step(student, teacher, _batch(tokenizer), logit_scale=2.0)


@pytest.mark.interpret
def test_triton_backend_under_the_interpreter():
    """The Triton kernels (TRITON_INTERPRET=1 on CPU, set by conftest) inside a real step."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without CUDA; test_matches_reference_on_cuda covers the kernels")
    tokenizer, student, teacher = _setup()
    _compare(student, teacher, teacher.model, _batch(tokenizer), topk=5, backend="triton")


@pytest.mark.gpu
def test_matches_reference_on_cuda():
    tokenizer, student, teacher = _setup()
    student.cuda()
    teacher.model.cuda()
    batch = _batch(tokenizer).to("cuda")
    _compare(student, teacher, teacher.model, batch, topk=5)  # backend "auto": the Triton kernels
