"""The benchmark suite as a smoke check, so that it never rots.

- Every contender the bench times on CPU computes the SDPO loss it claims to: loss and gradients against an
  fp64 oracle written from TRL's ``trl.experimental.sdpo.loss_utils`` (independent of sdpo_ops), on the
  bench's own inputs and through the bench's own wiring (``Contender.step``).
- The floor runs the GEMMs of the loss: its dH and dW equal ``Z Ws`` and ``Z^T Hs`` for ``Z = Hs Ws^T``.
- The ratio arithmetic of the report, on hand-made records.
- The harness end to end: pytest on ``bench/`` with ``--bench-profile smoke`` in a subprocess writes the
  pytest-benchmark JSON, the records with their ratios, ``results.md`` and a plot; the CPU memory probe's
  subprocess sees the naive path's ``[N, V]`` tensors.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import ELEMENTWISE, norm_relative_error

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import report  # noqa: E402
from bench.contenders import CONTENDERS, case_for, make_inputs, run_floor  # noqa: E402
from bench.shapes import FWD, FWD_BWD, Case, Shape  # noqa: E402

loss_utils = pytest.importorskip("trl.experimental.sdpo.loss_utils")

TINY = Shape("tiny", 48, 32, 384)
CPU_CONTENDERS = ("naive", "sdpo_torch", "trl_chunked")


def oracle(inputs, case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dH, dW)`` in fp64 from TRL's loss_utils on materialised logits (masked token-mean)."""
    from trl.trainer.utils import selective_log_softmax

    hidden = inputs.student_hidden.detach().double().requires_grad_()
    weight = inputs.student_weight.detach().double().requires_grad_()
    student_logits = hidden @ weight.t()
    teacher_logits = inputs.teacher_hidden.double() @ inputs.teacher_weight.double().t()
    if case.topk is None:
        per_token = loss_utils.compute_full_logit_self_distillation_loss(
            student_logits, teacher_logits, distillation_alpha=case.alpha
        )
    else:
        per_token = loss_utils.compute_topk_self_distillation_loss(
            student_logits,
            teacher_logits,
            distillation_topk=case.topk,
            distillation_alpha=case.alpha,
            distillation_add_tail=case.add_tail,
        )
    if case.with_is:
        target_logprobs = selective_log_softmax(student_logits, inputs.target_ids)
        per_token = loss_utils.apply_importance_sampling_clipping(
            per_token, target_logprobs, inputs.old_logprobs.double(), case.is_clip
        )
    mask = inputs.mask.double()
    loss = (per_token * mask).sum() / mask.sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def _cases():
    for name in CPU_CONTENDERS:
        for topk in (None, 20):
            case = Case(TINY, topk)
            if CONTENDERS[name].applies_to(case):
                yield pytest.param(name, case_for(name, case), id=f"{name}-{case.k_label}")


@pytest.mark.parametrize(("name", "case"), list(_cases()))
def test_contender_matches_trl_oracle(name, case):
    contender = CONTENDERS[name]
    if reason := contender.unsupported(case, torch.device("cpu")):
        pytest.skip(reason)
    inputs = make_inputs(case, "cpu", seed=1)
    loss = contender.step(inputs, case)()
    expected_loss, expected_dh, expected_dw = oracle(inputs, case)
    tol = ELEMENTWISE[torch.float32]
    assert expected_loss > 0
    torch.testing.assert_close(loss.detach().double(), expected_loss, **tol)
    torch.testing.assert_close(inputs.student_hidden.grad.double(), expected_dh, **tol)
    torch.testing.assert_close(inputs.student_weight.grad.double(), expected_dw, **tol)


@pytest.mark.parametrize("name", CPU_CONTENDERS)
def test_forward_mode_builds_no_graph(name):
    case = Case(TINY, None, mode=FWD)
    contender = CONTENDERS[name]
    if reason := contender.unsupported(case, torch.device("cpu")):
        pytest.skip(reason)
    inputs = make_inputs(case, "cpu", seed=1)
    loss = contender.step(inputs, case)()
    expected_loss, _, _ = oracle(inputs, case_for(name, case))
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), expected_loss, **ELEMENTWISE[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpo_triton", "liger_fused_jsd", "trl_chunked"])
def test_cuda_contender_matches_trl_oracle(name):
    case = case_for(name, Case(TINY, None))
    contender = CONTENDERS[name]
    if reason := contender.unsupported(case, torch.device("cuda")):
        pytest.skip(reason)
    inputs = make_inputs(case, "cuda", seed=1)
    loss = contender.step(inputs, case)()
    expected_loss, expected_dh, expected_dw = oracle(inputs, case)
    tol = {"rtol": 1e-3, "atol": 1e-5}  # TF32-free fp32 GEMMs on CUDA round differently from the CPU
    torch.testing.assert_close(loss.detach().double(), expected_loss, **tol)
    torch.testing.assert_close(inputs.student_hidden.grad.double(), expected_dh, **tol)
    torch.testing.assert_close(inputs.student_weight.grad.double(), expected_dw, **tol)


def test_floor_runs_the_loss_gemms_over_uneven_chunks():
    case = Case(TINY, 20)
    inputs = make_inputs(case, "cpu", seed=2)
    logit_grad = torch.randn(20, TINY.v)  # CPU stages one chunk per dW pass: blocks of 20, 20, 8 rows
    dh, dw = run_floor(inputs, FWD_BWD, chunk_rows=20, logit_grad=logit_grad)
    hidden, weight = inputs.student_hidden.detach().double(), inputs.student_weight.detach().double()
    assert dh.shape == inputs.student_hidden.shape and dw.shape == inputs.student_weight.shape
    blocks = [slice(0, 20), slice(20, 40), slice(40, 48)]
    expected_dh = torch.cat([logit_grad[: b.stop - b.start].double() @ weight for b in blocks])
    expected_dw = sum(logit_grad[: b.stop - b.start].double().t() @ hidden[b] for b in blocks)
    # fp32 GEMMs against fp64 ones: sums of up to 384 products, so a norm-relative bound.
    assert norm_relative_error(dh, expected_dh) < 1e-5
    assert norm_relative_error(dw, expected_dw) < 1e-5
    assert run_floor(inputs, FWD, chunk_rows=20) == (None, None)


def test_report_ratios_from_same_session_records():
    def rec(contender, topk, time_s, extra, n=64):  # time_s: the fastest round, the ratios' statistic
        return {
            "test": "loss",
            "contender": contender,
            "shape": "s",
            "n": n,
            "h": 8,
            "v": 32,
            "topk": topk,
            "dtype": "float32",
            "mode": FWD_BWD,
            "time_s": time_s,
            "extra_bytes": extra,
            "status": "ok",
        }

    records = [
        rec("floor", None, 1.0, 10),
        rec("naive", None, 8.0, 1000),
        rec("naive", 20, 4.0, 800),
        rec("sdpo_torch", 20, 2.0, 40),
        rec("sdpo_torch", 20, 3.0, 40, n=128),  # another shape: no floor, no naive
    ]
    report.add_ratios(records)
    ours, other = records[3], records[4]
    assert ours["time_vs_floor"] == pytest.approx(2.0)  # the floor does not depend on K
    assert ours["time_vs_naive"] == pytest.approx(0.5)  # the naive path with the same K
    assert ours["memory_vs_naive"] == pytest.approx(0.05)
    assert other["time_vs_floor"] is None and other["time_vs_naive"] is None
    table = report.text_table(report.TABLE_COLUMNS, report.table_rows(records))
    assert "2.00x" in table and "0.50x" in table


@pytest.mark.slow
def test_cpu_memory_probe_sees_the_naive_logits():
    from bench.memprobe import measure

    case = Case(Shape("probe", 256, 32, 4096), 20)
    result = measure("naive", case, "cpu")
    logits_bytes = case.shape.n * case.shape.v * 4
    # The naive fwd+bwd holds at least the fp32 student logits and their log-softmax at once; a probe that
    # measured the whole process (torch alone is ~200 MiB) would exceed the upper bound.
    assert 2 * logits_bytes <= result["extra_bytes"] <= 40 * logits_bytes, result
    assert result["grad_bytes"] == (256 * 32 + 4096 * 32) * 4


@pytest.mark.slow
def test_smoke_profile_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "bench/test_loss.py",
        "bench/test_scaling.py",
        "--benchmark-only",
        "--bench-profile",
        "smoke",
        "--bench-results",
        str(tmp_path),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ratios measured in this process" in proc.stdout

    benchmarks = json.loads((tmp_path / "benchmark.json").read_text())["benchmarks"]
    timed = {(b["extra_info"]["test"], b["extra_info"]["contender"], b["extra_info"]["topk"]) for b in benchmarks}
    for contender in ("floor", "naive", "sdpo_torch"):
        assert ("loss", contender, 20) in timed
    assert ("loss", "trl_chunked", None) in timed
    assert ("scaling_n", "naive", 20) in timed
    assert all(b["stats"]["rounds"] >= 1 and b["stats"]["median"] > 0 for b in benchmarks)

    records = json.loads((tmp_path / "records.json").read_text())["records"]
    by_key = {(r["test"], r["contender"], r["topk"], r["n"]): r for r in records if r["status"] == "ok"}
    naive = by_key[("loss", "naive", 20, TINY.n)]
    ours = by_key[("loss", "sdpo_torch", 20, TINY.n)]
    assert naive["time_vs_naive"] == pytest.approx(1.0)
    assert ours["time_vs_floor"] == pytest.approx(ours["time_s"] / by_key[("loss", "floor", 20, TINY.n)]["time_s"])
    assert naive["extra_bytes"] > 0

    results_md = (tmp_path / "results.md").read_text()
    assert f"torch {torch.__version__}" in results_md and "Commit:" in results_md
    assert "| sdpo_torch |" in results_md.replace("  ", " ")
    assert (tmp_path / "scaling_n.png").stat().st_size > 0


def test_stage_timer_times_every_row_stage_of_each_namespace(tmp_path):
    from bench import stages

    assert (
        stages.main(
            [
                "--device",
                "cpu",
                "--rows",
                "4",
                "--hidden",
                "8",
                "--vocab",
                "64",
                "--topk",
                "5",
                "--namespaces",
                "torch",
                "--iters",
                "2",
                "--warmup",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    written = json.loads((tmp_path / "stages.json").read_text())
    stage_names = [row["stage"] for row in written["rows"]]
    assert stage_names[0].startswith("chunk GEMM") and len(stage_names) == 7
    assert any(name.startswith("student_row_stats + teacher + row loss (fused") for name in stage_names)
    assert {"student_row_stats", "teacher_row_stats", "row_loss_", "full_vocab_divergence", "logit_grad"} == {
        name.split(" ")[0] for name in stage_names[1:]
    }
    assert all(row["ms"] > 0 and math.isfinite(row["ms"]) for row in written["rows"])
    assert "| logit_grad (top-K, float32 out) | torch |" in (tmp_path / "stages.md").read_text()
