"""From a Hugging Face causal LM and a batch of prompt + completion ids to the arguments of :func:`sdpo_ops.sdpo_loss`.

``sdpo_loss`` takes what the model's lm_head would read and the head itself, never the logits:

- the **last hidden states, after the final norm**: the backbone's ``last_hidden_state`` (``model.get_decoder()``,
  or ``model.model``), not ``output_hidden_states[-1]`` of some models, which is before the norm;
- **shifted by one**: the state at column ``p`` predicts the token at ``p + 1``, so with the completion in the last
  ``T`` columns of ``input_ids`` (columns ``L-T .. L-1``) the states are columns ``L-T-1 .. L-2``;
- the **lm_head's weight and bias**, and the **logit transform** the config declares (Gemma 2's
  ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...: :mod:`.heads`), which
  become ``sdpo_loss(..., logit_scale=..., logit_softcap=...)``.

:func:`head_inputs` does all of it for one model; :func:`sdpo_loss_arguments` joins a student's and a teacher's into
keyword arguments for ``sdpo_loss``. :func:`HeadInputs.logits` materialises what the model's own forward returns at
those positions (for checking, not for training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sdpo_ops.adapters.heads import LogitTransform, common_logit_transform, logit_transform, refuse_quantized_head

__all__ = [
    "HeadInputs",
    "backbone_and_head",
    "completion_hidden_states",
    "head_inputs",
    "positions_from_mask",
    "sdpo_loss_arguments",
]


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, Tensor, Tensor | None]:
    """``(backbone, lm_head weight [V, H], lm_head bias [V] or None)`` of a causal LM (or a PEFT wrapper).

    The backbone is the module that returns the final (normed) hidden states: ``model.get_decoder()``, else
    ``model.model``. Raises for an output embedding that is not a plain ``nn.Linear`` or is quantised.
    """
    backbone = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        backbone = get_decoder()
    if backbone is None or backbone is model:
        backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise TypeError(
            f"cannot find the backbone of {type(model).__name__}: expected model.get_decoder() or model.model "
            "returning the last hidden states"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    refuse_quantized_head(model, head)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the output embedding of {type(model).__name__} is {type(head).__name__}, not a plain torch.nn.Linear "
            "(an adapter on the lm_head, or no lm_head): the fused loss needs logits = hidden @ weight.T + bias"
        )
    return backbone, head.weight, head.bias


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` position ids that count only attended tokens, as ``model.generate`` assigns them.

    With left padding, ``arange(L)`` would shift every position by the padding width, so the same sequence
    would score differently depending on its batch neighbours.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_hidden_states(
    backbone: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_completion_tokens: int,
    *,
    position_ids_from_mask: bool = True,
) -> Tensor:
    """``[B, T, H]`` hidden states at the positions that predict the last ``T`` tokens of ``input_ids``.

    The state at column ``p`` predicts the token at ``p + 1``, so the completion's ``T`` tokens (columns
    ``[L - T, L)``) are predicted by columns ``[L - T - 1, L - 1)``.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids_from_mask:
        kwargs["position_ids"] = positions_from_mask(attention_mask)
    outputs = backbone(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[:, -num_completion_tokens - 1 : -1]


@dataclass
class HeadInputs:
    """One model's side of :func:`sdpo_ops.sdpo_loss`: what its lm_head reads at the completion positions.

    Attributes:
        hidden: ``[B, T, H]`` last hidden states (after the final norm) at the positions predicting the completion.
        weight: ``[V, H]`` the lm_head weight (the parameter itself: a student's gets its gradient).
        bias: ``[V]`` or None.
        transform: the head's logit transform, from the model's config.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    transform: LogitTransform

    def logits(self) -> Tensor:
        """``[B, T, V]`` fp32 logits: what the model's own forward returns at these positions. Materialises them;
        for checks and small vocabularies (:func:`sdpo_ops.sdpo_loss_from_logits`), not the fused path."""
        return self.transform.apply(nn.functional.linear(self.hidden, self.weight, self.bias))


def head_inputs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_completion_tokens: int,
    *,
    position_ids_from_mask: bool = True,
) -> HeadInputs:
    """Run ``model``'s backbone on prompt + completion and return its :class:`HeadInputs` for the completion.

    Args:
        model: a ``transformers`` causal LM (or a PEFT wrapper) whose logits are ``lm_head(last_hidden_state)``,
            optionally scaled and soft-capped as its config declares.
        input_ids: ``[B, L]`` prompt ids followed by completion ids; the completion is the last
            ``num_completion_tokens`` columns (right-pad completions, left-pad prompts).
        attention_mask: ``[B, L]``, 0 at padding.
        num_completion_tokens: ``T``, the completion's width.
        position_ids_from_mask: position ids counted from the attention mask (as ``generate`` assigns them), so
            left padding does not shift positions; False lets the model use ``arange(L)``.

    Runs with gradient unless called under ``torch.no_grad()`` (do that for a teacher).
    """
    backbone, weight, bias = backbone_and_head(model)
    hidden = completion_hidden_states(
        backbone, input_ids, attention_mask, num_completion_tokens, position_ids_from_mask=position_ids_from_mask
    )
    return HeadInputs(hidden=hidden, weight=weight, bias=bias, transform=logit_transform(model))


def sdpo_loss_arguments(student: HeadInputs, teacher: HeadInputs) -> dict[str, Any]:
    """Keyword arguments for :func:`sdpo_ops.sdpo_loss` from both sides: the hidden states, weights, biases (the
    teacher's detached) and the shared logit transform. Add ``mask``, ``target_ids``, ``old_logprobs`` and options.

    Raises:
        ValueError: the two heads declare different logit transforms (the fused loss applies one to both).
    """
    transform = common_logit_transform(student.transform, teacher.transform)

    def detached(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.detach()

    return {
        "student_hidden": student.hidden,
        "student_weight": student.weight,
        "student_bias": student.bias,
        "teacher_hidden": teacher.hidden.detach(),
        "teacher_weight": teacher.weight.detach(),
        "teacher_bias": detached(teacher.bias),
        **transform.loss_options(),
    }
