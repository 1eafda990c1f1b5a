"""What a model's head does to ``last_hidden_state @ lm_head.weight^T (+ bias)``, read from its config.

One reading for both adapters (``sdpo_step`` and the TRL trainer), the same as TRL's ``add_fused_lm_head``
(``trl/trainer/utils.py``), so the fused loss sees the logits the model's own forward returns:

- a scale, the first of these set: ``logit_scale`` (Cohere, Cohere 2), ``output_multiplier`` (Muse Glimmer),
  ``lm_head_multiplier`` (Falcon-H1), all multipliers; ``logits_scaling``, a divisor (Granite:
  ``logits / config.logits_scaling``; MiniCPM3 divides the hidden state, the same for a bias-free head), except
  HyperCLOVA X (``model_type="hyperclovax"``), which multiplies by it;
- ``final_logit_softcapping`` (Gemma 2 and later): ``cap * tanh(logits / cap)``, after the scale.

They become :func:`sdpo_ops.sdpo_loss`'s ``logit_scale`` and ``logit_softcap``. A bad value is refused with a
``ValueError`` naming the config attribute. A transform the config does not declare is not in the config: each
adapter checks once that backbone + head + declared transform reproduce the model's own logits
(:func:`head_check_streams`, :func:`refuse_unreproduced_logits`). A quantised head is refused
(:func:`refuse_quantized_head`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdpo_ops.reference import transform_logits

__all__ = [
    "HEAD_CHECK_SEED",
    "LogitTransform",
    "common_logit_transform",
    "head_check_streams",
    "logit_transform",
    "refuse_quantized_head",
    "refuse_unreproduced_logits",
    "shared_logit_transform",
]

# TRL's precedence: the first attribute that is not None is the scale.
_MULTIPLIER_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier")
_DIVISOR_ATTRIBUTE = "logits_scaling"
_SOFTCAP_ATTRIBUTE = "final_logit_softcapping"
# Model types whose `logits_scaling` multiplies (modeling_hyperclovax.py: "cf. GraniteForCausalLM which divides").
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


@dataclass(frozen=True)
class LogitTransform:
    """A head's post-processing as :func:`sdpo_ops.sdpo_loss` applies it: ``y = raw * logit_scale``, then
    ``y = logit_softcap * tanh(y / logit_softcap)`` when set.

    Attributes:
        logit_scale: the multiplier (``1.0`` for none).
        logit_softcap: the cap, or None.
        declared_by: the config settings it was read from (``"config.logits_scaling=4.0"``), for messages.
    """

    logit_scale: float = 1.0
    logit_softcap: float | None = None
    declared_by: tuple[str, ...] = ()

    def loss_options(self) -> dict[str, float | None]:
        """The keyword arguments of :func:`sdpo_ops.sdpo_loss` that apply this transform."""
        return {"logit_scale": self.logit_scale, "logit_softcap": self.logit_softcap}

    def apply(self, raw_logits: Tensor) -> Tensor:
        """``raw_logits [..., V]`` (``hidden @ W^T + b``) transformed, fp32 at least: what the model returns."""
        return transform_logits(raw_logits, logit_scale=self.logit_scale, logit_softcap=self.logit_softcap)

    def describe(self) -> str:
        return ", ".join(self.declared_by) if self.declared_by else "no logit transform"


def _positive_finite(value: Any, attribute: str, model_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{model_name} sets config.{attribute}={value!r}: sdpo_ops needs a finite number > 0 there to reproduce "
            "its logits"
        )
    return float(value)


def logit_transform(model: nn.Module) -> LogitTransform:
    """The logit transform ``model``'s config (its text config, for multimodal models) declares.

    Args:
        model: the ``transformers`` causal LM (a PEFT wrapper forwards ``config``); no ``config``: no transform.

    Raises:
        ValueError: a declared scale or cap that is not a finite number > 0, naming the config attribute.
    """
    config = getattr(model, "config", None)
    if config is None:
        return LogitTransform()
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        config = get_text_config()
    model_name = type(model).__name__
    logit_scale, declared_by = 1.0, []
    for attribute in (*_MULTIPLIER_ATTRIBUTES, _DIVISOR_ATTRIBUTE):
        value = getattr(config, attribute, None)
        if value is None:
            continue
        value = _positive_finite(value, attribute, model_name)
        multiplies = getattr(config, "model_type", None) in _MULTIPLYING_LOGITS_SCALING
        divides = attribute == _DIVISOR_ATTRIBUTE and not multiplies
        logit_scale = 1.0 / value if divides else value
        declared_by.append(f"config.{attribute}={value!r}")
        break
    logit_softcap = getattr(config, _SOFTCAP_ATTRIBUTE, None)
    if logit_softcap is not None:
        logit_softcap = _positive_finite(logit_softcap, _SOFTCAP_ATTRIBUTE, model_name)
        declared_by.append(f"config.{_SOFTCAP_ATTRIBUTE}={logit_softcap!r}")
    return LogitTransform(logit_scale, logit_softcap, tuple(declared_by))


def common_logit_transform(student: LogitTransform, teacher: LogitTransform) -> LogitTransform:
    """The one transform both heads declare; ``ValueError`` if they differ (the fused loss applies one to both)."""
    if student.loss_options() != teacher.loss_options():
        raise ValueError(
            f"the student ({student.describe()}) and the teacher ({teacher.describe()}) "
            "post-process their logits differently; sdpo_ops' fused loss applies one logit transform to both"
        )
    return student


def shared_logit_transform(student: nn.Module, teacher: nn.Module) -> LogitTransform:
    """The transform of both models; ``ValueError`` if they differ (the fused loss applies one to both sides)."""
    return common_logit_transform(logit_transform(student), logit_transform(teacher))


# Tolerance of the one-off check that backbone + lm_head + declared transform reproduce the model's own logits.
# Both sides run the same matmul on the same hidden state, so any real undeclared transform (a scale, a cap)
# exceeds it by far.
_HEAD_CHECK_RTOL = 1e-3
# Both forwards of the check start from this seed, so their random draws (live dropout's included) repeat.
HEAD_CHECK_SEED = 0


@contextlib.contextmanager
def head_check_streams() -> Iterator[None]:
    """Forked random streams for the head check's two forwards, restored on exit: the training's draws are unchanged.

    The model keeps its mode: the check's forwards are of the kind the training runs itself, so they leave the model
    as a training step would. Eval mode is not neutral: bitsandbytes' CPU ``Linear4bit`` (0.50) repacks its 4-bit
    weight for inference, for good, on its first eval-mode forward without gradient (on CPUs with AVX512-BF16), and
    training on the repacked weight fails. Live dropout draws alike in both forwards instead: each starts from
    :data:`HEAD_CHECK_SEED` and draws in the same order (the backbone, then the model's own forward through it).
    """
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        yield


def holds_quantized_weight(module: nn.Module | None) -> bool:
    """Whether ``module``'s own ``weight`` is quantised: a bitsandbytes ``Params4bit`` (it carries a ``quant_state``,
    whatever its storage dtype) or an integer matrix (8-bit)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return False
    return not weight.dtype.is_floating_point or getattr(weight, "quant_state", None) is not None


def refuse_quantized_head(model: nn.Module, head: nn.Module | None) -> None:
    """Raise ``ValueError`` if ``model``'s output embedding ``head`` holds a quantised weight (a bitsandbytes 4-bit
    ``Params4bit``, packed in any storage dtype, or an 8-bit integer matrix).

    The fused loss multiplies the hidden states by ``head.weight`` itself; a quantised weight is not the ``[V, H]``
    matrix of the model's logits (4-bit: ``[V * H / 2, 1]`` packed bytes), and would fail deep in the loss with a
    shape error, or compute from the raw codes.
    """
    if not holds_quantized_weight(head):
        return
    weight = head.weight
    name = next((name for name, module in model.named_modules() if module is head), "the output embedding")
    raise ValueError(
        f"the lm_head of {type(model).__name__} (`{name}`, a {type(head).__module__}.{type(head).__name__} holding a "
        f"{weight.dtype} weight of shape {tuple(weight.shape)}) is quantised: the fused loss multiplies the hidden "
        "states by lm_head.weight itself and needs it unquantised. Leave the head out of quantisation: with "
        'bitsandbytes, BitsAndBytesConfig(..., llm_int8_skip_modules=["lm_head"]) (transformers skips the head by '
        "itself only when llm_int8_skip_modules is not set)."
    )


def refuse_unreproduced_logits(
    model: nn.Module, expected: Tensor, actual: Tensor, transform: LogitTransform, *, alternative: str
) -> None:
    """Raise ``ValueError`` unless ``actual`` (the declared transform of ``hidden @ W^T + b``) matches ``expected``
    (the model's own logits), both ``[..., V]``, to within the check's tolerance."""
    expected = expected.float()
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual.to(expected.device) - expected).abs().max()
    if not error <= _HEAD_CHECK_RTOL * scale:
        raise ValueError(
            f"{type(model).__name__}'s logits are not `last_hidden_state @ lm_head.weight^T + bias` with its declared "
            f"transform ({transform.describe()}; max difference {float(error):.3g} for logits up to "
            f"{float(scale):.3g}): the model transforms its logits in a way its config does not declare, which the "
            f"fused loss cannot reproduce. {alternative}"
        )
