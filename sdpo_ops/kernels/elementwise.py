"""Triton math shared by the kernels: expm1, tanh, the logit transform applied on load, the target-logit read.

Triton has no portable ``expm1``/``tanh`` across releases 3.6-3.9 and the interpreter (libdevice names and
their interpreter support differ), so both are written here from ``exp`` with care near 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without the cancellation near 0: a degree-8 Taylor polynomial for |x| < 0.5 (relative
    error < 1e-8), ``exp(x) - 1`` beyond."""
    small = tl.abs(x) < 0.5
    y = tl.where(small, x, 0.0)
    poly = y * (
        1.0
        + y
        * (
            0.5
            + y * (1.0 / 6 + y * (1.0 / 24 + y * (1.0 / 120 + y * (1.0 / 720 + y * (1.0 / 5040 + y * (1.0 / 40320))))))
        )
    )
    return tl.where(small, poly, tl.exp(x) - 1.0)


@triton.jit
def _tanh(x):
    """``tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|))`` with the sign of x: exact near 0, +-1 at +-inf."""
    e = _expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _on_load(y, pre_scale, softcap_bound, HAS_SOFTCAP: tl.constexpr):
    """The logits from the chunk buffer ``y`` (the raw GEMM output, scaled in its epilogue where the dtypes
    allowed): ``x = y * pre_scale``, then ``z = softcap_bound * tanh(x)`` for a softcapped head (``pre_scale``
    carries ``logit_scale / softcap``, ``bound = softcap / T``), else ``z = x`` (``pre_scale = logit_scale / T``).
    Applied on load, so no transform ever makes a pass over the ``[C, V]`` buffer."""
    x = y * pre_scale
    if HAS_SOFTCAP:
        return softcap_bound * _tanh(x)
    return x


@triton.jit
def _store_target_logit(row_ptr, stride_v, target_ids_ptr, target_logit_ptr, row, V, pre_scale, softcap_bound,
                        HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    """``target_logit[row] = z[target[row]]`` (0 without targets); an out-of-range id (a caller bug) reads
    nothing and gives NaN instead of touching other memory."""
    if HAS_TARGET:
        target = tl.load(target_ids_ptr + row)
        in_range = (target >= 0) & (target < V)
        y = tl.load(row_ptr + target * stride_v, mask=in_range, other=float("nan")).to(tl.float32)
        tl.store(target_logit_ptr + row, _on_load(y, pre_scale, softcap_bound, HAS_SOFTCAP))
    else:
        tl.store(target_logit_ptr + row, 0.0)


@triton.jit
def _rescaled(m, s, t, shift):
    """The online log-sum-exp and entropy accumulators moved from the running max ``m`` to ``shift``:
    ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)`` become the same sums about ``shift``
    (``t`` picks up ``(m - shift) s``). Accumulating ``t`` about the max, not ``sum exp(z - m) z``, leaves the
    entropy ``log s - t / s`` two non-negative terms: no cancellation for logits of magnitude 1e4. A lane or row
    that has seen only ``-inf`` (``s = t = 0``) stays 0, NaN-free."""
    scale = tl.exp(m - shift)
    offset = tl.where(m == -float("inf"), 0.0, m - shift)
    return s * scale, scale * (t + offset * s)


@triton.jit
def _exp_terms(z, shift):
    """``exp(z - shift)`` and its entropy term ``exp(z - shift) (z - shift)`` (0 where the exponential is 0: a
    ``-inf`` logit)."""
    e = tl.exp(z - shift)
    return e, e * tl.where(e > 0.0, z - shift, 0.0)


@triton.jit
def _entropy(s, t):
    """``H = lse - sum p z = log s - t / s`` from the accumulators of ``_rescaled`` about the row max."""
    return tl.log(s) - t / s
