"""Instruments for one call of the fused loss, without a GPU: launches, host syncs, bytes, FLOPs, memory.

``trace(fn)`` runs ``fn`` (typically ``sdpo_loss(...).backward()`` on ``meta`` tensors, where the whole host
orchestration runs and nothing is computed) under a ``TorchDispatchMode`` and ``record_launches()``:

- every aten op that launches a kernel on a GPU (views, allocations and metadata ops do not), with its FLOPs
  (matmuls) and the bytes it reads and writes;
- every Triton launch, with the bytes its launcher says the kernel moves (``LaunchRecord.hbm_bytes``);
- host syncs (``aten._local_scalar_dense``: ``.item()``, ``.tolist()``);
- the bytes allocated beyond what existed before (fresh op outputs, freed when their tensor dies; a view
  keeps its base alive), and their peak.

The same trace drives the launch-budget and memory tests and ``bench.cost_model``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdpo_ops.kernels.launch import LaunchRecord, on_launch

# aten ops that allocate or relabel memory but launch no kernel on a GPU
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "lift_fresh",
    "_local_scalar_dense",
    "resize_",
    "set_",
}
_MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}


@dataclass
class Step:
    """One kernel of the traced call."""

    name: str  # aten op name or Triton kernel name
    kind: str  # "aten" or "triton"
    flops: int
    bytes: int
    shapes: tuple  # of the op's tensor outputs (aten) or its grid (triton)
    phase: str  # "forward" or "backward"
    # of ``bytes``: those written to the outputs plus those read back from them (in place, an addmm with beta != 0);
    # the rest are operand reads. 0 for Triton launches (their launchers report one total).
    output_bytes: int = 0


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    host_syncs: int = 0
    peak_extra_bytes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    # what forward's allocations still held when backward began (saved activations, results, formed gradients)
    forward_retained_bytes: int = 0

    def launches(self, phase: str | None = None) -> int:
        return sum(1 for step in self.steps if phase in (None, step.phase))

    def dw_pass_rows(self, vocab: int, hidden: int) -> list[int]:
        """Rows of dZ each pass over a ``[V, H]`` weight-gradient accumulator multiplies (the inner dimension of its
        ``[V, R] x [R, H]`` GEMM), in order."""
        return [
            step.flops // (2 * vocab * hidden)
            for step in self.steps
            if step.name in ("addmm", "addmm_") and step.shapes == ((vocab, hidden),)
        ]

    def peak_bytes(self) -> int:
        """Peak of the whole call beyond its inputs: forward's, or what forward left plus backward's own peak."""
        return max(self.peak_extra_bytes["forward"], self.forward_retained_bytes + self.peak_extra_bytes["backward"])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _matmul_flops(name: str, args) -> int:
    mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2][-2:]
    if len(mats) < 2:
        return 0
    (m, k), n = mats[0].shape[-2:], mats[1].shape[-1]
    batch = math.prod(mats[0].shape[:-2]) if mats[0].dim() > 2 else 1
    return 2 * batch * m * n * k


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: Trace):
        super().__init__()
        self.trace, self.phase = trace, "forward"
        self.live_bytes = 0

    def _track(self, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        self.live_bytes += size
        peak = self.trace.peak_extra_bytes
        peak[self.phase] = max(peak[self.phase], self.live_bytes)
        weakref.finalize(tensor, self._release, size)

    def _release(self, size: int) -> None:
        self.live_bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [r for r in tree_flatten(result)[0] if isinstance(r, torch.Tensor)]
        if name == "_local_scalar_dense":
            self.trace.host_syncs += 1
        if func.is_view:
            return result
        for output in outputs:
            if not any(output is a for a in inputs):
                self._track(output)
        if name in _NO_KERNEL:
            return result
        # read: every distinct input but a pure ``out=`` destination; written: every output (in place included)
        destinations = [v for k, v in kwargs.items() if k == "out" and isinstance(v, torch.Tensor)]
        positional = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        read = {id(a): a for a in inputs if not any(a is d for d in destinations) or any(a is p for p in positional)}
        if name in ("addmm", "addmm_") and kwargs.get("beta", 1) == 0 and not any(args[0] is a for a in args[1:3]):
            # BLAS: "if beta = 0, C need not be set on input" (cuBLAS: "C does not have to be a valid input"):
            # a beta = 0 GEMM writes its output without reading it (the first dW pass, the fp32 logits GEMM)
            read.pop(id(args[0]), None)
        moved = sum(_nbytes(a) for a in read.values()) + sum(_nbytes(o) for o in outputs)
        flops = _matmul_flops(name, args) if name in _MATMULS else 0
        shapes = tuple(tuple(o.shape) for o in outputs)
        read_back = sum(_nbytes(o) for o in outputs if id(o) in read)
        output_bytes = sum(_nbytes(o) for o in outputs) + read_back
        self.trace.steps.append(Step(name, "aten", flops, moved, shapes, self.phase, output_bytes))
        return result


def trace(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None] | None = None) -> Trace:
    """Trace ``loss = forward()`` and then ``backward(loss)`` (default ``loss.backward()``)."""
    result = Trace()
    recorder = _Recorder(result)

    def add_triton_step(record: LaunchRecord) -> None:
        # keep numbers only: holding the record would keep its tensors alive and inflate the memory peak
        result.steps.append(Step(record.name, "triton", 0, record.hbm_bytes, record.grid, recorder.phase))

    with on_launch(add_triton_step), recorder:
        loss = forward()
        recorder.phase = "backward"
        result.forward_retained_bytes = recorder.live_bytes
        recorder.live_bytes = 0  # what forward left alive is counted against forward's peak
        (backward or (lambda value: value.backward()))(loss)
    return result
