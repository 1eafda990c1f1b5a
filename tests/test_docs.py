"""The documented examples run: the docstrings of ``sdpo_ops.loss`` and the README's usage block."""

from __future__ import annotations

import contextlib
import doctest
import io
import math
import re
from pathlib import Path

import sdpo_ops.loss

README = Path(__file__).resolve().parents[1] / "README.md"
# The README shows a realistic size; the test runs the same code at a size a CPU does in well under a second.
README_SIZE_LINE = "N, H, V = 512, 896, 151936"
TEST_SIZE_LINE = "N, H, V = 24, 32, 1000"


def test_loss_docstring_examples_run():
    results = doctest.testmod(sdpo_ops.loss, verbose=False, report=True)
    assert results.attempted >= 2, "the public docstrings of sdpo_ops.loss must carry examples"
    assert results.failed == 0


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_usage_block_runs():
    blocks = _python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    usage = next((block for block in blocks if "sdpo_loss(" in block), None)
    assert usage is not None, "README.md has no python block calling sdpo_loss"
    assert README_SIZE_LINE in usage, f"the README usage block no longer sets `{README_SIZE_LINE}`: update this test"
    code = usage.replace(README_SIZE_LINE, TEST_SIZE_LINE)

    namespace: dict = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is this repository's own file

    # The block prints the loss and two metrics, and leaves gradients on the student side.
    printed = [float(value) for value in stdout.getvalue().split()]
    assert len(printed) == 3 and all(math.isfinite(value) for value in printed), stdout.getvalue()
    loss, is_weight_mean, topk_mass_mean = printed
    assert loss >= 0.0 and 0.0 < is_weight_mean <= 2.0 and 0.0 < topk_mass_mean <= 1.0
    assert namespace["student_hidden"].grad is not None
    assert namespace["lm_head"].weight.grad is not None
