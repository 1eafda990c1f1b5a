"""The fused SDPO loss as one autograd Function over token chunks; row stages from torch or Triton.

Per chunk of C token rows (never a full ``[N, V]`` tensor):

1. ``zs = (hs_c @ Ws^T + bs) / T`` into a reused fp32 ``[C, V]`` buffer; ``student_row_stats``: the
   log-sum-exp, the top-K logits and columns, the target logit.
2. ``zt = (ht_c @ Wt^T + bt) / T`` into a second buffer (no gradient); ``teacher_row_stats``: the
   log-sum-exp and the logits at the student's top-K columns and the target column.
3. ``[C, K+1]`` math (``sdpo_ops.divergence``): tail bins, GJSD, its gradient coefficients, IS weight.
   Full-vocabulary mode instead runs ``full_vocab_divergence`` over both buffers.
4. Gradient. When the only differentiable output is a scalar (every reduction but ``"none"``) the
   gradient w.r.t. the logits is formed now, in place in the ``zs`` buffer (``logit_grad_``), and turned
   into ``dH_c = dZ @ Ws`` and ``dW += dZ^T @ hs_c`` while the chunk is live: 4 GEMM-equivalents in all
   (2 in topk mode's forward, 2 for the gradient), and backward only scales by the upstream scalar.
   Otherwise (a per-token upstream gradient) backward recomputes ``zs`` (and ``zt`` in full-vocabulary
   mode) and forms ``dZ`` then. The target log-prob output's gradient (a policy loss on the same call)
   always comes from such a recompute pass, run only when that output actually receives a gradient.

``row_ops`` is ``sdpo_ops.row_ops`` (torch) or ``sdpo_ops.kernels.row_ops`` (Triton): the same host
orchestration runs on CPU tests and on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from sdpo_ops.divergence import topk_divergence
from sdpo_ops.reference import importance_weight

# Bytes of one fp32 [C, V] logits buffer; two are live at once (student and teacher).
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}
# torch >= 2.8 multiplies bf16/fp16 into an fp32 output on CUDA without rounding the product first.
_HAS_MM_OUT_DTYPE = hasattr(torch, "mm") and tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)


@dataclass(frozen=True)
class FusedOptions:
    topk: int | None
    add_tail: bool
    alpha: float
    is_clip: float | None
    temperature: float
    chunk_size: int
    grad_in_forward: bool


def default_chunk_size(num_tokens: int, vocab: int, device: torch.device) -> int:
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, min(num_tokens, budget // (4 * vocab)))


def _uses_fp32_output_mm(a: Tensor) -> bool:
    return _HAS_MM_OUT_DTYPE and a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but fp64, which stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, inv_temperature: float) -> Tensor:
    """``out[:C] = (hidden @ weight^T + bias) * inv_temperature`` in fp32, without a bf16 ``[C, V]`` copy."""
    out = out[: hidden.shape[0]]
    if hidden.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    elif _uses_fp32_output_mm(hidden):
        torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if inv_temperature != 1.0:
        out.mul_(inv_temperature)
    return out


def _accumulate_weight_grad(accumulator: Tensor, logit_grad: Tensor, gemm_grad: Tensor, hidden: Tensor) -> None:
    """``accumulator += logit_grad^T @ hidden`` in fp32 (rounding each chunk's product to bf16 biases training).

    ``gemm_grad`` is ``logit_grad`` already cast to the hidden states' dtype (bf16 tensor cores on CUDA).
    """
    if hidden.dtype == accumulator.dtype:
        accumulator.addmm_(logit_grad.t(), hidden)
    elif _uses_fp32_output_mm(hidden):
        torch.addmm(accumulator, gemm_grad.t(), hidden, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(logit_grad.t(), hidden.to(accumulator.dtype))


@dataclass
class _Gradients:
    """Accumulators of the student's gradients; None where no gradient is needed."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def allocate(cls, needs: tuple[bool, bool, bool], hidden: Tensor, weight: Tensor) -> _Gradients:
        return cls(
            torch.zeros_like(hidden) if needs[0] else None,
            torch.zeros(weight.shape, dtype=accumulation_dtype(weight.dtype), device=weight.device)
            if needs[1]
            else None,
            torch.zeros(weight.shape[0], dtype=accumulation_dtype(weight.dtype), device=weight.device)
            if needs[2]
            else None,
        )

    def add_chunk(self, rows: slice, logit_grad: Tensor, hidden: Tensor, weight: Tensor) -> None:
        # One cast of the chunk's gradient (a [C, V] copy) serves both GEMMs.
        gemm_grad = logit_grad.to(weight.dtype)
        if self.hidden is not None:
            self.hidden[rows] = torch.mm(gemm_grad, weight)
        if self.weight is not None:
            _accumulate_weight_grad(self.weight, logit_grad, gemm_grad, hidden[rows])
        if self.bias is not None:
            self.bias.add_(logit_grad.sum(0))


class _SavedForBackward(NamedTuple):
    """What backward needs: the inputs, and per row the statistics and gradient coefficients of forward."""

    student_hidden: Tensor  # [N, H]
    student_weight: Tensor  # [V, H]
    student_bias: Tensor | None  # [V]
    teacher_hidden: Tensor  # [N, Ht]
    teacher_weight: Tensor  # [V, Ht]
    teacher_bias: Tensor | None  # [V]
    target_ids: Tensor | None  # [N]
    row_weight: Tensor  # [N]
    is_weight: Tensor  # [N]
    student_lse: Tensor  # [N]
    teacher_lse: Tensor  # [N]
    topk_index: Tensor  # [N, K]
    sparse_grad: Tensor  # [N, K]
    dense_grad: Tensor  # [N]


class ChunkedSDPOFunction(torch.autograd.Function):
    """Inputs: flattened ``[N, *]`` tensors. Outputs: ``(loss, target_logprobs, teacher_target_logprobs,
    is_weight, topk_mass, divergence)``; ``loss`` is the scalar ``sum_t row_weight_t * w_t * D_t`` when
    ``options.grad_in_forward``, else the per-token ``row_weight_t * w_t * D_t`` ``[N]``; ``divergence``
    is the unweighted ``D_t`` (detached, for logging).
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,  # [N, H]
        student_weight: Tensor,  # [V, H]
        student_bias: Tensor | None,  # [V]
        teacher_hidden: Tensor,  # [N, Ht]
        teacher_weight: Tensor,  # [V, Ht]
        teacher_bias: Tensor | None,  # [V]
        target_ids: Tensor | None,  # [N] int64
        old_logprobs: Tensor | None,  # [N]
        row_weight: Tensor,  # [N] fp32: mask x token weights (x reduction coefficient when grad_in_forward)
        options: FusedOptions,
        row_ops: ModuleType,
    ):
        ctx.set_materialize_grads(False)
        num_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
        device = student_hidden.device
        inv_temperature = 1.0 / options.temperature
        topk = options.topk or 0
        needs_grad = tuple(ctx.needs_input_grad[:3])
        form_grad_now = options.grad_in_forward and any(needs_grad)

        chunk = options.chunk_size
        dtype = accumulation_dtype(student_hidden.dtype)
        student_buffer = torch.empty(min(chunk, num_tokens), vocab, dtype=dtype, device=device)
        teacher_buffer = torch.empty_like(student_buffer)
        per_token_loss = torch.empty(num_tokens, dtype=dtype, device=device)
        per_token_divergence = torch.empty_like(per_token_loss)
        target_logprobs = torch.zeros(num_tokens, dtype=dtype, device=device)
        teacher_target_logprobs = torch.zeros_like(target_logprobs)
        is_weight = torch.ones_like(target_logprobs)
        topk_mass = torch.ones_like(target_logprobs)
        student_lse = torch.empty_like(target_logprobs)
        # What a recompute pass needs per row: the gradient coefficients before the row scale.
        topk_index = torch.empty(num_tokens, topk, dtype=torch.int64, device=device)
        sparse_grad = torch.empty(num_tokens, topk, dtype=dtype, device=device)
        dense_grad = torch.empty_like(target_logprobs)
        teacher_lse = torch.empty_like(target_logprobs)
        grads = _Gradients.allocate(needs_grad, student_hidden, student_weight) if form_grad_now else None

        for start in range(0, num_tokens, chunk):
            rows = slice(start, min(start + chunk, num_tokens))
            targets = None if target_ids is None else target_ids[rows]
            zs = _logits_into(student_buffer, student_hidden[rows], student_weight, student_bias, inv_temperature)
            s_lse, s_topk_logits, s_topk_index, s_target_logit = row_ops.student_row_stats(zs, topk, targets)
            zt = _logits_into(teacher_buffer, teacher_hidden[rows], teacher_weight, teacher_bias, inv_temperature)
            gather_index = s_topk_index if targets is None else torch.cat([s_topk_index, targets[:, None]], 1)
            t_lse, t_gathered = row_ops.teacher_row_stats(zt, gather_index)

            if options.topk is None:
                divergence, grad_sum = row_ops.full_vocab_divergence(zs, zt, s_lse, t_lse, options.alpha)
                dense_grad[rows] = grad_sum
            else:
                support = topk_divergence(
                    s_lse, s_topk_logits, t_lse, t_gathered[:, :topk], add_tail=options.add_tail, alpha=options.alpha
                )
                divergence = support.divergence
                dense_grad[rows], sparse_grad[rows], topk_mass[rows] = (
                    support.dense_grad,
                    support.sparse_grad,
                    support.topk_mass,
                )
                topk_index[rows] = s_topk_index
            if targets is not None:
                target_logprobs[rows] = s_target_logit - s_lse
                teacher_target_logprobs[rows] = t_gathered[:, topk] - t_lse
            if old_logprobs is not None and options.is_clip is not None:
                is_weight[rows] = importance_weight(target_logprobs[rows], old_logprobs[rows], options.is_clip)
            student_lse[rows], teacher_lse[rows] = s_lse, t_lse
            # Masked rows may hold garbage (padding): select, never multiply, so NaN cannot leak.
            row_scale = torch.where(row_weight[rows] != 0, row_weight[rows] * is_weight[rows], 0.0)
            per_token_loss[rows] = torch.where(row_scale != 0, row_scale * divergence, 0.0)
            per_token_divergence[rows] = divergence

            if form_grad_now:
                teacher = (zt, t_lse) if options.topk is None else None
                _form_logit_grad(
                    row_ops,
                    options,
                    zs,
                    s_lse,
                    row_scale,
                    dense_grad[rows],
                    s_topk_index,
                    sparse_grad[rows],
                    teacher,
                    None,
                    None,
                )
                grads.add_chunk(rows, zs, student_hidden, student_weight)

        ctx.options, ctx.row_ops = options, row_ops
        ctx.form_grad_now = form_grad_now
        ctx.precomputed = grads
        ctx.save_for_backward(
            *_SavedForBackward(
                student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                target_ids, row_weight, is_weight, student_lse, teacher_lse, topk_index, sparse_grad, dense_grad,
            )
        )  # fmt: skip
        ctx.mark_non_differentiable(teacher_target_logprobs, is_weight, topk_mass, per_token_divergence)
        loss = per_token_loss.sum() if options.grad_in_forward else per_token_loss
        return loss, target_logprobs, teacher_target_logprobs, is_weight, topk_mass, per_token_divergence

    @staticmethod
    def backward(ctx, grad_loss, grad_target_logprobs, *_grad_non_differentiable):
        saved = _SavedForBackward(*ctx.saved_tensors)
        student_hidden, student_weight = saved.student_hidden, saved.student_weight
        options = ctx.options
        needs_grad = tuple(ctx.needs_input_grad[:3])
        grads = _Gradients(None, None, None)
        if ctx.form_grad_now and grad_loss is not None:
            pre = ctx.precomputed
            grads = _Gradients(
                None if pre.hidden is None else pre.hidden * grad_loss.to(pre.hidden.dtype),
                None if pre.weight is None else pre.weight * grad_loss,
                None if pre.bias is None else pre.bias * grad_loss,
            )
        # A recompute pass: per-token upstream gradient of the loss, or a gradient of the target log-probs.
        loss_scale = None
        if grad_loss is not None and not ctx.form_grad_now:
            loss_scale = torch.where(saved.row_weight != 0, grad_loss * saved.row_weight * saved.is_weight, 0.0)
        if (loss_scale is not None or grad_target_logprobs is not None) and any(needs_grad):
            recomputed = _Gradients.allocate(needs_grad, student_hidden, student_weight)
            _recompute_pass(ctx.row_ops, options, recomputed, saved, loss_scale, grad_target_logprobs)
            pairs = zip(
                (grads.hidden, grads.weight, grads.bias),
                (recomputed.hidden, recomputed.weight, recomputed.bias),
                strict=True,
            )
            grads = _Gradients(*(new if old is None else old + new for old, new in pairs))
        grad_weight = None if grads.weight is None else grads.weight.to(student_weight.dtype)
        grad_bias = None if grads.bias is None else grads.bias.to(saved.student_bias.dtype)
        return (
            grads.hidden,
            grad_weight,
            grad_bias,
            None,  # teacher_hidden: the teacher never receives a gradient
            None,  # teacher_weight
            None,  # teacher_bias
            None,  # target_ids: integer
            None,  # old_logprobs: a constant of the rollout
            None,  # row_weight: mask and detached weights
            None,  # options
            None,  # row_ops
        )


def _form_logit_grad(
    row_ops: ModuleType,
    options: FusedOptions,
    zs: Tensor,
    s_lse: Tensor,
    row_scale: Tensor,
    dense_grad: Tensor,
    topk_index: Tensor,
    sparse_grad: Tensor,
    teacher: tuple[Tensor, Tensor] | None,
    targets: Tensor | None,
    target_scale: Tensor | None,
) -> Tensor:
    """Overwrite ``zs`` with dLoss/d(raw student logits) for one chunk.

    ``row_scale`` [C] multiplies the divergence gradient (coefficients ``dense_grad`` [C] and
    ``sparse_grad`` [C, K] at ``topk_index``; plus, in full-vocabulary mode, the elementwise term, which
    needs the teacher's ``(logits [C, V], lse [C])``). ``target_scale`` [C] (or None) is the upstream
    gradient of the target log-probs, whose gradient is ``onehot(target) - softmax``.
    """
    live = row_scale != 0
    # Select, never multiply by 0: a masked padding row may hold non-finite coefficients.
    dense = torch.where(live, row_scale * dense_grad, 0.0)
    sparse_index, sparse_value = topk_index, torch.where(live[:, None], row_scale[:, None] * sparse_grad, 0.0)
    if target_scale is not None:
        dense = dense + target_scale
        sparse_index = torch.cat([sparse_index, targets[:, None]], 1)
        sparse_value = torch.cat([sparse_value, target_scale[:, None]], 1)
    full_vocab = None if teacher is None else (*teacher, row_scale, options.alpha)
    return row_ops.logit_grad_(zs, s_lse, dense, sparse_index, sparse_value, 1.0 / options.temperature, full_vocab)


def _recompute_pass(
    row_ops: ModuleType,
    options: FusedOptions,
    grads: _Gradients,
    saved: _SavedForBackward,
    loss_scale: Tensor | None,
    target_scale: Tensor | None,
) -> None:
    """Recompute the student's logits chunk by chunk and accumulate the gradient of
    ``sum_t loss_scale_t * D_t + target_scale_t * log p(target_t)`` into ``grads``."""
    student_hidden, student_weight, student_bias = saved.student_hidden, saved.student_weight, saved.student_bias
    teacher_hidden, teacher_weight, teacher_bias = saved.teacher_hidden, saved.teacher_weight, saved.teacher_bias
    target_ids, student_lse, teacher_lse = saved.target_ids, saved.student_lse, saved.teacher_lse
    topk_index, sparse_grad, dense_grad = saved.topk_index, saved.sparse_grad, saved.dense_grad
    num_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    inv_temperature = 1.0 / options.temperature
    chunk = options.chunk_size
    dtype = accumulation_dtype(student_hidden.dtype)
    student_buffer = torch.empty(min(chunk, num_tokens), vocab, dtype=dtype, device=student_hidden.device)
    # Full-vocabulary mode needs the teacher's logits again, but only when the divergence has a gradient.
    teacher_buffer = torch.empty_like(student_buffer) if options.topk is None and loss_scale is not None else None
    if loss_scale is None:
        loss_scale = torch.zeros(num_tokens, dtype=dtype, device=student_hidden.device)
    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        zs = _logits_into(student_buffer, student_hidden[rows], student_weight, student_bias, inv_temperature)
        teacher = None
        if teacher_buffer is not None:
            zt = _logits_into(teacher_buffer, teacher_hidden[rows], teacher_weight, teacher_bias, inv_temperature)
            teacher = (zt, teacher_lse[rows])
        _form_logit_grad(
            row_ops,
            options,
            zs,
            student_lse[rows],
            loss_scale[rows],
            dense_grad[rows],
            topk_index[rows],
            sparse_grad[rows],
            teacher,
            None if target_ids is None else target_ids[rows],
            None if target_scale is None else target_scale[rows],
        )
        grads.add_chunk(rows, zs, student_hidden, student_weight)
