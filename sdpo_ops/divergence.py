"""Per-row SDPO math on the support, from row statistics, shared by the chunked torch and Triton paths.

Both fused backends reduce a chunk of logits to a few numbers per row (student and teacher
log-sum-exp, the student's top-K logits and indices, the teacher's logits at those indices). Everything
after that is ``[C, K+1]`` work done here in torch, identical for both backends:

    s_k = z_k - lse(z),  t_k = u_k - lse(u)                      (k in the top-K set I)
    tail: bin log(1 - sum_k exp(l_k)), the top-K log-mass clamped at -1e-7 first
    no tail: l_k - logsumexp_{k in I} l_k
    D = GJSD_alpha(student bins, teacher bins), g_b = dD/ds_b

and the coefficients of the closed-form gradient w.r.t. the scaled student logits ``z`` (SPEC 2):

    dD/dz_j = sparse_j [j in I] - S_j * dense,   S = softmax(z)

with ``sparse = g~`` and ``dense = sum_k g~_k`` (tail; ``g~_k = g_k - g_tail S_k / (1 - P_K)`` unless
the mass was clamped), or ``sparse = g_k - q_k sum g`` and ``dense = 0`` (renormalised top-K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sdpo_ops.reference import TAIL_LOG_MASS_MAX


def _weighted_log_ratio(log_p: Tensor, log_r: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, p * (log p - log r))`` with ``0 * anything = 0``, so -inf logits stay finite."""
    p = log_p.exp()
    positive = p > 0
    return p, torch.where(positive, p * (log_p - log_r), torch.zeros_like(p))


def generalized_jsd_and_grad(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Generalised JSD over the last dim and its gradient w.r.t. the student log-probs.

    Returns ``(divergence [...], grad [..., B])``. ``alpha = 0`` is ``KL(q || p)`` with gradient
    ``-q``; ``alpha = 1`` is ``KL(p || q)`` with gradient ``p (log p - log q + 1)``; otherwise
    ``(1 - alpha) KL(p || m) + alpha KL(q || m)`` with gradient ``(1 - alpha) p (log p - log m)``.
    """
    if alpha == 0.0:
        q, terms = _weighted_log_ratio(teacher_logp, student_logp)
        return terms.sum(-1), -q
    if alpha == 1.0:
        p, terms = _weighted_log_ratio(student_logp, teacher_logp)
        return terms.sum(-1), terms + p
    log_m = torch.logaddexp(student_logp + math.log(1.0 - alpha), teacher_logp + math.log(alpha))
    _, student_terms = _weighted_log_ratio(student_logp, log_m)
    _, teacher_terms = _weighted_log_ratio(teacher_logp, log_m)
    divergence = (1.0 - alpha) * student_terms.sum(-1) + alpha * teacher_terms.sum(-1)
    return divergence, (1.0 - alpha) * student_terms


def _tail_log_mass(support_logp: Tensor) -> tuple[Tensor, Tensor]:
    """``(log(1 - sum exp(l)), clamped)`` for the bins of one side; ``clamped`` rows get no tail gradient."""
    log_mass = torch.logsumexp(support_logp, dim=-1)
    clamped = log_mass > TAIL_LOG_MASS_MAX
    return torch.log(-torch.expm1(torch.clamp(log_mass, max=TAIL_LOG_MASS_MAX))), clamped


@dataclass
class SupportDivergence:
    """What one chunk's rows need after the statistics: the loss and the gradient coefficients.

    divergence: [C] the GJSD per row (unweighted).
    sparse_grad: [C, K] dD/dz at the top-K columns (beyond the dense term).
    dense_grad: [C] the coefficient of ``-softmax(z)`` in dD/dz.
    topk_mass: [C] the student's probability captured by the top-K.
    """

    divergence: Tensor
    sparse_grad: Tensor
    dense_grad: Tensor
    topk_mass: Tensor


def topk_divergence(
    student_lse: Tensor,
    student_topk_logits: Tensor,
    teacher_lse: Tensor,
    teacher_topk_logits: Tensor,
    *,
    add_tail: bool,
    alpha: float,
) -> SupportDivergence:
    """GJSD on the top-K (+ tail) support from row statistics of scaled logits.

    student_lse, teacher_lse: [C]; student_topk_logits, teacher_topk_logits: [C, K] fp32, the student's
    top-K logits and the teacher's logits at the same columns (both already divided by the temperature).
    """
    student_logp = student_topk_logits - student_lse[:, None]
    teacher_logp = teacher_topk_logits - teacher_lse[:, None]
    topk_mass = student_logp.exp().sum(-1)
    if add_tail:
        student_tail, student_clamped = _tail_log_mass(student_logp)
        teacher_tail, _ = _tail_log_mass(teacher_logp)
        divergence, grad = generalized_jsd_and_grad(
            torch.cat([student_logp, student_tail[:, None]], -1),
            torch.cat([teacher_logp, teacher_tail[:, None]], -1),
            alpha,
        )
        # d tail / d s_k = -S_k / (1 - P_K) = -exp(s_k - tail); no tail gradient where the mass was clamped.
        tail_grad = torch.where(student_clamped, torch.zeros_like(student_tail), grad[:, -1])
        sparse = grad[:, :-1] - tail_grad[:, None] * torch.exp(student_logp - student_tail[:, None])
        return SupportDivergence(divergence, sparse, sparse.sum(-1), topk_mass)
    student_renorm = torch.log_softmax(student_topk_logits, dim=-1)
    teacher_renorm = torch.log_softmax(teacher_topk_logits, dim=-1)
    divergence, grad = generalized_jsd_and_grad(student_renorm, teacher_renorm, alpha)
    sparse = grad - student_renorm.exp() * grad.sum(-1, keepdim=True)
    return SupportDivergence(divergence, sparse, torch.zeros_like(divergence), topk_mass)
