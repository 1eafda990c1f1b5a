"""Teacher and student batches: TRL's SuccessfulRolloutTeacherContextBuilder as the oracle, plus layout checks."""

import os
from types import SimpleNamespace

import pytest
import torch
from adapters_tiny import make_tokenizer

from sdpo_ops.adapters import (
    TRL_FEEDBACK_TEMPLATE,
    TRL_REPROMPT_TEMPLATE,
    TRL_SOLUTION_TEMPLATE,
    SDPOBatch,
    build_sdpo_batch,
    build_teacher_batch,
    build_teacher_messages,
    build_teacher_prompt_ids,
    pad_sequences,
    split_completions,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a color."}],
]
GROUP = 3
# Demonstrations avoid outer whitespace and whitespace after </think>, where TRL's .strip() and the
# official whitespace rule would differ (see test_adapters_reprompt).
COMPLETION_TEXTS = ["4", "<think>two and two</think>4.", "five", "blue", "red", "<think>x</think>green"]
REWARDS = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
FEEDBACK = [None, None, "You said five.", "Not a color.", None, "  "]


def _completions(tokenizer):
    return [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in COMPLETION_TEXTS]


def _trl_teacher_batch(tokenizer, prompts, completions, rewards, feedback, **args):
    """Run TRL's own builder on a stand-in trainer (one process, CPU)."""
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer, SuccessfulRolloutTeacherContextBuilder

    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        gather=lambda tensor: tensor,
        pad_across_processes=lambda tensor, dim, pad_index: tensor,
    )
    trainer = SimpleNamespace(
        accelerator=accelerator,
        model=SimpleNamespace(training=True),
        num_generations=GROUP,
        _tokenizer=tokenizer,
        processing_class=tokenizer,
        chat_template_kwargs={},
        args=SimpleNamespace(use_successful_as_teacher=True, **args),
    )
    trainer._tokenize_prompts_untruncated = lambda batch: SDPOTrainer._tokenize_prompts_untruncated(trainer, batch)
    completion_ids, completion_mask = pad_sequences(completions, padding_value=tokenizer.pad_token_id, side="right")
    builder = SuccessfulRolloutTeacherContextBuilder(trainer)
    output = builder.build(
        {"completion_ids": completion_ids, "completion_mask": completion_mask},
        prompts,
        torch.tensor(rewards),
        feedbacks=feedback,
    )
    return output, builder.last_metrics


@pytest.mark.parametrize("dont_reprompt_on_self_success", [True, False])
@pytest.mark.parametrize("feedback_only_without_solution", [True, False])
@pytest.mark.parametrize("include_feedback", [True, False])
@pytest.mark.parametrize("max_reprompt_len", [10240, 40])
def test_matches_trl_builder(
    dont_reprompt_on_self_success, feedback_only_without_solution, include_feedback, max_reprompt_len
):
    tokenizer = make_tokenizer()
    prompts = [prompt for prompt in PROMPTS for _ in range(GROUP)]
    completions = _completions(tokenizer)
    options = {
        "success_reward_threshold": 1.0,
        "dont_reprompt_on_self_success": dont_reprompt_on_self_success,
        "environment_feedback_only_without_solution": feedback_only_without_solution,
        "include_environment_feedback": include_feedback,
        "remove_thinking_from_demonstration": True,
        "reprompt_template": TRL_REPROMPT_TEMPLATE,
        "solution_template": TRL_SOLUTION_TEMPLATE,
        "feedback_template": TRL_FEEDBACK_TEMPLATE,
        "max_reprompt_len": max_reprompt_len,
    }
    expected, expected_metrics = _trl_teacher_batch(tokenizer, prompts, completions, REWARDS, FEEDBACK, **options)
    got = build_teacher_batch(
        tokenizer,
        prompts,
        completions,
        REWARDS,
        GROUP,
        feedback=FEEDBACK,
        success_threshold=1.0,
        dont_reprompt_on_self_success=dont_reprompt_on_self_success,
        environment_feedback_only_without_solution=feedback_only_without_solution,
        include_environment_feedback=include_feedback,
        remove_thinking_from_demonstration=True,
        reprompt_template=TRL_REPROMPT_TEMPLATE,
        solution_template=TRL_SOLUTION_TEMPLATE,
        feedback_template=TRL_FEEDBACK_TEMPLATE,
        max_reprompt_len=max_reprompt_len,
        truncation="left",
    )
    torch.testing.assert_close(got.input_ids, expected["teacher_input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(got.attention_mask, expected["teacher_attention_mask"], rtol=0, atol=0)
    torch.testing.assert_close(got.self_distillation_mask, expected["self_distillation_mask"], rtol=0, atol=0)
    assert got.metrics == pytest.approx(expected_metrics)


def test_hand_computed_official_defaults():
    tokenizer = make_tokenizer()
    prompts = [prompt for prompt in PROMPTS for _ in range(GROUP)]
    batch = build_teacher_batch(tokenizer, prompts, _completions(tokenizer), REWARDS, GROUP, feedback=FEEDBACK)
    # group 0: successes {0, 1}; group 1: a lone success at 4. Threshold 0.5, self excluded.
    assert batch.demonstration_indices == [1, 0, 0, 4, None, 4]
    # Feedback only without a demonstration: sample 2 has one, sample 3 has one; "  " is no feedback.
    assert batch.feedback_used == [False, False, False, False, False, False]
    assert batch.self_distillation_mask.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    solution_of = "\nCorrect solution:\n\n{}\n\nCorrectly solve the original question."
    assert batch.teacher_prompts[0][-1]["content"] == "What is 2+2?" + solution_of.format("4.")
    assert batch.teacher_prompts[1][-1]["content"] == "What is 2+2?" + solution_of.format("4")
    assert batch.teacher_prompts[0][0] == PROMPTS[0][0]
    assert batch.teacher_prompts[4] == PROMPTS[1]  # lone success: original prompt
    assert batch.metrics == pytest.approx(
        {
            "self_distillation/success_group_fraction": 1.0,
            "self_distillation/success_sample_fraction": 5 / 6,
            "self_distillation/feedback_available_fraction": 2 / 6,
            "self_distillation/feedback_used_fraction": 0.0,
            "self_distillation/reprompt_sample_fraction": 5 / 6,
        }
    )


def test_feedback_activates_samples_without_demonstration():
    tokenizer = make_tokenizer()
    prompts = [PROMPTS[1]] * 2
    completions = [tokenizer("blue")["input_ids"], tokenizer("red")["input_ids"]]
    batch = build_teacher_batch(tokenizer, prompts, completions, [0.0, 0.0], 2, feedback=["Wrong.", None])
    assert batch.feedback_used == [True, False]
    assert batch.self_distillation_mask.tolist() == [1.0, 0.0]
    assert batch.teacher_prompts[0][-1]["content"] == (
        "Name a color.\nThe following is feedback from your unsuccessful earlier attempt:\n\nWrong."
        "\n\nCorrectly solve the original question."
    )


def test_layout_left_padded_prompt_then_right_padded_completion():
    tokenizer = make_tokenizer()
    prompts = [prompt for prompt in PROMPTS for _ in range(GROUP)]
    completions = _completions(tokenizer)
    batch = build_teacher_batch(
        tokenizer, prompts, completions, REWARDS, GROUP, feedback=FEEDBACK, max_reprompt_len=None
    )
    width = max(len(c) for c in completions)
    assert batch.num_completion_tokens == width
    for row, (messages, completion) in enumerate(zip(batch.teacher_prompts, completions, strict=True)):
        prompt_ids = build_teacher_prompt_ids(tokenizer, messages, max_reprompt_len=None)
        tokens = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        assert tokens == prompt_ids + completion
        prompt_part = batch.attention_mask[row, :-width]
        # Left padding: zeros then ones, ending at the completion.
        assert prompt_part.tolist() == [0] * (len(prompt_part) - len(prompt_ids)) + [1] * len(prompt_ids)
        assert batch.input_ids[row, -width:].tolist() == completion + [tokenizer.pad_token_id] * (
            width - len(completion)
        )
        assert batch.completion_mask[row].tolist() == [1] * len(completion) + [0] * (width - len(completion))


def test_demonstration_texts_override_decoding():
    tokenizer = make_tokenizer()
    prompts = [PROMPTS[1]] * 2
    completions = [tokenizer("blue")["input_ids"], tokenizer("red")["input_ids"]]
    batch = build_teacher_batch(
        tokenizer, prompts, completions, [1.0, 0.0], 2, demonstration_texts=["BLUE (shown)", "RED"]
    )
    assert "Correct solution:\n\nBLUE (shown)" in batch.teacher_prompts[1][-1]["content"]


def test_right_truncation_is_the_official_cut():
    tokenizer = make_tokenizer()
    prompts = [PROMPTS[0]] * 2
    completions = [tokenizer("4")["input_ids"], tokenizer("5")["input_ids"]]
    batch = build_teacher_batch(tokenizer, prompts, completions, [1.0, 0.0], 2, max_reprompt_len=12, truncation="right")
    messages = build_teacher_messages(PROMPTS[0], "4", None)
    full = build_teacher_prompt_ids(tokenizer, messages, max_reprompt_len=None)
    assert batch.input_ids[1, :12].tolist() == full[:12]


def test_student_batch_shares_the_completion_columns():
    tokenizer = make_tokenizer()
    prompts = [prompt for prompt in PROMPTS for _ in range(GROUP)]
    completions = _completions(tokenizer)
    teacher = build_teacher_batch(tokenizer, prompts, completions, REWARDS, GROUP, feedback=FEEDBACK)
    prompt_ids = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in prompts
    ]
    old = torch.randn(len(prompts), teacher.num_completion_tokens)
    batch = build_sdpo_batch(prompt_ids, teacher, pad_token_id=tokenizer.pad_token_id, old_logprobs=old)
    width = teacher.num_completion_tokens
    assert torch.equal(batch.input_ids[:, -width:], batch.completion_ids)
    assert torch.equal(batch.teacher_input_ids[:, -width:], batch.completion_ids)
    for row, ids in enumerate(prompt_ids):
        assert batch.input_ids[row][batch.attention_mask[row].bool()].tolist() == list(ids) + completions[row]
    assert batch.old_logprobs is old


def test_sdpo_batch_validates_shapes():
    ids = torch.zeros(2, 5, dtype=torch.long)
    completion = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_input_ids"):
        SDPOBatch(ids, torch.ones_like(ids), completion, torch.ones_like(completion), ids[:, :3], torch.ones(2, 3))
    with pytest.raises(ValueError, match="old_logprobs"):
        SDPOBatch(
            ids,
            torch.ones_like(ids),
            completion,
            torch.ones_like(completion),
            ids,
            torch.ones_like(ids),
            old_logprobs=torch.zeros(2, 4),
        )


def test_build_teacher_batch_bad_input():
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="completions"):
        build_teacher_batch(tokenizer, PROMPTS, [[5]], [1.0, 0.0], 2)
    with pytest.raises(ValueError, match="rewards"):
        build_teacher_batch(tokenizer, PROMPTS, [[5], [6]], [1.0], 2)


def test_pad_sequences_and_split_completions():
    ids, mask = pad_sequences([[1, 2, 3], [4]], padding_value=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[1, 2, 3], torch.tensor([4])], padding_value=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    generated = torch.tensor([[0, 7, 5, 2, 6, 6], [7, 7, 5, 5, 5, 5]])
    assert split_completions(generated, 2, eos_token_ids=2) == [[5, 2], [5, 5, 5, 5]]
    assert split_completions(generated, 2, eos_token_ids=[6, 5]) == [[5], [5]]
    assert split_completions(generated, 4, eos_token_ids=None) == [[6, 6], [5, 5]]


def test_adapters_package_does_not_import_trl():
    import subprocess
    import sys

    code = "import sys, sdpo_ops.adapters; sys.exit(any(m.split('.')[0] == 'trl' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
