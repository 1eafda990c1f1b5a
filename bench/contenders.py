"""The contenders of the benchmark: what each one runs, on which inputs, and when it cannot run.

Every contender gets the same inputs (``make_inputs``): student hidden ``[N, H]`` and lm_head weight
``[V, H]`` with gradient, teacher hidden ``[N, H]`` and weight ``[V, H]`` without, target ids ``[N]``, old
log-probs ``[N]`` and a 0/1 mask ``[N]``, and returns a *step*: a no-argument callable that runs one
forward (``mode="fwd"``, under ``torch.no_grad()``) or forward+backward (``"fwd+bwd"``) of the loss.

- ``sdpo_torch`` / ``sdpo_triton``: ``sdpo_ops.sdpo_loss`` with that backend (Triton on CUDA only: the
  interpreter is a test tool, not a benchmark).
- ``naive``: ``sdpo_ops.reference.sdpo_loss_reference``, full ``[N, V]`` logits and autograd: what the
  official SDPO code and TRL's ``SDPOTrainer`` compute.
- ``trl_chunked``: TRL's fused full-vocabulary op ``ChunkedDivergenceFunction`` (per-token divergence,
  masked token-mean taken here). It has no top-K and no IS correction: full-vocabulary cases only, run
  without IS (one ``[N]`` gather less than ours).
- ``liger_fused_jsd``: Liger-Kernel's ``LigerFusedLinearJSD`` (CUDA only, full vocabulary, no IS). Liger's
  ``jsd_beta`` *is* our ``alpha``: its loss is ``beta KL(teacher || M) + (1 - beta) KL(student || M)`` with
  ``M = beta teacher + (1 - beta) student`` (forward KL at 0, reverse KL at 1), a token-mean over the
  labels that are not ``ignore_index``, which is how the mask is passed.
- ``floor``: the four GEMMs no implementation can avoid, issued as ``sdpo_loss`` issues them: student and
  teacher logits per token chunk, ``dH = dZ Ws`` and ``dW += dZ^T Hs`` per block of staged rows into an fp32
  accumulator (``run_floor`` says why that is the honest floor). ``fwd`` mode: the two logits GEMMs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.shapes import FWD, FWD_BWD, Case

Step = Callable[[], object]


def floor_chunk_rows(n: int, v: int, h: int, device: torch.device | str = "cpu") -> int:
    """Token rows per chunk of the floor: the same chunks as ``sdpo_loss``'s fused backends use."""
    from sdpo_ops.chunked import default_chunk_size

    return default_chunk_size(n, v, h, torch.device(device))


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class Inputs:
    """The tensors every contender reads; ``student_hidden`` and ``student_weight`` require grad."""

    student_hidden: Tensor  # [N, H]
    student_weight: Tensor  # [V, H]
    teacher_hidden: Tensor  # [N, H]
    teacher_weight: Tensor  # [V, H]
    target_ids: Tensor  # [N] int64
    old_logprobs: Tensor | None  # [N] fp32
    mask: Tensor | None  # [N] fp32, 0/1

    def reset_grads(self) -> None:
        self.student_hidden.grad = None
        self.student_weight.grad = None

    def grad_bytes(self) -> int:
        """Bytes of the gradients a fwd+bwd returns (dH, dW), excluded from "extra memory" (KERNELS.md)."""
        return sum(t.numel() * t.element_size() for t in (self.student_hidden, self.student_weight))

    def input_bytes(self) -> int:
        tensors = (
            self.student_hidden,
            self.student_weight,
            self.teacher_hidden,
            self.teacher_weight,
            self.target_ids,
            self.old_logprobs,
            self.mask,
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def make_inputs(case: Case, device: torch.device | str = "cpu", seed: int = 0) -> Inputs:
    """Random inputs for ``case``: student logits of std ~2, a teacher close to the student (an EMA copy
    reading a longer prompt), ~10% of the tokens masked out. Same seed and device, same tensors."""
    device = torch.device(device)
    n, h, v = case.shape.n, case.shape.h, case.shape.v
    dtype = torch_dtype(case.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=device)

    scale = 2.0 / math.sqrt(h)
    student_hidden = randn(n, h)
    student_weight = randn(v, h).mul_(scale)
    teacher_hidden = (student_hidden + 0.5 * randn(n, h)).to(dtype)
    teacher_weight = (student_weight + 0.2 * scale * randn(v, h)).to(dtype)
    target_ids = torch.randint(0, v, (n,), generator=gen, device=device)
    # A rollout's log-prob of its sampled token: around -log V, so that IS weights spread over [0, clip].
    old_logprobs = (-math.log(v) + randn(n)) if case.with_is else None
    mask = (torch.rand(n, generator=gen, device=device) > 0.1).float() if case.with_mask else None
    return Inputs(
        student_hidden=student_hidden.to(dtype).requires_grad_(),
        student_weight=student_weight.to(dtype).requires_grad_(),
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        target_ids=target_ids,
        old_logprobs=old_logprobs,
        mask=mask,
    )


def _masked_token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass(frozen=True)
class Contender:
    """A way of computing the loss. ``loss`` builds the scalar loss with autograd (``None`` for the floor);
    ``unsupported`` returns why it cannot run ``case`` on ``device``, or ``None``."""

    name: str
    description: str
    unsupported: Callable[[Case, torch.device], str | None]
    loss: Callable[[Inputs, Case], Tensor] | None = None
    # False for the full-vocabulary-only ops: a top-K case does not apply to them (not a skip to report).
    supports_topk: bool = True
    # Which loss options the contender ignores (shown in the results table).
    note: str = ""

    def applies_to(self, case: Case) -> bool:
        return case.topk is None or self.supports_topk

    def step(self, inputs: Inputs, case: Case) -> Step:
        """A no-argument callable running one forward (``fwd``) or forward+backward (``fwd+bwd``)."""
        if self.loss is None:
            chunk = floor_chunk_rows(case.shape.n, case.shape.v, case.shape.h, inputs.student_hidden.device)
            return lambda: run_floor(inputs, case.mode, chunk)
        loss_fn = self.loss
        if case.mode == FWD:

            def forward_only() -> Tensor:
                with torch.no_grad():
                    return loss_fn(inputs, case)

            return forward_only
        if case.mode != FWD_BWD:
            raise ValueError(f"unknown mode {case.mode!r}")

        def forward_backward() -> Tensor:
            loss = loss_fn(inputs, case)
            loss.backward()
            return loss

        return forward_backward


# --- the floor -------------------------------------------------------------------------------------------


def run_floor(
    inputs: Inputs, mode: str, chunk_rows: int, logit_grad: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """The unavoidable GEMMs, issued exactly as ``sdpo_loss`` issues them; returns ``(dH [N, H], dW [V, H])``.

    Per chunk of ``chunk_rows`` tokens: the student and teacher logits into fp32 ``[C, V]`` buffers (fp32
    output from bf16 operands on CUDA). Per block of staged rows (the loss's dW passes in top-K mode:
    ``chunked.staging_rows``, ``device_policy.dw_pass_chunks``; 2304, 2304, 1920 and 1664 rows at the SPEC shape on
    CUDA): ``dH = dZ Ws`` and ``dW += dZ^T Hs`` into an fp32 accumulator, with a GEMM-dtype buffer of the block's
    size standing in for dZ. The accumulator's read+write per block is part of the honest floor: a
    floor that added each small chunk straight into dW would be memory-bound; one that never accumulated in
    fp32 would skip traffic any unbiased training must pay. ``None, None`` in ``fwd`` mode.
    ``logit_grad`` (``[stage rows, V]``, default random) is the dZ stand-in every block reuses.
    """
    from sdpo_ops.chunked import (
        FusedOptions,
        _accumulate_weight_grad,
        _logits_into,
        _nbytes,
        _scratch_rows,
        accumulation_dtype,
        staging_rows,
    )
    from sdpo_ops.device_policy import dw_pass_chunks, policy_for

    hs, ws = inputs.student_hidden.detach(), inputs.student_weight.detach()
    ht, wt = inputs.teacher_hidden, inputs.teacher_weight
    n, v = hs.shape[0], ws.shape[0]
    rows = min(chunk_rows, n)
    policy = policy_for(hs.device)
    options = FusedOptions(None, True, 0.5, None, 1.0, rows, True, policy=policy)
    backward = mode == FWD_BWD
    with torch.no_grad():
        accumulate = accumulation_dtype(hs.dtype)
        zs = torch.empty(rows, v, dtype=accumulate, device=hs.device)
        zt = torch.empty(rows, v, dtype=accumulate, device=ht.device)
        dh = torch.empty_like(hs) if backward else None
        dw = torch.zeros(ws.shape, dtype=accumulate, device=ws.device) if backward else None
        # the top-K loss's staging: its teacher logits ride in the staging, beside the student's buffer
        scratch = _scratch_rows(policy, v, ws.dtype, accumulate)
        stage_rows, _ = staging_rows(policy, rows, n, ws, _nbytes(zs), scratch)
        pass_ends = list(itertools.accumulate(dw_pass_chunks(-(-n // rows), stage_rows // rows)))
        gemm_dtype = policy.staging_dtype(ws.dtype, accumulate)
        if backward and logit_grad is None:
            logit_grad = torch.randn(stage_rows, v, device=hs.device).to(gemm_dtype)
        block_start = 0
        for start in range(0, n, rows):
            end = min(start + rows, n)
            _logits_into(zs, hs[start:end], ws, None, options)
            _logits_into(zt, ht[start:end], wt, None, options)
            if backward and start // rows + 1 in pass_ends:  # the last chunk of a pass
                block, block_start = slice(block_start, end), end
                dz = logit_grad[: block.stop - block.start]
                gemm_grad = dz if dz.dtype == ws.dtype else dz.to(ws.dtype)
                torch.mm(gemm_grad, ws, out=dh[block])
                _accumulate_weight_grad(dw, dz, hs[block], overwrite=False)
    return dh, dw


# --- the losses --------------------------------------------------------------------------------------------


def _sdpo_kwargs(inputs: Inputs, case: Case) -> dict:
    return {
        "mask": inputs.mask,
        "target_ids": inputs.target_ids,
        "old_logprobs": inputs.old_logprobs,
        "topk": case.topk,
        "add_tail": case.add_tail,
        "alpha": case.alpha,
        "is_clip": case.is_clip,
        "temperature": 1.0,
        "reduction": "token-mean",
    }


def _naive_loss(inputs: Inputs, case: Case) -> Tensor:
    from sdpo_ops.reference import sdpo_loss_reference

    out = sdpo_loss_reference(
        inputs.student_hidden,
        inputs.student_weight,
        inputs.teacher_hidden,
        inputs.teacher_weight,
        **_sdpo_kwargs(inputs, case),
    )
    return out["loss"]


def _sdpo_loss(backend: str, **transform) -> Callable[[Inputs, Case], Tensor]:
    def loss(inputs: Inputs, case: Case) -> Tensor:
        from sdpo_ops import sdpo_loss

        return sdpo_loss(
            inputs.student_hidden,
            inputs.student_weight,
            inputs.teacher_hidden,
            inputs.teacher_weight,
            backend=backend,
            **_sdpo_kwargs(inputs, case),
            **transform,
        )

    return loss


def _trl_loss(inputs: Inputs, case: Case) -> Tensor:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    divergence, _entropy = ChunkedDivergenceFunction.apply(
        inputs.student_hidden,
        inputs.student_weight,
        None,
        inputs.teacher_hidden,
        inputs.teacher_weight,
        None,
        case.alpha,  # TRL's beta: 0 forward KL, 1 reverse KL, the same mixture as ours in between
        1.0,
    )
    return _masked_token_mean(divergence, inputs.mask)


def _liger_loss(inputs: Inputs, case: Case) -> Tensor:
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    ignore_index = -100
    labels = inputs.target_ids
    if inputs.mask is not None:
        labels = torch.where(inputs.mask != 0, labels, torch.full_like(labels, ignore_index))
    # fp32 dW accumulation like ours (Liger's default accumulates in the weight's dtype).
    accum = torch.float32 if inputs.student_weight.dtype != torch.float32 else None
    module = LigerFusedLinearJSD(jsd_beta=case.alpha, ignore_index=ignore_index, temperature=1.0, accum_dtype=accum)
    return module(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden, inputs.teacher_weight, labels)


# --- availability ------------------------------------------------------------------------------------------


def sdpo_ops_missing() -> str | None:
    try:
        from sdpo_ops import sdpo_loss  # noqa: F401
    except ImportError as err:
        return f"sdpo_ops.sdpo_loss does not import yet ({err})"
    return None


def _always(case: Case, device: torch.device) -> str | None:
    return None


def _sdpo_torch_unsupported(case: Case, device: torch.device) -> str | None:
    return sdpo_ops_missing()


def _sdpo_triton_unsupported(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the Triton backend is benchmarked on CUDA only (the interpreter is for tests)"
    return sdpo_ops_missing()


def _trl_unsupported(case: Case, device: torch.device) -> str | None:
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except ImportError as err:
        return f"trl.kernels.chunked_divergence does not import ({err})"
    return None


def _liger_unsupported(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "Liger-Kernel's fused JSD needs CUDA (Triton kernels, no CPU path)"
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD  # noqa: F401
    except ImportError as err:
        return f"liger-kernel is not installed ({err})"
    return None


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("floor", "4 bare GEMMs (torch.mm, same chunks)", _always),
        Contender("naive", "sdpo_loss_reference (full logits)", _always, _naive_loss),
        Contender("sdpo_torch", 'sdpo_loss(backend="torch")', _sdpo_torch_unsupported, _sdpo_loss("torch")),
        Contender("sdpo_triton", 'sdpo_loss(backend="triton")', _sdpo_triton_unsupported, _sdpo_loss("triton")),
        Contender(
            "sdpo_torch_softcap",
            'sdpo_loss(backend="torch", logit_softcap=30.0) (Gemma 2\'s final softcap)',
            _sdpo_torch_unsupported,
            _sdpo_loss("torch", logit_softcap=30.0),
        ),
        Contender(
            "trl_chunked",
            "TRL ChunkedDivergenceFunction",
            _trl_unsupported,
            _trl_loss,
            supports_topk=False,
            note="no IS correction",
        ),
        Contender(
            "liger_fused_jsd",
            "Liger LigerFusedLinearJSD",
            _liger_unsupported,
            _liger_loss,
            supports_topk=False,
            note="no IS correction",
        ),
    )
}


def case_for(contender: str, case: Case) -> Case:
    """The case as ``contender`` runs it: the ops without an IS correction run without ``old_logprobs``."""
    if contender in ("trl_chunked", "liger_fused_jsd"):
        return case.replace(with_is=False)
    return case


def naive_memory_estimate(case: Case) -> int:
    """A rough lower bound of the naive path's peak (student logits in the input dtype and fp32, log-softmax,
    its gradient, teacher logits and log-probs): used to skip shapes that cannot fit instead of thrashing."""
    n, v = case.shape.n, case.shape.v
    return n * v * (torch_dtype(case.dtype).itemsize + 4 * 5)
