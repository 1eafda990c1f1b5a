"""Sample routing (SRPO, arXiv:2604.02288): successful samples take the policy loss, failed ones the distillation.

SRPO argues that distilling already-correct samples toward a teacher that was shown a sibling's answer adds
optimisation ambiguity, while a failed sample is where the teacher's token-level correction is informative;
GRPO's group-relative reward, in turn, is what keeps the correct behaviour reinforced. Per sample ``i``:

- ``reward_i >= threshold`` (a success): the clipped policy-gradient loss with its group-relative advantage;
- a failure with a teacher signal (a successful sibling's demonstration or feedback): the self-distillation loss;
- a failure without a teacher signal: the policy loss (the fallback; in a group where every sample failed and
  the reward is binary its advantage is 0, so it contributes nothing).

Both losses share one normaliser, the completion tokens of the whole batch (a joint token mean), so a token
weighs the same whichever loss it took; there is no blend weight. This follows the paper's routing and
shared normalisation as its routing table is reproduced in public code (the paper's own text beyond its
abstract was not available to us).

Not implemented: SRPO's entropy-aware dynamic weighting of the distillation tokens (down-weighting tokens whose
teacher distribution has high entropy). We could not read its exact formula from the paper, and it needs the
teacher's entropy per token, which the fused pass does not compute. Per-token weights of one's own can be
passed to :func:`sdpo_ops.adapters.sdpo_step` as ``token_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SampleRouting:
    """What :func:`sdpo_ops.adapters.sdpo_step` needs to route the samples of a batch (see the module doc).

    Attributes:
        successful: ``[B]`` bool, the samples whose reward reached the success threshold.
        advantages: ``[B]`` (or ``[B, T]``) policy-gradient advantages, e.g. :func:`group_advantages`.
        epsilon_low, epsilon_high: the PPO clip range of the policy loss, ``[1 - low, 1 + high]``.
    """

    successful: Tensor
    advantages: Tensor
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2

    def __post_init__(self):
        if self.successful.dim() != 1:
            raise ValueError(f"successful must be [B], got shape {tuple(self.successful.shape)}")
        if self.advantages.dim() not in (1, 2) or self.advantages.shape[0] != self.successful.shape[0]:
            raise ValueError(
                f"advantages must be [B={self.successful.shape[0]}] or [B, T], got shape {tuple(self.advantages.shape)}"
            )
        if not (self.epsilon_low >= 0 and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {self.epsilon_low}, {self.epsilon_high}")


def group_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (TRL's formula): ``(r - group mean) / (group std + eps)`` (``scale=False``: no division).

    ``rewards`` is ``[B]`` with the ``group_size`` samples of each prompt consecutive; the std is unbiased, as
    ``torch.std`` and TRL compute it.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [B] with B a multiple of group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.view(-1)


def distillation_route(successful: Tensor, has_teacher: Tensor) -> Tensor:
    """``[B]`` float: 1 for the samples that take the distillation loss (failed, with a teacher signal), else 0."""
    if successful.shape != has_teacher.shape:
        raise ValueError(f"successful {tuple(successful.shape)} and has_teacher {tuple(has_teacher.shape)} differ")
    return ((~successful.bool()) & has_teacher.bool()).float()


def clipped_policy_loss_per_token(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    completion_mask: Tensor | None = None,
    sequence_level: bool = False,
) -> Tensor:
    """``[B, T]`` PPO-clipped policy loss ``-min(rho A, clip(rho, 1 - low, 1 + high) A)``, unmasked (TRL's).

    ``rho = exp(logprobs - old_logprobs)`` per token, or, with ``sequence_level`` (TRL's
    ``importance_sampling_level="sequence"``), the exponent of the mean log-ratio over ``completion_mask``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    if sequence_level:
        if completion_mask is None:
            raise ValueError("sequence_level needs completion_mask")
        log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(-1, keepdim=True).clamp(
            min=1.0
        )
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def routed_loss(
    policy_per_token: Tensor, distillation_per_token: Tensor, completion_mask: Tensor, to_distillation: Tensor
) -> Tensor:
    """The routed loss: each sample's tokens take one of the two per-token losses, over one joint token count.

    ``sum_i sum_t m_it [(1 - r_i) policy_it + r_i distillation_it] / sum_i sum_t m_it`` with ``r`` from
    :func:`distillation_route`; 0 (with zero gradients) for a batch without completion tokens.
    """
    mask = completion_mask.to(policy_per_token.dtype)
    route = to_distillation.to(policy_per_token.dtype).unsqueeze(1)
    total = (policy_per_token * mask * (1 - route)).sum() + (distillation_per_token * mask * route).sum()
    return total / mask.sum().clamp(min=1.0)
