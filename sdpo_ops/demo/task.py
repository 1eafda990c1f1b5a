"""The demo's task: small arithmetic and word problems with a checkable answer and textual feedback.

Pure Python (no torch), so it is cheap to test and to reuse in other examples.

A problem asks for one integer. The reply is expected to end with ``Answer: <number>``. The reward
function scores each completion and, where it falls short, says what was wrong, e.g.
``"Your answer 12 is wrong: 7 + 8 = 15."`` or ``"No final answer found: 7 + 8 = 15. End your reply
with 'Answer: <number>'."``. SDPO puts this feedback into the teacher's reprompt (the official
``include_environment_feedback``), so a failed attempt still gets a teacher that knows what to fix,
and successful siblings in the group serve as demonstrations.

The reply's answer is the number of its last ``Answer: <n>`` line (any case, optional ``**`` / ``=``
decoration) or, without one, its last integer: a 135M model often replies ``"7 + 8 = 15"`` and rarely
keeps to the format at first, and a format-only reward would leave almost no successful replies to
serve as demonstrations. Scores: 1.0 for the right number (a success), 0.0 otherwise, with feedback
that says which number was read, the worked result, and the expected format when it was missing.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sdpo_ops.adapters.feedback import completion_text  # noqa: F401 - re-exported: the demo's API

SCORE_CORRECT = 1.0
SCORE_WRONG = 0.0

SYSTEM_PROMPT = "You are a math tutor. Solve the problem, then end your reply with 'Answer: <number>'."
FORMAT_HINT = "End your reply with 'Answer: <number>'."

_OPERATIONS = ("+", "-")

# Word-problem templates per operation; each fills {name}, {a}, {b}, {items}.
_WORD_TEMPLATES = {
    "+": (
        "{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
        "There are {a} {items} in a box and {b} more are added. How many {items} are in the box?",
    ),
    "-": (
        "{name} has {a} {items} and gives away {b}. How many {items} are left?",
        "There are {a} {items} in a box and {b} are taken out. How many {items} are still in the box?",
    ),
}
_NAMES = ("Tom", "Anna", "Sam", "Lena", "Max", "Mia")
_ITEMS = ("apples", "pencils", "coins", "stickers", "books", "marbles")

# The last "Answer: 12" in a reply; tolerates markdown bold, "answer is", "=" and a sign.
_ANSWER_RE = re.compile(r"answer(?:\s+is)?\s*\**\s*[:=]?\s*\**\s*(-?\d+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One problem: ``a <operation> b``, asked as an expression or as a short word problem.

    Attributes:
        question: the user message (without the format hint).
        a: first operand.
        b: second operand.
        operation: ``"+"`` or ``"-"``.
        answer: the integer result.
    """

    question: str
    a: int
    b: int
    operation: str
    answer: int

    @property
    def solution(self) -> str:
        """The worked result, e.g. ``"7 + 8 = 15"``, quoted in feedback."""
        return f"{self.a} {self.operation} {self.b} = {self.answer}"


def generate_problems(
    n: int,
    seed: int = 0,
    *,
    max_operand: int = 20,
    operations: Sequence[str] = _OPERATIONS,
    word_fraction: float = 0.5,
) -> list[Problem]:
    """``n`` problems drawn from ``random.Random(seed)``: the same seed gives the same list.

    Args:
        n: number of problems.
        seed: seed of the private random generator (the global ``random`` state is untouched).
        max_operand: operands are drawn from ``1..max_operand``; subtraction keeps ``a >= b``, so answers are >= 0.
        operations: a subset of ``("+", "-")``.
        word_fraction: probability that a problem is a word problem rather than ``"What is a + b?"``.

    Raises:
        ValueError: ``n < 0``, ``max_operand < 1``, unknown or no ``operations``, ``word_fraction`` outside [0, 1].
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if not operations or any(op not in _OPERATIONS for op in operations):
        raise ValueError(f"operations must be a non-empty subset of {_OPERATIONS}, got {tuple(operations)!r}")
    if not 0.0 <= word_fraction <= 1.0:
        raise ValueError(f"word_fraction must be in [0, 1], got {word_fraction}")

    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        operation = rng.choice(tuple(operations))
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        if operation == "-" and a < b:
            a, b = b, a
        answer = a + b if operation == "+" else a - b
        if rng.random() < word_fraction:
            template = rng.choice(_WORD_TEMPLATES[operation])
            question = template.format(name=rng.choice(_NAMES), items=rng.choice(_ITEMS), a=a, b=b)
        else:
            question = f"What is {a} {operation} {b}?"
        problems.append(Problem(question=question, a=a, b=b, operation=operation, answer=answer))
    return problems


def build_prompt(problem: Problem, *, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat messages for one problem: an optional system message, then the user turn.

    Without a system prompt the format hint goes into the user turn instead, so it is always asked for.
    """
    if system_prompt is None:
        return [{"role": "user", "content": f"{problem.question} {FORMAT_HINT}"}]
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem.question}]


def dataset_rows(problems: Sequence[Problem], *, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Rows for a TRL dataset: ``prompt`` (chat messages), ``answer`` (int), ``solution`` (str).

    TRL hands the extra columns to reward functions as keyword arguments of the same name.
    """
    return [
        {"prompt": build_prompt(p, system_prompt=system_prompt), "answer": p.answer, "solution": p.solution}
        for p in problems
    ]


def parse_answer(text: str) -> tuple[int | None, bool]:
    """``(value, formatted)`` read from a reply.

    ``value`` is the number of the last ``Answer: <n>`` (``formatted=True``); without one, the last integer
    anywhere in the text (``formatted=False``); without any integer, ``(None, False)``.
    """
    matches = _ANSWER_RE.findall(text)
    if matches:
        return int(matches[-1]), True
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return int(numbers[-1]), False
    return None, False


def score_completion(
    text: str, answer: int, solution: str, *, reveal_solution: bool = True
) -> tuple[float, str | None]:
    """``(score, feedback)`` for one reply; feedback is None for a correct one.

    Args:
        text: the model's reply.
        answer: the correct integer.
        solution: the worked result quoted in feedback, e.g. ``"7 + 8 = 15"``.
        reveal_solution: quote ``solution`` in the feedback; False says only what was wrong (a verdict,
            as a test harness would), so a teacher reading it still has to find the answer.
    """
    quoted = f": {solution}" if reveal_solution else ""
    value, formatted = parse_answer(text)
    if value is None:
        return SCORE_WRONG, f"No final answer found{quoted}. {FORMAT_HINT}"
    if value == answer:
        return SCORE_CORRECT, None
    if formatted:
        return SCORE_WRONG, f"Your answer {value} is wrong{quoted}."
    return SCORE_WRONG, f"No 'Answer:' line found and your last number {value} is wrong{quoted}. {FORMAT_HINT}"


def arithmetic_reward(completions, answer, solution, **kwargs) -> list[dict]:
    """TRL reward function with feedback: one ``{"score", "feedback"}`` dict per completion.

    Args:
        completions: the batch's completions (strings or chat-message lists).
        answer: the ``answer`` dataset column, one int per completion.
        solution: the ``solution`` dataset column, one string per completion.
        **kwargs: the other columns and ``trainer_state``, unused.
    """
    results = []
    for completion, correct, worked in zip(completions, answer, solution, strict=True):
        score, feedback = score_completion(completion_text(completion), int(correct), worked)
        results.append({"score": score, "feedback": feedback})
    return results


def arithmetic_reward_scores(completions, answer, solution, **kwargs) -> list[float]:
    """The same scores as :func:`arithmetic_reward` without the feedback, for trainers that take floats only."""
    return [item["score"] for item in arithmetic_reward(completions, answer, solution)]
