"""The public SDPO loss: validate once, pick a backend, reduce.

Backends share one contract (SPEC section 3):

- ``"triton"``: the chunked autograd Function with the Triton row kernels (CUDA; on CPU tensors only
  under ``TRITON_INTERPRET=1``);
- ``"torch"``: the same Function with the torch row stages: any device, the CPU default;
- ``"reference"``: the naive materialising oracle (``sdpo_ops.reference``);
- ``"auto"``: ``"triton"`` for CUDA tensors (``topk <= 256``, not fp64), ``"torch"`` otherwise.

Which of them ``"auto"`` takes, like every other device-dependent choice, is the device policy's
(``sdpo_ops.device_policy``).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from sdpo_ops import row_ops as torch_row_ops
from sdpo_ops.chunked import FusedOptions, accumulation_dtype
from sdpo_ops.compiled_op import chunk_rows_for_call, chunked_sdpo, static_options
from sdpo_ops.device_policy import DevicePolicy, policy_for
from sdpo_ops.reference import sdpo_loss_reference, sdpo_loss_reference_from_logits

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
# The Triton student kernel keeps a running top-k of up to this many columns per row in registers
# (sdpo_ops/kernels/student_row_stats.py); "auto" takes the torch path beyond it.
TRITON_MAX_TOPK = 256


class SDPOOutput(NamedTuple):
    """Everything one fused call produces; per-token tensors have the inputs' leading shape.

    loss: the reduced loss (per-token for ``reduction="none"``).
    per_token_loss: ``mask * token_weights * is_weight * D`` per token before the reduction, detached
        (for logging a different aggregate than the one optimised, at no extra cost).
    target_logprobs: the student's log-prob of ``target_ids`` at the temperature, with gradient
        (what a GRPO/PPO policy loss needs), at every position, masked or not; None without ``target_ids``.
    teacher_target_logprobs: the teacher's log-prob of ``target_ids``, detached; None without them.
    is_weight: the clipped importance weight, detached; None without IS correction.
    topk_mass: the student's probability captured by the top-K (1 for the full vocabulary), detached.
    metrics: 0-dim detached tensors averaged over the mask: ``is_weight_mean``,
        ``is_clipped_fraction``, ``topk_mass_mean``, ``entropy_mean``.
    entropy: the student's entropy ``-sum_v p_v log p_v`` over the full vocabulary, ``p`` the softmax of the
        transformed logits (scale, softcap) at the temperature, detached; exactly 0 at masked positions (padding
        may hold anything: no NaN leaks into a masked mean). The fused paths take it from the pass that computes
        the log-sum-exp (no extra launch, no extra ``[C, V]`` memory).
    """

    loss: Tensor
    per_token_loss: Tensor
    target_logprobs: Tensor | None
    teacher_target_logprobs: Tensor | None
    is_weight: Tensor | None
    topk_mass: Tensor
    metrics: dict[str, Tensor]
    entropy: Tensor


def _check_tensor(name: str, value, *, device: torch.device) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but student_hidden is on {device}: put all inputs on one device")


def _check_per_token(name: str, value: Tensor | None, leading_shape: torch.Size, device: torch.device) -> None:
    if value is None:
        return
    _check_tensor(name, value, device=device)
    if value.shape != leading_shape:
        raise ValueError(
            f"{name} must have shape {tuple(leading_shape)} (the tokens' leading shape), got {tuple(value.shape)}"
        )


def _checked_per_token_inputs(
    per_token: dict[str, Tensor | None], leading_shape: torch.Size, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Check the per-token inputs' shapes and devices; return the mask as a detached float tensor."""
    for name, value in per_token.items():
        _check_per_token(name, value, leading_shape, device)
    mask = per_token["mask"]
    return (torch.ones(leading_shape, device=device, dtype=dtype) if mask is None else mask.to(dtype)).detach()


def _check_logit_transform(logit_scale, logit_softcap) -> None:
    for name, value in (("logit_scale", logit_scale), ("logit_softcap", logit_softcap)):
        if value is None and name == "logit_softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float{' or None' if name == 'logit_softcap' else ''}, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")


def _check_options(*, vocab: int, topk, alpha, is_clip, temperature, reduction, normalizer, backend) -> None:
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int):
            raise TypeError(f"topk must be an int or None, got {type(topk).__name__}")
        if not 1 <= topk <= vocab:
            raise ValueError(f"topk must be in [1, V={vocab}] or None (full vocabulary), got {topk}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0: KL(teacher||student), 1: KL(student||teacher)), got {alpha}")
    if is_clip is not None and not float(is_clip) > 0.0:
        raise ValueError(f"is_clip must be > 0 or None (no importance-sampling correction), got {is_clip}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction in ("sum", "none"):
            raise ValueError(f"normalizer replaces the denominator of a mean; reduction={reduction!r} has none")
        if not isinstance(normalizer, Tensor) and not float(normalizer) > 0.0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_side(side: str, hidden, weight, bias, device: torch.device) -> None:
    _check_tensor(f"{side}_hidden", hidden, device=device)
    _check_tensor(f"{side}_weight", weight, device=device)
    if not hidden.is_floating_point():
        raise TypeError(f"{side}_hidden must be a floating-point tensor (fp32/bf16/fp16), got {hidden.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{side}_weight must be a floating-point tensor, got {weight.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{side}_hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_weight must be [V, H] with H = {side}_hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{side}_weight dtype {weight.dtype} differs from {side}_hidden dtype {hidden.dtype}: cast one to the "
            f"other's dtype (e.g. {side}_hidden.to({side}_weight.dtype)), or call inside "
            f"torch.autocast({hidden.device.type!r}, dtype=...) to run the head in autocast's dtype as F.linear would"
        )
    if bias is not None:
        _check_tensor(f"{side}_bias", bias, device=device)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{side}_bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")


def _check_targets(target_ids: Tensor | None, old_logprobs: Tensor | None, vocab: int) -> None:
    if old_logprobs is not None and target_ids is None:
        raise ValueError("old_logprobs needs target_ids: the importance weight is read at the sampled tokens")
    if target_ids is None:
        return
    if target_ids.is_floating_point() or target_ids.is_complex() or target_ids.dtype == torch.bool:
        raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if not target_ids.numel() or target_ids.device.type == "meta":  # meta (dry runs): no values to check
        return
    if target_ids.device.type == "cuda" or torch.compiler.is_compiling():
        # Under torch.compile (any device) a host read of the values would break the graph (fullgraph=True fails).
        # No host sync on CUDA: it would drain the queue and idle the GPU for the host work up to the first
        # GEMM (~0.7 ms measured on the 2-core CPU box, ~1% of the call at N=8192). A device-side assert instead,
        # as F.cross_entropy and gather do; every kernel masks out-of-range ids, so nothing reads or writes out
        # of bounds before it fires.
        in_range = ((target_ids >= 0) & (target_ids < vocab)).all()
        torch._assert_async(in_range, f"target_ids must lie in [0, V={vocab}) at unmasked positions")
        return
    # CPU: one host check (free here), before any kernel runs.
    low, high = (int(v) for v in torch.stack(torch.aminmax(target_ids)).tolist())
    if low < 0 or high >= vocab:
        raise ValueError(f"target_ids must lie in [0, V={vocab}) at unmasked positions, got values in [{low}, {high}]")


def _unmasked_targets(target_ids: Tensor | None, float_mask: Tensor, vocab: int) -> Tensor | None:
    """``target_ids`` with out-of-range ids at masked positions (Hugging Face's ``-100`` label padding) replaced by
    0, so only unmasked positions are validated and no stage gathers out of range. In-range ids stay, masked or
    not: a policy loss may read ``target_logprobs`` where the distillation mask is 0."""
    if target_ids is None or target_ids.is_floating_point() or target_ids.is_complex():
        return target_ids  # no ids, or a wrong dtype that _check_targets refuses
    out_of_range = (target_ids < 0) | (target_ids >= vocab)
    return target_ids.masked_fill(out_of_range & (float_mask == 0), 0)


def _checked_call(
    per_token: dict, leading_shape: torch.Size, device: torch.device, dtype: torch.dtype, *, vocab: int, **options
) -> tuple[Tensor, Tensor | None]:
    """Every check the entry points share, in the order a user meets them: the per-token inputs, the options, the
    logit transform, the target ids (at unmasked positions). Returns the float mask and the target ids to use."""
    float_mask = _checked_per_token_inputs(per_token, leading_shape, device, dtype)
    if isinstance(options["normalizer"], Tensor):
        _check_tensor("normalizer", options["normalizer"], device=device)
    transform = {name: options.pop(name) for name in ("logit_scale", "logit_softcap")}
    _check_options(vocab=vocab, **options)
    _check_logit_transform(**transform)
    target_ids = _unmasked_targets(per_token["target_ids"], float_mask, vocab)
    _check_targets(target_ids, per_token["old_logprobs"], vocab)
    return float_mask, target_ids


def _reduction_coefficients(mask: Tensor, reduction: str, normalizer) -> Tensor:
    """Per-token coefficients ``c`` such that the reduced loss is ``sum_t c_t * loss_t``."""
    if reduction in ("sum", "none"):
        return mask
    if reduction == "token-mean":
        denominator = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
        return mask / denominator
    per_sequence = mask.reshape(mask.shape[:-1].numel(), mask.shape[-1])  # [N] is one sequence; B or T may be 0
    if reduction == "seq-mean-token-mean":
        per_sequence = per_sequence / per_sequence.sum(-1, keepdim=True).clamp(min=1.0)
    denominator = per_sequence.shape[0] if normalizer is None else normalizer
    return (per_sequence / denominator).reshape(mask.shape)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _metrics(is_weight: Tensor | None, is_clip, topk_mass: Tensor, entropy: Tensor, mask: Tensor) -> dict[str, Tensor]:
    if is_weight is None:
        is_weight_mean, clipped = torch.ones((), device=mask.device), torch.zeros((), device=mask.device)
    else:
        is_weight_mean = _masked_mean(is_weight.float(), mask)
        clipped = _masked_mean((is_weight >= is_clip).float(), mask)
    return {
        "is_weight_mean": is_weight_mean.detach(),
        "is_clipped_fraction": clipped.detach(),
        "topk_mass_mean": _masked_mean(topk_mass.float(), mask).detach(),
        "entropy_mean": _masked_mean(entropy.float(), mask).detach(),
    }


def _fused_backend(backend: str, policy: DevicePolicy, dtype: torch.dtype, topk: int | None) -> str:
    """``"auto"`` resolved; ``"triton"`` refused for what its kernels cannot compute (fp64, a top-K over 256)."""
    fits_triton = dtype != torch.float64 and (topk is None or topk <= TRITON_MAX_TOPK)
    if backend == "auto":
        return "triton" if policy.triton_by_default and fits_triton else "torch"
    if backend == "triton" and dtype == torch.float64:
        raise ValueError(
            "backend='triton' computes in fp32 inside, the inputs are torch.float64: use backend='torch' (or 'auto'), "
            "which computes in fp64"
        )
    if backend == "triton" and topk is not None and topk > TRITON_MAX_TOPK:
        raise ValueError(f"topk={topk} exceeds the Triton kernels' maximum {TRITON_MAX_TOPK}: use backend='torch'")
    return backend


def _triton_row_ops(device: torch.device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before sdpo_ops is imported, or use backend='torch'"
        )
    try:
        from sdpo_ops.kernels import row_ops
    except ImportError as error:  # triton missing (e.g. macOS)
        raise ImportError(f"backend='triton' needs the triton package: {error}") from error
    return row_ops


# The dtypes autocast casts (it leaves fp64 alone, as F.linear under autocast does).
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_dtype(tensor) -> torch.dtype | None:
    """Autocast's compute dtype if ``torch.autocast`` is enabled on ``tensor``'s device, else None."""
    if not isinstance(tensor, Tensor) or tensor.device.type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return None
    if not torch.is_autocast_enabled(tensor.device.type):
        return None
    return torch.get_autocast_dtype(tensor.device.type)


def _follows_autocast(*operands: str) -> Callable:
    """Decorate a loss entry point so that, inside an enabled ``torch.autocast``, its head operands (the named
    hidden states, weights and biases) are cast to autocast's dtype, as ``F.linear`` casts its inputs, and the call
    runs with autocast off (its fp32 accumulation and per-row math stay fp32). The casts are differentiable: an
    fp32 lm_head weight gets its gradient in fp32. Outside autocast the call is unchanged."""

    def decorate(loss_fn: Callable) -> Callable:
        positional = [
            name
            for name, parameter in inspect.signature(loss_fn).parameters.items()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]

        @functools.wraps(loss_fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get(positional[0])
            dtype = _autocast_dtype(first)
            if dtype is None:
                return loss_fn(*args, **kwargs)

            def cast(name: str, value):
                eligible = name in operands and isinstance(value, Tensor) and value.dtype in _AUTOCAST_ELIGIBLE
                return value.to(dtype) if eligible else value

            # Extra positional arguments are passed on untouched, for loss_fn to refuse.
            args = tuple(cast(positional[i] if i < len(positional) else "", value) for i, value in enumerate(args))
            kwargs = {name: cast(name, value) for name, value in kwargs.items()}
            with torch.autocast(first.device.type, enabled=False):
                return loss_fn(*args, **kwargs)

        return wrapper

    return decorate


@_follows_autocast(
    "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias"
)
def sdpo_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    mask: Tensor | None = None,
    target_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    topk: int | None = 100,
    add_tail: bool = True,
    alpha: float = 0.5,
    is_clip: float | None = 2.0,
    temperature: float = 1.0,
    reduction: str = "token-mean",
    normalizer: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    backend: str = "auto",
    return_outputs: bool = False,
    chunk_size: int | None = None,
) -> Tensor | SDPOOutput:
    """SDPO self-distillation loss from hidden states and lm_head weights, without ``[N, V]`` logits.

    Per completion token the student's next-token distribution is pulled toward the teacher's by a
    generalised Jensen-Shannon divergence over the student's top-K tokens (+ one tail bin holding the
    rest of the mass), weighted by a clipped importance ratio.

    Computes exactly: ``sdpo_ops.reference.sdpo_loss_reference(...)["loss"]`` (full logits, torch.topk,
    autograd), with at most ``O(chunk_size * V)`` extra memory.

    Args:
        student_hidden: [N, H] or [B, T, H], fp32/bf16/fp16: the student's last hidden states at the
            positions that predict the completion tokens. Receives a gradient.
        student_weight: [V, H], same dtype: the student's lm_head weight. Receives a gradient. Inside an enabled
            ``torch.autocast`` the dtypes may differ (bf16 hidden states, fp32 weight): hidden states, weights and
            biases are cast to autocast's dtype, as ``F.linear`` would, and the weight's gradient comes back fp32.
        teacher_hidden: [N, Ht] or [B, T, Ht] (same leading shape; Ht may differ from H): the teacher's.
        teacher_weight: [V, Ht]. The teacher never receives a gradient.
        student_bias, teacher_bias: [V] or None.
        mask: [N] or [B, T], 0/1: padding and samples without a teacher signal are 0.
        target_ids: [N] or [B, T] int: the sampled tokens (needed for IS and ``target_logprobs``), in [0, V) at
            unmasked positions; masked positions may hold anything (Hugging Face's ``-100``): an out-of-range id
            there reads as id 0.
        old_logprobs: [N] or [B, T]: the rollout policy's log-probs of ``target_ids`` (anything, NaN or -inf
            included, at masked positions).
        topk: K for the top-K support, or None for the full vocabulary.
        add_tail: append the tail bin (top-K only); otherwise renormalise the K log-probs.
        alpha: 0 = KL(teacher || student), 1 = KL(student || teacher), between = generalised JSD.
        is_clip: clip of the importance weight ``exp(logp - old_logprobs)``; None disables IS.
        temperature: both models' logits are divided by it (after the logit transform).
        reduction: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "sum" | "none".
        normalizer: replaces the outer denominator of the mean reductions (token count or sequence count),
            e.g. TRL's ``num_items_in_batch``.
        token_weights: [N] or [B, T], extra detached per-token weights.
        logit_scale, logit_softcap: heads that are not ``h W^T + b`` (Cohere, Granite, Gemma 2), for student
            and teacher alike, in TRL's order: ``y = (h W^T + b) * logit_scale``, then
            ``y = logit_softcap * tanh(y / logit_softcap)`` when set, then ``z = y / temperature``.
        backend: "auto" | "triton" | "torch" | "reference".
        return_outputs: return an :class:`SDPOOutput` instead of the loss tensor.
        chunk_size: token rows per chunk (default: a ``[C, V]`` fp32 buffer of 32 MiB on CPU, 224 MiB on GPU).

    Returns:
        The loss (0-dim, or per-token for ``reduction="none"``), or an :class:`SDPOOutput`.

    Example:
        >>> import torch
        >>> from sdpo_ops import sdpo_loss
        >>> hidden = torch.randn(6, 16, requires_grad=True)
        >>> weight = torch.randn(50, 16, requires_grad=True)
        >>> loss = sdpo_loss(hidden, weight, torch.randn(6, 16), torch.randn(50, 16), topk=5, is_clip=None)
        >>> loss.backward()
        >>> bool(loss > 0), hidden.grad.shape
        (True, torch.Size([6, 16]))
    """
    topk, alpha, is_clip, temperature, logit_scale, logit_softcap, chunk_size = static_options(
        topk, alpha, is_clip, temperature, logit_scale, logit_softcap, chunk_size
    )
    if not isinstance(student_hidden, Tensor):
        raise TypeError(f"student_hidden must be a torch.Tensor, got {type(student_hidden).__name__}")
    device = student_hidden.device
    _check_side("student", student_hidden, student_weight, student_bias, device)
    _check_side("teacher", teacher_hidden, teacher_weight, teacher_bias, device)
    leading_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading_shape:
        raise ValueError(
            f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must equal student_hidden's "
            f"{tuple(leading_shape)} (one teacher position per student position)"
        )
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"vocab mismatch: student_weight has V={vocab} rows, teacher_weight has {teacher_weight.shape[0]}"
        )
    per_token = {"mask": mask, "target_ids": target_ids, "old_logprobs": old_logprobs, "token_weights": token_weights}
    float_mask, target_ids = _checked_call(
        per_token, leading_shape, device, accumulation_dtype(student_hidden.dtype), vocab=vocab, topk=topk,
        alpha=alpha, is_clip=is_clip, temperature=temperature, reduction=reduction, normalizer=normalizer,
        backend=backend, logit_scale=logit_scale, logit_softcap=logit_softcap,
    )  # fmt: skip
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    policy = policy_for(device)
    if backend != "reference":
        backend = _fused_backend(backend, policy, student_hidden.dtype, topk)
    if backend == "reference":
        result = sdpo_loss_reference(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            mask=float_mask,
            target_ids=target_ids,
            old_logprobs=old_logprobs,
            topk=topk,
            add_tail=add_tail,
            alpha=alpha,
            is_clip=is_clip,
            temperature=temperature,
            reduction=reduction,
            normalizer=normalizer,
            token_weights=token_weights,
            logit_scale=float(logit_scale),
            logit_softcap=None if logit_softcap is None else float(logit_softcap),
        )
        return _package(result, return_outputs, target_ids, is_clip, float_mask)

    row_ops = _triton_row_ops(device) if backend == "triton" else torch_row_ops
    num_tokens = leading_shape.numel()
    # A scalar loss has a scalar upstream gradient: the Function folds the reduction into per-token
    # weights and forms the gradient in forward. "none" gets a per-token upstream gradient in backward.
    grad_in_forward = reduction != "none"
    row_weight = _row_weight(float_mask, reduction, normalizer, token_weights)
    options = FusedOptions(
        topk=topk,
        add_tail=add_tail,
        alpha=float(alpha),
        is_clip=None if is_clip is None else float(is_clip),
        temperature=float(temperature),
        grad_in_forward=grad_in_forward,
        chunk_size=chunk_size or chunk_rows_for_call(policy, num_tokens, vocab, student_hidden.shape[-1]),
        logit_scale=float(logit_scale),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        policy=policy,
    )
    fused = chunked_sdpo(
        student_hidden.reshape(num_tokens, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_hidden.detach().reshape(num_tokens, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        None if target_ids is None else target_ids.reshape(-1).long(),
        None if old_logprobs is None else old_logprobs.detach().reshape(-1),
        row_weight.reshape(-1),
        options,
        row_ops,
    )
    result = _fused_result(fused, float_mask, token_weights, use_is=old_logprobs is not None and is_clip is not None)
    return _package(result, return_outputs, target_ids, is_clip, float_mask)


def _row_weight(float_mask: Tensor, reduction: str, normalizer, token_weights: Tensor | None) -> Tensor:
    """The fused Functions' per-token ``row_weight``: mask x reduction coefficient x detached token weights."""
    row_weight = _reduction_coefficients(float_mask, reduction, normalizer)
    if token_weights is not None:
        row_weight = row_weight * token_weights.detach().to(float_mask.dtype)
    return row_weight


def _fused_result(fused: tuple, float_mask: Tensor, token_weights: Tensor | None, *, use_is: bool) -> dict:
    """The fused Functions' outputs, reshaped to the tokens' leading shape, as the dict ``_package`` reads."""
    loss, target_logprobs, teacher_target_logprobs, is_weight, topk_mass, divergence, entropy = fused
    leading_shape = float_mask.shape
    unreduced_weight = float_mask * is_weight.reshape(leading_shape)
    if token_weights is not None:
        unreduced_weight = unreduced_weight * token_weights.detach().to(float_mask.dtype)
    return {
        "loss": loss if loss.dim() == 0 else loss.reshape(leading_shape),
        "per_token_loss": torch.where(unreduced_weight != 0, unreduced_weight * divergence.reshape(leading_shape), 0.0),
        "target_logprobs": target_logprobs.reshape(leading_shape),
        "teacher_target_logprobs": teacher_target_logprobs.reshape(leading_shape),
        "is_weight": is_weight.reshape(leading_shape) if use_is else None,
        "topk_mass": topk_mass.reshape(leading_shape),
        "entropy": torch.where(float_mask != 0, entropy.reshape(leading_shape), 0.0),
    }


def _package(result: dict, return_outputs: bool, target_ids, is_clip, mask: Tensor) -> Tensor | SDPOOutput:
    if not return_outputs:
        return result["loss"]
    has_targets = target_ids is not None
    return SDPOOutput(
        loss=result["loss"],
        per_token_loss=result["per_token_loss"],
        target_logprobs=result["target_logprobs"] if has_targets else None,
        teacher_target_logprobs=result["teacher_target_logprobs"] if has_targets else None,
        is_weight=result["is_weight"],
        topk_mass=result["topk_mass"],
        metrics=_metrics(result["is_weight"], is_clip, result["topk_mass"], result["entropy"], mask),
        entropy=result["entropy"],
    )


def sdpo_loss_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    target_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    topk: int | None = 100,
    add_tail: bool = True,
    alpha: float = 0.5,
    is_clip: float | None = 2.0,
    temperature: float = 1.0,
    reduction: str = "token-mean",
    normalizer: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    return_outputs: bool = False,
) -> Tensor | SDPOOutput:
    """SDPO loss on already-materialised logits (``[N, V]`` or ``[B, T, V]``, student with gradient).

    For callers that have the logits anyway (small vocabularies, other frameworks). The logits are the raw
    head outputs: ``logit_scale`` / ``logit_softcap`` / ``temperature`` are applied here, as in
    :func:`sdpo_loss`. Same options and validation; computes exactly
    ``sdpo_ops.reference.sdpo_loss_reference_from_logits``.
    """
    topk, alpha, is_clip, temperature, logit_scale, logit_softcap = static_options(
        topk, alpha, is_clip, temperature, logit_scale, logit_softcap
    )
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    device = student_logits.device
    _check_tensor("teacher_logits", teacher_logits, device=device)
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating-point tensor, got {student_logits.dtype}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)} (same positions, same vocabulary)"
        )
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V] or [B, T, V], got shape {tuple(student_logits.shape)}")
    leading_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    per_token = {"mask": mask, "target_ids": target_ids, "old_logprobs": old_logprobs, "token_weights": token_weights}
    float_mask, target_ids = _checked_call(
        per_token, leading_shape, device, accumulation_dtype(student_logits.dtype), vocab=vocab, topk=topk,
        alpha=alpha, is_clip=is_clip, temperature=temperature, reduction=reduction, normalizer=normalizer,
        backend="reference", logit_scale=logit_scale, logit_softcap=logit_softcap,
    )  # fmt: skip
    result = sdpo_loss_reference_from_logits(
        student_logits,
        teacher_logits,
        mask=float_mask,
        target_ids=target_ids,
        old_logprobs=old_logprobs,
        topk=topk,
        add_tail=add_tail,
        alpha=alpha,
        is_clip=is_clip,
        temperature=temperature,
        reduction=reduction,
        normalizer=normalizer,
        token_weights=token_weights,
        logit_scale=float(logit_scale),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
    )
    return _package(result, return_outputs, target_ids, is_clip, float_mask)


_HIDDEN_ARGUMENTS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")


class SDPOLoss(torch.nn.Module):
    """Module form of :func:`sdpo_loss`: stores the options, holds no logic and no parameters.

    Example:
        >>> import torch
        >>> from sdpo_ops import SDPOLoss
        >>> criterion = SDPOLoss(topk=4, alpha=1.0, is_clip=None)
        >>> loss = criterion(torch.randn(3, 8), torch.randn(20, 8), torch.randn(3, 8), torch.randn(20, 8))
        >>> bool(loss >= 0)
        True
    """

    def __init__(self, **options):
        super().__init__()
        allowed = set(inspect.signature(sdpo_loss).parameters) - set(_HIDDEN_ARGUMENTS)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"SDPOLoss got unknown options {unknown}; allowed: {sorted(allowed)}")
        self.options = options

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, **overrides):
        return sdpo_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, **{**self.options, **overrides}
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
