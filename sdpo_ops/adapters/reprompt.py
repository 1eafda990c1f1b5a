"""The teacher's prompt: the original question plus a successful sibling attempt and/or feedback.

The teacher re-reads the last user message wrapped in ``REPROMPT_TEMPLATE``, which inserts a solution
section (a successful rollout of the same prompt, ``<think>`` blocks removed) and a feedback section (what
the environment said about *this* attempt). Every earlier message (system prompt, few-shot turns) is kept
as it is, and the chat template adds the generation prompt, so the teacher then scores the student's
completion as its own answer. The templates are the official code's runtime defaults; TRL's versions end
with extra newlines and are given as ``TRL_*`` for users who want TRL's teacher text.

A sample with neither a demonstration nor usable feedback keeps its original prompt (its
``self_distillation_mask`` is 0, so the teacher's output is never used).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"

# TRL's SDPOConfig defaults (trl.experimental.sdpo), identical up to the trailing newlines.
TRL_REPROMPT_TEMPLATE = REPROMPT_TEMPLATE + "\n"
TRL_SOLUTION_TEMPLATE = SOLUTION_TEMPLATE + "\n\n"
TRL_FEEDBACK_TEMPLATE = FEEDBACK_TEMPLATE + "\n\n"

# TRL's SDPOConfig.max_reprompt_len default.
DEFAULT_MAX_REPROMPT_LEN = 10240

Message = Mapping[str, Any]
Prompt = str | Sequence[Message]

# Non-greedy and DOTALL: each block ends at its own closing tag, across lines; the whitespace after a
# block goes with it (the official rule), so "<think>..</think>\n\nAnswer" becomes "Answer".
_THINKING_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove every ``<think>...</think>`` block and the whitespace that follows it.

    The official rule: text before a block and an unclosed ``<think>`` are kept as they are (TRL also
    strips the result's outer whitespace).

    Example:
        >>> strip_thinking("<think>2 + 2 = 4</think>\\n\\nThe answer is 4.")
        'The answer is 4.'
    """
    return _THINKING_BLOCK.sub("", text)


def has_feedback(feedback: str | None) -> bool:
    """A non-empty, non-whitespace string (what a reward function returns when it has something to say)."""
    return isinstance(feedback, str) and feedback.strip() != ""


def feedback_to_use(
    feedback: str | None,
    has_demonstration: bool,
    *,
    include_environment_feedback: bool = True,
    environment_feedback_only_without_solution: bool = True,
) -> str | None:
    """The feedback the teacher sees, or None: only when included, non-empty, and (optionally) without a demo."""
    if not include_environment_feedback or not has_feedback(feedback):
        return None
    if environment_feedback_only_without_solution and has_demonstration:
        return None
    return feedback


def _last_user_text(messages: Sequence[Message]) -> str:
    if not messages:
        raise ValueError("the prompt is an empty list of messages")
    last = messages[-1]
    if last.get("role") != "user":
        raise ValueError(
            f"the teacher prompt re-asks the last user message, but the prompt ends with role {last.get('role')!r}; "
            "prompts ending with an assistant prefill or a tool turn are not supported"
        )
    content = last.get("content", "")
    if isinstance(content, str):
        return content
    # Multimodal content: a list of parts; the reprompt is text, so keep the text parts (TRL's rule).
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


def build_teacher_messages(
    prompt: Prompt,
    demonstration: str | None,
    feedback: str | None,
    *,
    include_environment_feedback: bool = True,
    environment_feedback_only_without_solution: bool = True,
    remove_thinking_from_demonstration: bool = True,
    reprompt_template: str = REPROMPT_TEMPLATE,
    solution_template: str = SOLUTION_TEMPLATE,
    feedback_template: str = FEEDBACK_TEMPLATE,
) -> Prompt:
    """The teacher's prompt for one sample, in the form of ``prompt`` (messages in, messages out).

    Args:
        prompt: the student's prompt: a list of chat messages ending with a user turn, or plain text.
        demonstration: text of the successful sibling rollout (decoded completion), or None.
        feedback: the environment's feedback on this sample's attempt, or None / empty for none.
        include_environment_feedback: use feedback at all.
        environment_feedback_only_without_solution: use feedback only when there is no demonstration.
        remove_thinking_from_demonstration: :func:`strip_thinking` the demonstration first.
        reprompt_template: with fields ``{prompt}``, ``{solution}``, ``{feedback}``.
        solution_template: with field ``{successful_previous_attempt}``.
        feedback_template: with field ``{feedback_raw}``.

    Returns:
        The reprompted messages (earlier messages unchanged, a new last user message) or text. Without a
        demonstration and without usable feedback, the original prompt itself (a shallow copy for lists).

    Example:
        >>> build_teacher_messages([{"role": "user", "content": "2+2?"}], "<think>hm</think> 4", None)
        [{'role': 'user', 'content': '2+2?\\nCorrect solution:\\n\\n4\\n\\nCorrectly solve the original question.'}]
    """
    used_feedback = feedback_to_use(
        feedback,
        demonstration is not None,
        include_environment_feedback=include_environment_feedback,
        environment_feedback_only_without_solution=environment_feedback_only_without_solution,
    )
    if demonstration is None and used_feedback is None:
        return prompt if isinstance(prompt, str) else list(prompt)
    solution_section = ""
    if demonstration is not None:
        if remove_thinking_from_demonstration:
            demonstration = strip_thinking(demonstration)
        solution_section = solution_template.format(successful_previous_attempt=demonstration)
    feedback_section = "" if used_feedback is None else feedback_template.format(feedback_raw=used_feedback)
    question = prompt if isinstance(prompt, str) else _last_user_text(prompt)
    text = reprompt_template.format(prompt=question, solution=solution_section, feedback=feedback_section)
    if isinstance(prompt, str):
        return text
    return [*prompt[:-1], {"role": "user", "content": text}]


def build_teacher_prompt_ids(
    tokenizer,
    messages: Prompt,
    *,
    max_reprompt_len: int | None = DEFAULT_MAX_REPROMPT_LEN,
    truncation: Literal["left", "right"] = "left",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the teacher's prompt, cut to ``max_reprompt_len``.

    Chat messages go through the chat template with the generation prompt; plain text is tokenized as it
    is (TRL's rule for non-conversational prompts).

    Args:
        tokenizer: a Hugging Face tokenizer (with a chat template for message prompts).
        messages: what :func:`build_teacher_messages` returned.
        max_reprompt_len: most tokens kept; None keeps all.
        truncation: ``"left"`` keeps the *last* tokens, so the final instruction and the generation prompt
            survive (TRL; the default); ``"right"`` keeps the first tokens and loses the end (the official
            code, which truncates in ``apply_chat_template``).
        chat_template_kwargs: extra arguments of ``apply_chat_template`` (e.g. ``enable_thinking``).

    Returns:
        ``[L]`` token ids, ``L <= max_reprompt_len``.
    """
    if truncation not in ("left", "right"):
        raise ValueError(f"truncation must be 'left' or 'right', got {truncation!r}")
    if max_reprompt_len is not None and max_reprompt_len < 1:
        raise ValueError(f"max_reprompt_len must be >= 1 or None, got {max_reprompt_len}")
    if isinstance(messages, str):
        ids = tokenizer(text=messages)["input_ids"]
    else:
        encoded = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, **dict(chat_template_kwargs or {})
        )
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    ids = list(ids)
    if max_reprompt_len is None or len(ids) <= max_reprompt_len:
        return ids
    return ids[-max_reprompt_len:] if truncation == "left" else ids[:max_reprompt_len]
