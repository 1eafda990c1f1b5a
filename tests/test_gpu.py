"""The Triton backend at real shapes on CUDA (skipped cleanly without it).

bf16 inputs at H in {896, 4096}, V = 151936 (Qwen's vocabulary): loss and gradients of
``backend="triton"`` against the fp64 reference, with a norm-relative error bounded by the error of the
bf16 naive path against the same fp64 ground truth (CCE's principle), times the margin in tolerances.py.
"""

import pytest
import torch
from tolerances import LOW_PRECISION_FLOOR, LOW_PRECISION_MARGIN, norm_relative_error

from sdpo_ops import sdpo_loss

pytestmark = pytest.mark.gpu

VOCAB = 151936


def _inputs(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device="cuda") * scale).to(dtype)

    # Weight scale gives logits of std ~2-3, peaked enough that the top-100 holds real mass.
    return {
        "student_hidden": randn(num_tokens, hidden),
        "student_weight": randn(VOCAB, hidden, scale=hidden**-0.5 * 2.5),
        "teacher_hidden": randn(num_tokens, hidden),
        "teacher_weight": randn(VOCAB, hidden, scale=hidden**-0.5 * 2.5),
        "target_ids": torch.randint(0, VOCAB, (num_tokens,), generator=generator, device="cuda"),
        "old_logprobs": -torch.rand(num_tokens, generator=generator, device="cuda") * 12,
        "mask": (torch.rand(num_tokens, generator=generator, device="cuda") > 0.1).float(),
    }


def _loss_and_grads(inputs: dict, dtype: torch.dtype, backend: str, **options):
    hidden = inputs["student_hidden"].to(dtype).requires_grad_()
    weight = inputs["student_weight"].to(dtype).requires_grad_()
    loss = sdpo_loss(
        hidden,
        weight,
        inputs["teacher_hidden"].to(dtype),
        inputs["teacher_weight"].to(dtype),
        mask=inputs["mask"],
        target_ids=inputs["target_ids"],
        old_logprobs=inputs["old_logprobs"],
        backend=backend,
        **options,
    )
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("hidden", [896, 4096])
@pytest.mark.parametrize("options", [{"topk": 100}, {"topk": 20, "add_tail": False}, {"topk": None, "alpha": 0.5}])
def test_triton_bf16_matches_fp64_reference_within_naive_bf16_error(hidden, options):
    inputs = _inputs(256, hidden, torch.bfloat16)
    truth = _loss_and_grads(inputs, torch.float64, "reference", **options)
    naive = _loss_and_grads(inputs, torch.bfloat16, "reference", **options)
    fused = _loss_and_grads(inputs, torch.bfloat16, "triton", **options)
    for name, expected, baseline, actual in zip(
        ("loss", "grad hidden", "grad weight"), truth, naive, fused, strict=True
    ):
        bound = max(LOW_PRECISION_MARGIN * norm_relative_error(baseline, expected), LOW_PRECISION_FLOOR[torch.bfloat16])
        error = norm_relative_error(actual, expected)
        assert error <= bound, f"{name}: triton error {error:.3e} > bound {bound:.3e}"


def test_triton_fp32_matches_torch_backend_at_real_vocabulary():
    inputs = _inputs(64, 896, torch.float32)
    expected = _loss_and_grads(inputs, torch.float32, "torch", topk=100)
    actual = _loss_and_grads(inputs, torch.float32, "triton", topk=100)
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_a_call_makes_no_host_sync():
    # the target-id range check is a device-side assert on CUDA: a host sync would drain the queue (issue 9)
    inputs = _inputs(64, 896, torch.bfloat16)
    hidden = inputs["student_hidden"].requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = sdpo_loss(
            hidden, inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
            mask=inputs["mask"], target_ids=inputs["target_ids"], old_logprobs=inputs["old_logprobs"], topk=100,
        )  # fmt: skip
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and hidden.grad is not None


# --- issue 17: the CUDA path's own choices, on the GPU ----------------------------------------------------------

SMALL_VOCAB = 32000  # several chunks and several dW passes at a few thousand tokens


def _small_inputs(num_tokens: int, hidden: int = 256, vocab: int = SMALL_VOCAB, seed: int = 1):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.float64) * scale

    return {
        "student_hidden": randn(num_tokens, hidden),
        "student_weight": randn(vocab, hidden, scale=hidden**-0.5 * 2.5),
        "student_bias": randn(vocab, scale=0.3),
        "teacher_hidden": randn(num_tokens, hidden),
        "teacher_weight": randn(vocab, hidden, scale=hidden**-0.5 * 2.5),
        "target_ids": torch.randint(0, vocab, (num_tokens,), generator=generator, device="cuda"),
        "old_logprobs": -torch.rand(num_tokens, generator=generator, device="cuda", dtype=torch.float64) * 12,
        "mask": (torch.rand(num_tokens, generator=generator, device="cuda") > 0.1).float(),
    }


def _grads(inputs: dict, dtype: torch.dtype, backend: str, upstream: float = 1.0, **options):
    names = ("student_hidden", "student_weight", "student_bias")
    leaves = [inputs[name].to(dtype, copy=True).requires_grad_() for name in names]
    loss = sdpo_loss(
        leaves[0], leaves[1], inputs["teacher_hidden"].to(dtype), inputs["teacher_weight"].to(dtype),
        student_bias=leaves[2], mask=inputs["mask"], target_ids=inputs["target_ids"],
        old_logprobs=inputs["old_logprobs"].float(), backend=backend, **options,
    )  # fmt: skip
    (loss * upstream if loss.dim() == 0 else (loss * upstream).sum()).backward()
    return [loss.detach().double()] + [leaf.grad.double() / upstream for leaf in leaves]


def _within_naive_error(inputs: dict, dtype: torch.dtype, upstream: float = 1.0, **options) -> None:
    truth = _grads(inputs, torch.float64, "reference", **options)
    naive = _grads(inputs, dtype, "reference", upstream, **options)
    fused = _grads(inputs, dtype, "triton", upstream, **options)
    for name, expected, baseline, actual in zip(("loss", "dH", "dW", "db"), truth, naive, fused, strict=True):
        bound = max(LOW_PRECISION_MARGIN * norm_relative_error(baseline, expected), LOW_PRECISION_FLOOR[dtype])
        error = norm_relative_error(actual, expected)
        assert error <= bound, f"{name}: triton error {error:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_pass_dw_accumulation_matches_the_reference(dtype):
    # N=4096 at V=32000, H=256: chunks of 1824 rows; the 1 GiB budget would stage all three in one pass, so the
    # passes are capped at one chunk (1824, 1824, 448): beta=0 then beta=1 into the fp32 accumulator, the
    # fp32-output GEMM from bf16/fp16 operands (fp16: the 2^16 loss scale is the naive bar), the teacher's logits
    # in the staging's unfilled rows
    from dataclasses import replace

    from sdpo_ops.device_policy import policy_for, use_policy

    policy = replace(policy_for(torch.device("cuda")), dw_stage_rows=1)
    chunk = policy.chunk_rows(4096, SMALL_VOCAB, 256)
    assert policy.stage_rows(chunk, 4096, row_bytes=SMALL_VOCAB * 2, held_bytes=0) == chunk < 4096
    with use_policy(policy):
        _within_naive_error(_small_inputs(4096), dtype, 2.0**16, topk=100, normalizer=4096.0)


@pytest.mark.parametrize(
    "options",
    [
        {"topk": 100, "logit_softcap": 30.0, "temperature": 0.7},
        {"topk": 20, "reduction": "none"},
        {"topk": None, "alpha": 0.3},
    ],
    ids=["softcap", "reduction none", "full vocabulary"],
)
def test_bias_softcap_and_none_reduction_on_triton(options):
    _within_naive_error(_small_inputs(1024), torch.bfloat16, **options)


def test_teacher_topk_on_triton_without_a_host_sync():
    from sdpo_ops import sdpo_loss_from_teacher_topk, validate_teacher_topk

    inputs = _small_inputs(512)
    generator = torch.Generator().manual_seed(2)
    ids = torch.argsort(torch.rand(512, SMALL_VOCAB, generator=generator), -1)[:, :50]
    logprobs = torch.log_softmax(torch.randn(512, 50, generator=generator) * 2, -1) - 0.5
    validate_teacher_topk(logprobs, ids, SMALL_VOCAB, mask=inputs["mask"].cpu())  # on the host: no sync
    ids, logprobs = ids.cuda(), logprobs.cuda()

    def call(dtype, backend, **options):
        hidden = inputs["student_hidden"].to(dtype, copy=True).requires_grad_()
        loss = sdpo_loss_from_teacher_topk(
            hidden, inputs["student_weight"].to(dtype), logprobs, ids, mask=inputs["mask"],
            target_ids=inputs["target_ids"], old_logprobs=inputs["old_logprobs"].float(), backend=backend, **options,
        )  # fmt: skip
        loss.backward()
        return loss.detach().double(), hidden.grad.double()

    truth = call(torch.float64, "torch")
    naive = call(torch.bfloat16, "reference")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused = call(torch.bfloat16, "triton", validate_teacher=False)
        with pytest.raises(RuntimeError):  # the loss's own validation is a host sync
            call(torch.bfloat16, "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for expected, baseline, actual in zip(truth, naive, fused, strict=True):
        bound = max(LOW_PRECISION_MARGIN * norm_relative_error(baseline, expected), LOW_PRECISION_FLOOR[torch.bfloat16])
        assert norm_relative_error(actual, expected) <= bound


@pytest.mark.parametrize("leading", [(0,), (2, 0)])
def test_zero_tokens_give_zero_gradients_on_cuda(leading):
    from sdpo_ops import sdpo_loss_from_teacher_topk

    weight = torch.randn(SMALL_VOCAB, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(SMALL_VOCAB, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    hidden = torch.randn(*leading, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    garbage = torch.full((SMALL_VOCAB, 256), float("nan"), device="cuda")  # what an unset accumulator would return
    del garbage
    for call in (
        lambda: sdpo_loss(hidden, weight, hidden.detach(), weight.detach(), student_bias=bias, topk=100),
        lambda: sdpo_loss_from_teacher_topk(
            hidden, weight, torch.zeros(*leading, 4, device="cuda"),
            torch.zeros(*leading, 4, dtype=torch.int64, device="cuda"), student_bias=bias,
        ),
    ):  # fmt: skip
        weight.grad = bias.grad = hidden.grad = None
        loss = call()
        assert torch.equal(loss, torch.zeros((), device="cuda"))
        loss.backward()
        for leaf in (hidden, weight, bias):
            assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_fp64_on_cuda_takes_the_torch_path():
    inputs = _small_inputs(64)
    args = [inputs[name] for name in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    with pytest.raises(ValueError, match="torch.float64"):
        sdpo_loss(*args, topk=100, backend="triton")
    assert torch.equal(sdpo_loss(*args, topk=100), sdpo_loss(*args, topk=100, backend="torch"))
