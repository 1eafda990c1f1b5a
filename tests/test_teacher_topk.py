"""``sdpo_loss_from_teacher_topk`` (a teacher given as its top-K log-probs) against TRL's served-teacher math.

The oracle is written here from TRL's own pieces (``trl.experimental.sdpo.loss_utils``: ``add_tail_bucket``,
``compute_divergence``, ``apply_importance_sampling_clipping``) in float64 on materialised student logits, with
``SDPOTrainer._compute_server_distillation_loss``'s masking (masked positions zeroed on both sides before the tail)
and the verl reductions written out; gradients come from autograd through it. The torch backend runs in float64,
Triton under the interpreter in fp32 on tiny shapes. Every fused call is split into chunks of 3 rows (the CPU chunk
budget is patched), so the chunk loop and the staging of dZ are exercised.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import ELEMENTWISE

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.sdpo.loss_utils import add_tail_bucket, apply_importance_sampling_clipping, compute_divergence
from trl.trainer.utils import entropy_from_logits

from bench.trace import trace
from sdpo_ops import device_policy, sdpo_loss, sdpo_loss_from_teacher_topk
from sdpo_ops.chunked import default_chunk_size
from sdpo_ops.device_policy import CPU_POLICY

FP64, FP32 = ELEMENTWISE[torch.float64], ELEMENTWISE[torch.float32]
ROWS_PER_CHUNK = 3
VOCAB = 37

# The interpreter evaluates IEEE arithmetic with numpy, which warns where a GPU is silent (masked lanes).
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(device_policy, "CPU_POLICY", replace(CPU_POLICY, chunk_bytes=ROWS_PER_CHUNK * 4 * VOCAB))


# ----------------------------------------------------------------------------------------------- the oracle


def trl_served_loss(student_logits, teacher_logprobs, teacher_ids, *, mask, target_ids, old_logprobs, add_tail,
                    alpha, is_clip, reduction, normalizer=None, token_weights=None):  # fmt: skip
    """TRL's ``_compute_server_distillation_loss`` (``topk_logits``) on ``[B, T, V]`` logits already transformed and
    divided by the temperature, generalised to the verl reductions and token weights of ``sdpo_loss``."""
    required = mask.bool()
    keep = required.unsqueeze(-1)
    log_probs = torch.log_softmax(student_logits, dim=-1)
    # TRL pads masked positions' ids with 0; ours may hold anything there
    ids = torch.where(keep, teacher_ids, torch.zeros_like(teacher_ids))
    student_topk = torch.where(keep, log_probs.gather(-1, ids), torch.zeros_like(teacher_logprobs))
    teacher_topk = torch.where(keep, teacher_logprobs, torch.zeros_like(teacher_logprobs))
    if add_tail:
        student_topk, teacher_topk = add_tail_bucket(student_topk), add_tail_bucket(teacher_topk)
    else:
        student_topk = student_topk - torch.logsumexp(student_topk, dim=-1, keepdim=True)
        teacher_topk = teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True)
    per_token = compute_divergence(student_topk, teacher_topk, alpha)
    target_logprobs = None
    if target_ids is not None:
        target_logprobs = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    if is_clip is not None and old_logprobs is not None:
        per_token = apply_importance_sampling_clipping(per_token, target_logprobs, old_logprobs, is_clip)
    if token_weights is not None:
        per_token = per_token * token_weights
    per_token = torch.where(required, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token, target_logprobs
    if reduction == "sum":
        return per_token.sum(), target_logprobs
    if reduction == "token-mean":
        denominator = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
        return per_token.sum() / denominator, target_logprobs
    per_sequence = per_token.sum(-1)
    if reduction == "seq-mean-token-mean":
        per_sequence = per_sequence / mask.sum(-1).clamp(min=1.0)
    denominator = per_sequence.shape[0] if normalizer is None else normalizer
    return per_sequence.sum() / denominator, target_logprobs


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    teacher_logprobs: torch.Tensor  # [B, T, K]
    teacher_ids: torch.Tensor  # [B, T, K]
    mask: torch.Tensor
    target_ids: torch.Tensor
    old_logprobs: torch.Tensor
    token_weights: torch.Tensor
    options: dict = field(default_factory=dict)


def make_inputs(*, batch=2, steps=5, hidden_size=6, topk=5, seed=0, dtype=torch.float64, bias=False,
                masked_garbage=True) -> Inputs:  # fmt: skip
    """Random student and a random teacher's true top-K (a different model's log-softmax, so its support is not the
    student's); the last positions of each sequence are padding holding server sentinels (``-inf`` log-probs, id 0
    repeated) or worse (ids out of range)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, steps, hidden_size, generator=generator, dtype=dtype)
    weight = torch.randn(VOCAB, hidden_size, generator=generator, dtype=dtype)
    teacher_logits = 2 * torch.randn(batch, steps, VOCAB, generator=generator, dtype=torch.float64)
    teacher_logprobs, teacher_ids = torch.log_softmax(teacher_logits, -1).topk(topk, dim=-1)
    mask = torch.ones(batch, steps, dtype=dtype)
    mask[0, -2:] = 0
    mask[-1, -1] = 0
    if masked_garbage:
        padding = mask == 0
        teacher_logprobs[padding] = -math.inf
        teacher_ids[padding] = 0
        teacher_ids[0, -1, -1] = VOCAB + 5  # out of range: never read
        teacher_ids[-1, -1, -1] = -3
    return Inputs(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        bias=torch.randn(VOCAB, generator=generator, dtype=dtype).requires_grad_() if bias else None,
        teacher_logprobs=teacher_logprobs.to(dtype),
        teacher_ids=teacher_ids,
        mask=mask,
        target_ids=torch.randint(VOCAB, (batch, steps), generator=generator),
        old_logprobs=torch.log(torch.rand(batch, steps, generator=generator, dtype=dtype)) - 1.0,
        token_weights=torch.rand(batch, steps, generator=generator, dtype=dtype) + 0.5,
    )


def _grads(tensors):
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def run_both(inputs: Inputs, *, backend, add_tail=True, alpha=0.5, is_clip=2.0, use_is=True, reduction="token-mean",
             normalizer=None, token_weights=False, temperature=1.0, logit_scale=1.0, logit_softcap=None,
             blend=False, upstream_seed=None):  # fmt: skip
    """(ours, TRL's): loss, target log-probs, the gradients of the student's hidden, weight (and bias); TRL's also the
    student's entropy (``entropy_from_logits``: what TRL's GRPOTrainer logs)."""
    params = [inputs.hidden, inputs.weight] + ([inputs.bias] if inputs.bias is not None else [])
    common = {
        "mask": inputs.mask,
        "target_ids": inputs.target_ids,
        "old_logprobs": inputs.old_logprobs if use_is else None,
        "add_tail": add_tail,
        "alpha": alpha,
        "is_clip": is_clip,
        "reduction": reduction,
        "normalizer": normalizer,
        "token_weights": inputs.token_weights if token_weights else None,
    }

    def objective(loss, target_logprobs):
        if upstream_seed is not None:  # a random upstream gradient: not the last op of the graph
            upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=loss.dtype)
            loss = loss * upstream
        return loss.sum() + (0.3 * target_logprobs.sum() if blend else 0.0)

    ours = sdpo_loss_from_teacher_topk(
        inputs.hidden, inputs.weight, inputs.teacher_logprobs, inputs.teacher_ids, student_bias=inputs.bias,
        temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap, backend=backend,
        return_outputs=True, **common,
    )  # fmt: skip
    objective(ours.loss, ours.target_logprobs).backward()
    our_grads = _grads(params)

    raw = torch.nn.functional.linear(inputs.hidden.double(), inputs.weight.double(), None if inputs.bias is None
                                     else inputs.bias.double()) * logit_scale  # fmt: skip
    if logit_softcap is not None:
        raw = logit_softcap * torch.tanh(raw / logit_softcap)
    double = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in common.items()
    }
    trl_loss, trl_target = trl_served_loss(
        raw / temperature, inputs.teacher_logprobs.double(), inputs.teacher_ids, **double
    )
    objective(trl_loss, trl_target).backward()
    trl_grads = _grads(params)
    trl_entropy = entropy_from_logits(raw.detach() / temperature)
    return (ours, our_grads), (trl_loss, trl_target, trl_grads, trl_entropy)


def assert_matches(inputs, tolerance, **options):
    (ours, our_grads), (trl_loss, trl_target, trl_grads, trl_entropy) = run_both(inputs, **options)
    assert torch.isfinite(ours.loss).all()
    torch.testing.assert_close(ours.loss.double(), trl_loss.detach(), **tolerance)
    torch.testing.assert_close(ours.target_logprobs.double(), trl_target.detach(), **tolerance)
    for ours_grad, trl_grad in zip(our_grads, trl_grads, strict=True):
        assert torch.isfinite(ours_grad).all()
        torch.testing.assert_close(ours_grad.double(), trl_grad.double(), **tolerance)
    for name, metric in ours.metrics.items():
        assert torch.isfinite(metric), name
    # the student's entropy over the full vocabulary, detached; exactly 0 at masked positions
    keep = inputs.mask.bool()
    assert not ours.entropy.requires_grad and ours.entropy.shape == inputs.mask.shape
    torch.testing.assert_close(ours.entropy[keep].double(), trl_entropy[keep], **tolerance)
    assert ours.entropy[~keep].eq(0).all()
    # metrics are averaged in fp32
    torch.testing.assert_close(ours.metrics["entropy_mean"].double(), trl_entropy[keep].mean(), **FP32)


# ----------------------------------------------------------------------------------------------- torch backend

OPTION_FAMILIES = {
    "tail, JSD, IS": {},
    "tail, forward KL": {"alpha": 0.0},
    "tail, reverse KL": {"alpha": 1.0},
    "renormalised, JSD": {"add_tail": False},
    "renormalised, forward KL, no IS": {"add_tail": False, "alpha": 0.0, "use_is": False},
    "renormalised, reverse KL": {"add_tail": False, "alpha": 1.0},
    "is_clip None": {"is_clip": None},
    "token weights": {"token_weights": True},
    "seq-mean-token-mean": {"reduction": "seq-mean-token-mean"},
    "seq-mean-token-sum": {"reduction": "seq-mean-token-sum"},
    "sum": {"reduction": "sum"},
    "token-mean, normalizer": {"normalizer": 17.0},
    "seq-mean-token-mean, tensor normalizer": {"reduction": "seq-mean-token-mean", "normalizer": torch.tensor(3.0)},
    "none, random upstream": {"reduction": "none", "upstream_seed": 4},
    "target log-prob blended": {"blend": True},
    "none, blended": {"reduction": "none", "upstream_seed": 5, "blend": True},
    "bias, temperature, scale, softcap": {"temperature": 0.7, "logit_scale": 1.3, "logit_softcap": 4.0},
}


@pytest.mark.parametrize("family", OPTION_FAMILIES)
def test_torch_backend_equals_trl_served_loss(family):
    options = dict(OPTION_FAMILIES[family])
    inputs = make_inputs(seed=list(OPTION_FAMILIES).index(family), bias="bias" in family)
    assert_matches(inputs, FP64, backend="torch", **options)


@settings(max_examples=25)
@given(
    flat=st.booleans(),
    topk=st.integers(1, 8),
    add_tail=st.booleans(),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    use_is=st.booleans(),
    reduction=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "none"]),
    token_weights=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_equals_trl_on_drawn_configurations(flat, topk, add_tail, alpha, use_is, reduction,
                                                          token_weights, seed):  # fmt: skip
    if flat and reduction.startswith("seq-"):
        reduction = "token-mean"  # [N] inputs have no sequences
    inputs = make_inputs(batch=2, steps=3, topk=topk, seed=seed)
    if flat:  # [N, *] inputs
        for name in (
            "hidden",
            "teacher_logprobs",
            "teacher_ids",
            "mask",
            "target_ids",
            "old_logprobs",
            "token_weights",
        ):
            value = getattr(inputs, name)
            value = value.detach().flatten(0, 1)
            setattr(inputs, name, value.requires_grad_() if name == "hidden" else value)
    options = {"add_tail": add_tail, "alpha": alpha, "use_is": use_is, "reduction": reduction}
    upstream = {"upstream_seed": seed} if reduction == "none" else {}
    assert_matches(inputs, FP64, backend="torch", token_weights=token_weights, **options, **upstream)


@pytest.mark.parametrize("family", ["tail, JSD, IS", "renormalised, reverse KL", "none, blended"])
def test_reference_backend_equals_trl_served_loss(family):
    assert_matches(make_inputs(seed=3), FP64, backend="reference", **OPTION_FAMILIES[family])


def test_outputs_report_the_students_mass_on_the_teachers_support():
    inputs = make_inputs(seed=8)
    out = sdpo_loss_from_teacher_topk(
        inputs.hidden, inputs.weight, inputs.teacher_logprobs, inputs.teacher_ids, mask=inputs.mask,
        target_ids=inputs.target_ids, old_logprobs=inputs.old_logprobs, return_outputs=True,
    )  # fmt: skip
    log_probs = torch.log_softmax(inputs.hidden.detach() @ inputs.weight.detach().T, -1)
    keep = inputs.mask.bool()
    expected_mass = log_probs.gather(-1, torch.where(keep[..., None], inputs.teacher_ids, 0)).exp().sum(-1)
    torch.testing.assert_close(out.topk_mass[keep], expected_mass[keep], **FP64)
    # metrics are averaged in fp32
    torch.testing.assert_close(out.metrics["topk_mass_mean"], expected_mass[keep].mean(), **FP32)
    ratio = torch.exp(log_probs.gather(-1, inputs.target_ids[..., None]).squeeze(-1) - inputs.old_logprobs)
    torch.testing.assert_close(out.is_weight, ratio.clamp(max=2.0), **FP64)
    assert out.teacher_target_logprobs is None
    assert torch.all(out.per_token_loss[~keep] == 0)


def test_adversarial_supports():
    """The student's argmax outside the teacher's support, the support at ids 0 and V-1, K = 1 and K = V."""
    inputs = make_inputs(seed=11, topk=4, masked_garbage=False)
    student_logits = inputs.hidden.detach() @ inputs.weight.detach().T
    argmax = student_logits.argmax(-1)
    ids = torch.empty_like(inputs.teacher_ids)
    for position in range(ids[..., 0].numel()):
        others = [v for v in (0, VOCAB - 1, 5, 9, 13, 21) if v != int(argmax.reshape(-1)[position])]
        ids.reshape(-1, 4)[position] = torch.tensor(others[:4])
    assert not (ids == argmax[..., None]).any()
    assert (ids == 0).any() and (ids == VOCAB - 1).any()
    inputs.teacher_ids = ids
    for options in ({}, {"add_tail": False, "alpha": 1.0}, {"alpha": 0.0, "blend": True}):
        assert_matches(inputs, FP64, backend="torch", **options)
    for topk in (1, VOCAB):
        assert_matches(make_inputs(seed=12, topk=topk), FP64, backend="torch")


def test_all_masked_gives_zero_loss_and_gradients():
    inputs = make_inputs(seed=13)
    inputs.mask.zero_()
    inputs.teacher_logprobs.fill_(-math.inf)
    out = sdpo_loss_from_teacher_topk(
        inputs.hidden, inputs.weight, inputs.teacher_logprobs, inputs.teacher_ids, mask=inputs.mask,
        target_ids=inputs.target_ids, old_logprobs=inputs.old_logprobs, return_outputs=True,
    )  # fmt: skip
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert torch.all(inputs.hidden.grad == 0) and torch.all(inputs.weight.grad == 0)
    assert all(torch.isfinite(metric) for metric in out.metrics.values())


def test_student_logits_equal_to_the_teacher_give_zero_loss():
    """The teacher's top-K of the student's own distribution: the divergence vanishes (a property, no oracle)."""
    inputs = make_inputs(seed=14, masked_garbage=False)
    own = torch.log_softmax(inputs.hidden.detach() @ inputs.weight.detach().T, -1).topk(5, dim=-1)
    for add_tail in (True, False):
        loss = sdpo_loss_from_teacher_topk(
            inputs.hidden, inputs.weight, own.values, own.indices, add_tail=add_tail, is_clip=None, reduction="sum"
        )
        assert abs(float(loss)) < 1e-12


# ----------------------------------------------------------------------------------------------- Triton


@pytest.mark.interpret
@pytest.mark.parametrize(
    "family",
    ["tail, JSD, IS", "renormalised, forward KL, no IS", "tail, reverse KL", "none, blended", "token weights",
     "bias, temperature, scale, softcap"],
)  # fmt: skip
def test_triton_backend_equals_trl_served_loss(family):
    inputs = make_inputs(batch=2, steps=4, hidden_size=4, topk=4, seed=21, dtype=torch.float32, bias="bias" in family)
    assert_matches(inputs, FP32, backend="triton", **OPTION_FAMILIES[family])


# ----------------------------------------------------------------------------------------------- validation


def _call(inputs: Inputs, **overrides):
    arguments = {
        "student_hidden": inputs.hidden,
        "student_weight": inputs.weight,
        "teacher_topk_logprobs": inputs.teacher_logprobs,
        "teacher_topk_ids": inputs.teacher_ids,
        "mask": inputs.mask,
        **overrides,
    }
    return sdpo_loss_from_teacher_topk(**arguments)


def _with(tensor: torch.Tensor, index, value) -> torch.Tensor:
    changed = tensor.clone()
    changed[index] = value
    return changed


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda i: {"teacher_topk_logprobs": i.teacher_logprobs[:, :-1]}, ValueError, "teacher_topk_logprobs must be"),
        (lambda i: {"teacher_topk_logprobs": i.teacher_logprobs[0]}, ValueError, "teacher_topk_logprobs must be"),
        (lambda i: {"teacher_topk_ids": i.teacher_ids[..., :-1]}, ValueError, "teacher_topk_ids shape"),
        (lambda i: {"teacher_topk_ids": i.teacher_ids.double()}, TypeError, "teacher_topk_ids must be an integer"),
        (lambda i: {"teacher_topk_logprobs": i.teacher_ids}, TypeError, "teacher_topk_logprobs must be a floating"),
        (lambda i: {"teacher_topk_logprobs": i.teacher_logprobs.tolist()}, TypeError, "teacher_topk_logprobs"),
        (lambda i: {"teacher_topk_ids": _with(i.teacher_ids, (1, 0, 2), VOCAB)}, ValueError, r"\[0, V=37\)"),
        (lambda i: {"teacher_topk_ids": _with(i.teacher_ids, (1, 0, 2), -1)}, ValueError, r"\[0, V=37\)"),
        (
            lambda i: {"teacher_topk_ids": _with(i.teacher_ids, (1, 0, 2), int(i.teacher_ids[1, 0, 0]))},
            ValueError,
            "teacher_topk_ids repeat an id",
        ),  # fmt: skip
        (lambda i: {"teacher_topk_logprobs": _with(i.teacher_logprobs, (1, 0, 2), 0.01)}, ValueError, r"<= 0"),
        (lambda i: {"teacher_topk_logprobs": _with(i.teacher_logprobs, (1, 0, 2), math.inf)}, ValueError, r"<= 0"),
        (lambda i: {"teacher_topk_logprobs": _with(i.teacher_logprobs, (1, 0, 2), math.nan)}, ValueError, "NaN"),
        (lambda i: {"student_weight": i.weight.float()}, TypeError, "student_weight dtype"),
        (lambda i: {"mask": i.mask[:, :-1]}, ValueError, "mask must have shape"),
        (lambda i: {"alpha": 1.5}, ValueError, "alpha"),
        (lambda i: {"target_ids": _with(i.target_ids, (0, 0), VOCAB)}, ValueError, "target_ids must lie"),
        (lambda i: {"old_logprobs": i.old_logprobs}, ValueError, "old_logprobs needs target_ids"),
        (lambda i: {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(change, error, message):
    inputs = make_inputs(seed=30)
    with pytest.raises(error, match=message):
        _call(inputs, **change(inputs))


def test_rounding_above_zero_and_padding_at_masked_positions_are_accepted():
    inputs = make_inputs(seed=31)  # masked positions hold -inf, repeated and out-of-range ids
    top = inputs.teacher_logprobs.clone()
    top[1, 0, 0] = 1e-6  # a log-prob of ~1 rounded above 0 by the server
    loss = _call(inputs, teacher_topk_logprobs=top)
    assert torch.isfinite(loss)
    loss_bf16 = _call(inputs, teacher_topk_logprobs=_with(inputs.teacher_logprobs, (1, 0, 0), 0.004).bfloat16())
    assert torch.isfinite(loss_bf16)  # within bf16's epsilon of 0


# ----------------------------------------------------------------------------------------------- memory, launches


def test_no_tensor_of_n_times_v_elements():
    from test_chunked import _LargestTensor

    inputs = make_inputs(batch=4, steps=6, seed=40)  # 24 tokens, chunks of 3 rows
    num_tokens = inputs.mask.numel()

    def largest_tensor(backend):
        recorder = _LargestTensor()
        with recorder:
            out = sdpo_loss_from_teacher_topk(
                inputs.hidden, inputs.weight, inputs.teacher_logprobs, inputs.teacher_ids, mask=inputs.mask,
                target_ids=inputs.target_ids, old_logprobs=inputs.old_logprobs, backend=backend, return_outputs=True,
            )  # fmt: skip
            (out.loss + out.target_logprobs.sum()).backward()
        return recorder.largest

    assert largest_tensor("reference") >= num_tokens * VOCAB  # the recorder sees a materialised [N, V]
    largest = largest_tensor("torch")
    assert largest < num_tokens * VOCAB
    assert largest <= max(ROWS_PER_CHUNK * VOCAB, VOCAB * inputs.hidden.shape[-1]), largest


# At the SPEC's target shape on meta tensors (bench.trace): what a served-teacher call of TRL's size costs.
N, H, V, K = 8192, 4096, 151936, 100
GiB, MiB = 2**30, 2**20


def _meta_call(weight_dtype=torch.bfloat16, num_tokens=N, **options):
    def empty(*shape, dtype=weight_dtype, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    hidden, weight = empty(num_tokens, H, grad=True), empty(V, H, grad=True)
    logprobs, ids = empty(num_tokens, K, dtype=torch.float32), empty(num_tokens, K, dtype=torch.int64)
    target_ids, old_logprobs = empty(num_tokens, dtype=torch.int64), empty(num_tokens, dtype=torch.float32)
    return lambda: sdpo_loss_from_teacher_topk(
        hidden, weight, logprobs, ids, target_ids=target_ids, old_logprobs=old_logprobs, backend="triton", **options
    )


def test_meta_trace_one_chunk_buffer_three_kernels_three_gemms():
    traced = trace(_meta_call())
    chunk = default_chunk_size(N, V, H, torch.device("meta"))
    chunks = -(-N // chunk)
    # no teacher logits: the budget holds 7 chunks of dZ per pass beside the student's buffer, and the 22 chunks take
    # 4 passes of 6, 6, 5, 5 chunks (the staging holds 6)
    assert traced.dw_pass_rows(V, H) == [2304, 2304, 1920, 1664]
    stage_rows = 6 * chunk
    # one fp32 [C, V] buffer (no teacher buffer), the dZ staging, per-row results and the sanitised teacher inputs
    working = chunk * V * 4 + stage_rows * V * 2 + N * K * (8 + 4 + 4) + N * 12 * 4
    gradients = V * H * 4 + N * H * 2  # fp32 dW accumulator, bf16 dH
    assert traced.peak_extra_bytes["forward"] <= working + gradients + 16 * MiB, traced.peak_extra_bytes
    assert working <= GiB
    triton_forward = [step.name for step in traced.steps if step.kind == "triton" and step.phase == "forward"]
    # the row loss runs in the stats kernel's epilogue: two row kernels per chunk
    assert triton_forward == ["_teacher_row_stats_kernel", "_logit_grad_kernel"] * chunks
    # student logits, dH, dW: one GEMM fewer than sdpo_loss with a teacher lm_head
    assert sum(step.flops for step in traced.steps) == 3 * 2 * N * H * V
    hidden_teacher = trace(
        lambda: sdpo_loss(
            *(torch.empty(*s, dtype=torch.bfloat16, device="meta", requires_grad=g)
              for s, g in (((N, H), True), ((V, H), True), ((N, H), False), ((V, H), False))),
            topk=K, backend="triton",
        )
    )  # fmt: skip
    assert sum(step.flops for step in hidden_teacher.steps) == 4 * 2 * N * H * V
    assert traced.launches() < hidden_teacher.launches()


def test_meta_trace_backward_allocates_only_the_returned_gradient():
    traced = trace(_meta_call())
    assert traced.peak_extra_bytes["backward"] <= V * H * 2 + N * H * 2 + 16 * MiB, traced.peak_extra_bytes


def test_docstring_example_runs():
    import doctest

    import sdpo_ops.teacher_topk

    results = doctest.testmod(sdpo_ops.teacher_topk, verbose=False, report=True)
    assert results.attempted >= 1 and results.failed == 0


def test_bench_contenders_compute_the_same_loss_and_gradients():
    """bench.teacher_topk's two contenders (ours and TRL's materialised path) on the bench's own inputs."""
    from bench.shapes import Case, Shape
    from bench.teacher_topk import LOSSES, served_inputs

    case = Case(Shape("tiny", 40, 8, 64), topk=6)
    results = []
    for name, loss_fn in LOSSES.items():
        inputs, logprobs, ids = served_inputs(case, seed=1)
        loss = loss_fn(inputs, logprobs, ids, case)
        loss.backward()
        results.append((name, loss.detach(), inputs.student_hidden.grad, inputs.student_weight.grad))
    (_, *ours), (_, *theirs) = results
    for mine, trl in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, trl, **FP32)


def test_meta_trace_extra_memory_is_flat_in_n():
    """4x the tokens: the peak grows by per-token rows (dH, the row outputs, the sanitised teacher inputs), never
    by anything of the vocabulary's size."""
    peaks = {n: trace(_meta_call(num_tokens=n)).peak_extra_bytes["forward"] for n in (N, 4 * N)}
    per_token = H * 2 + K * (8 + 4 + 4 + 8) + 16 * 4  # dH bf16; ids, log-probs, sparse grad, sort scratch; rows
    assert peaks[4 * N] - peaks[N] <= 3 * N * per_token, peaks
    assert 50 * per_token < V * 4  # the bound is tight enough: one fp32 [N, V] would exceed it fifty-fold
