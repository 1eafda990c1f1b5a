"""Sample routing (SRPO): the routed loss against a hand computation, and sdpo_step's routing against the naive
reference on the models' full logits (the distillation) plus log_softmax (the policy loss)."""

import math

import pytest
import torch
from test_adapters_step import _batch, _completion_logits, _grads, _setup

from sdpo_ops.adapters import sdpo_step
from sdpo_ops.adapters.routing import (
    SampleRouting,
    clipped_policy_loss_per_token,
    distillation_route,
    group_advantages,
    routed_loss,
)
from sdpo_ops.reference import sdpo_loss_reference_from_logits


def test_routed_loss_by_hand():
    """Three samples of two tokens: a success (policy), a failure with a teacher (distillation), a failure without
    one (policy fallback, its second token padding). Every number below is worked out by hand."""
    successful = torch.tensor([True, False, False])
    has_teacher = torch.tensor([1.0, 1.0, 0.0])
    route = distillation_route(successful, has_teacher)
    assert route.tolist() == [0.0, 1.0, 0.0]

    old = torch.zeros(3, 2, dtype=torch.float64)
    logprobs = torch.tensor([[0.0, math.log(1.5)], [0.0, 0.0], [math.log(0.5), 0.0]], dtype=torch.float64)
    logprobs.requires_grad_(True)
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    policy = clipped_policy_loss_per_token(logprobs, old, advantages, epsilon_low=0.2, epsilon_high=0.2)
    # ratio 1 -> -A; ratio 1.5 with A=1 clipped to 1.2 -> -1.2; ratio 0.5 with A=2: min(1.0, 0.8 * 2) = 1.0 -> -1.0.
    expected_policy = torch.tensor([[-1.0, -1.2], [0.5, 0.5], [-1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(policy.detach(), expected_policy, rtol=0, atol=1e-12)

    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    distillation = torch.tensor([[9.0, 9.0], [0.3, 0.7], [9.0, 9.0]], dtype=torch.float64)
    loss = routed_loss(policy, distillation, mask, route)
    # (-1 - 1.2) from the success + (0.3 + 0.7) distilled + (-1.0) from the fallback's one real token, over 5 tokens.
    assert loss.item() == pytest.approx(-2.2 / 5, abs=1e-12)

    loss.backward()
    # Only unclipped policy tokens carry a gradient, d(-rho A)/d logprob = -rho A, over the 5 tokens.
    expected_grad = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-12)


def test_routed_loss_without_tokens_is_zero():
    policy = torch.ones(2, 3, requires_grad=True)
    loss = routed_loss(policy, torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    loss.backward()
    assert loss.item() == 0.0 and policy.grad.abs().sum().item() == 0.0


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # First group: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); the second is flat: all zero.
    scale = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([scale, -scale, -scale, scale, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5] + [0.0] * 4)
    )
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 3)


@pytest.mark.parametrize("options", [{"topk": 5}, {"topk": None, "alpha": 1.0, "temperature": 0.7}])
def test_sdpo_step_routing_matches_reference(options):
    """Routed sdpo_step == the reference divergence on the distilled samples + the clipped policy loss on
    log_softmax of the full logits elsewhere, over all completion tokens; same loss, same student gradients."""
    tokenizer, student, teacher = _setup()
    probe = _batch(tokenizer)
    # Rollout log-probs a little off the current ones: ratios away from 1, some clipped, IS weights active.
    generator = torch.Generator().manual_seed(7)
    old_logprobs = torch.randn(probe.completion_ids.shape, generator=generator) * 0.3 - 3.0
    batch = _batch(tokenizer, old_logprobs=old_logprobs)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    routing = SampleRouting(successful=rewards >= 0.5, advantages=group_advantages(rewards, 3))
    # Group 1: two successes (policy), a failure with a demonstration (distilled). Group 2: a failure with a
    # demonstration and one with feedback (distilled), the lone success (policy; it has no teacher anyway).
    assert batch.self_distillation_mask.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    route = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])

    student.zero_grad()
    result = sdpo_step(student, teacher, batch, routing=routing, **options)
    result.loss.backward()
    got_grads = _grads(student)

    student.zero_grad()
    width = batch.completion_ids.shape[1]
    temperature = options.get("temperature", 1.0)
    student_logits = _completion_logits(student, batch.input_ids, batch.attention_mask, width)
    with torch.no_grad():
        teacher_logits = _completion_logits(teacher.model, batch.teacher_input_ids, batch.teacher_attention_mask, width)
    completion_mask = batch.completion_mask.float()
    distilled = sdpo_loss_reference_from_logits(
        student_logits,
        teacher_logits,
        mask=completion_mask * route[:, None],
        target_ids=batch.completion_ids,
        old_logprobs=old_logprobs,
        reduction="sum",
        **options,
    )["loss"]
    logprobs = torch.log_softmax(student_logits / temperature, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = routing.advantages[:, None]
    policy = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    policy_sum = (policy * completion_mask * (1 - route)[:, None]).sum()
    expected = (distilled + policy_sum) / completion_mask.sum()
    expected.backward()
    expected_grads = _grads(student)

    torch.testing.assert_close(result.loss, expected, rtol=2e-5, atol=2e-6)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=2e-4, atol=2e-6, msg=name)
    assert result.metrics["routed_to_distillation_fraction"].item() == pytest.approx(0.5)
    # sdpo_step returns the student's entropy (full vocabulary, at the temperature) over the distilled tokens.
    log_p = torch.log_softmax(student_logits.detach() / temperature, -1)
    distilled_tokens = completion_mask * route[:, None]
    entropy = -(log_p.exp() * log_p).sum(-1) * distilled_tokens
    torch.testing.assert_close(result.output.entropy, entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        result.metrics["entropy_mean"], entropy.sum() / distilled_tokens.sum(), rtol=1e-4, atol=1e-6
    )
    # Both parts contribute: neither the policy nor the distillation side is empty or zero.
    assert distilled.item() > 0 and abs(policy_sum.item()) > 0
    assert ((ratio - 1).abs() > 0.2).any(), "no ratio reaches the clip range: the clipping would go untested"


def test_sdpo_step_routing_refuses_a_reduction():
    tokenizer, student, teacher = _setup()
    batch = _batch(tokenizer)
    routing = SampleRouting(successful=torch.zeros(6, dtype=torch.bool), advantages=torch.zeros(6))
    with pytest.raises(ValueError, match="reduction"):
        sdpo_step(student, teacher, batch, routing=routing, reduction="token-mean")
    with pytest.raises(ValueError, match="successful"):
        SampleRouting(successful=torch.zeros(6, 2, dtype=torch.bool), advantages=torch.zeros(6))
