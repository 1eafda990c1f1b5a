"""The demo task: deterministic problems, answer parsing, reward and feedback on hand-written replies."""

import random

import pytest

from sdpo_ops.adapters.feedback import split_scores_and_feedback
from sdpo_ops.demo.task import (
    FORMAT_HINT,
    SCORE_CORRECT,
    SCORE_WRONG,
    SYSTEM_PROMPT,
    Problem,
    arithmetic_reward,
    arithmetic_reward_scores,
    build_prompt,
    completion_text,
    dataset_rows,
    generate_problems,
    parse_answer,
    score_completion,
)


def test_problems_are_deterministic_by_seed():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)
    # The first problems do not depend on how many are drawn.
    assert generate_problems(10, seed=3) == generate_problems(50, seed=3)[:10]


def test_problems_leave_the_global_random_state_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_problems(20, seed=0)
    assert random.random() == expected


def test_problem_answers_are_the_arithmetic_of_their_operands():
    problems = generate_problems(300, seed=1, max_operand=12)
    for p in problems:
        assert 1 <= p.a <= 12 and 1 <= p.b <= 12
        assert p.answer == (p.a + p.b if p.operation == "+" else p.a - p.b)
        assert p.answer >= 0
        # Both operands appear in the question text as numbers.
        assert str(p.a) in p.question and str(p.b) in p.question
    assert {p.operation for p in problems} == {"+", "-"}
    # Both question styles occur with the default word_fraction.
    assert any(p.question.startswith("What is") for p in problems)
    assert any(not p.question.startswith("What is") for p in problems)


def test_problem_options():
    only_add = generate_problems(40, seed=0, operations=("+",), word_fraction=0.0)
    assert all(p.operation == "+" and p.question == f"What is {p.a} + {p.b}?" for p in only_add)
    assert all(p.question != f"What is {p.a} {p.operation} {p.b}?" for p in generate_problems(40, word_fraction=1.0))
    assert generate_problems(0) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1},
        {"n": 3, "max_operand": 0},
        {"n": 3, "operations": ("*",)},
        {"n": 3, "operations": ()},
        {"n": 3, "word_fraction": 1.5},
    ],
)
def test_problem_arguments_are_validated(kwargs):
    with pytest.raises(ValueError):
        generate_problems(**kwargs)


def test_solution_text():
    assert Problem("q", 7, 8, "+", 15).solution == "7 + 8 = 15"
    assert Problem("q", 9, 4, "-", 5).solution == "9 - 4 = 5"


def test_prompt_and_dataset_rows():
    p = Problem("What is 7 + 8?", 7, 8, "+", 15)
    assert build_prompt(p) == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is 7 + 8?"},
    ]
    assert build_prompt(p, system_prompt=None) == [{"role": "user", "content": f"What is 7 + 8? {FORMAT_HINT}"}]
    assert dataset_rows([p]) == [{"prompt": build_prompt(p), "answer": 15, "solution": "7 + 8 = 15"}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 15", (15, True)),
        ("7 + 8 = 15.\nAnswer: 15", (15, True)),
        ("**Answer:** 15", (15, True)),
        ("The answer is 15.", (15, True)),
        ("answer = -3", (-3, True)),
        ("Answer: 12 ... no wait. Answer: 15", (15, True)),  # the last Answer line counts
        ("Answer: 15, because 7 + 8 gives 15 and 3 more", (15, True)),  # Answer line beats a later number
        ("7 + 8 = 15", (15, False)),
        ("I think it is 14 or maybe 16", (16, False)),
        ("I don't know.", (None, False)),
        ("", (None, False)),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_score_correct_replies_have_no_feedback():
    assert score_completion("Answer: 15", 15, "7 + 8 = 15") == (SCORE_CORRECT, None)
    assert score_completion("7 + 8 = 15", 15, "7 + 8 = 15") == (SCORE_CORRECT, None)


def test_score_wrong_answer_names_it_and_the_solution():
    score, feedback = score_completion("Answer: 12", 15, "7 + 8 = 15")
    assert score == SCORE_WRONG
    assert feedback == "Your answer 12 is wrong: 7 + 8 = 15."


def test_score_wrong_unformatted_number_asks_for_the_format():
    score, feedback = score_completion("7 + 8 = 16", 15, "7 + 8 = 15")
    assert score == SCORE_WRONG
    assert "16 is wrong: 7 + 8 = 15" in feedback and FORMAT_HINT in feedback


def test_verdict_feedback_never_quotes_the_solution():
    for reply in ("Answer: 12", "7 + 8 = 16", "no idea"):
        score, feedback = score_completion(reply, 15, "7 + 8 = 15", reveal_solution=False)
        assert score == SCORE_WRONG
        assert "15" not in feedback and "7 + 8" not in feedback
    assert score_completion("Answer: 15", 15, "7 + 8 = 15", reveal_solution=False) == (SCORE_CORRECT, None)
    assert score_completion("Answer: 12", 15, "7 + 8 = 15", reveal_solution=False)[1] == "Your answer 12 is wrong."


def test_score_no_number():
    score, feedback = score_completion("Let me think about apples.", 15, "7 + 8 = 15")
    assert score == SCORE_WRONG
    assert feedback == f"No final answer found: 7 + 8 = 15. {FORMAT_HINT}"


def test_completion_text_accepts_both_trl_forms():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "chat"}]) == "chat"
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
        == "a b"
    )
    with pytest.raises(TypeError):
        completion_text(42)


def test_reward_follows_the_feedback_contract():
    completions = [
        [{"role": "assistant", "content": "Answer: 15"}],
        [{"role": "assistant", "content": "Answer: 3"}],
        [{"role": "assistant", "content": "no idea"}],
    ]
    answers, solutions = [15, 5, 5], ["7 + 8 = 15", "9 - 4 = 5", "9 - 4 = 5"]
    output = arithmetic_reward(completions=completions, answer=answers, solution=solutions, trainer_state=None)
    scores, feedback = split_scores_and_feedback(output)
    assert scores == [1.0, 0.0, 0.0]
    assert feedback[0] is None
    assert feedback[1] == "Your answer 3 is wrong: 9 - 4 = 5."
    assert feedback[2].startswith("No final answer found: 9 - 4 = 5.")
    assert arithmetic_reward_scores(completions=completions, answer=answers, solution=solutions) == [1.0, 0.0, 0.0]


def test_reward_rejects_mismatched_columns():
    with pytest.raises(ValueError):
        arithmetic_reward(completions=["Answer: 1", "Answer: 2"], answer=[1], solution=["0 + 1 = 1"])
