"""The Triton kernels as production launches them, compiled for sm_90 without a GPU (issue 9, item 6).

``bench.compile_report`` traces ``sdpo_loss`` and its backward at the real shape (N=8192, H=4096, V=151936,
bf16) on meta tensors for every production mode, turns each launch into the specialisation Triton's JIT
would compile on a GPU (pointer dtypes, 16-byte alignment, stride 1 as a constexpr, divisibility by 16),
compiles each distinct one for sm_90 with the ptxas of the triton wheel and reads registers, spills and
access widths from the cubin, its SASS and PTX. It runs in a subprocess: the test session sets
TRITON_INTERPRET=1 (conftest), and Triton fixes compile-or-interpret when a kernel is defined. Triton caches
the compiles, so only a cold cache makes this slow (about 1.5 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# sm_90: 64K 32-bit registers per SM; a kernel keeps two CTAs resident only at <= 65536 / (2 * threads) each.
REGISTERS_PER_SM = 65536
TARGET_CTAS_PER_SM = 2


@pytest.fixture(scope="module")
def report() -> dict:
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--json", "--no-write"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _describe(result: dict) -> str:
    return f"{result['kernel']} {result['constexprs']} (modes {result['modes']}, triton {result['triton_version']})"


def test_every_production_mode_launches_compiled_kernels(report):
    traced = {mode for result in report["results"] for mode in result["modes"]}
    assert traced == set(report["modes"])


def test_no_production_specialisation_spills(report):
    spilling = [_describe(result) for result in report["results"] if result["spills"] or result["spill_instructions"]]
    assert not spilling, "local memory / STL in:\n" + "\n".join(spilling)


def test_student_row_stats_keeps_two_ctas_per_sm_at_k256(report):
    at_k256 = [
        result
        for result in report["results"]
        if result["kernel"] == "_student_row_stats_kernel" and result["constexprs"].get("K_PAD") == "256"
    ]
    assert at_k256, "no student row-stats launch at K=256 was traced"
    for result in at_k256:
        limit = REGISTERS_PER_SM // (TARGET_CTAS_PER_SM * result["num_warps"] * 32)
        assert result["registers"] <= limit, f"{result['registers']} registers > {limit}: {_describe(result)}"


def test_streaming_kernels_move_rows_in_128_bit_accesses(report):
    # a kernel that takes the row width V streams [C, V] rows: each must have row accesses, all 128-bit; at an odd
    # V too (the host pads the row stride to 16 elements and the kernels mask their accesses at that width)
    streaming = [result for result in report["results"] if "V" in result["signature"]]
    assert streaming
    odd_modes = {mode for mode, vocab in report["vocab"].items() if vocab % 16}
    assert odd_modes, "no mode at an odd vocabulary was traced"
    at_odd_vocab = {result["kernel"] for result in streaming if odd_modes & set(result["modes"])}
    assert at_odd_vocab >= {"_student_row_stats_kernel", "_teacher_row_stats_kernel", "_logit_grad_kernel"}
    for result in streaming:
        loads = [access for access in result["row_accesses"] if access["kind"] == "load"]
        assert loads, f"no row load found in {_describe(result)}"
        narrow = [access for access in result["row_accesses"] if set(access["widths"]) != {128}]
        assert not narrow, f"row accesses not 128-bit in {_describe(result)}: {narrow}"
        assert result["sass_ldg_128"] > 0, f"no LDG.E.128 in the SASS of {_describe(result)}"
