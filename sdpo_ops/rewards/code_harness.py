"""Runs a solution against its tests inside the sandbox, reporting one JSON line per event on the report pipe.

Executed by :mod:`sdpo_ops.rewards.sandbox_child` as the program of a sandboxed run (standard library only:
the isolated interpreter cannot import ``sdpo_ops``). Reads ``solution.py`` and ``tests.json`` from its working
directory. ``tests.json`` is ``{"kind": "assert", "tests": [statement, ...]}`` (the solution runs once, then each
statement in its namespace) or ``{"kind": "io", "tests": [[stdin, expected stdout], ...]}`` (the solution runs
once per test as ``__main__`` on that stdin). Events, in order:

- ``{"event": "syntax_error", "message"}``: the solution does not compile (line and caret in the message);
- ``{"event": "program_error", "message", "kind"}``: (assert tests) the solution failed before any test ran;
- ``{"event": "start", "test"}`` then ``{"event": "result", "test", "passed", "message", "kind"}`` per test;
- ``{"event": "done"}``.

``kind`` is ``failed`` (wrong result), ``error`` (an exception), ``exit`` (``sys.exit``), ``memory``
(``MemoryError``) or ``output`` (more than the output limit). Messages show only the solution's and the tests'
traceback lines.
"""

import ast
import io
import json
import linecache
import os
import sys
import traceback

SOLUTION = "solution.py"
REPORT_FD = int(sys.argv[1])
HARNESS_PID = os.getpid()
REPR_CHARS = 300


class OutputLimitExceeded(BaseException):
    """Raised from a test's stdout past the limit; a BaseException so that ``except Exception`` does not hide it."""


class BoundedBytes(io.BytesIO):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:
        if self.tell() + len(data) > self.limit:
            raise OutputLimitExceeded
        return super().write(data)


def report(**event) -> None:
    # A process the solution forked runs this code too; only the harness speaks for the run.
    if os.getpid() == HARNESS_PID:
        os.write(REPORT_FD, (json.dumps(event) + "\n").encode())


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= REPR_CHARS else text[: REPR_CHARS - 3] + "..."


def user_traceback(error: BaseException, own_files: set) -> str:
    """The traceback of ``error`` with only the frames of ``own_files`` (the solution's and the tests')."""
    if isinstance(error, SyntaxError):
        return "".join(traceback.format_exception_only(type(error), error)).rstrip()
    summary = traceback.TracebackException.from_exception(error, capture_locals=False)
    frames = [frame for frame in summary.stack if frame.filename in own_files]
    summary.stack = traceback.StackSummary.from_list(frames)
    return "".join(summary.format(chain=False)).rstrip()


def classify(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return "memory"
    if isinstance(error, SystemExit):
        return "exit"
    if isinstance(error, OutputLimitExceeded):
        return "output"
    return "error"


def describe(error: BaseException, own_files: set) -> str:
    if isinstance(error, SystemExit):
        return f"The code called sys.exit({short_repr(error.code) if error.code is not None else ''})."
    if isinstance(error, OutputLimitExceeded):
        return "The output exceeded the limit."
    return user_traceback(error, own_files)


def register_source(filename: str, source: str) -> None:
    """Let tracebacks quote lines of a test (it has no file)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)


def run_assert_test(index: int, statement: str, namespace: dict, own_files: set) -> None:
    filename = f"<test {index + 1}>"
    own_files.add(filename)
    register_source(filename, statement)
    tree = ast.parse(statement, filename, "exec")
    body = tree.body
    compare = body[0].test if len(body) == 1 and isinstance(body[0], ast.Assert) else None
    if isinstance(compare, ast.Compare) and len(compare.ops) == 1 and isinstance(compare.ops[0], ast.Eq):
        # ``assert f(x) == y``: evaluate both sides to say what came back and what was expected.
        actual = eval(compile(ast.Expression(compare.left), filename, "eval"), namespace)
        expected = eval(compile(ast.Expression(compare.comparators[0]), filename, "eval"), namespace)
        if actual == expected:
            report(event="result", test=index, passed=True, message=None, kind=None)
        else:
            call = ast.get_source_segment(statement, compare.left) or "the left side"
            message = f"{call} returned {short_repr(actual)}, expected {short_repr(expected)}"
            report(event="result", test=index, passed=False, message=message, kind="failed")
        return
    try:
        exec(compile(tree, filename, "exec"), namespace)
    except AssertionError as error:
        message = user_traceback(error, own_files)
        report(event="result", test=index, passed=False, message=message, kind="failed")
        return
    report(event="result", test=index, passed=True, message=None, kind=None)


def normalized_output(text: str) -> list:
    """Output lines without trailing whitespace, trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def run_io_test(index: int, code, stdin: str, expected: str, output_limit: int) -> None:
    captured = BoundedBytes(output_limit)
    real_stdin, real_stdout = sys.stdin, sys.stdout
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    output = sys.stdout = io.TextIOWrapper(captured, encoding="utf-8", write_through=True)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as error:
        if error.code not in (None, 0):
            raise
    finally:
        sys.stdin, sys.stdout = real_stdin, real_stdout
        output.detach()  # else closing the wrapper (when collected) closes ``captured``
    actual = captured.getvalue().decode("utf-8", errors="replace")
    if normalized_output(actual) == normalized_output(expected):
        report(event="result", test=index, passed=True, message=None, kind=None)
    else:
        message = f"input:\n{stdin}\nexpected output:\n{expected}\nactual output:\n{actual}"
        report(event="result", test=index, passed=False, message=message, kind="failed")


def main() -> None:
    with open("tests.json", encoding="utf-8") as handle:
        spec = json.load(handle)
    with open(SOLUTION, encoding="utf-8") as handle:
        source = handle.read()
    own_files = {SOLUTION}
    try:
        code = compile(source, SOLUTION, "exec")
    except (SyntaxError, ValueError) as error:  # ValueError: a null byte in the source
        report(event="syntax_error", message=user_traceback(error, own_files))
        return
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    if spec["kind"] == "assert":
        try:
            exec(code, namespace)
        except BaseException as error:
            namespace.clear()  # frees what a memory bomb allocated before we format the message
            report(event="program_error", message=describe(error, own_files), kind=classify(error))
            return
    for index, test in enumerate(spec["tests"]):
        report(event="start", test=index)
        try:
            if spec["kind"] == "assert":
                run_assert_test(index, test, namespace, own_files)
            else:
                run_io_test(index, code, test[0], test[1], spec["output_bytes"])
        except BaseException as error:
            report(event="result", test=index, passed=False, message=describe(error, own_files), kind=classify(error))
    report(event="done")


main()
