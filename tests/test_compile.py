"""torch.compile over the fused loss (``sdpo_ops.compiled_op``): ``fullgraph=True`` traces the whole call, forward
and backward, and a new token count N does not compile a new graph.

Recompiles are counted exactly with dynamo's ``CompileCounter`` (one count per graph handed to the backend) over
token counts that span one to five chunks of a forced small policy; every compiled result equals eager in float64
(the same computation: the compiled call runs the same chunk loop inside one op).
"""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from sdpo_ops import compiled_op, sdpo_loss, sdpo_loss_from_logits, sdpo_loss_from_teacher_topk
from sdpo_ops.chunked import FusedOptions
from sdpo_ops.device_policy import CPU_POLICY, use_policy

H, V, N = 16, 64, 12
SAME_COMPUTATION = {"rtol": 1e-12, "atol": 1e-14}
# 4 rows per chunk: the token counts below take 1 (N=3 is below a chunk) to 5 chunks, some ending in a partial one
SMALL_CHUNKS = replace(CPU_POLICY, chunk_bytes=4 * 4 * V)
TOKEN_COUNTS = (5, 9, 13, 3, 20)


def _inputs(seed: int = 0, num_tokens: int = N, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(num_tokens, H, generator=generator, dtype=dtype)
    teacher_hidden = torch.randn(num_tokens, H, generator=generator, dtype=dtype)
    weight = torch.randn(V, H, generator=generator, dtype=dtype)
    target_ids = torch.randint(V, (num_tokens,), generator=generator)
    old_logprobs = -torch.rand(num_tokens, generator=generator, dtype=dtype) * 5
    mask = (torch.rand(num_tokens, generator=generator) > 0.2).to(dtype)
    return student_hidden, teacher_hidden, weight, target_ids, old_logprobs, mask


def _loss_and_grads(fn, student_hidden, teacher_hidden, weight, target_ids, old_logprobs, mask, *, mark_dynamic=False):
    student_hidden = student_hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    if mark_dynamic:
        for tensor in (student_hidden, teacher_hidden, target_ids, old_logprobs, mask):
            torch._dynamo.mark_dynamic(tensor, 0)
    loss = fn(student_hidden, weight, teacher_hidden, target_ids, old_logprobs, mask)
    loss.backward()
    return loss.detach(), student_hidden.grad, weight.grad


def _assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **SAME_COMPUTATION)


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
    _assert_same(compiled, eager)
    assert eager[0] > 0  # a real loss, not the all-masked zero


def _distillation_and_policy_loss(reduction: str, backend: str = "torch"):
    """A trainer's step: the distillation loss and a policy term on ``target_logprobs`` from the same call (its
    gradient takes the recompute pass; ``reduction="none"`` takes it for the loss as well)."""

    def loss_fn(student_hidden, weight, teacher_hidden, target_ids, old_logprobs, mask):
        out = sdpo_loss(
            student_hidden, weight, teacher_hidden, weight.detach(), target_ids=target_ids, old_logprobs=old_logprobs,
            mask=mask, topk=8, reduction=reduction, backend=backend, return_outputs=True,
        )  # fmt: skip
        return out.loss.sum() - 0.5 * (out.target_logprobs * mask).sum()

    return loss_fn


# compiles over the five token counts: the default (automatic dynamic) compiles once for the first N, then once more,
# dynamic in N, when the second N differs; a dimension marked dynamic, or dynamic=True, compiles once
RECOMPILES = {"automatic dynamic": (None, False, 2), "mark_dynamic": (None, True, 1), "dynamic=True": (True, False, 1)}


@pytest.mark.parametrize("reduction", ["token-mean", "none"])
@pytest.mark.parametrize("mode", RECOMPILES)
def test_new_token_counts_do_not_recompile(mode, reduction):
    dynamic, mark_dynamic, expected_compiles = RECOMPILES[mode]
    torch._dynamo.reset()
    counter = CompileCounter()
    loss_fn = _distillation_and_policy_loss(reduction)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter, dynamic=dynamic)
    with use_policy(SMALL_CHUNKS):
        for seed, num_tokens in enumerate(TOKEN_COUNTS):
            inputs = _inputs(seed, num_tokens)
            _assert_same(
                _loss_and_grads(compiled, *inputs, mark_dynamic=mark_dynamic), _loss_and_grads(loss_fn, *inputs)
            )
    assert counter.frame_count == expected_compiles


def test_aot_autograd_traces_the_ops_backward_once():
    # aot_eager traces forward and backward into graphs (what inductor compiles): the op's backward, its in-place
    # hand-over of the formed gradients and the recompute op included, symbolic in N
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    loss_fn = _distillation_and_policy_loss("token-mean")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    with use_policy(SMALL_CHUNKS):
        for seed, num_tokens in enumerate(TOKEN_COUNTS):
            inputs = _inputs(seed, num_tokens)
            _assert_same(_loss_and_grads(compiled, *inputs, mark_dynamic=True), _loss_and_grads(loss_fn, *inputs))
    assert counter.frame_count == 1


def test_second_backward_through_a_retained_graph_recomputes():
    # dynamo's eager backend runs the op's autograd formula as eager runs the Function's: the first backward hands the
    # formed gradients over (scaled in place), the second recomputes them; both equal eager's
    torch._dynamo.reset()
    loss_fn = _distillation_and_policy_loss("token-mean")
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    student_hidden, teacher_hidden, weight, target_ids, old_logprobs, mask = _inputs(5)
    grads = []
    for fn in (compiled, loss_fn):
        hidden, head = student_hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = 3.0 * fn(hidden, head, teacher_hidden, target_ids, old_logprobs, mask)  # an upstream scale != 1
        first = torch.autograd.grad(loss, (hidden, head), retain_graph=True)
        grads.append((*first, *torch.autograd.grad(loss, (hidden, head))))
    _assert_same(*grads)
    _assert_same(grads[0][2:], grads[0][:2])


def test_inductor_compiles_once_over_token_counts():
    # inductor (C++ code on CPU) compiles the forward and backward graphs around the op (needs a C++ compiler)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    loss_fn = _distillation_and_policy_loss("token-mean")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    with use_policy(SMALL_CHUNKS):
        for seed, num_tokens in enumerate((5, 13, 3)):
            inputs = _inputs(seed, num_tokens)
            _assert_same(_loss_and_grads(compiled, *inputs, mark_dynamic=True), _loss_and_grads(loss_fn, *inputs))
    assert counter.frame_count == 1


class _TinyDistilledModel(torch.nn.Module):
    """A module whose forward ends in ``sdpo_loss`` (what a compiled training step looks like)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(H, H, dtype=torch.float64)
        self.lm_head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)

    def forward(self, student_inputs, teacher_hidden, target_ids, mask=None):
        hidden = torch.tanh(self.body(student_inputs))
        return sdpo_loss(
            hidden, self.lm_head.weight, teacher_hidden, self.lm_head.weight.detach(),
            target_ids=target_ids, mask=mask, topk=8, backend="torch",
        )  # fmt: skip


def _model_loss_and_grads(model, parameters, *inputs):
    loss = model(*inputs)
    return (loss.detach(), *torch.autograd.grad(loss, parameters))


def test_a_model_calling_sdpo_loss_compiles_fullgraph():
    torch._dynamo.reset()
    student_inputs, teacher_hidden, _, target_ids, _, _ = _inputs(1)
    model = _TinyDistilledModel()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    parameters = list(model.parameters())
    _assert_same(
        _model_loss_and_grads(compiled, parameters, student_inputs, teacher_hidden, target_ids),
        _model_loss_and_grads(model, parameters, student_inputs, teacher_hidden, target_ids),
    )


def test_a_compiled_model_over_new_sequence_lengths_compiles_twice():
    # [B, T, H] batches whose length T changes every step, as an RL trainer's completions do
    torch._dynamo.reset()
    model = _TinyDistilledModel()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    parameters = list(model.parameters())
    generator = torch.Generator().manual_seed(3)
    with use_policy(SMALL_CHUNKS):
        for length in (3, 7, 10, 5, 2):
            student_inputs = torch.randn(2, length, H, generator=generator, dtype=torch.float64)
            teacher_hidden = torch.randn(2, length, H, generator=generator, dtype=torch.float64)
            target_ids = torch.randint(V, (2, length), generator=generator)
            mask = (torch.rand(2, length, generator=generator) > 0.2).double()
            inputs = (student_inputs, teacher_hidden, target_ids, mask)
            _assert_same(
                _model_loss_and_grads(compiled, parameters, *inputs), _model_loss_and_grads(model, parameters, *inputs)
            )
    assert counter.frame_count == 2


def _teacher_topk(num_tokens: int, seed: int, topk: int = 6):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=generator)[:topk] for _ in range(num_tokens)])
    logprobs = torch.log_softmax(torch.randn(num_tokens, V, generator=generator, dtype=torch.float64), -1)
    return logprobs.gather(-1, ids), ids


def _served_teacher_loss(student_hidden, weight, teacher_logprobs, teacher_ids, target_ids, old_logprobs, mask):
    return sdpo_loss_from_teacher_topk(
        student_hidden, weight, teacher_logprobs, teacher_ids, target_ids=target_ids, old_logprobs=old_logprobs,
        mask=mask, backend="torch",
    )  # fmt: skip


def test_teacher_topk_entry_point_does_not_recompile():
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_served_teacher_loss, fullgraph=True, backend=counter)
    with use_policy(SMALL_CHUNKS):
        for seed, num_tokens in enumerate(TOKEN_COUNTS):
            student_hidden, _, weight, target_ids, old_logprobs, mask = _inputs(seed, num_tokens)
            teacher = _teacher_topk(num_tokens, seed)
            results = []
            for fn in (compiled, _served_teacher_loss):
                hidden, head = student_hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                loss = fn(hidden, head, *teacher, target_ids, old_logprobs, mask)
                results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, head))))
            _assert_same(*results)
    assert counter.frame_count == 2


def test_teacher_values_are_still_checked_under_compile():
    # eager checks them on the host before the loop; compiled, the op checks them where the values are known
    torch._dynamo.reset()
    compiled = torch.compile(_served_teacher_loss, fullgraph=True, backend="eager")
    student_hidden, _, weight, target_ids, old_logprobs, mask = _inputs(0, 5)
    logprobs, ids = _teacher_topk(5, 0)
    mask = torch.ones(5, dtype=torch.float64)
    ids[2, 1] = ids[2, 0]
    with pytest.raises(ValueError, match="teacher_topk_ids repeat an id"):
        compiled(student_hidden, weight, logprobs, ids, target_ids, old_logprobs, mask)


def test_logits_entry_point_compiles_dynamic_in_n():
    # the materialising reference: no fused loop; its logged entropy's row loop (eager) is one expression compiled
    torch._dynamo.reset()
    counter = CompileCounter()

    def loss_fn(student_logits, teacher_logits, target_ids):
        return sdpo_loss_from_logits(student_logits, teacher_logits, target_ids=target_ids, topk=4)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for seed, num_tokens in enumerate(TOKEN_COUNTS):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(2, num_tokens, V, generator=generator, dtype=torch.float64)
        target_ids = torch.randint(V, (num_tokens,), generator=generator)
        _assert_same([compiled(*logits, target_ids)], [loss_fn(*logits, target_ids)])
    assert counter.frame_count == 2


@pytest.mark.interpret
def test_triton_backend_compiles_once_over_token_counts():
    # the op runs the Triton row kernels (here under the interpreter) as eager does: the same numbers in fp32
    torch._dynamo.reset()
    counter = CompileCounter()
    loss_fn = _distillation_and_policy_loss("token-mean", backend="triton")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    with use_policy(SMALL_CHUNKS):
        for seed, num_tokens in enumerate((5, 9, 3)):
            inputs = _inputs(seed, num_tokens, dtype=torch.float32)
            _assert_same(_loss_and_grads(compiled, *inputs, mark_dynamic=True), _loss_and_grads(loss_fn, *inputs))
    assert counter.frame_count == 1


def test_the_ops_are_registered_on_this_torch():
    # without them compiled calls fall back to tracing the Functions (one graph per N): this torch must have them
    assert compiled_op._FUSED_OP._opoverload is torch.ops.sdpo_ops.fused_sdpo.default
    assert compiled_op._RECOMPUTE_OP._opoverload is torch.ops.sdpo_ops.recompute_student_gradients.default


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["scalar_loss", "per_token_loss"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_fused_op_fake_shapes_and_autograd_registration(dtype, grad_in_forward, teacher):
    # torch.library.opcheck: the schema, the autograd registration, and the fake implementation's outputs against
    # the real ones (shapes, dtypes, strides) at a chunk size the op resolves itself (0) and an explicit one. Its
    # aot_dispatch test is left out: it returns every output of the op from the compiled function, the formed
    # gradients too, which backward scales in place; the entry points never return them (AOT is tested above).
    generator = torch.Generator().manual_seed(4)
    num_tokens, topk = 7, 4
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, dtype=dtype, grad=False):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_(grad)

    student = (randn(num_tokens, H, grad=True), randn(V, H, grad=True), randn(V, grad=True))
    if teacher == "hidden":
        teacher_inputs = (randn(num_tokens, H), randn(V, H), None, None, None)
    else:
        ids = torch.stack([torch.randperm(V, generator=generator)[:topk] for _ in range(num_tokens)])
        teacher_inputs = (None, None, None, -torch.rand(num_tokens, topk, generator=generator, dtype=accumulate), ids)
    per_token = (
        torch.randint(V, (num_tokens,), generator=generator),
        -torch.rand(num_tokens, generator=generator, dtype=accumulate),
        torch.rand(num_tokens, generator=generator, dtype=accumulate),
    )
    for chunk_size in (0, 3):
        options = FusedOptions(
            topk=topk, add_tail=True, alpha=0.5, is_clip=2.0, temperature=1.0, chunk_size=chunk_size,
            grad_in_forward=grad_in_forward, policy=CPU_POLICY,
        )  # fmt: skip
        torch.library.opcheck(
            torch.ops.sdpo_ops.fused_sdpo.default,
            (*student, *teacher_inputs, *per_token, options, "torch", [True, True, True], teacher == "topk"),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
