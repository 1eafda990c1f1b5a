"""The fused SDPO loss as one autograd Function over token chunks; row stages from torch or Triton.

Per chunk of C token rows (never a full ``[N, V]`` tensor):

1. ``hs_c @ Ws^T + bs`` into a reused fp32 ``[C, V]`` buffer (one GEMM; bias, logit scale and temperature in
   its epilogue where the dtypes allow, the rest and any softcap applied by every row stage on load), then
   ``ht_c @ Wt^T + bt`` likewise into a second buffer (no gradient). In top-K mode with the gradient formed in
   forward that buffer is the dZ staging's next unfilled rows (step 4): the logits are dead before the chunk's
   dZ overwrites them, which one stream orders, and the staging gains their bytes (one chunk more per dW pass).
2. ``student_row_stats`` over both buffers in one launch: the student's log-sum-exp, top-K logits and columns,
   target and entropy (for logging); the teacher's log-sum-exp from the same streaming pass (its row loaded beside
   the student's: its bytes stream while the student's issue-bound work runs), then its logits at the student's
   top-K columns and at the target column (``teacher_row_stats``' work, fused).
3. ``row_loss_``: the ``[C, K+1]`` math (tail bins, GJSD, its gradient coefficients, IS weight, row scale,
   weighted loss). In top-K mode it runs in step 2's epilogue, on the statistics still in registers
   (``student_row_stats(..., row_loss=)``); full-vocabulary mode runs ``full_vocab_divergence`` over both buffers,
   then ``row_loss_`` as a launch of its own (its only one).
4. Gradient. When the only differentiable output is a scalar (every reduction but ``"none"``) the gradient
   w.r.t. the logits is formed now by ``logit_grad``, written in the GEMM dtype into a staging buffer that
   holds the dZ of several chunks; when it is full, ``dH = dZ @ Ws`` and one ``dW += dZ^T @ hs`` over all its
   rows (a pass over the fp32 ``[V, H]`` accumulator costs ~2 x 4 x V x H bytes whatever the row count, so
   it must see >= ~1300 rows at H=4096 to stay compute-bound; one chunk of C = 384 rows would not).
   4 GEMM-equivalents in all; backward only scales the gradients, in place, by the upstream scalar.
   Otherwise (a per-token upstream gradient) backward recomputes ``zs`` (and ``zt`` in full-vocabulary
   mode) and forms ``dZ`` then. The target log-prob output's gradient (a policy loss on the same call)
   always comes from such a recompute pass, run only when that output actually receives a gradient.

Per chunk that is 4 launches in top-K mode (2 GEMMs and 2 row kernels on the Triton path; 5 in full-vocabulary mode;
+1 per side for a bias in bf16), plus 2-3 per staging flush; ``tests/test_launch_budget.py``
holds it to that. ``row_ops`` is ``sdpo_ops.row_ops`` (torch) or ``sdpo_ops.kernels.row_ops`` (Triton): the
same host orchestration runs on CPU tests and on the GPU. On ``meta`` tensors the whole call runs as a dry
run (shapes, allocations and launches only), which the cost model and the memory tests use.

A teacher given as its top-K log-probs and ids (``TeacherTopKSDPOFunction``, SPEC 3.2: a served or cached teacher)
runs the same loop without the teacher's GEMM, step 2 being one stage on the student's buffer:
``teacher_row_stats(zs, ids)`` gives the student's log-sum-exp, entropy and its logits at the teacher's ids and at the
target, and in its epilogue the row loss against the teacher's log-probs (a teacher log-sum-exp of 0); ``logit_grad``
scatters at the teacher's ids. 3 GEMM-equivalents and 2 row kernels per chunk; backward is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from sdpo_ops.device_policy import DevicePolicy, dw_pass_chunks, mm_into_fp32, policy_for
from sdpo_ops.row_outputs import RowLossInputs, RowOutputs


@dataclass(frozen=True)
class FusedOptions:
    topk: int | None
    add_tail: bool
    alpha: float
    is_clip: float | None
    temperature: float
    chunk_size: int
    grad_in_forward: bool
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    # the device's host-side choices (``sdpo_ops.device_policy``); None: the inputs' device's. Fixed per call, so
    # backward follows forward's choices even outside a ``use_policy`` block.
    policy: DevicePolicy | None = None

    def __fx_repr__(self) -> tuple[str, dict[str, type]]:
        """Source that rebuilds these options in a traced graph (``sdpo_ops.compiled_op`` passes them to its custom
        ops as an opaque value: compared by ``==``, hashed, and written into the graph's code as this repr)."""
        return repr(self), {"FusedOptions": FusedOptions, "DevicePolicy": DevicePolicy}

    @property
    def grad_scale(self) -> float:
        """dz/d(raw head output) without a softcap, and its factor before ``1 - (z / softcap_bound)^2`` with one."""
        return self.logit_scale / self.temperature

    @property
    def softcap_bound(self) -> float | None:
        """``|z| < softcap / T``: the softcapped logits' bound, from which ``tanh`` is recovered as ``z / bound``."""
        return None if self.logit_softcap is None else self.logit_softcap / self.temperature


def default_chunk_size(num_tokens: int, vocab: int, hidden_size: int, device: torch.device) -> int:
    """Rows per chunk on ``device`` (``DevicePolicy.chunk_rows``)."""
    return policy_for(device).chunk_rows(num_tokens, vocab, hidden_size)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but fp64, which stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_scale(options: FusedOptions) -> float:
    """What multiplies ``h W^T + b`` before the row stages see it: ``logit_scale / T``, or for a softcapped head
    ``logit_scale / softcap`` (the stages then apply ``(softcap / T) * tanh``)."""
    softcap = options.logit_softcap
    return options.logit_scale / (options.temperature if softcap is None else softcap)


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, options: FusedOptions) -> float:
    """``out[:C] = hidden @ weight^T + bias`` in fp32 (without a bf16 ``[C, V]`` copy), times the linear scale
    where the GEMM's epilogue can apply it; returns the ``pre_scale`` the row stages apply on load for the rest
    (no pass over the buffer for a scale, a temperature or a softcap)."""
    out = out[: hidden.shape[0]]
    linear = _linear_scale(options)
    if hidden.dtype == out.dtype:
        # one GEMM with bias and scale in its epilogue (beta = 0 ignores the old contents, NaN included)
        source = out if bias is None else bias
        torch.addmm(source, hidden, weight.t(), beta=0.0 if bias is None else linear, alpha=linear, out=out)
        return 1.0
    if options.policy.multiplies_into_fp32(hidden):
        mm_into_fp32(out, hidden, weight.t())
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out.add_(bias)
    return linear


def _accumulate_weight_grad(accumulator: Tensor, logit_grad: Tensor, hidden: Tensor, overwrite: bool) -> None:
    """``accumulator (+)= logit_grad^T @ hidden`` in fp32 (rounding each pass's product to bf16 biases training);
    ``overwrite``: the accumulator holds nothing yet (beta = 0 ignores it, NaN included)."""
    beta = 0.0 if overwrite else 1.0
    if logit_grad.dtype != accumulator.dtype:  # the GEMM dtype on CUDA: bf16 tensor cores, fp32 output
        mm_into_fp32(accumulator, logit_grad.t(), hidden, beta=beta)
    else:
        operand = hidden if hidden.dtype == accumulator.dtype else hidden.to(accumulator.dtype)
        accumulator.addmm_(logit_grad.t(), operand, beta=beta)


@dataclass
class _Gradients:
    """Accumulators of the student's gradients; None where no gradient is needed."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    # what the accumulators hold over the true gradient (a power of two, 0-dim, on the device); None: 1
    scale: Tensor | None = None

    @classmethod
    def allocate(cls, needs: tuple[bool, bool, bool], hidden: Tensor, weight: Tensor, zero: bool = True) -> _Gradients:
        """``zero=False`` leaves all three unset for a staging that overwrites them (``_StagedGradients(...,
        overwrite=True)``): saves a fill pass over the fp32 [V, H] and one over the [N, H]."""
        accumulate = accumulation_dtype(weight.dtype)
        new = torch.zeros if zero else torch.empty
        return cls(
            (torch.zeros_like if zero else torch.empty_like)(hidden) if needs[0] else None,
            new(weight.shape, dtype=accumulate, device=weight.device) if needs[1] else None,
            new(weight.shape[0], dtype=accumulate, device=weight.device) if needs[2] else None,
        )


class _StagedGradients:
    """dZ of consecutive chunks staged in the GEMM dtype, turned into dH rows, dW and db one pass at a time."""

    def __init__(self, grads: _Gradients, hidden: Tensor, weight: Tensor, options: FusedOptions, held_bytes: int,
                 overwrite: bool = False, scratch_dtype: torch.dtype | None = None):  # fmt: skip
        """``held_bytes``: what the call's other working buffers hold (chunk buffers, per-row results), which the
        staging's share of ``DevicePolicy.working_bytes`` leaves out. ``overwrite``: the accumulators hold nothing
        yet (``_Gradients.allocate(zero=False)``): the first pass sets dW and db, and each pass sets its rows of dH,
        which only it writes (the forward stages every row once). ``scratch_dtype``: per-chunk logits of this
        dtype live in the unfilled rows (``logits_scratch``): they span ``C * itemsize / staging itemsize`` rows
        from the fill, the chunk's own dZ slot among them, so the buffer holds that many beyond one pass's dZ."""
        self.grads, self.hidden, self.weight = grads, hidden, weight
        self.overwrite = overwrite
        self.hidden_rows_unset = overwrite
        policy = options.policy
        vocab = weight.shape[0]
        # staging rows per row of scratch logits; 0: no scratch
        self.scratch_rows = 0 if scratch_dtype is None else _scratch_rows(policy, vocab, weight.dtype, scratch_dtype)
        self.capacity, extra = staging_rows(policy, options.chunk_size, hidden.shape[0], weight, held_bytes,
                                            self.scratch_rows)  # fmt: skip
        staging = policy.staging_dtype(weight.dtype, accumulation_dtype(weight.dtype))
        self.storage = torch.empty(self.capacity + extra, policy.row_stride(vocab), dtype=staging, device=weight.device)
        self.buffer = self.storage[:, :vocab]
        self.first_row, self.filled = 0, 0
        chunk = max(1, min(options.chunk_size, hidden.shape[0]))
        # chunks per pass, the current one first (even passes: no small last one)
        self.passes = dw_pass_chunks(-(-hidden.shape[0] // chunk), self.capacity // chunk)
        self.staged_chunks = 0

    def logits_scratch(self, count: int, dtype: torch.dtype) -> Tensor:
        """A ``[count, V]`` buffer of ``dtype`` (the padded row stride) over the rows the next ``slot`` hands out,
        flushing first when the pass is full (constructed with ``scratch_dtype=dtype``). Only for logits that are
        read before the chunk's dZ is written (the teacher's in top-K mode: ``student_row_stats`` reads them,
        ``logit_grad`` does not), which one stream orders; the next flush's GEMMs, too, run before the next
        chunk's logits overwrite them."""
        self._make_room()
        start = self.filled
        rows = self.storage[start : start + count * self.scratch_rows]
        return rows.view(dtype).view(count, self.storage.shape[1])[:, : self.buffer.shape[1]]

    def slot(self, rows: slice) -> Tensor:
        """The staging rows for the chunk ``rows`` (consecutive chunks only), flushing first when the pass is full."""
        count = rows.stop - rows.start
        self._make_room()
        if self.filled == 0:
            self.first_row = rows.start
        slot = self.buffer[self.filled : self.filled + count]
        self.filled += count
        self.staged_chunks += 1
        return slot

    def _make_room(self) -> None:
        """Flush when the pass being staged has all its chunks."""
        if self.staged_chunks == self.passes[0]:
            self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            if self.overwrite:  # nothing was ever staged (zero tokens): the unset accumulators are the gradient, 0
                for accumulator in (self.grads.weight, self.grads.bias):
                    if accumulator is not None:
                        accumulator.zero_()
                self.overwrite = False
            return
        logit_grad = self.buffer[: self.filled]
        rows = slice(self.first_row, self.first_row + self.filled)
        grads = self.grads
        if grads.hidden is not None:
            gemm_grad = logit_grad if logit_grad.dtype == self.weight.dtype else logit_grad.to(self.weight.dtype)
            grads.hidden[rows].addmm_(gemm_grad, self.weight, beta=0.0 if self.hidden_rows_unset else 1.0)
        if grads.weight is not None:
            _accumulate_weight_grad(grads.weight, logit_grad, self.hidden[rows], overwrite=self.overwrite)
        if grads.bias is not None:
            if self.overwrite:
                torch.sum(logit_grad, 0, dtype=grads.bias.dtype, out=grads.bias)
            else:
                grads.bias.add_(logit_grad.sum(0, dtype=grads.bias.dtype))
        self.filled, self.overwrite, self.staged_chunks = 0, False, 0
        self.passes.pop(0)


def staging_rows(policy: DevicePolicy, chunk_size: int, num_tokens: int, weight: Tensor, held_bytes: int,
                 scratch_rows: int = 0) -> tuple[int, int]:  # fmt: skip
    """``(rows of dZ per dW pass, rows beyond them)`` of the dZ staging for ``weight``'s dtype: the rows beyond hold
    one chunk of scratch logits spanning ``scratch_rows`` staging rows each, the chunk's own dZ slot among them
    (``_StagedGradients.logits_scratch``); ``held_bytes``: the call's other working buffers."""
    chunk = min(chunk_size, num_tokens)
    if chunk == 0:
        return 0, 0
    staging = policy.staging_dtype(weight.dtype, accumulation_dtype(weight.dtype))
    row_bytes = policy.row_stride(weight.shape[0]) * staging.itemsize
    extra = chunk * max(scratch_rows - 1, 0)
    return policy.stage_rows(chunk, num_tokens, row_bytes, held_bytes + extra * row_bytes), extra


def _scratch_rows(policy: DevicePolicy, vocab: int, weight_dtype: torch.dtype, logits_dtype: torch.dtype) -> int:
    """Staging rows one row of ``logits_dtype`` logits spans in the dZ staging (``_StagedGradients.logits_scratch``):
    1 (fp32 staging) or 2 (bf16/fp16 staging under fp32 logits); 0 where the padded stride cannot be split so."""
    staging = policy.staging_dtype(weight_dtype, accumulation_dtype(weight_dtype))
    ratio, remainder = divmod(logits_dtype.itemsize, staging.itemsize)
    return ratio if remainder == 0 and policy.row_stride(vocab) % ratio == 0 else 0


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _needs_dz_scale(weight: Tensor) -> bool:
    """fp16 models: dZ ~ row_weight * p_j (1e-7 to 1e-12 at a token mean over thousands of tokens) is below fp16's
    smallest normal (6e-5), where it is staged (CUDA: the GEMM dtype) or cast for the dH GEMM (CPU), and a
    GradScaler cannot help (dZ is formed in forward). bf16 has fp32's exponent range."""
    return weight.dtype == torch.float16


def _power_of_two_scale(*values: Tensor) -> Tensor:
    """``2^-ceil(log2(max |v|))`` as a 0-dim fp32 tensor on the values' device (no host sync): the largest per-row
    weight times it lies in (0.5, 1], so dZ's entries sit at fp16's normal range instead of under it. 1 where
    every value is 0 (or not finite). A power of two: scaling and unscaling are exact."""
    largest = values[0].new_zeros((), dtype=torch.float32)
    for value in values:
        if value.numel():
            largest = torch.maximum(largest, value.detach().abs().amax().float())
    exponent = torch.ceil(torch.log2(largest)).clamp(-126, 126)
    return torch.where(torch.isfinite(largest) & (largest > 0), torch.exp2(-exponent), 1.0)


def _same_layout(buffer: Tensor) -> Tensor:
    """An uninitialised ``[rows, V]`` view like ``buffer`` (a ``DevicePolicy.row_buffer``): its padded row stride, the
    last row's padding included, so kernels may read every row up to the stride (``kernels.launch.readable_width``;
    ``empty_like`` would drop the padding, ``empty_strided`` the last row's)."""
    rows, vocab = buffer.shape
    return buffer.new_empty(rows, buffer.stride(0))[:, :vocab]


def _scaled(accumulator: Tensor | None, scale: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``accumulator * scale`` in ``dtype``: in place when the dtype matches, else in one pass into the result
    (a bf16 weight's gradient straight from the fp32 accumulator, no fp32 temporary)."""
    if accumulator is None:
        return None
    if scale is None:
        return accumulator if accumulator.dtype == dtype else accumulator.to(dtype)
    if accumulator.dtype == dtype:
        return accumulator.mul_(scale)
    return torch.mul(accumulator, scale, out=torch.empty(accumulator.shape, dtype=dtype, device=accumulator.device))


class _SavedForBackward(NamedTuple):
    """What backward needs: the inputs, and per row the statistics and gradient coefficients of forward."""

    student_hidden: Tensor  # [N, H]
    student_weight: Tensor  # [V, H]
    student_bias: Tensor | None  # [V]
    teacher_hidden: Tensor | None  # [N, Ht]; None for a top-K log-prob teacher
    teacher_weight: Tensor | None  # [V, Ht]
    teacher_bias: Tensor | None  # [V]
    target_ids: Tensor | None  # [N]
    row_scale: Tensor  # [N]
    student_lse: Tensor  # [N]
    teacher_lse: Tensor  # [N]
    topk_index: Tensor  # [N, K]: the student's top-K, or a top-K teacher's ids
    sparse_grad: Tensor  # [N, K]
    dense_grad: Tensor  # [N]


class _HiddenTeacher:
    """A teacher given as hidden states and an lm_head: per chunk its logits into a second ``[C, V]`` buffer, the
    student's own top-K as the support (SPEC 2)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias  # [N, Ht], [V, Ht], [V]

    def allocate(self, num_tokens: int, buffer_rows: int, topk: int, like: Tensor, staging: bool) -> RowOutputs:
        """The call's ``RowOutputs`` and this teacher's per-chunk scratch (``like``: the student's logits buffer).
        ``staging``: the dZ staging can hold logits (``self.staged``, set once it exists); in top-K mode they live
        there, not in a buffer of their own (dead once ``student_row_stats`` has read them, before ``logit_grad``
        writes the chunk's dZ; full-vocabulary mode's ``logit_grad`` reads them)."""
        # the dtype of the logits in the staging (``_StagedGradients.logits_scratch``); None: in ``self.buffer``
        self.staged_logits = like.dtype if staging and topk > 0 else None
        self.staged: _StagedGradients | None = None
        self.buffer = None if self.staged_logits is not None else _same_layout(like)
        # per-chunk scratch of the statistics the row loss consumes (the [N]-sized results go to the outputs)
        self.student_topk, self.teacher_topk = (like.new_empty(buffer_rows, topk) for _ in range(2))
        self.student_target, self.teacher_target = (like.new_empty(buffer_rows) for _ in range(2))
        outputs = RowOutputs.allocate(num_tokens, topk, like.dtype, like.device)
        scratch = (self.buffer, self.student_topk, self.teacher_topk, self.student_target, self.teacher_target)
        self.allocated_bytes = _nbytes(*outputs, *scratch)
        return outputs

    def chunk_stats(self, row_ops: ModuleType, options: FusedOptions, zs: Tensor, rows: slice, targets: Tensor | None,
                    loss_inputs: RowLossInputs, on_load: dict) -> tuple[Tensor, Tensor, float] | None:  # fmt: skip
        """The chunk's statistics and row loss into ``loss_inputs.rows``; returns ``logit_grad``'s ``teacher``
        (full-vocabulary mode), else None."""
        count = zs.shape[0]
        topk = options.topk or 0
        chunk_out = loss_inputs.rows
        # the teacher's logits first: the student's stats stream them beside its own row (one launch for both, and
        # in top-K mode the row loss in its epilogue)
        if self.staged_logits is None:
            zt = self.buffer[:count]
        else:
            zt = self.staged.logits_scratch(count, self.staged_logits)
        _logits_into(zt, self.hidden[rows], self.weight, self.bias, options)
        s_topk, s_target = self.student_topk[:count], self.student_target[:count]
        t_topk, t_target = self.teacher_topk[:count], self.teacher_target[:count]
        row_ops.student_row_stats(
            zs, topk, targets, out=(chunk_out.student_lse, s_topk, chunk_out.topk_index, s_target),
            entropy=chunk_out.entropy, teacher_logits=zt, teacher_out=(chunk_out.teacher_lse, t_topk, t_target),
            row_loss=loss_inputs if topk > 0 else None, **on_load,
        )  # fmt: skip
        if topk > 0:
            return None
        row_ops.full_vocab_divergence(
            zs, zt, chunk_out.student_lse, chunk_out.teacher_lse, options.alpha,
            out=(chunk_out.divergence, chunk_out.dense_grad), **on_load,
        )  # fmt: skip
        has_target = targets is not None
        row_ops.row_loss_(
            chunk_out, None, None, s_target if has_target else None, t_target if has_target else None,
            loss_inputs.old_logprobs, loss_inputs.row_weight, add_tail=loss_inputs.add_tail, alpha=loss_inputs.alpha,
            is_clip=loss_inputs.is_clip,
        )  # fmt: skip
        return zt, chunk_out.teacher_lse, options.alpha

    def release(self) -> None:
        self.buffer = self.staged = None

    def saved(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.hidden, self.weight, self.bias


class _TopKLogprobTeacher:
    """A teacher given as its own top-K log-probs and token ids (a served or cached teacher, SPEC 3.2): the support
    is its K ids, read from the *student's* logits buffer by the teacher-stats stage (the student's log-sum-exp, its
    logits at the ids and at the target); the teacher side needs no GEMM, its log-sum-exp is 0 (log-probs already
    normalised over its vocabulary)."""

    def __init__(self, logprobs: Tensor, ids: Tensor):
        self.logprobs, self.ids = logprobs, ids  # [N, K] fp32, [N, K] int64 distinct per row

    def allocate(self, num_tokens: int, buffer_rows: int, topk: int, like: Tensor, staging: bool) -> RowOutputs:
        self.student_topk = like.new_empty(buffer_rows, topk)
        self.student_target = like.new_empty(buffer_rows)
        outputs = RowOutputs.allocate(num_tokens, topk, like.dtype, like.device, topk_index=self.ids)
        # t = logprob - 0; the teacher's "target logit" reads the same zeros (its log-prob there is unknown: 0)
        outputs.teacher_lse.zero_()
        # the log-probs and ids too: the entry point hands over sanitised copies of the server's (teacher_topk.py)
        allocated = [t for t in outputs if t is not self.ids]
        self.allocated_bytes = _nbytes(*allocated, self.student_topk, self.student_target, self.logprobs, self.ids)
        self.staged_logits = None  # no logits of its own
        return outputs

    def chunk_stats(self, row_ops: ModuleType, options: FusedOptions, zs: Tensor, rows: slice, targets: Tensor | None,
                    loss_inputs: RowLossInputs, on_load: dict) -> None:  # fmt: skip
        count = zs.shape[0]
        chunk_out = loss_inputs.rows
        s_topk, s_target = self.student_topk[:count], self.student_target[:count]
        # the row loss in the same launch, against the teacher's log-probs (log-sum-exp and target logit 0)
        row_ops.teacher_row_stats(
            zs, chunk_out.topk_index, targets, out=(chunk_out.student_lse, s_topk, s_target),
            entropy=chunk_out.entropy, row_loss=loss_inputs._replace(served_teacher_logprobs=self.logprobs[rows]),
            **on_load,
        )  # fmt: skip

    def release(self) -> None:
        pass

    def saved(self) -> tuple[None, None, None]:
        return None, None, None  # the backward of a top-K teacher never reads a teacher tensor


def _fused_forward(
    ctx,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher: _HiddenTeacher | _TopKLogprobTeacher,
    target_ids: Tensor | None,
    old_logprobs: Tensor | None,
    row_weight: Tensor,
    options: FusedOptions,
    row_ops: ModuleType,
):
    """The forward of both Functions: per chunk the student's logits, ``teacher.chunk_stats``, the row loss and
    (scalar reductions) the logit gradient; saves what ``_student_gradients`` needs."""
    ctx.set_materialize_grads(False)
    num_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    if options.policy is None:
        options = replace(options, policy=policy_for(device))
    needs_grad = tuple(ctx.needs_input_grad[:3])
    form_grad_now = options.grad_in_forward and any(needs_grad)

    chunk = options.chunk_size
    dtype = accumulation_dtype(student_hidden.dtype)
    buffer_rows = min(chunk, num_tokens)
    student_buffer = options.policy.row_buffer(buffer_rows, vocab, dtype, device)
    staging_holds_logits = form_grad_now and _scratch_rows(options.policy, vocab, student_weight.dtype, dtype) > 0
    outputs = teacher.allocate(num_tokens, buffer_rows, options.topk or 0, student_buffer, staging_holds_logits)
    grads, staged, grad_row_scale = None, None, None
    if form_grad_now:
        grads = _Gradients.allocate(needs_grad, student_hidden, student_weight, zero=False)
        held = _nbytes(student_buffer) + teacher.allocated_bytes
        staged = _StagedGradients(
            grads, student_hidden, student_weight, options, held, overwrite=True, scratch_dtype=teacher.staged_logits
        )
        teacher.staged = staged
        if _needs_dz_scale(student_weight):
            grads.scale = _power_of_two_scale(row_weight)
            grad_row_scale = row_weight.new_empty(buffer_rows)

    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        chunk_out = outputs.rows(rows)
        targets = None if target_ids is None else target_ids[rows]
        zs = student_buffer[: rows.stop - rows.start]
        pre_scale = _logits_into(zs, student_hidden[rows], student_weight, student_bias, options)
        # what the GEMM's epilogue did not apply (scale, softcap), every row stage applies on load
        on_load = {"pre_scale": pre_scale, "softcap_bound": options.softcap_bound}
        loss_inputs = RowLossInputs(
            chunk_out, None if old_logprobs is None else old_logprobs[rows], row_weight[rows], options.add_tail,
            options.alpha, options.is_clip,
        )  # fmt: skip
        full_vocab_teacher = teacher.chunk_stats(row_ops, options, zs, rows, targets, loss_inputs, on_load)
        if form_grad_now:
            row_scale = chunk_out.row_scale
            if grad_row_scale is not None:  # fp16: dZ scaled by a power of two, taken out at the hand-over
                row_scale = torch.mul(row_scale, grads.scale, out=grad_row_scale[: rows.stop - rows.start])
            row_ops.logit_grad(
                zs, chunk_out.student_lse, row_scale, chunk_out.dense_grad, chunk_out.topk_index,
                chunk_out.sparse_grad, None, None, options.grad_scale, full_vocab_teacher,
                out=staged.slot(rows), **on_load,
            )  # fmt: skip
    if staged is not None:
        staged.flush()
    teacher.release()
    del student_buffer, staged

    ctx.options, ctx.row_ops = options, row_ops
    ctx.form_grad_now = form_grad_now
    ctx.precomputed = grads
    ctx.save_for_backward(
        *_SavedForBackward(
            student_hidden, student_weight, student_bias, *teacher.saved(), target_ids, outputs.row_scale,
            outputs.student_lse, outputs.teacher_lse, outputs.topk_index, outputs.sparse_grad, outputs.dense_grad,
        )
    )  # fmt: skip
    ctx.mark_non_differentiable(
        outputs.teacher_target_logprobs, outputs.is_weight, outputs.topk_mass, outputs.divergence, outputs.entropy
    )
    loss = outputs.loss.sum() if options.grad_in_forward else outputs.loss
    return (
        loss,
        outputs.target_logprobs,
        outputs.teacher_target_logprobs,
        outputs.is_weight,
        outputs.topk_mass,
        outputs.divergence,
        outputs.entropy,
    )


def _student_gradients(ctx, grad_loss: Tensor | None, grad_target_logprobs: Tensor | None, recompute_pass=None):
    """The backward of both Functions: ``(d student_hidden, d student_weight, d student_bias)``. ``recompute_pass``:
    ``_recompute_pass`` or a stand-in with its signature (``sdpo_ops.compiled_op``: the same pass as a custom op)."""
    saved = _SavedForBackward(*ctx.saved_tensors)
    student_hidden, student_weight = saved.student_hidden, saved.student_weight
    needs_grad = tuple(ctx.needs_input_grad[:3])
    # What forward formed, times the upstream scalar: handed over and scaled in place (no second [V, H] buffer);
    # a second backward through the same graph (retain_graph=True) then takes the recompute path.
    grads, upstream = None, None
    formed = ctx.form_grad_now and ctx.precomputed is not None
    if formed and grad_loss is not None:
        grads, ctx.precomputed = ctx.precomputed, None
        upstream = grad_loss if grads.scale is None else grad_loss / grads.scale
    # A recompute pass: per-token upstream gradient of the loss, or a gradient of the target log-probs.
    loss_scale, target_scale = None, grad_target_logprobs
    if grad_loss is not None and not formed:
        loss_scale = torch.where(saved.row_scale != 0, grad_loss * saved.row_scale, 0.0)
    if (loss_scale is not None or target_scale is not None) and any(needs_grad):
        dz_scale = None
        if _needs_dz_scale(student_weight):
            dz_scale = _power_of_two_scale(*(t for t in (loss_scale, target_scale) if t is not None))
            loss_scale = None if loss_scale is None else loss_scale * dz_scale
            target_scale = None if target_scale is None else target_scale * dz_scale
        if grads is None:
            grads = _Gradients.allocate(needs_grad, student_hidden, student_weight)
        elif upstream is not None:  # the recompute pass adds its own, already scaled terms: fold the scalar in first
            fold = upstream if dz_scale is None else upstream * dz_scale
            for accumulator in (grads.hidden, grads.weight, grads.bias):
                if accumulator is not None:
                    accumulator.mul_(fold.to(accumulator.dtype))
        # a new record, not an attribute write: torch.compile traces backward and refuses side effects in it
        grads = replace(grads, scale=dz_scale)
        (recompute_pass or _recompute_pass)(ctx.row_ops, ctx.options, grads, saved, loss_scale, target_scale)
        upstream = None if dz_scale is None else 1.0 / dz_scale
    if grads is None:
        grads = _Gradients(None, None, None)
    bias_dtype = None if saved.student_bias is None else saved.student_bias.dtype
    return (
        _scaled(grads.hidden, upstream, student_hidden.dtype),
        _scaled(grads.weight, upstream, student_weight.dtype),
        _scaled(grads.bias, upstream, bias_dtype),
    )


class ChunkedSDPOFunction(torch.autograd.Function):
    """Inputs: flattened ``[N, *]`` tensors. Outputs: ``(loss, target_logprobs, teacher_target_logprobs,
    is_weight, topk_mass, divergence, entropy)``; ``loss`` is the scalar ``sum_t row_weight_t * w_t * D_t`` when
    ``options.grad_in_forward``, else the per-token ``row_weight_t * w_t * D_t`` ``[N]``; ``divergence``
    is the unweighted ``D_t`` and ``entropy`` the student's entropy (both detached, for logging).
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
        teacher = _HiddenTeacher(teacher_hidden, teacher_weight, teacher_bias)
        return _fused_forward(
            ctx, student_hidden, student_weight, student_bias, teacher, target_ids, old_logprobs, row_weight, options,
            row_ops,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_loss, grad_target_logprobs, *_grad_non_differentiable):
        return (
            *_student_gradients(ctx, grad_loss, grad_target_logprobs),
            None,  # teacher_hidden: the teacher never receives a gradient
            None,  # teacher_weight
            None,  # teacher_bias
            None,  # target_ids: integer
            None,  # old_logprobs: a constant of the rollout
            None,  # row_weight: mask and detached weights
            None,  # options
            None,  # row_ops
        )


class TeacherTopKSDPOFunction(torch.autograd.Function):
    """``ChunkedSDPOFunction`` for a teacher given as its top-K log-probs: same outputs (``teacher_target_logprobs``
    is zeros: the teacher's log-prob of the target is not known), one GEMM per chunk in forward instead of two.
    ``options.topk`` is K; ``teacher_topk_ids`` must be distinct per row (``logit_grad`` writes each column once).
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,  # [N, H]
        student_weight: Tensor,  # [V, H]
        student_bias: Tensor | None,  # [V]
        teacher_topk_logprobs: Tensor,  # [N, K] fp32, normalised over the teacher's vocabulary
        teacher_topk_ids: Tensor,  # [N, K] int64 in [0, V), distinct per row
        target_ids: Tensor | None,  # [N] int64
        old_logprobs: Tensor | None,  # [N]
        row_weight: Tensor,  # [N] fp32
        options: FusedOptions,
        row_ops: ModuleType,
    ):
        teacher = _TopKLogprobTeacher(teacher_topk_logprobs, teacher_topk_ids)
        return _fused_forward(
            ctx, student_hidden, student_weight, student_bias, teacher, target_ids, old_logprobs, row_weight, options,
            row_ops,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_loss, grad_target_logprobs, *_grad_non_differentiable):
        return (
            *_student_gradients(ctx, grad_loss, grad_target_logprobs),
            None,  # teacher_topk_logprobs: the teacher never receives a gradient
            None,  # teacher_topk_ids: integer
            None,  # target_ids: integer
            None,  # old_logprobs: a constant of the rollout
            None,  # row_weight: mask and detached weights
            None,  # options
            None,  # row_ops
        )


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
    target_ids = saved.target_ids
    num_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    chunk = options.chunk_size
    dtype = accumulation_dtype(student_hidden.dtype)
    student_buffer = options.policy.row_buffer(min(chunk, num_tokens), vocab, dtype, device)
    # Full-vocabulary mode needs the teacher's logits again, but only when the divergence has a gradient.
    teacher_buffer = _same_layout(student_buffer) if options.topk is None and loss_scale is not None else None
    if loss_scale is None:
        loss_scale = torch.zeros(num_tokens, dtype=dtype, device=device)
    if target_scale is not None:
        target_scale = target_scale.to(dtype)
    held = _nbytes(student_buffer, teacher_buffer, loss_scale, target_scale, *saved[7:])  # + the per-row results
    staged = _StagedGradients(grads, student_hidden, student_weight, options, held)
    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        zs = student_buffer[: rows.stop - rows.start]
        pre_scale = _logits_into(zs, student_hidden[rows], student_weight, student_bias, options)
        teacher = None
        if teacher_buffer is not None:
            zt = teacher_buffer[: rows.stop - rows.start]
            _logits_into(zt, teacher_hidden[rows], teacher_weight, teacher_bias, options)
            teacher = (zt, saved.teacher_lse[rows], options.alpha)
        has_target = target_scale is not None
        row_ops.logit_grad(
            zs, saved.student_lse[rows], loss_scale[rows], saved.dense_grad[rows], saved.topk_index[rows],
            saved.sparse_grad[rows], target_ids[rows] if has_target else None,
            target_scale[rows] if has_target else None, options.grad_scale, teacher, out=staged.slot(rows),
            pre_scale=pre_scale, softcap_bound=options.softcap_bound,
        )  # fmt: skip
    staged.flush()
