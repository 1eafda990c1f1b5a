"""CodeReward on ordinary programs: passing, partly passing, wrong, not compiling; code extraction; bad input.

The expected feedback is written out by hand from what the tests say (not produced by the code under test).
The adversarial programs are in tests/test_code_sandbox.py.
"""

import pytest

from sdpo_ops.adapters.feedback import RewardWithFeedback, split_scores_and_feedback
from sdpo_ops.rewards import CodeReward, SandboxLimits, extract_code
from sdpo_ops.rewards.code import NO_CODE_FEEDBACK, trim_middle

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
SUM_IO_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nIt adds the numbers."


@pytest.fixture(scope="module")
def reward():
    return CodeReward(limits=SandboxLimits(wall_seconds=10, memory_bytes=256 << 20, processes=4))


def test_passing_partial_wrong_and_syntax_error_in_one_batch(reward):
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a + b + (a == 2)"),  # wrong only for add(2, 2)
        fenced("def add(a, b):\n    return a * b"),  # right only for add(2, 2)
        fenced("def add(a, b)\n    return a + b"),
    ]
    result = reward(completions, tests=[ADD_TESTS] * 4)
    assert isinstance(result, RewardWithFeedback)
    assert result.scores == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert result.feedback[0] is None
    assert result.feedback[1] == "Test 2 of 3 (assert add(2, 2) == 4) failed:\nadd(2, 2) returned 5, expected 4"
    assert result.feedback[2] == "Test 1 of 3 (assert add(1, 2) == 3) failed:\nadd(1, 2) returned 2, expected 3"
    assert result.feedback[3] == (
        "The code does not compile:\n"
        '  File "solution.py", line 1\n'
        "    def add(a, b)\n"
        "                 ^\n"
        "SyntaxError: expected ':'"
    )


def _without_carets(text: str) -> list[str]:
    """The lines of a traceback but the ``^^^`` markers (their column differs between CPython 3.11 patch releases)."""
    return [line for line in text.splitlines() if line.strip(" ^~")]


def test_exception_feedback_shows_only_the_solution_and_test_lines(reward):
    result = reward([fenced("def add(a, b):\n    return a + c")], tests=[ADD_TESTS])
    assert result.scores == [0.0]
    assert _without_carets(result.feedback[0]) == [
        "Test 1 of 3 (assert add(1, 2) == 3) raised an exception:",
        "Traceback (most recent call last):",
        '  File "<test 1>", line 1, in <module>',
        "    assert add(1, 2) == 3",
        '  File "solution.py", line 2, in add',
        "    return a + c",
        "NameError: name 'c' is not defined",
    ]


def test_assertions_other_than_equality_report_the_assertion(reward):
    tests = ["assert is_even(4)", "assert not is_even(3), 'three is odd'"]
    result = reward([fenced("def is_even(n):\n    return True")], tests=[tests])
    assert result.scores == [0.5]
    assert result.feedback[0].startswith("Test 2 of 2 (assert not is_even(3), 'three is odd') failed:\n")
    assert result.feedback[0].endswith("AssertionError: three is odd")


def test_input_output_tests(reward):
    completions = [
        fenced("a, b = map(int, input().split())\nprint(a + b)"),
        fenced("a, b = map(int, input().split())\nprint(a * b)"),  # right for 1 2? no: 2; wrong for both
        "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)  ",  # bare code, trailing spaces
    ]
    result = reward(completions, tests=[SUM_IO_TESTS] * 3)
    assert result.scores == [1.0, 0.0, 1.0]
    assert result.feedback[1] == (
        "Test 1 of 2 (input '1 2\\n') failed:\ninput:\n1 2\n\nexpected output:\n3\n\nactual output:\n2\n"
    )


def test_all_or_nothing_scores(reward):
    strict = CodeReward(all_or_nothing=True, sandbox=reward.sandbox)
    completions = [fenced("def add(a, b):\n    return a + b"), fenced("def add(a, b):\n    return a + b + (a == 2)")]
    result = strict(completions, tests=[ADD_TESTS] * 2)
    assert result.scores == [1.0, 0.0]
    assert result.feedback[1].startswith("Test 2 of 3")


def test_chat_completions_and_trl_plumbing(reward):
    """TRL passes chat completions as message lists; the output splits as the trainer splits it."""
    completions = [
        [{"role": "assistant", "content": fenced("def add(a, b):\n    return a + b")}],
        [{"role": "assistant", "content": "I cannot do that."}],
    ]
    scores, feedback = split_scores_and_feedback(reward(completions, tests=[ADD_TESTS] * 2, prompts=["p", "p"]))
    assert scores == [1.0, 0.0]
    assert feedback == [None, NO_CODE_FEEDBACK]


def test_feedback_is_trimmed_in_the_middle():
    reward = CodeReward(max_feedback_chars=200, limits=SandboxLimits(wall_seconds=10))
    long_message = "x" * 1000
    result = reward([fenced(f"raise ValueError('{long_message}')")], tests=[ADD_TESTS])
    feedback = result.feedback[0]
    assert len(feedback) <= 200
    assert feedback.startswith("The code failed before any test ran:")
    assert "[... trimmed ...]" in feedback
    assert feedback.endswith("xxxx')") or feedback.endswith("x")
    assert trim_middle("abcdef", 6) == "abcdef"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("```python\nprint(1)\n```", "print(1)\n"),
        ("First:\n```py\nx = 1\n```\nBetter:\n```\nx = 2\n```", "x = 2\n"),  # the last block
        ("```Python3\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
        ("def f(x):\n    return x", "def f(x):\n    return x"),  # bare code
        ("def f(x)\n    return x", "def f(x)\n    return x"),  # bare code that does not compile: still code
        ("The answer is 42.", None),
        ("", None),
        ("```python\n\n```", None),
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_bad_input_is_refused_naming_the_argument(reward):
    with pytest.raises(ValueError, match="dataset column 'tests'"):
        reward(["x = 1"], answer=["1"])
    with pytest.raises(ValueError, match="1 completions but 2 entries of 'tests'"):
        reward(["x = 1"], tests=[ADD_TESTS, ADD_TESTS])
    with pytest.raises(ValueError, match="tests for completion 0 must be a non-empty list"):
        reward(["x = 1"], tests=["assert x == 1"])
    with pytest.raises(ValueError, match="is not valid Python"):
        reward(["x = 1"], tests=[["assert x =="]])
    with pytest.raises(ValueError, match="all assert statements"):
        reward(["x = 1"], tests=[["assert x == 1", {"input": "", "output": ""}]])
    with pytest.raises(ValueError, match="max_feedback_chars"):
        CodeReward(max_feedback_chars=10, sandbox=reward.sandbox)
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ValueError, match="processes"):
        SandboxLimits(processes=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=1 << 20)
