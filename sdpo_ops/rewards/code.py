"""A reward for code: run each completion's Python against its prompt's tests, in a sandbox, and say what failed.

:class:`CodeReward` is a TRL reward function (``reward_funcs=CodeReward()``) returning a
:class:`~sdpo_ops.adapters.feedback.RewardWithFeedback`: per completion, the fraction of tests passed (or 1/0
with ``all_or_nothing``) and, unless all passed, what a programmer would want to read, which SDPO puts into
the teacher's reprompt:

- the first failing test with what came back and what was expected (``add(2, 2) returned 5, expected 4``);
- an exception with its type, message and only the solution's and the test's traceback lines;
- a syntax error with its line and a caret;
- ``Timed out after 4 s``, ``Exceeded the memory limit (512 MiB)``, a crash signal, an early exit;
- ``No Python code found`` when there is no code at all;

trimmed to ``max_feedback_chars`` (the middle is cut, so the exception line at the end survives).

Tests come from a dataset column (``tests`` by default), one list per prompt, either assert statements
(``["assert add(1, 2) == 3", ...]``: the solution runs, then each statement in its namespace) or input/output
pairs (``[{"input": "1 2\\n", "output": "3\\n"}, ...]``: the solution runs once per pair as a script on that
stdin; output lines are compared without trailing whitespace). The code is the last fenced block of the
completion (```` ```python ````, ```` ```py ```` or bare ```` ``` ````), or else the whole completion when it
looks like Python. All completions of a batch run in parallel, ``max_workers`` at a time, each in its own
:mod:`sandbox <sdpo_ops.rewards.sandbox>` (whose docs say what it does and does not protect against).

Throughput: 8-10 programs/s with 2 workers on the 2-core AMD EPYC VM at load average 6-7 (measured with
``python -m bench.code_reward_throughput``; see the README's "Rewards from executed code" section).
"""

from __future__ import annotations

import ast
import json
import re
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from sdpo_ops.adapters.feedback import RewardWithFeedback, completion_text
from sdpo_ops.rewards.sandbox import MIB, RunResult, Sandbox, SandboxLimits

_HARNESS_SOURCE = Path(__file__).with_name("code_harness.py").read_text(encoding="utf-8")
_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", flags=re.DOTALL | re.IGNORECASE)
# A line starting like Python makes an unfenced completion code (then a syntax error is worth reporting).
_PYTHON_LINE_RE = re.compile(r"^\s*(def |class |import |from \w|for |while |if |print\(|return\b|\w+\s*=[^=])", re.M)
NO_CODE_FEEDBACK = "No Python code found in the reply. Put the solution in a ```python code block."
_SIGNAL_MEANINGS = {
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGXCPU: "exceeded the CPU time limit",
    signal.SIGXFSZ: "exceeded the file size limit",
    signal.SIGABRT: "aborted (SIGABRT)",
}


def extract_code(text: str) -> str | None:
    """The Python code of a completion: its last fenced block, or the whole text when it looks like Python."""
    blocks = [block for language, block in _FENCE_RE.findall(text) if block.strip()]
    if blocks:
        return blocks[-1]
    return text if _PYTHON_LINE_RE.search(text) else None


def _test_spec(tests, position: int) -> dict:
    """``tests.json`` for the harness from one prompt's tests; a ValueError naming the completion if malformed."""
    if isinstance(tests, str) or not isinstance(tests, Sequence) or not tests:
        raise ValueError(f"tests for completion {position} must be a non-empty list, got {tests!r}")
    if all(isinstance(test, str) for test in tests):
        for test in tests:
            try:
                ast.parse(test)
            except SyntaxError as error:
                raise ValueError(f"tests for completion {position}: {test!r} is not valid Python ({error})") from None
        return {"kind": "assert", "tests": list(tests)}
    if all(isinstance(test, Mapping) and {"input", "output"} <= set(test) for test in tests):
        pairs = [[str(test["input"]), str(test["output"])] for test in tests]
        return {"kind": "io", "tests": pairs}
    raise ValueError(
        f"tests for completion {position} must be all assert statements (str) or all "
        f"{{'input': ..., 'output': ...}} dicts, got {tests!r}"
    )


def trim_middle(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters by removing its middle."""
    if len(text) <= limit:
        return text
    marker = "\n[... trimmed ...]\n"
    keep = max(limit - len(marker), 0)
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head) :]


def _test_label(spec: dict, index: int) -> str:
    test = spec["tests"][index]
    shown = test if spec["kind"] == "assert" else f"input {test[0]!r}"
    return f"Test {index + 1} of {len(spec['tests'])} ({shown})"


def _megabytes(count: int) -> str:
    return f"{count / MIB:g} MiB"


class CodeReward:
    """TRL reward function: run each completion's code against its tests in a sandbox (see the module docs).

    Args:
        tests_column: the dataset column with each prompt's tests.
        limits: the sandbox's per-program limits.
        max_workers: programs run at once (default 2: the cores of a small machine).
        all_or_nothing: score 1.0 only if every test passes, else 0.0 (default: the fraction passed).
        max_feedback_chars: the longest feedback string.
        sandbox: a :class:`Sandbox` to use instead of building one from ``limits`` and ``max_workers``.
    """

    def __init__(
        self,
        *,
        tests_column: str = "tests",
        limits: SandboxLimits | None = None,
        max_workers: int = 2,
        all_or_nothing: bool = False,
        max_feedback_chars: int = 1500,
        sandbox: Sandbox | None = None,
    ):
        if not isinstance(max_feedback_chars, int) or max_feedback_chars < 100:
            raise ValueError(f"max_feedback_chars must be an int >= 100, got {max_feedback_chars!r}")
        self.tests_column = tests_column
        self.all_or_nothing = all_or_nothing
        self.max_feedback_chars = max_feedback_chars
        self.sandbox = sandbox if sandbox is not None else Sandbox(limits, max_workers=max_workers)
        self.__name__ = "code_reward"  # TRL names the reward's metric after it

    def __call__(self, completions, **kwargs) -> RewardWithFeedback:
        if self.tests_column not in kwargs:
            raise ValueError(f"CodeReward needs the dataset column {self.tests_column!r} (the tests of each prompt)")
        all_tests = kwargs[self.tests_column]
        if len(all_tests) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(all_tests)} entries of {self.tests_column!r}")
        specs = [_test_spec(tests, position) for position, tests in enumerate(all_tests)]
        codes = [extract_code(completion_text(completion)) for completion in completions]
        jobs = [(position, code, spec) for position, (code, spec) in enumerate(zip(codes, specs, strict=True)) if code]
        results = self.sandbox.run_many([self._files(code, spec) for _, code, spec in jobs])
        scores: list[float] = [0.0] * len(completions)
        feedback: list[str | None] = [NO_CODE_FEEDBACK] * len(completions)
        for (position, _, spec), result in zip(jobs, results, strict=True):
            scores[position], text = self.score(spec, result)
            feedback[position] = None if text is None else trim_middle(text, self.max_feedback_chars)
        return RewardWithFeedback(scores, feedback)

    def _files(self, code: str, spec: dict) -> tuple[dict[str, str], str]:
        spec = {**spec, "output_bytes": self.sandbox.limits.output_bytes}
        return {"solution.py": code, "tests.json": json.dumps(spec), "harness.py": _HARNESS_SOURCE}, "harness.py"

    def score(self, spec: dict, result: RunResult) -> tuple[float, str | None]:
        """``(score, feedback)`` of one run: feedback None when every test passed."""
        count = len(spec["tests"])
        outcomes: dict[int, dict] = {}
        started = None
        problems: list[str] = []
        for event in result.reports:
            kind = event.get("event")
            if kind == "syntax_error":
                problems.append(f"The code does not compile:\n{event.get('message', '')}")
            elif kind == "program_error":
                problems.append(self._program_error(event))
            elif kind == "start":
                started = event.get("test")
            elif kind == "result" and isinstance(event.get("test"), int) and event["test"] not in outcomes:
                outcomes[event["test"]] = event
                started = None
        passed = sum(1 for event in outcomes.values() if event.get("passed") is True)
        for index in sorted(outcomes):
            event = outcomes[index]
            if event.get("passed") is not True:
                problems.append(f"{_test_label(spec, index)} {self._verdict(event)}:\n{event.get('message', '')}")
                break
        # The harness stops after a syntax error or a failure before the tests: no "done", yet nothing ended early.
        finished = any(event.get("event") in ("done", "syntax_error", "program_error") for event in result.reports)
        if not finished or (result.timed_out or result.output_exceeded):
            where = f" while running {_test_label(spec, started)}" if isinstance(started, int) else ""
            problems.append(self._ended_early(result) + where + ".")
        score = passed / count
        if self.all_or_nothing:
            score = float(passed == count)
        if passed == count and not problems:
            return score, None
        return score, "\n\n".join(problems) if problems else "The tests did not all run."

    @staticmethod
    def _verdict(event: dict) -> str:
        return {
            "failed": "failed",
            "exit": "stopped the program",
            "memory": "exceeded the memory limit",
            "output": "printed more than the output limit",
        }.get(event.get("kind"), "raised an exception")

    def _program_error(self, event: dict) -> str:
        if event.get("kind") == "memory":
            limit = _megabytes(self.sandbox.limits.memory_bytes)
            return f"Exceeded the memory limit ({limit}) before any test ran:\n{event.get('message', '')}"
        return f"The code failed before any test ran:\n{event.get('message', '')}"

    def _ended_early(self, result: RunResult) -> str:
        limits = self.sandbox.limits
        if result.timed_out:
            return f"Timed out after {limits.wall_seconds:g} s"
        if result.output_exceeded:
            return f"Printed more than {_megabytes(limits.output_bytes)} of output"
        if result.returncode < 0:
            number = -result.returncode
            meaning = _SIGNAL_MEANINGS.get(number, f"was killed by signal {number}")
            return f"The program {meaning}"
        if "MemoryError" in result.stderr:
            return f"Exceeded the memory limit ({_megabytes(limits.memory_bytes)})"
        return f"The program exited with status {result.returncode} before the tests finished"
