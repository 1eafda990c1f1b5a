"""The one place a Triton kernel of sdpo_ops is launched: the device guard and a record per launch.

``launch(kernel, grid, hbm_bytes=..., num_warps=..., **args)`` runs ``kernel[grid](**args)`` under
``torch.cuda.device(<the tensors' device>)``: Triton launches on the *current* CUDA device, so without the
guard tensors on ``cuda:1`` while device 0 is current would be read from the wrong device.

Each launch is also described by a ``LaunchRecord`` (kernel, grid, arguments, the launcher's estimate of
its HBM traffic) handed to every active ``record_launches()`` block. On ``meta`` tensors nothing runs: the
launchers validate, allocate and record exactly as on a GPU, which is how the launch counter, the
allocation tracker and the cost model (``bench.cost_model``) see a real-size call without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchRecord:
    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: dict[str, Any]
    num_warps: int
    hbm_bytes: int  # the launcher's estimate of the bytes the kernel moves to and from HBM

    @property
    def name(self) -> str:
        return self.kernel.__name__


_listeners: list[Callable[[LaunchRecord], None]] = []


@contextlib.contextmanager
def on_launch(listener: Callable[[LaunchRecord], None]) -> Iterator[None]:
    """Call ``listener(record)`` at every Triton launch made inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Collect the ``LaunchRecord`` of every Triton launch made inside the block (they keep their tensors
    alive: a memory instrument should listen with ``on_launch`` instead)."""
    records: list[LaunchRecord] = []
    with on_launch(records.append):
        yield records


def runs_on_gpu(tensor: torch.Tensor) -> bool:
    """Whether a launch on ``tensor`` takes the GPU tile configuration: CUDA, and ``meta`` (which stands for a GPU
    in dry runs: the cost model, the launch and memory budgets, the sm_90 compile report)."""
    return tensor.device.type in ("cuda", "meta")


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for the duration (a no-op for other device types)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid: tuple[int, ...], *, hbm_bytes: int, num_warps: int, **args) -> None:
    device = next(value.device for value in args.values() if isinstance(value, torch.Tensor))
    record = LaunchRecord(kernel, tuple(grid), args, num_warps, int(hbm_bytes))
    for listener in _listeners:
        listener(record)
    if device.type == "meta":
        return
    with device_guard(device):
        kernel[grid](**args, num_warps=num_warps)


def check_row_output(name: str, out: torch.Tensor | None, logits: torch.Tensor) -> None:
    """An optional per-row output of a launcher over ``logits [C, V]``: None, or a contiguous ``[C]`` floating tensor
    on the same device."""
    if out is None:
        return
    rows = logits.shape[0]
    if out.shape != (rows,) or not out.is_floating_point() or out.stride(0) != 1 or out.device != logits.device:
        raise ValueError(
            f"{name} must be a contiguous floating [C] = [{rows}] tensor on {logits.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )


# Elements per 128-bit access group that a row mask must not split: Triton vectorises a masked access only where the
# mask bound is divisible by 16 (its integer specialisation), so 16 covers every dtype up to 8 per 16 bytes.
_MASK_MULTIPLE = 16


def readable_width(*rows: torch.Tensor) -> int:
    """How far along each row of the ``[C, V]`` tensors ``rows`` a kernel may load (and ``logit_grad`` store): V
    rounded up to a multiple of 16 elements where every tensor's rows have memory that far (a row stride padded by
    ``DevicePolicy.row_stride_multiple``), else V.

    Row accesses masked at ``cols < V`` for an odd V are split into 32-bit (16-bit) ones, whatever the row alignment;
    masked at this width they stay 128-bit, and the kernels discard the columns past V (``tl.where`` after the load,
    zeros stored into the padding)."""
    vocab = rows[0].shape[-1]
    width = -(-vocab // _MASK_MULTIPLE) * _MASK_MULTIPLE
    for tensor in rows:
        count = tensor.shape[0]
        if count == 0 or tensor.stride(-1) != 1 or tensor.stride(0) < width:
            return vocab
        last = tensor.storage_offset() + (count - 1) * tensor.stride(0) + width
        if tensor.untyped_storage().nbytes() < last * tensor.element_size():
            return vocab
    return width
