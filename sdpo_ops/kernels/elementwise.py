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
    """``target_logit[row] = z[target[row]]`` (0 without targets), also returned; an out-of-range id (a caller bug)
    reads nothing and gives NaN instead of touching other memory."""
    if HAS_TARGET:
        target = tl.load(target_ids_ptr + row)
        in_range = (target >= 0) & (target < V)
        y = tl.load(row_ptr + target * stride_v, mask=in_range, other=float("nan")).to(tl.float32)
        y = _on_load(y, pre_scale, softcap_bound, HAS_SOFTCAP)
    else:
        y = 0.0
    tl.store(target_logit_ptr + row, y)
    return y


# The running maxima of the online log-sum-exp start at this floor, not -inf: below every finite logit (in base 2),
# and -inf logits then give exp2(-inf) = 0 with no guard per element (-inf - -inf would be NaN).
_FLT_MAX_NEG = tl.constexpr(-3.4028234663852886e38)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _rescaled(m, s, t, m_new):
    """The online log-sum-exp and entropy accumulators, in base 2 (``m`` and the logits times log2(e)), moved from
    the running max ``m`` to ``m_new >= m``: ``s = sum 2^(z - m)`` and ``t = sum 2^(z - m) (z - m)`` become the same
    sums about ``m_new`` (``t`` picks up ``(m - m_new) s``). Accumulating ``t`` about the max, not
    ``sum 2^(z - m) z``, leaves the entropy ``log s - t / s`` two non-negative terms: no cancellation for logits of
    magnitude 1e4. Both maxima are finite (from the ``_FLT_MAX_NEG`` floor); their difference is clamped there too,
    so a lane that has seen only ``-inf`` (``s = t = 0``) stays 0, NaN-free, whatever the new max."""
    offset = tl.maximum(m - m_new, _FLT_MAX_NEG, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.exp2(offset)
    return s * scale, scale * (t + offset * s)


@triton.jit
def _exp_terms(z, m):
    """``2^(z - m)`` and its entropy term ``2^(z - m) (z - m)`` in base 2 about a finite ``m``; a ``-inf`` logit
    gives 0 for both (the difference is clamped to ``_FLT_MAX_NEG``, where ``exp2`` is 0: exact); a NaN logit stays
    NaN (the clamp propagates it, as ``exp`` did)."""
    d = tl.maximum(z - m, _FLT_MAX_NEG, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(d)
    return e, e * d


@triton.jit
def _entropy(s, t):
    """``H = lse - sum p z = (log2 s - t / s) ln 2`` from the base-2 accumulators of ``_rescaled`` about the row
    max."""
    return (tl.log2(s) - t / s) * _LN2
