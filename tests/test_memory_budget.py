"""Peak bytes a call allocates beyond its inputs, at the SPEC's target shape, without a GPU (issue 9, item 3).

On ``meta`` tensors (``bench.trace``) every allocation of the real host code happens at full size and costs
nothing. Budget (KERNELS.md, "Memory accounting"): the chunk buffers, the dZ staging buffer and the per-row
results stay under 1 GiB; beside them only the gradients (the fp32 dW accumulator, the returned dH and, in
backward, the returned bf16 dW) and a small slack.
"""

import torch

from bench.trace import trace
from sdpo_ops import sdpo_loss
from sdpo_ops.chunked import default_chunk_size
from sdpo_ops.device_policy import CUDA_POLICY

N, H, V, K = 8192, 4096, 151936, 100
GiB, MiB = 2**30, 2**20
SLACK = 16 * MiB


def _call(weight_dtype=torch.bfloat16):
    def empty(*shape, dtype=weight_dtype, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    # the inputs exist before the trace starts: only what the call allocates is counted
    hidden, weight, teacher_hidden, teacher_weight = (
        empty(N, H, grad=True),
        empty(V, H, grad=True),
        empty(N, H),
        empty(V, H),
    )
    target_ids, old_logprobs = empty(N, dtype=torch.int64), empty(N, dtype=torch.float32)
    return lambda: sdpo_loss(
        hidden, weight, teacher_hidden, teacher_weight, target_ids=target_ids, old_logprobs=old_logprobs,
        topk=K, backend="triton",
    )  # fmt: skip


def test_forward_extra_memory_is_chunk_buffers_plus_gradients():
    traced = trace(_call())
    chunk = default_chunk_size(N, V, H, torch.device("meta"))
    stage_rows = -(-CUDA_POLICY.dw_stage_rows // chunk) * chunk
    working = 2 * chunk * V * 4 + stage_rows * V * 2 + N * (K * 16 + 12 * 4) + 4 * chunk * (K + 1) * 4
    gradients = V * H * 4 + N * H * 2  # fp32 dW accumulator, bf16 dH
    assert working <= GiB
    assert traced.peak_extra_bytes["forward"] <= working + gradients + SLACK, traced.peak_extra_bytes


def test_backward_allocates_only_the_returned_gradient():
    # the formed gradients are scaled straight into the bf16 result: no fp32 [V, H] temporary
    traced = trace(_call())
    assert traced.peak_extra_bytes["backward"] <= V * H * 2 + N * H * 2 + SLACK, traced.peak_extra_bytes


def test_fp32_weight_gradient_is_the_accumulator_itself():
    traced = trace(_call(torch.float32))
    assert traced.peak_extra_bytes["backward"] <= SLACK, traced.peak_extra_bytes
