"""pytest hooks of the benchmark suite: options, the case x contender parametrisation, the final report.

``make bench`` runs ``python -m pytest bench --benchmark-only``. Options:

- ``--bench-profile cpu|gpu|smoke`` (default: ``gpu`` when CUDA is available, else ``cpu``), see shapes.py;
- ``--bench-results DIR`` (default ``bench/results/<machine>``; ``none``: write nothing);
- ``--bench-contenders a,b`` to run a subset (``floor`` and ``naive`` are needed for the ratios);
- ``--bench-no-memory`` to skip the (untimed, separate) memory measurements.

The timed run and the memory measurement are in harness.py. At the end the session prints the ratio table
and writes ``benchmark.json`` (pytest-benchmark's raw data), ``records.json``, ``results.md`` and the
scaling plots into the results directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # As in tests/conftest.py: Triton picks interpreter mode when a kernel is defined, so set it before
    # sdpo_ops.kernels is imported (the Triton contender is skipped on CPU, but imports stay consistent).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import report  # noqa: E402
from bench.contenders import CONTENDERS  # noqa: E402
from bench.harness import OUT_DIR_KEY, RECORDS_KEY, bench_profile, run_case  # noqa: E402
from bench.shapes import PROFILES  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sdpo_ops benchmarks")
    group.addoption("--bench-profile", choices=sorted(PROFILES), default=None, help="cases to run (default by CUDA)")
    group.addoption(
        "--bench-results", default=None, help="results directory or 'none' (default bench/results/<machine>)"
    )
    group.addoption("--bench-contenders", default=None, help="comma-separated subset of: " + ", ".join(CONTENDERS))
    group.addoption("--bench-no-memory", action="store_true", help="skip the peak-memory measurements")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RECORDS_KEY] = []
    results = config.getoption("--bench-results")
    out_dir = Path(results) if results else report.RESULTS_ROOT / report.machine_slug()
    if results == "none":
        out_dir = None
    config.stash[OUT_DIR_KEY] = out_dir
    # pytest-benchmark reads this option when its session starts (its pytest_configure is trylast).
    if out_dir is not None and getattr(config.option, "benchmark_json", "absent") is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = out_dir / "benchmark.json"


def _selected_contenders(config: pytest.Config, names) -> list[str]:
    chosen = config.getoption("--bench-contenders")
    if not chosen:
        return list(names)
    wanted = {name.strip() for name in chosen.split(",")}
    if unknown := wanted - set(CONTENDERS):
        raise pytest.UsageError(f"unknown contenders {sorted(unknown)}; known: {list(CONTENDERS)}")
    return [n for n in names if n in wanted]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    profile = bench_profile(metafunc.config)
    scaling = False
    for fixture, cases in (
        ("loss_case", profile.loss_cases()),
        ("scaling_n_case", profile.scaling_cases("n")),
        ("scaling_v_case", profile.scaling_cases("v")),
    ):
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, cases, ids=[c.id for c in cases])
            scaling = scaling or fixture != "loss_case"
    if "contender_name" in metafunc.fixturenames:
        names = profile.contenders_scaling if scaling else tuple(CONTENDERS)
        metafunc.parametrize("contender_name", _selected_contenders(metafunc.config, names))


@pytest.fixture
def bench_case(request: pytest.FixtureRequest, benchmark):
    """``bench_case(test, contender_name, case)``: time, measure and record one benchmark."""

    def run(test: str, contender_name: str, case) -> dict:
        return run_case(request.config, benchmark, test, contender_name, case)

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    records = config.stash.get(RECORDS_KEY, [])
    if not records:
        return
    report.add_ratios(records)
    terminalreporter.write_sep("=", "sdpo_ops benchmark: ratios measured in this process")
    terminalreporter.write_line(report.summary_text(records))
    out_dir = config.stash.get(OUT_DIR_KEY, None)
    if out_dir is not None:
        written = report.write_results(records, report.environment(), bench_profile(config).name, out_dir)
        terminalreporter.write_line("results written: " + ", ".join(str(p) for p in written))
