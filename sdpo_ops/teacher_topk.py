"""The SDPO loss against a teacher that arrives as its own top-K log-probs (SPEC 3.2): served or cached teachers.

TRL's ``use_teacher_server=True`` and any offline distillation get, per token, the teacher's K most likely ids and
their log-probs over the teacher's full vocabulary (vLLM's ``logprobs``); no teacher hidden states, no teacher
lm_head. The fused path (``TeacherTopKSDPOFunction`` in ``sdpo_ops.chunked``) never builds the student's ``[N, V]``
logits either: per chunk one student GEMM, one row stage for the student's log-sum-exp and its logits at the
teacher's ids and at the target, the ``[C, K+1]`` row loss, and the gradient (3 GEMM-equivalents in all).

Validation and reductions are ``sdpo_loss``'s (``sdpo_ops.loss``); what is new is the teacher inputs' checks and
their sanitising: masked positions may hold server padding (``-inf`` log-probs, repeated or out-of-range ids) and
are replaced by a harmless stand-in (ids ``0..K-1``, log-probs 0: TRL's zeroing) before anything reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo_ops import row_ops as torch_row_ops
from sdpo_ops.chunked import FusedOptions, accumulation_dtype
from sdpo_ops.compiled_op import chunk_rows_for_call, compiles_as_op, static_options, teacher_topk_sdpo
from sdpo_ops.device_policy import policy_for
from sdpo_ops.loss import (
    SDPOOutput,
    _check_side,
    _check_tensor,
    _checked_call,
    _follows_autocast,
    _fused_backend,
    _fused_result,
    _package,
    _row_weight,
    _triton_row_ops,
)
from sdpo_ops.reference import sdpo_loss_reference_from_teacher_topk

# A log-prob above 0 is impossible; one this far above is not rounding (fp32 log_softmax rounds by ~1e-7; a bf16 or
# fp16 tensor by its epsilon, which is larger and used instead).
LOGPROB_ROUNDING = 1e-4


def _check_teacher_topk(logprobs, ids, student_hidden: Tensor, vocab: int) -> int:
    """Types, devices and shapes of the teacher's inputs; returns K."""
    device = student_hidden.device
    _check_tensor("teacher_topk_logprobs", logprobs, device=device)
    _check_tensor("teacher_topk_ids", ids, device=device)
    if not logprobs.is_floating_point():
        raise TypeError(f"teacher_topk_logprobs must be a floating-point tensor, got {logprobs.dtype}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    leading_shape = student_hidden.shape[:-1]
    if logprobs.dim() != student_hidden.dim() or logprobs.shape[:-1] != leading_shape:
        raise ValueError(
            f"teacher_topk_logprobs must be [{', '.join(map(str, leading_shape))}, K] (student_hidden's leading "
            f"shape, then K), got shape {tuple(logprobs.shape)}"
        )
    if ids.shape != logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids shape {tuple(ids.shape)} must equal teacher_topk_logprobs shape {tuple(logprobs.shape)}"
        )
    topk = logprobs.shape[-1]
    if not 1 <= topk <= vocab:
        raise ValueError(f"teacher_topk_ids must hold K in [1, V={vocab}] ids per position, got K={topk}")
    return topk


def _with_stand_ins(logprobs: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``[M, K]`` views with masked positions replaced: distinct in-range ids and log-probs 0 (TRL zeroes them), so
    neither a check nor a stage meets server padding there. ``mask``: ``[M]``, nonzero where the position counts."""
    num_tokens, topk = ids.shape[:-1].numel(), ids.shape[-1]
    keep = (mask.reshape(num_tokens, 1) != 0).expand(num_tokens, topk)
    stand_in_ids = torch.arange(topk, device=ids.device).expand(num_tokens, topk)
    ids = torch.where(keep, ids.reshape(num_tokens, topk).long(), stand_in_ids)
    return torch.where(keep, logprobs.detach().reshape(num_tokens, topk), 0.0), ids


def validate_teacher_topk(logprobs: Tensor, ids: Tensor, vocab: int, mask: Tensor | None = None) -> None:
    """Raise the ``ValueError`` :func:`sdpo_loss_from_teacher_topk` would for these teacher values: at unmasked
    positions ids in ``[0, vocab)`` and distinct, log-probs ``<= 0`` (up to rounding) and not NaN.

    Free on host tensors; on CUDA ones it is a host sync. A served teacher's data arrive on the host: check them
    there, before they move to the GPU, and call the loss with ``validate_teacher=False`` (its own check would be
    a sync that waits for the student's queued forward). Shapes are the loss's: ``[..., K]`` and ``mask`` ``[...]``.
    """
    if ids.shape != logprobs.shape or ids.dim() < 1:
        raise ValueError(f"teacher_topk_ids shape {tuple(ids.shape)} must equal teacher_topk_logprobs shape "
                         f"{tuple(logprobs.shape)}, [..., K]")  # fmt: skip
    if mask is None:
        mask = torch.ones(ids.shape[:-1], device=ids.device)
    elif mask.shape != ids.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(ids.shape[:-1])} (the teacher inputs' leading shape), "
                         f"got {tuple(mask.shape)}")  # fmt: skip
    _check_teacher_values(*_with_stand_ins(logprobs, ids, mask.to(ids.device)), vocab)


def _check_teacher_values(logprobs: Tensor, ids: Tensor, vocab: int) -> None:
    """At unmasked positions (masked rows were already replaced): ids in range and distinct, log-probs <= 0 up to
    rounding and not NaN. One host sync on CUDA, before any kernel runs; meta tensors (dry runs) hold no values."""
    if ids.device.type == "meta" or ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)
    ordered = ids.sort(-1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(-1).sum()
    not_a_number = logprobs.isnan().sum()
    largest = torch.where(logprobs.isnan(), -torch.inf, logprobs).amax()
    low, high, repeats, not_a_number, largest = torch.stack(
        [t.double() for t in (low, high, repeats, not_a_number, largest)]
    ).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(
            f"teacher_topk_ids must lie in [0, V={vocab}) at unmasked positions, "
            f"got values in [{int(low)}, {int(high)}]"
        )
    if repeats:
        raise ValueError(
            f"teacher_topk_ids repeat an id within a position at {int(repeats)} unmasked position(s): a teacher's "
            "top-K ids are distinct (a server that pads with id 0 returned fewer than K there: mask the position or "
            "ask for fewer log-probs)"
        )
    if not_a_number:
        raise ValueError(f"teacher_topk_logprobs holds {int(not_a_number)} NaN(s) at unmasked positions")
    rounding = max(LOGPROB_ROUNDING, torch.finfo(logprobs.dtype).eps)
    if largest > rounding:
        raise ValueError(
            f"teacher_topk_logprobs must be log-probabilities (<= 0), got {largest:.4g} at an unmasked position "
            "(logits instead of log-probs?)"
        )


@_follows_autocast("student_hidden", "student_weight", "student_bias")
def sdpo_loss_from_teacher_topk(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    *,
    student_bias: Tensor | None = None,
    mask: Tensor | None = None,
    target_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
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
    validate_teacher: bool = True,
) -> Tensor | SDPOOutput:
    """SDPO loss against a teacher given as its top-K log-probs and ids, without the student's ``[N, V]`` logits.

    The support is the teacher's K ids per token. The student's log-probs there are ``z[ids] - lse(z)`` with
    ``z`` its logits over the full vocabulary; then a tail bin on both sides (``add_tail``) or both renormalised
    over the K, the generalised JSD, the clipped importance weight from the student's log-prob of ``target_ids``,
    mask, token weights and reduction as :func:`sdpo_ops.sdpo_loss`. This is TRL's served-teacher loss
    (``SDPOTrainer._compute_server_distillation_loss``, ``distillation_mode="topk_logits"``).

    Computes exactly: ``sdpo_ops.reference.sdpo_loss_reference_from_teacher_topk(...)["loss"]``, with at most one
    ``[chunk, V]`` fp32 buffer (and the dZ staging) of extra memory.

    Args:
        student_hidden: [N, H] or [B, T, H], fp32/bf16/fp16: the student's last hidden states at the positions that
            predict the completion tokens. Receives a gradient.
        student_weight: [V, H], same dtype: the student's lm_head weight. Receives a gradient. Inside an enabled
            ``torch.autocast`` the head runs in autocast's dtype, as in :func:`sdpo_ops.sdpo_loss`.
        teacher_topk_logprobs: [N, K] or [B, T, K], floating, detached: the teacher's log-probs normalised over its
            full vocabulary (as vLLM returns them), at the same temperature as the student's.
        teacher_topk_ids: same shape, int, in [0, V), distinct per position: the teacher's top-K ids. At masked
            positions both may hold anything (``-inf``, repeated or out-of-range padding): they are never read.
        student_bias: [V] or None.
        mask: [N] or [B, T], 0/1: padding and samples without a teacher signal are 0.
        target_ids: [N] or [B, T] int: the sampled tokens (needed for IS and ``target_logprobs``); masked positions
            may hold anything (``-100``), as in :func:`sdpo_ops.sdpo_loss`.
        old_logprobs: [N] or [B, T]: the rollout policy's log-probs of ``target_ids``.
        add_tail: append the tail bin (the mass outside the K ids); otherwise renormalise the K log-probs.
        alpha: 0 = KL(teacher || student), 1 = KL(student || teacher), between = generalised JSD.
        is_clip: clip of the importance weight ``exp(logp - old_logprobs)``; None disables IS.
        temperature: the student's logits are divided by it (after the logit transform).
        reduction: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "sum" | "none".
        normalizer: replaces the outer denominator of the mean reductions (e.g. TRL's ``num_items_in_batch``).
        token_weights: [N] or [B, T], extra detached per-token weights.
        logit_scale, logit_softcap: the student head's transform, as in :func:`sdpo_ops.sdpo_loss`.
        backend: "auto" | "triton" | "torch" | "reference".
        return_outputs: return an :class:`SDPOOutput` (``teacher_target_logprobs`` None: not known here;
            ``topk_mass`` is the student's probability on the teacher's K ids).
        validate_teacher: check the teacher's values (:func:`validate_teacher_topk`): on CUDA tensors a host sync,
            which waits for everything queued before the call (the student's forward). False: the caller checked
            them already, on the host before they moved to the device (the TRL adapter's served teacher does);
            unchecked bad values give undefined results instead of a ``ValueError``. Shapes, dtypes, devices
            and ``target_ids`` are checked either way (no sync).

    Returns:
        The loss (0-dim, or per-token for ``reduction="none"``), or an :class:`SDPOOutput`.

    Example:
        >>> import torch
        >>> from sdpo_ops import sdpo_loss_from_teacher_topk
        >>> hidden = torch.randn(6, 16, requires_grad=True)
        >>> weight = torch.randn(50, 16, requires_grad=True)
        >>> teacher_ids = torch.randperm(50)[:4].repeat(6, 1)
        >>> teacher_logprobs = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1])).repeat(6, 1)
        >>> loss = sdpo_loss_from_teacher_topk(hidden, weight, teacher_logprobs, teacher_ids, is_clip=None)
        >>> loss.backward()
        >>> bool(loss > 0), weight.grad.shape
        (True, torch.Size([50, 16]))
    """
    alpha, is_clip, temperature, logit_scale, logit_softcap = static_options(
        alpha, is_clip, temperature, logit_scale, logit_softcap
    )
    if not isinstance(student_hidden, Tensor):
        raise TypeError(f"student_hidden must be a torch.Tensor, got {type(student_hidden).__name__}")
    device = student_hidden.device
    _check_side("student", student_hidden, student_weight, student_bias, device)
    vocab = student_weight.shape[0]
    topk = _check_teacher_topk(teacher_topk_logprobs, teacher_topk_ids, student_hidden, vocab)
    leading_shape = student_hidden.shape[:-1]
    dtype = accumulation_dtype(student_hidden.dtype)
    per_token = {"mask": mask, "target_ids": target_ids, "old_logprobs": old_logprobs, "token_weights": token_weights}
    float_mask, target_ids = _checked_call(
        per_token, leading_shape, device, dtype, vocab=vocab, topk=topk, alpha=alpha, is_clip=is_clip,
        temperature=temperature, reduction=reduction, normalizer=normalizer, backend=backend,
        logit_scale=logit_scale, logit_softcap=logit_softcap,
    )  # fmt: skip

    num_tokens = leading_shape.numel()
    logprobs, ids = _with_stand_ins(teacher_topk_logprobs, teacher_topk_ids, float_mask)
    # while compiling, the fused op checks them where their values are known (a host read here breaks the graph)
    if validate_teacher and not (compiles_as_op() and backend != "reference"):
        _check_teacher_values(logprobs, ids, vocab)
    logprobs = logprobs.to(dtype)

    policy = policy_for(device)
    if backend != "reference":
        # no top-K selection here (the teacher's ids are given): any K runs on the Triton kernels
        backend = _fused_backend(backend, policy, student_hidden.dtype, None)
    if backend == "reference":
        result = sdpo_loss_reference_from_teacher_topk(
            student_hidden,
            student_weight,
            logprobs.reshape(*leading_shape, topk),
            ids.reshape(*leading_shape, topk),
            student_bias=student_bias,
            mask=float_mask,
            target_ids=target_ids,
            old_logprobs=old_logprobs,
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
    options = FusedOptions(
        topk=topk,
        add_tail=add_tail,
        alpha=float(alpha),
        is_clip=None if is_clip is None else float(is_clip),
        temperature=float(temperature),
        # a scalar loss's gradient is formed in forward; "none" gets a per-token upstream gradient in backward
        grad_in_forward=reduction != "none",
        chunk_size=chunk_rows_for_call(policy, num_tokens, vocab, student_hidden.shape[-1]),
        logit_scale=float(logit_scale),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        policy=policy,
    )
    fused = teacher_topk_sdpo(
        student_hidden.reshape(num_tokens, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        logprobs,
        ids,
        None if target_ids is None else target_ids.reshape(-1).long(),
        None if old_logprobs is None else old_logprobs.detach().reshape(-1),
        _row_weight(float_mask, reduction, normalizer, token_weights).reshape(-1),
        options,
        row_ops,
        validate_teacher=validate_teacher,
    )
    result = _fused_result(fused, float_mask, token_weights, use_is=old_logprobs is not None and is_clip is not None)
    result["teacher_target_logprobs"] = None  # the teacher's log-prob of the target is not among its top-K inputs
    return _package(result, return_outputs, target_ids, is_clip, float_mask)
