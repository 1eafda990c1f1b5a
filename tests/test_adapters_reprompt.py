"""Reprompting: thinking removal, teacher messages (hand-written expected strings), tokenization, truncation."""

import doctest
import os
import re

import pytest
from adapters_tiny import make_tokenizer

import sdpo_ops.adapters.reprompt as reprompt_module
from sdpo_ops.adapters import (
    FEEDBACK_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
    TRL_FEEDBACK_TEMPLATE,
    TRL_REPROMPT_TEMPLATE,
    TRL_SOLUTION_TEMPLATE,
    build_teacher_messages,
    build_teacher_prompt_ids,
    strip_thinking,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def test_templates_are_the_official_runtime_defaults():
    assert REPROMPT_TEMPLATE == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    assert SOLUTION_TEMPLATE == "\nCorrect solution:\n\n{successful_previous_attempt}"
    assert FEEDBACK_TEMPLATE == "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"


def test_trl_templates_equal_trl_config_defaults():
    from trl.experimental.sdpo import SDPOConfig

    fields = SDPOConfig.__dataclass_fields__
    assert fields["reprompt_template"].default == TRL_REPROMPT_TEMPLATE
    assert fields["solution_template"].default == TRL_SOLUTION_TEMPLATE
    assert fields["feedback_template"].default == TRL_FEEDBACK_TEMPLATE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>2 + 2 = 4</think>\n\nThe answer is 4.", "The answer is 4."),
        ("<think>a\nb\n</think>   \n x", "x"),
        ("<think>a</think>one <think>b</think>two", "one two"),
        ("before <think>a</think>after", "before after"),
        ("no thinking here  ", "no thinking here  "),
        ("<think>never closed", "<think>never closed"),
        ("<think>a</think>", ""),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


def test_strip_thinking_differs_from_trl_only_in_outer_whitespace():
    # TRL: re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
    def trl_rule(text):
        return re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()

    assert strip_thinking("<think>x</think>Answer: 4") == trl_rule("<think>x</think>Answer: 4") == "Answer: 4"
    assert strip_thinking("  Answer <think>x</think>") == "  Answer "
    assert trl_rule("  Answer <think>x</think>") == "Answer"


def test_demonstration_only():
    messages = build_teacher_messages(QUESTION, "<think>hmm</think>\n4", None)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."},
    ]


def test_thinking_kept_when_asked():
    messages = build_teacher_messages(QUESTION, "<think>hmm</think>4", None, remove_thinking_from_demonstration=False)
    assert messages[-1]["content"] == (
        "What is 2+2?\nCorrect solution:\n\n<think>hmm</think>4\n\nCorrectly solve the original question."
    )


def test_feedback_only():
    messages = build_teacher_messages(QUESTION, None, "You said 5.")
    assert messages[-1]["content"] == (
        "What is 2+2?\nThe following is feedback from your unsuccessful earlier attempt:\n\nYou said 5."
        "\n\nCorrectly solve the original question."
    )
    assert messages[0] == QUESTION[0]


def test_feedback_dropped_when_a_demonstration_exists_by_default():
    with_demo = build_teacher_messages(QUESTION, "4", "You said 5.")
    assert "feedback" not in with_demo[-1]["content"]
    both = build_teacher_messages(QUESTION, "4", "You said 5.", environment_feedback_only_without_solution=False)
    assert both[-1]["content"] == (
        "What is 2+2?\nCorrect solution:\n\n4\nThe following is feedback from your unsuccessful earlier attempt:"
        "\n\nYou said 5.\n\nCorrectly solve the original question."
    )


@pytest.mark.parametrize("feedback", [None, "", "   \n"])
def test_neither_keeps_the_original_prompt(feedback):
    assert build_teacher_messages(QUESTION, None, feedback) == QUESTION


def test_feedback_ignored_when_not_included():
    assert build_teacher_messages(QUESTION, None, "You said 5.", include_environment_feedback=False) == QUESTION


def test_earlier_turns_kept_and_last_user_rewritten():
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    messages = build_teacher_messages(conversation, "d", None)
    assert messages[:3] == conversation[:3]
    assert messages[3] == {
        "role": "user",
        "content": "U2\nCorrect solution:\n\nd\n\nCorrectly solve the original question.",
    }
    assert conversation[3]["content"] == "U2"  # the input is not mutated


def test_multipart_user_content_keeps_text_parts():
    prompt = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look"}, {"type": "image"}, {"type": "text", "text": "here"}],
        }
    ]
    assert build_teacher_messages(prompt, "d", None)[-1]["content"].startswith("Look here\nCorrect solution:")


def test_text_prompt_gives_text():
    assert (
        build_teacher_messages("Q:", "A", None)
        == "Q:\nCorrect solution:\n\nA\n\nCorrectly solve the original question."
    )


def test_custom_templates():
    messages = build_teacher_messages(
        QUESTION,
        "4",
        None,
        reprompt_template="[{prompt}|{solution}|{feedback}]",
        solution_template="<{successful_previous_attempt}>",
    )
    assert messages[-1]["content"] == "[What is 2+2?|<4>|]"


def test_prompt_must_end_with_user():
    with pytest.raises(ValueError, match="ends with role 'assistant'"):
        build_teacher_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "d", None)


def test_prompt_ids_are_the_chat_template_with_generation_prompt():
    tokenizer = make_tokenizer()
    messages = build_teacher_messages(QUESTION, "4", None)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = build_teacher_prompt_ids(tokenizer, messages, max_reprompt_len=None)
    assert ids == list(expected["input_ids"])
    assert tokenizer.decode(ids).endswith("Correctly solve the original question.<|im_end|>\n<|im_start|>assistant\n")


def test_left_truncation_keeps_the_instruction():
    tokenizer = make_tokenizer()
    messages = build_teacher_messages(QUESTION, "4", None)
    full = build_teacher_prompt_ids(tokenizer, messages, max_reprompt_len=None)
    kept = build_teacher_prompt_ids(tokenizer, messages, max_reprompt_len=24, truncation="left")
    assert kept == full[-24:] and len(full) > 24
    assert tokenizer.decode(kept).endswith("question.<|im_end|>\n<|im_start|>assistant\n")


def test_right_truncation_matches_the_official_tokenizer_truncation():
    tokenizer = make_tokenizer()
    messages = build_teacher_messages(QUESTION, "4", None)
    # The official code: apply_chat_template(..., max_length=..., truncation=True) (tokenizer side "right").
    official = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, max_length=20, truncation=True
    )
    assert build_teacher_prompt_ids(tokenizer, messages, max_reprompt_len=20, truncation="right") == list(
        official["input_ids"]
    )
    assert len(official["input_ids"]) == 20


def test_text_prompt_ids_and_short_prompts_untouched():
    tokenizer = make_tokenizer()
    assert build_teacher_prompt_ids(tokenizer, "abc", max_reprompt_len=10) == tokenizer("abc")["input_ids"]
    assert (
        build_teacher_prompt_ids(tokenizer, "abc", max_reprompt_len=3, truncation="right")
        == tokenizer("abc")["input_ids"]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"truncation": "middle"}, "truncation"), ({"max_reprompt_len": 0}, "max_reprompt_len")]
)
def test_prompt_ids_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_teacher_prompt_ids(make_tokenizer(), QUESTION, **kwargs)


def test_docstring_examples():
    assert doctest.testmod(reprompt_module).failed == 0
