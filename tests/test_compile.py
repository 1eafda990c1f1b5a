"""torch.compile over the torch backend: ``fullgraph=True`` traces the whole fused call (forward and backward).

Not covered yet (README, "Under torch.compile"): every new token count N compiles a new graph, because the chunk loop's
trip count is Python control flow that dynamo specialises.
"""

import pytest
import torch

from sdpo_ops import sdpo_loss

H, V, N = 16, 64, 12


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N, H, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(N, H, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64)
    target_ids = torch.randint(V, (N,), generator=generator)
    old_logprobs = -torch.rand(N, generator=generator, dtype=torch.float64) * 5
    mask = (torch.rand(N, generator=generator) > 0.2).double()
    return student_hidden, teacher_hidden, weight, target_ids, old_logprobs, mask


def _loss_and_grads(fn, student_hidden, teacher_hidden, weight, target_ids, old_logprobs, mask):
    student_hidden = student_hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = fn(student_hidden, weight, teacher_hidden, target_ids, old_logprobs, mask)
    loss.backward()
    return loss.detach(), student_hidden.grad, weight.grad


@pytest.mark.parametrize("topk", [8, None], ids=["topk", "full_vocab"])
def test_fullgraph_compile_equals_eager(topk):
    torch._dynamo.reset()

    def loss_fn(student_hidden, weight, teacher_hidden, target_ids, old_logprobs, mask):
        return sdpo_loss(
            student_hidden, weight, teacher_hidden, weight.detach(), target_ids=target_ids,
            old_logprobs=old_logprobs, mask=mask, topk=topk, backend="torch",
        )  # fmt: skip

    inputs = _inputs()
    eager = _loss_and_grads(loss_fn, *inputs)
    compiled = _loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend="eager"), *inputs)
    for expected, actual in zip(eager, compiled, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    assert eager[0] > 0  # a real loss, not the all-masked zero


class _TinyDistilledModel(torch.nn.Module):
    """A module whose forward ends in ``sdpo_loss`` (what a compiled training step looks like)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(H, H, dtype=torch.float64)
        self.lm_head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)

    def forward(self, student_inputs, teacher_hidden, target_ids):
        hidden = torch.tanh(self.body(student_inputs))
        return sdpo_loss(
            hidden, self.lm_head.weight, teacher_hidden, self.lm_head.weight.detach(),
            target_ids=target_ids, topk=8, backend="torch",
        )  # fmt: skip


def test_a_model_calling_sdpo_loss_compiles_fullgraph():
    torch._dynamo.reset()
    student_inputs, teacher_hidden, _, target_ids, _, _ = _inputs(1)
    model = _TinyDistilledModel()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    eager_loss = model(student_inputs, teacher_hidden, target_ids)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(student_inputs, teacher_hidden, target_ids)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=1e-14)
    for expected, actual in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
