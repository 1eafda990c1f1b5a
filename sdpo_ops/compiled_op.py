"""The fused loss as torch.library custom ops, what ``torch.compile`` sees instead of the chunk loop.

Traced through, the chunked Functions (``sdpo_ops.chunked``) specialise the graph on the token count N: the
chunk loop's trip count, the chunk rows ``min(N, rows)`` and the dW staging passes are Python control flow over
N. An RL trainer's N changes every batch, so every step would compile again, up to dynamo's recompile limit.
While compiling, the entry points call these ops instead: one opaque node per call, whose fake implementation
gives every output's shape in a symbolic N, so a graph compiled once serves every N (``dynamic=True`` or
``mark_dynamic``; by default dynamo compiles a second time, dynamic in N, on the second N it meets).

- ``sdpo_ops::fused_sdpo`` runs ``chunked._fused_forward`` (either teacher) and returns, beside the Functions'
  seven outputs, what their backward reads: the per-row statistics and the gradients formed in forward.
- Its autograd formula is the Functions' backward (``chunked._student_gradients``): the formed gradients scaled
  by the upstream scalar in place, or a recompute pass, itself the op ``sdpo_ops::recompute_student_gradients``
  (its chunk loop is N's as well).

Eager calls keep the autograd Functions: a ``TorchDispatchMode`` (``bench.trace``'s launch and memory counts, a
profiler's FLOP counter) sees a custom op as one opaque op, and the Functions' backward hands the formed gradients
over once (a second backward through a retained graph recomputes), which an op's traced backward cannot record.
Both run the same forward and backward code: only the packaging differs. The options (``FusedOptions``, with its
``DevicePolicy``) reach the ops as value-type opaque objects (``torch._library.opaque_object``, torch 2.13 here);
on a torch that cannot register them, no op is registered and compiled calls trace the Functions as before.
"""

import inspect
from dataclasses import replace
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_scalar

from sdpo_ops import row_ops as torch_row_ops
from sdpo_ops.chunked import (
    ChunkedSDPOFunction,
    FusedOptions,
    TeacherTopKSDPOFunction,
    _fused_forward,
    _Gradients,
    _HiddenTeacher,
    _needs_dz_scale,
    _recompute_pass,
    _SavedForBackward,
    _student_gradients,
    _TopKLogprobTeacher,
    accumulation_dtype,
)
from sdpo_ops.device_policy import DevicePolicy


def compiles_as_op() -> bool:
    """Whether this call is being compiled into ``sdpo_ops::fused_sdpo`` (this torch has the ops: ``_register_ops``)."""
    return torch.compiler.is_compiling() and _FUSED_OP is not None


def chunk_rows_for_call(policy: DevicePolicy, num_tokens: int, vocab: int, hidden_size: int) -> int:
    """``FusedOptions.chunk_size`` for a call without an explicit one: the policy's rows for N; 0 while compiling,
    where N is symbolic (``min(N, rows)`` would specialise the graph) and the op resolves 0 from the N it runs on."""
    if compiles_as_op():
        return 0
    return policy.chunk_rows(num_tokens, vocab, hidden_size)


def static_options(*values):
    """The options' numbers as Python constants while compiling (unchanged in eager). Dynamo makes a number it reads
    from a default, a global or an attribute symbolic under ``dynamic=True`` (or once it changed between calls); an
    option picks code paths and shapes (K) and is a constant of the ops: specialised here, before any check reads
    it (a new value compiles anew, as it does by default)."""
    if not torch.compiler.is_compiling():
        return values
    numbers = (int, float, torch.SymInt, torch.SymFloat)
    return tuple(guard_scalar(v) if isinstance(v, numbers) and not isinstance(v, bool) else v for v in values)


def _resolved(options: FusedOptions, student_hidden: Tensor, student_weight: Tensor) -> FusedOptions:
    if options.chunk_size:
        return options
    rows = options.policy.chunk_rows(student_hidden.shape[0], student_weight.shape[0], student_hidden.shape[1])
    return replace(options, chunk_size=rows)


def _row_ops(backend: str) -> ModuleType:
    if backend == "triton":
        from sdpo_ops.kernels import row_ops  # triton is optional: imported where it runs, as loss.py does

        return row_ops
    return torch_row_ops


class _OpOutputs(NamedTuple):
    """``sdpo_ops::fused_sdpo``'s outputs: the Functions' seven, then what backward reads. An op's outputs may not
    alias its inputs or each other, nor be None: a gradient not formed, or a top-K teacher's ids (an input), is
    returned as an empty placeholder."""

    loss: Tensor
    target_logprobs: Tensor
    teacher_target_logprobs: Tensor
    is_weight: Tensor
    topk_mass: Tensor
    divergence: Tensor
    entropy: Tensor
    row_scale: Tensor
    student_lse: Tensor
    teacher_lse: Tensor
    topk_index: Tensor
    sparse_grad: Tensor
    dense_grad: Tensor
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Tensor
    grad_scale: Tensor


class _ForwardRecord:
    """What ``_fused_forward`` hands an autograd context, kept for the op to return (the op runs below autograd)."""

    def __init__(self, needs_grad: list[bool]):
        self.needs_input_grad = tuple(needs_grad)
        self.saved: tuple = ()

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors) -> None:
        self.saved = tensors

    def mark_non_differentiable(self, *tensors) -> None:
        pass  # the op's caller detaches them


def _formed(options: FusedOptions, needs_grad: list[bool], student_weight: Tensor) -> tuple[bool, bool, bool, bool]:
    """Which of dH, dW, db and dZ's scale forward forms (``_fused_forward``: scalar reductions, when needed)."""
    formed = options.grad_in_forward and any(needs_grad)
    return (formed and needs_grad[0], formed and needs_grad[1], formed and needs_grad[2],
            formed and _needs_dz_scale(student_weight))  # fmt: skip


def _fused_sdpo(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_topk_logprobs: Tensor | None,
    teacher_topk_ids: Tensor | None,
    target_ids: Tensor | None,
    old_logprobs: Tensor | None,
    row_weight: Tensor,
    options: FusedOptions,
    backend: str,
    needs_grad: list[bool],
    validate_teacher: bool,
) -> tuple[(Tensor,) * len(_OpOutputs._fields)]:
    options = _resolved(options, student_hidden, student_weight)
    if teacher_topk_ids is None:
        teacher = _HiddenTeacher(teacher_hidden, teacher_weight, teacher_bias)
    else:
        if validate_teacher:
            # here, where the values are concrete: a host read while tracing would break the graph
            from sdpo_ops.teacher_topk import _check_teacher_values  # teacher_topk imports this module

            _check_teacher_values(teacher_topk_logprobs, teacher_topk_ids, student_weight.shape[0])
        teacher = _TopKLogprobTeacher(teacher_topk_logprobs, teacher_topk_ids)
    record = _ForwardRecord(needs_grad)
    results = _fused_forward(
        record, student_hidden, student_weight, student_bias, teacher, target_ids, old_logprobs, row_weight, options,
        _row_ops(backend),
    )  # fmt: skip
    saved = _SavedForBackward(*record.saved)
    grads = record.precomputed or _Gradients(None, None, None)
    placeholder = row_weight.new_empty(0)

    def owned(tensor: Tensor | None) -> Tensor:
        return torch.empty_like(placeholder) if tensor is None else tensor

    return _OpOutputs(
        *results, saved.row_scale, saved.student_lse, saved.teacher_lse,
        owned(saved.topk_index if teacher_topk_ids is None else None), saved.sparse_grad, saved.dense_grad,
        owned(grads.hidden), owned(grads.weight), owned(grads.bias), owned(grads.scale),
    )  # fmt: skip


def _fused_sdpo_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                     teacher_topk_logprobs, teacher_topk_ids, target_ids, old_logprobs, row_weight, options, backend,
                     needs_grad, validate_teacher):  # fmt: skip
    """Shapes in the symbolic N = ``student_hidden.shape[0]``; dtypes as ``_fused_forward`` allocates them."""
    num_tokens = student_hidden.shape[0]
    dtype = accumulation_dtype(student_hidden.dtype)
    topk = options.topk or 0

    def rows(*shape, dtype=dtype) -> Tensor:
        return row_weight.new_empty(num_tokens, *shape, dtype=dtype)

    def placeholder() -> Tensor:
        return row_weight.new_empty(0)

    formed = _formed(options, needs_grad, student_weight)
    accumulator = {"dtype": accumulation_dtype(student_weight.dtype)}  # dW and db's (``_Gradients.allocate``)
    return _OpOutputs(
        loss=row_weight.new_empty((), dtype=dtype) if options.grad_in_forward else rows(),
        target_logprobs=rows(),
        teacher_target_logprobs=rows(),
        is_weight=rows(),
        topk_mass=rows(),
        divergence=rows(),
        entropy=rows(),
        row_scale=rows(),
        student_lse=rows(),
        teacher_lse=rows(),
        topk_index=rows(topk, dtype=torch.int64) if teacher_topk_ids is None else placeholder(),
        sparse_grad=rows(topk),
        dense_grad=rows(),
        grad_hidden=torch.empty_like(student_hidden) if formed[0] else placeholder(),
        grad_weight=student_weight.new_empty(student_weight.shape, **accumulator) if formed[1] else placeholder(),
        grad_bias=student_weight.new_empty(student_weight.shape[0], **accumulator) if formed[2] else placeholder(),
        grad_scale=row_weight.new_empty((), dtype=torch.float32) if formed[3] else placeholder(),
    )


def _fused_sdpo_setup_context(ctx, inputs, output) -> None:
    """The Functions' context (``_fused_forward`` writes it there), rebuilt from the op's inputs and outputs."""
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, _,
     teacher_topk_ids, target_ids, _, _, options, backend, needs_grad, _) = inputs  # fmt: skip
    out = _OpOutputs(*output)
    ctx.set_materialize_grads(False)
    ctx.options, ctx.row_ops = options, backend
    formed = _formed(options, needs_grad, student_weight)
    ctx.form_grad_now = any(formed)
    ctx.precomputed = None
    if ctx.form_grad_now:
        returned = (out.grad_hidden, out.grad_weight, out.grad_bias, out.grad_scale)
        ctx.precomputed = _Gradients(
            *(grad if present else None for grad, present in zip(returned, formed, strict=True))
        )
    ctx.save_for_backward(
        *_SavedForBackward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target_ids,
            out.row_scale, out.student_lse, out.teacher_lse,
            out.topk_index if teacher_topk_ids is None else teacher_topk_ids, out.sparse_grad, out.dense_grad,
        )
    )  # fmt: skip


def _fused_sdpo_backward(ctx, grad_loss, grad_target_logprobs, *_grad_non_differentiable):
    grads = _student_gradients(ctx, grad_loss, grad_target_logprobs, recompute_pass=_recompute_with_op)
    return (*grads, *(None,) * (len(ctx.needs_input_grad) - len(grads)))  # nothing but the student's has one


def _recompute_student_gradients(
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    target_ids: Tensor | None,
    row_scale: Tensor,
    student_lse: Tensor,
    teacher_lse: Tensor,
    topk_index: Tensor,
    sparse_grad: Tensor,
    dense_grad: Tensor,
    loss_scale: Tensor | None,
    target_scale: Tensor | None,
    options: FusedOptions,
    backend: str,
) -> None:
    saved = _SavedForBackward(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target_ids,
        row_scale, student_lse, teacher_lse, topk_index, sparse_grad, dense_grad,
    )  # fmt: skip
    grads = _Gradients(grad_hidden, grad_weight, grad_bias)
    _recompute_pass(
        _row_ops(backend), _resolved(options, student_hidden, student_weight), grads, saved, loss_scale, target_scale
    )


def _recompute_student_gradients_fake(*_args) -> None:
    return None


def _register_ops():
    """``(sdpo_ops::fused_sdpo, sdpo_ops::recompute_student_gradients)``, or ``(None, None)`` where this torch cannot
    take the options as a value-type opaque object (``torch._library``'s API, torch 2.13 here; torch >= 2.10 is
    supported): compiled calls then trace the Functions, specialised on N, as before the ops existed."""
    try:
        from torch._library.opaque_object import register_opaque_type
    except ImportError:
        return None, None
    if "typ" not in inspect.signature(register_opaque_type).parameters:  # opaque objects, but no value types yet
        return None, None
    # Options reach the ops as one constant of the graph, guarded by ``==`` (a new value compiles anew, as a new Python
    # constant would); they hold no tensor. A refusal here (a missing ``__fx_repr__``) is a bug: raised, not skipped.
    register_opaque_type(DevicePolicy, typ="value")
    register_opaque_type(FusedOptions, typ="value")
    fused = torch.library.custom_op("sdpo_ops::fused_sdpo", _fused_sdpo, mutates_args=())
    fused.register_fake(_fused_sdpo_fake)
    fused.register_autograd(_fused_sdpo_backward, setup_context=_fused_sdpo_setup_context)
    mutated = ("grad_hidden", "grad_weight", "grad_bias")
    recompute = torch.library.custom_op("sdpo_ops::recompute_student_gradients", _recompute_student_gradients,
                                        mutates_args=mutated)  # fmt: skip
    recompute.register_fake(_recompute_student_gradients_fake)
    return fused, recompute


_FUSED_OP, _RECOMPUTE_OP = _register_ops()


def _recompute_with_op(backend: str, options: FusedOptions, grads: _Gradients, saved: _SavedForBackward,
                       loss_scale: Tensor | None, target_scale: Tensor | None) -> None:  # fmt: skip
    """``chunked._recompute_pass``'s signature, run as ``sdpo_ops::recompute_student_gradients``."""
    _RECOMPUTE_OP(grads.hidden, grads.weight, grads.bias, *saved, loss_scale, target_scale, options, backend)


def _needs_grad(*student: Tensor | None) -> list[bool]:
    enabled = torch.is_grad_enabled()
    return [enabled and tensor is not None and tensor.requires_grad for tensor in student]


def _outputs(op_outputs: tuple) -> tuple[Tensor, ...]:
    """The Functions' seven outputs; the five they mark non-differentiable detached."""
    out = _OpOutputs(*op_outputs)
    logging = (out.teacher_target_logprobs, out.is_weight, out.topk_mass, out.divergence, out.entropy)
    return (out.loss, out.target_logprobs, *(tensor.detach() for tensor in logging))


def chunked_sdpo(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                 target_ids, old_logprobs, row_weight, options: FusedOptions, row_ops: ModuleType):  # fmt: skip
    """``ChunkedSDPOFunction.apply`` (same arguments and outputs); while compiling, ``sdpo_ops::fused_sdpo``."""
    if not compiles_as_op():
        return ChunkedSDPOFunction.apply(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target_ids,
            old_logprobs, row_weight, options, row_ops,
        )  # fmt: skip
    return _outputs(
        _FUSED_OP(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, None, None,
            target_ids, old_logprobs, row_weight, options, _backend_name(row_ops),
            _needs_grad(student_hidden, student_weight, student_bias), False,
        )
    )  # fmt: skip


def teacher_topk_sdpo(student_hidden, student_weight, student_bias, teacher_topk_logprobs, teacher_topk_ids,
                      target_ids, old_logprobs, row_weight, options: FusedOptions, row_ops: ModuleType, *,
                      validate_teacher: bool):  # fmt: skip
    """``TeacherTopKSDPOFunction.apply``; while compiling, ``sdpo_ops::fused_sdpo``, which also checks the teacher's
    values (``validate_teacher``: the check that eager callers run before, on the host)."""
    if not compiles_as_op():
        return TeacherTopKSDPOFunction.apply(
            student_hidden, student_weight, student_bias, teacher_topk_logprobs, teacher_topk_ids, target_ids,
            old_logprobs, row_weight, options, row_ops,
        )  # fmt: skip
    return _outputs(
        _FUSED_OP(
            student_hidden, student_weight, student_bias, None, None, None, teacher_topk_logprobs, teacher_topk_ids,
            target_ids, old_logprobs, row_weight, options, _backend_name(row_ops),
            _needs_grad(student_hidden, student_weight, student_bias), validate_teacher,
        )
    )  # fmt: skip


def _backend_name(row_ops: ModuleType) -> str:
    return "torch" if row_ops is torch_row_ops else "triton"
