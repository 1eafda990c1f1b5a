"""Reward functions that explain themselves: scores plus per-completion textual feedback.

TRL reads environment feedback only from a dataset column. The official SDPO routes what the
environment says about a failed attempt (a failing test, a wrong answer) into the teacher's reprompt.
Here a reward function may return, for a batch of completions, any of:

- a list of floats (or None), as TRL expects: no feedback;
- a list of ``{"score": float | None, "feedback": str | None}`` dicts;
- a :class:`RewardWithFeedback` ``(scores, feedback)``.

:func:`split_scores_and_feedback` turns any of these into two parallel lists; :func:`completion_text` reads
one completion as TRL passes it to a reward function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardWithFeedback:
    """What a reward function returns for a batch: one score and one feedback string per completion."""

    scores: Sequence[float | None]
    feedback: Sequence[str | None]

    def __post_init__(self):
        if len(self.scores) != len(self.feedback):
            raise ValueError(
                f"RewardWithFeedback: scores has {len(self.scores)} entries but feedback has {len(self.feedback)}"
            )


def split_scores_and_feedback(output) -> tuple[list[float | None], list[str | None]]:
    """``(scores, feedback)`` from a reward function's output; feedback entries are None where absent.

    An empty or whitespace-only feedback string counts as no feedback (the official code's rule).
    """
    if isinstance(output, RewardWithFeedback):
        scores, feedback = list(output.scores), list(output.feedback)
    else:
        scores, feedback = [], []
        for position, item in enumerate(output):
            if isinstance(item, Mapping):
                if "score" not in item:
                    raise ValueError(f"reward output item {position} is a dict without a 'score' key: {item!r}")
                scores.append(item["score"])
                feedback.append(item.get("feedback"))
            else:
                scores.append(item)
                feedback.append(None)
    for position, text in enumerate(feedback):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"feedback for completion {position} must be a str or None, got {type(text).__name__}")
    feedback = [text if text is not None and text.strip() else None for text in feedback]
    return [None if score is None else float(score) for score in scores], feedback


def completion_text(completion) -> str:
    """The text of one completion as TRL passes it: a string, or a list of chat messages (the last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal-style content parts
            return " ".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return str(content)
    raise TypeError(f"a completion must be a str or a list of chat messages, got {type(completion).__name__}")
