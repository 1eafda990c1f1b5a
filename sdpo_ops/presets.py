"""Named option sets for :func:`sdpo_ops.sdpo_loss`, so a port from another implementation is one word.

``sdpo_loss(..., **TRL)`` computes TRL's ``SDPOConfig`` defaults (``distillation_mode="topk_logits"``): no tail bin,
``alpha=1`` (reverse KL), IS clip 2, the per-sequence mean. ``OFFICIAL`` is the official SDPO code's (verl): a tail
bin, ``alpha=0.5``, IS clip 2, the token mean; these are also ``sdpo_loss``'s own defaults. Neither sets ``topk``
(TRL requires ``distillation_topk`` to be set; verl's is 100, ``sdpo_loss``'s default): pass it beside the preset.
To change one of a preset's options, merge: ``sdpo_loss(..., **{**TRL, "alpha": 0.5})`` (``alpha=0.5`` beside
``**TRL`` repeats a keyword, a ``TypeError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["OFFICIAL", "TRL"]

TRL: Mapping[str, object] = MappingProxyType(
    {
        "add_tail": False,  # distillation_add_tail=False
        "alpha": 1.0,  # distillation_alpha=1.0
        "is_clip": 2.0,  # distillation_is_clip=2.0
        "temperature": 1.0,  # temperature=1.0
        "reduction": "seq-mean-token-mean",  # SDPOTrainer: each sequence's token mean, then the mean over sequences
    }
)

OFFICIAL: Mapping[str, object] = MappingProxyType(
    {
        "add_tail": True,  # distillation_add_tail=True
        "alpha": 0.5,  # alpha=0.5
        "is_clip": 2.0,  # is_clip=2.0
        "temperature": 1.0,  # the rollout temperature
        "reduction": "token-mean",  # loss_agg_mode="token-mean"
    }
)
