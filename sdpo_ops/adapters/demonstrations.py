"""Which successful sibling rollout demonstrates the task to the teacher of each sample.

Rollouts come in groups of ``group_size`` consecutive samples that share a prompt (``[p0, p0, ..., p1,
p1, ...]``, the order of TRL and of verl's ``repeat(interleave=True)``). A rollout is *successful* when
its summed reward reaches ``success_threshold``. The demonstration of sample ``i`` is the first
successful rollout of its group, skipping ``i`` itself when ``dont_reprompt_on_self_success`` (the
official code and TRL). Successful samples are distilled too, from a sibling's success; a lone success
has no sibling to learn from and gets no demonstration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

# The official code's default threshold (rewards in [0, 1], "passes" at 0.5 and above).
OFFICIAL_SUCCESS_THRESHOLD = 0.5
# TRL's SDPOConfig.success_reward_threshold default.
TRL_SUCCESS_THRESHOLD = 1.0


def sequence_rewards(rewards: Sequence[float | None] | Tensor) -> list[float]:
    """One float per sample: token-level rewards (``[B, T]`` tensor) are summed over the last dimension.

    ``None`` (a reward function that abstains) becomes NaN, which never counts as a success.
    """
    if isinstance(rewards, Tensor):
        if rewards.dim() == 0 or rewards.dim() > 2:
            raise ValueError(f"rewards must be [B] or [B, T], got shape {tuple(rewards.shape)}")
        summed = rewards.detach().float().sum(-1) if rewards.dim() == 2 else rewards.detach().float()
        return summed.cpu().tolist()
    return [math.nan if reward is None else float(reward) for reward in rewards]


def successful(rewards: Sequence[float | None] | Tensor, success_threshold: float) -> list[bool]:
    """``reward >= success_threshold`` per sample (NaN and None are failures)."""
    return [reward >= success_threshold for reward in sequence_rewards(rewards)]


def select_demonstrations(
    rewards: Sequence[float | None] | Tensor,
    group_size: int,
    *,
    success_threshold: float = OFFICIAL_SUCCESS_THRESHOLD,
    dont_reprompt_on_self_success: bool = True,
) -> list[int | None]:
    """Index of the demonstration of each sample, or None where its group offers none.

    Args:
        rewards: ``[B]`` sequence rewards (floats, None, or a tensor), or a ``[B, T]`` tensor of token-level
            rewards (summed per sample). ``B`` is a multiple of ``group_size``.
        group_size: rollouts per prompt (TRL's ``num_generations``, verl's ``rollout.n``).
        success_threshold: minimum summed reward of a successful rollout (official 0.5, TRL 1.0).
        dont_reprompt_on_self_success: never use a sample as its own demonstration.

    Returns:
        ``B`` entries: the index (into the batch) of the first successful rollout of the sample's group
        other than itself, or None. Deterministic: the same rewards always give the same indices.

    Example:
        >>> select_demonstrations([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], 3)
        [1, 2, 1, 4, None, 4]
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    success = successful(rewards, success_threshold)
    if len(success) % group_size != 0:
        raise ValueError(f"the batch has {len(success)} rewards, not a multiple of group_size={group_size}")
    demonstrations: list[int | None] = []
    for index in range(len(success)):
        start = index - index % group_size
        candidates = (
            j
            for j in range(start, start + group_size)
            if success[j] and not (dont_reprompt_on_self_success and j == index)
        )
        demonstrations.append(next(candidates, None))
    return demonstrations
