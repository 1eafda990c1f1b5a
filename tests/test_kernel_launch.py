"""Every Triton launch goes through ``sdpo_ops.kernels.launch.launch``: the device guard, records, dry runs."""

import pathlib
import re

import pytest
import torch

from sdpo_ops import row_ops as torch_ops
from sdpo_ops.kernels import launch as launch_module
from sdpo_ops.kernels import row_ops as triton_ops
from sdpo_ops.kernels.launch import device_guard, record_launches

KERNELS_DIR = pathlib.Path(launch_module.__file__).parent


def test_device_guard_selects_the_tensors_cuda_device():
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for device in ("cpu", "meta"):
        assert not isinstance(device_guard(torch.device(device)), torch.cuda.device)


def test_no_kernel_is_launched_around_the_guard():
    # a direct `kernel[grid](...)` would launch on the current device, not the tensors'
    direct = re.compile(r"\b_\w*_kernel\[")
    offenders = [path.name for path in KERNELS_DIR.glob("*.py") if direct.search(path.read_text())]
    assert offenders == [], offenders


@pytest.mark.interpret
def test_each_launch_is_guarded_with_its_tensors_device(monkeypatch):
    guarded = []

    def recording_guard(device):
        guarded.append(device)
        return device_guard(device)

    monkeypatch.setattr(launch_module, "device_guard", recording_guard)
    logits = torch.randn(3, 40)
    with record_launches() as records:
        lse, *_ = triton_ops.student_row_stats(logits, 4, None)
    assert guarded == [logits.device] and [r.name for r in records] == ["_student_row_stats_kernel"]
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


def test_meta_tensors_are_a_dry_run():
    logits = torch.empty(5, 1000, device="meta")
    with record_launches() as records:
        lse, topk_logits, topk_index, _ = triton_ops.student_row_stats(logits, 8, None)
    assert (lse.device.type, topk_logits.shape, topk_index.dtype) == ("meta", (5, 8), torch.int64)
    assert len(records) == 1 and records[0].grid == (5,) and records[0].hbm_bytes >= 5 * 1000 * 4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    torch.cuda.set_device(0)
    logits = torch.randn(4, 5000, device="cuda:1")
    lse, topk_logits, _, _ = triton_ops.student_row_stats(logits, 16, None)
    ref_lse, ref_topk, _, _ = torch_ops.student_row_stats(logits, 16, None)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(topk_logits.sort(-1).values, ref_topk.sort(-1).values)
