"""Which models the fused loss can train: those whose logits are ``last_hidden_state @ lm_head.weight^T (+ bias)``.

One check for both adapters (``sdpo_step`` and the TRL trainer): a model whose config declares a post-lm_head
transform is refused with a ``ValueError`` naming the config attribute, before anything runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["LOGIT_TRANSFORM_ATTRIBUTES", "logit_transforms", "refuse_logit_transforms"]

# Config attributes by which transformers models post-process the lm_head output (TRL's list in
# `add_fused_lm_head`, plus Gemma's softcapping). Any of them set breaks `logits = hidden @ W^T + b`.
LOGIT_TRANSFORM_ATTRIBUTES = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def logit_transforms(config: Any) -> dict[str, Any]:
    """The logit post-processing a model config (or its text config) declares; ``{}`` for a plain linear head."""
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        configs.append(get_text_config())
    found = {}
    for cfg in configs:
        for name in LOGIT_TRANSFORM_ATTRIBUTES:
            value = getattr(cfg, name, None)
            # A scale of exactly 1 is the identity; softcapping has no neutral value.
            if value is not None and not (name != "final_logit_softcapping" and float(value) == 1.0):
                found[name] = value
    return found


def refuse_logit_transforms(model: nn.Module, *, role: str, alternative: str) -> None:
    """Raise ``ValueError`` if ``model``'s config declares a logit transform the fused loss would not apply.

    Args:
        model: the ``transformers`` causal LM (below any PEFT wrapper); a model without ``config`` passes.
        role: how the message names the model (``"student"``, ``"teacher"``).
        alternative: what to use instead, appended to the message.
    """
    config = getattr(model, "config", None)
    transforms = {} if config is None else logit_transforms(config)
    if transforms:
        settings = ", ".join(f"config.{name}={value!r}" for name, value in transforms.items())
        raise ValueError(
            f"the {role} model ({type(model).__name__}) sets {settings}: its logits are post-processed after the "
            "lm_head, which sdpo_ops' fused loss (logits = hidden @ lm_head.weight^T + bias) does not apply, so it "
            f"would train another objective. {alternative}"
        )
