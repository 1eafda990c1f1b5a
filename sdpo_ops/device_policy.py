"""Every host-side choice of the fused path that differs by device, in one place a test can set.

The CUDA path stages dZ in the GEMM dtype, multiplies bf16/fp16 operands into fp32 outputs (``mm(...,
out_dtype=float32)``), accumulates dW over several chunks per pass (``beta=0`` first, then ``beta=1``), sizes
chunks by the logits GEMM's arithmetic intensity and pads the ``[C, V]`` row stride; the CPU path does none of
that. Without a GPU the CUDA choices would never run: ``use_policy(CUDA_POLICY)`` makes every call inside it
take them on CPU tensors, with the fp32-output GEMM emulated by an fp32 upcast where the device has no such kernel
(CPU: the products of two bf16 or two fp16 values are exact in fp32, so the emulation differs from cuBLAS only by
the summation order).

What does not differ by device stays where it is used: fp64 accumulates in fp64, everything else in fp32
(``chunked.accumulation_dtype``); an fp16 model's dZ carries a power-of-two scale on every device
(``chunked._Gradients``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# torch >= 2.8 multiplies bf16/fp16 into an fp32 output on CUDA without rounding the product first.
# (The first release with mm/addmm.dtype_out; every release since accepts an fp32 accumulator as ``self``:
# bench/results/sm90-compile/torch_addmm_out_dtype.md.)
_HAS_MM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)
# Devices whose torch has the mm/addmm.dtype_out kernels (CPU has neither in torch 2.13); meta stands for a GPU.
_FP32_OUTPUT_MM_DEVICES = ("cuda", "meta")
# Chunks start on a multiple of this many rows, so every chunk's view of the per-row outputs is 16-byte aligned
# (one Triton specialisation, not two: a pointer off 16 bytes compiles its own kernel, with narrower accesses).
CHUNK_ROW_MULTIPLE = 16


@dataclass(frozen=True)
class DevicePolicy:
    """The fused path's device-dependent choices (see the module docstring).

    chunk_bytes: bytes of one fp32 ``[C, V]`` logits buffer; two are live at once (student and teacher).
    min_gemm_intensity: FLOP per HBM byte the per-chunk logits GEMM ``[C, H] x [H, V]`` must reach (it re-reads
        the whole ``[V, H]`` weight each chunk and writes an fp32 ``[C, V]``); chunks grow past ``chunk_bytes`` to
        reach it, up to ``max_intensity_rows``. 0: bytes alone.
    max_intensity_rows: the most rows the intensity target may ask for (small H never reaches it: H/2 FLOP/B).
    working_bytes: what the chunk buffers, the dZ staging and the per-row results of one call may hold together
        (KERNELS.md's extra memory, the gradients aside); the staging takes what the rest leaves (``stage_rows``).
    dw_stage_rows: at most this many rows of dZ per dW accumulator pass (rounded up to whole chunks); None: as many
        as ``working_bytes`` holds.
    fp32_output_mm: bf16/fp16 operands multiply into fp32 outputs (logits, the dW accumulator) and dZ is staged
        in the GEMM dtype; else the logits are cast from a GEMM-dtype product and dZ is staged in fp32.
    row_stride_multiple: the ``[C, V]`` buffers' row stride is a multiple of this many elements (cuBLAS leading
        dimensions and Triton's ``% 16`` pointer specialisation: 16-byte aligned rows for an odd V).
    triton_by_default: ``backend="auto"`` takes the Triton kernels (inputs they serve: not fp64, top-K <= 256).
    """

    name: str
    chunk_bytes: int
    min_gemm_intensity: float
    max_intensity_rows: int
    working_bytes: int
    dw_stage_rows: int | None
    fp32_output_mm: bool
    row_stride_multiple: int
    triton_by_default: bool

    def chunk_rows(self, num_tokens: int, vocab: int, hidden_size: int) -> int:
        """Rows per chunk: what ``chunk_bytes`` allows, raised to the GEMM's intensity target, at most the call's."""
        rows = self.chunk_bytes // (4 * vocab)
        wanted = _rows_for_intensity(self.min_gemm_intensity, vocab, hidden_size)
        if wanted is not None:  # rounded up: rounding down would fall under the target (V=262144: 368 rows, 312 FLOP/B)
            wanted = -(-wanted // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
            rows = max(rows, min(wanted, self.max_intensity_rows))
        if rows >= CHUNK_ROW_MULTIPLE:
            rows -= rows % CHUNK_ROW_MULTIPLE
        return max(1, min(num_tokens, rows))

    def stage_rows(self, chunk_size: int, num_tokens: int, row_bytes: int, held_bytes: int) -> int:
        """Rows of dZ per dW pass, in whole chunks: the fewest passes that cover the call with the chunks that
        ``working_bytes`` holds beside ``held_bytes`` (at least one, at most ``dw_stage_rows`` rounded up), spread
        evenly over the passes (ceil(chunks / passes) each: no small last pass, where the accumulator's
        read-modify-write would cost the same as a full pass's). ``row_bytes``: one staged row."""
        chunks = -(-num_tokens // chunk_size)
        if chunks == 0:
            return 0
        fit = max(1, (self.working_bytes - held_bytes) // (row_bytes * chunk_size))
        if self.dw_stage_rows is not None:
            fit = min(fit, -(-self.dw_stage_rows // chunk_size))
        passes = -(-chunks // fit)
        return -(-chunks // passes) * chunk_size

    def multiplies_into_fp32(self, operand: Tensor) -> bool:
        """Whether a GEMM on ``operand`` (and a same-dtype partner) writes fp32 directly (no rounded product)."""
        return self.fp32_output_mm and _HAS_MM_OUT_DTYPE and operand.dtype in (torch.float16, torch.bfloat16)

    def staging_dtype(self, weight_dtype: torch.dtype, accumulate: torch.dtype) -> torch.dtype:
        """dZ's dtype between ``logit_grad`` and the dH/dW GEMMs."""
        reduced = weight_dtype in (torch.float16, torch.bfloat16)
        return weight_dtype if self.fp32_output_mm and reduced and _HAS_MM_OUT_DTYPE else accumulate

    def row_stride(self, vocab: int) -> int:
        """Elements per row of a ``[C, V]`` buffer: ``vocab`` padded to ``row_stride_multiple``."""
        return -(-vocab // self.row_stride_multiple) * self.row_stride_multiple

    def row_buffer(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised ``[rows, vocab]`` view whose row stride is padded to ``row_stride_multiple``."""
        return torch.empty(rows, self.row_stride(vocab), dtype=dtype, device=device)[:, :vocab]

    def __fx_repr__(self) -> tuple[str, dict[str, type]]:
        """Source that rebuilds this policy in a traced graph (an opaque value of ``sdpo_ops.compiled_op``'s ops)."""
        return repr(self), {"DevicePolicy": DevicePolicy}


def dw_pass_chunks(chunks: int, per_pass: int) -> list[int]:
    """Chunks of dZ in each dW pass: the fewest passes of at most ``per_pass`` chunks, as even as whole chunks allow
    (each takes ceil(chunks left / passes left): sizes differ by one chunk at most, the larger first)."""
    passes = -(-chunks // max(per_pass, 1))
    sizes = []
    for left in range(passes, 0, -1):
        sizes.append(-(-(chunks - sum(sizes)) // left))
    return sizes


def _rows_for_intensity(target: float, vocab: int, hidden_size: int) -> int | None:
    """The fewest rows C with ``2 C H V / (2 V H + 2 C H + 4 C V) >= target`` (bf16 operands, fp32 output);
    None when no C reaches it or there is no target."""
    if target <= 0:
        return None
    per_row = 2 * hidden_size * vocab - target * (2 * hidden_size + 4 * vocab)
    if per_row <= 0:
        return None
    return math.ceil(target * 2 * vocab * hidden_size / per_row)


# H100: the ridge of the logits GEMM is ~255 FLOP/B (728 TFLOP/s measured for cuBLAS at this shape over 2.85 TB/s
# achievable HBM; 295 at the datasheet's 989 TFLOP/s over 3.35 TB/s); 320 keeps 25% above the first. At H=4096 that
# is C = 384 at V=151936 (the 224 MiB budget's rows already: 323 FLOP/B) and at V=262144 (224 MiB alone gives 224
# rows: 202 FLOP/B). Small H (896) cannot reach it: capped at 512 rows.
# V=262144 (Gemma, issue 17 item 6): 384 rows, not 512. The 1 GiB working budget binds there: an fp32 logits row is
# 1 MiB, so C=512 puts 1 GiB in the student's and the teacher's logits alone and leaves dW one 512-row chunk per
# pass (16 passes at N=8192, each an 8.6 GB read-modify-write of the fp32 [V, H] accumulator: the cost model's
# central estimate 1.57x the 4-GEMM floor); C=384 leaves 2 chunks (768 rows) per pass, 11 passes (1.43x); bytes
# alone (C=224) would fall under the ridge.
# dZ staging: a pass over the fp32 [V, H] accumulator (~5 GB read+write at V=151936, H=4096, ~1.7 ms) costs the
# same whatever the row count, the GEMM 2*R*V*H FLOP: R >= ~1300 rows keeps it compute-bound, and every pass
# saved is ~1.7 ms of accumulator traffic (issue 17, item 8). The staging takes what the working budget leaves:
# at the SPEC shape (N=8192, K=100, top-K mode) the student's fp32 [384, V] logits (233 MB), the per-row results
# (11 MB) and the staging itself, 6 chunks of dZ (2304 rows) plus one chunk for the teacher's logits (817 MB): 1064
# MB, 4 passes (6, 6, 5, 5 chunks) where a fixed 1920 rows gave 5 (1920 x 4 + 512). 3 passes would need C <= 251
# rows (under the ridge). 8 MiB of the budget stays for the caller's per-token inputs (row weights, target ids).
CUDA_POLICY = DevicePolicy(
    name="cuda",
    chunk_bytes=224 * 2**20,
    min_gemm_intensity=320.0,
    max_intensity_rows=512,
    working_bytes=2**30 - 8 * 2**20,
    dw_stage_rows=None,
    fp32_output_mm=True,
    row_stride_multiple=16,
    triton_by_default=True,
)
# CPU: no HBM ridge and no accumulator-pass cliff: small chunks (cache-sized), one chunk per dW pass, fp32 staging.
CPU_POLICY = DevicePolicy(
    name="cpu",
    chunk_bytes=32 * 2**20,
    min_gemm_intensity=0.0,
    max_intensity_rows=0,
    working_bytes=2**30 - 8 * 2**20,
    dw_stage_rows=1,
    fp32_output_mm=False,
    row_stride_multiple=1,
    triton_by_default=False,
)

# The policies ``use_policy`` forced, innermost last. A plain list, not a ContextVar: torch.compile traces (and
# guards on) a global list, while ContextVar.get breaks a fullgraph compile. Forcing is a test tool: not thread-local.
_FORCED: list[DevicePolicy] = []


def policy_for(device: torch.device) -> DevicePolicy:
    """The policy a call on ``device`` follows: the one ``use_policy`` set, else CUDA's for CUDA and ``meta``
    (dry runs stand for a GPU), CPU's for every other device."""
    if _FORCED:
        return _FORCED[-1]
    return CUDA_POLICY if device.type in _FP32_OUTPUT_MM_DEVICES else CPU_POLICY


@contextlib.contextmanager
def use_policy(policy: DevicePolicy) -> Iterator[DevicePolicy]:
    """Every fused call inside follows ``policy`` whatever its tensors' device (tests: the CUDA policy on CPU)."""
    _FORCED.append(policy)
    try:
        yield policy
    finally:
        _FORCED.pop()


def mm_into_fp32(out: Tensor, a: Tensor, b: Tensor, *, beta: float | None = None) -> None:
    """``out = a @ b`` (``beta=None``) or ``out = beta * out + a @ b`` for bf16/fp16 ``a``, ``b`` and an fp32
    ``out``, without rounding the product to the operands' dtype: one ``mm``/``addmm(..., out_dtype=float32)``
    where the device has it, else (CPU under the CUDA policy) the same product from fp32 copies."""
    if out.device.type in _FP32_OUTPUT_MM_DEVICES:
        if beta is None:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)
        return
    a, b = a.to(torch.float32), b.to(torch.float32)
    if beta is None:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b, beta=beta)
