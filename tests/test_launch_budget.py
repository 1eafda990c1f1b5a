"""Kernel launches of one call at the SPEC's target shape, counted without a GPU (issue 9, item 2).

The call runs on ``meta`` tensors (``bench.trace``): the host orchestration, the launchers and every aten op
run as on CUDA, nothing is computed. Counted: aten ops that launch a GPU kernel, and Triton launches. A
launch costs ~2-5 us; before the row-loss kernel a top-K chunk took ~90 of them.
"""

import pytest
import torch

from bench.trace import trace
from sdpo_ops import sdpo_loss
from sdpo_ops.chunked import default_chunk_size

N, H, V = 8192, 4096, 151936
# Per chunk on the CUDA path (issue 9: at most 12); per call: validation, reduction weights, outputs, metrics.
LAUNCHES_PER_CHUNK = 12
LAUNCHES_PER_CALL = 24


def _inputs(**options):
    def empty(*shape, dtype=torch.bfloat16, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    return {
        "student_hidden": empty(N, H, grad=True),
        "student_weight": empty(V, H, grad=True),
        "teacher_hidden": empty(N, H),
        "teacher_weight": empty(V, H),
        "target_ids": empty(N, dtype=torch.int64),
        "old_logprobs": empty(N, dtype=torch.float32),
        "backend": "triton",
        **options,
    }


CHUNKS = -(-N // default_chunk_size(N, V, H, torch.device("meta")))
MODES = {
    "top-K, scalar reduction": ({"topk": 100}, None),
    "top-K 256, no tail, reverse KL": ({"topk": 256, "add_tail": False, "alpha": 1.0}, None),
    "full vocabulary": ({"topk": None}, None),
    "softcapped head (Gemma 2), T != 1": ({"topk": 100, "logit_softcap": 30.0, "temperature": 0.7}, None),
    "reduction='none' (recompute in backward)": (
        {"topk": 100, "reduction": "none"},
        lambda loss: loss.sum().backward(),
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_launches_per_chunk_within_budget(mode):
    options, backward = MODES[mode]
    traced = trace(lambda: sdpo_loss(**_inputs(**options)), backward)
    for phase in ("forward", "backward"):
        launches = traced.launches(phase)
        assert launches <= LAUNCHES_PER_CHUNK * CHUNKS + LAUNCHES_PER_CALL, f"{phase}: {launches} over {CHUNKS} chunks"
    # per chunk in forward: the student's stats with the teacher's and (top-K) the row loss fused in; in
    # full-vocabulary mode the divergence and the row loss after it; and the logit gradient when it is formed in
    # forward (a scalar reduction); nothing more
    triton = [step for step in traced.steps if step.kind == "triton" and step.phase == "forward"]
    full_vocab = options["topk"] is None
    per_chunk = 1 + 2 * full_vocab + (options.get("reduction") != "none")
    assert not [step for step in triton if step.name == "_teacher_row_stats_kernel"]
    assert bool([step for step in triton if step.name == "_row_loss_kernel"]) == full_vocab
    assert len(triton) == per_chunk * CHUNKS


def test_target_logprob_gradient_adds_one_recompute_pass():
    def forward():
        out = sdpo_loss(**_inputs(topk=100), return_outputs=True)
        return out.loss + out.target_logprobs.sum()

    traced = trace(forward)
    backward_triton = [step.name for step in traced.steps if step.kind == "triton" and step.phase == "backward"]
    assert backward_triton == ["_logit_grad_kernel"] * CHUNKS
    assert traced.launches("backward") <= LAUNCHES_PER_CHUNK * CHUNKS + LAUNCHES_PER_CALL


def test_no_gradient_work_without_a_gradient():
    inputs = _inputs(topk=100)
    for name in ("student_hidden", "student_weight"):
        inputs[name] = inputs[name].detach()
    with torch.no_grad():
        traced = trace(lambda: sdpo_loss(**inputs), backward=lambda loss: None)
    assert not [step for step in traced.steps if step.name == "_logit_grad_kernel"]
    assert not [step for step in traced.steps if step.flops and step.shapes and step.shapes[0] == (V, H)]


def test_entropy_is_written_by_the_counted_stats_launches():
    # SDPOOutput.entropy costs no launch: the student's stats kernel of each chunk writes it (a top-K teacher's
    # stats kernel, which reads the student's buffer, likewise)
    from sdpo_ops import sdpo_loss_from_teacher_topk
    from sdpo_ops.kernels.launch import record_launches

    inputs = _inputs(topk=100)
    with record_launches() as records:
        sdpo_loss(**inputs)
    stats = [record for record in records if record.name == "_student_row_stats_kernel"]
    assert len(stats) == CHUNKS and all(record.args["HAS_ENTROPY"] and record.args["HAS_TEACHER"] for record in stats)

    teacher = {"teacher_topk_logprobs": torch.empty(N, 100, device="meta"),
               "teacher_topk_ids": torch.empty(N, 100, dtype=torch.int64, device="meta")}  # fmt: skip
    student = {name: inputs[name] for name in ("student_hidden", "student_weight", "target_ids", "backend")}
    with record_launches() as records:
        sdpo_loss_from_teacher_topk(**student, **teacher)
    stats = [record for record in records if record.name == "_teacher_row_stats_kernel"]
    assert len(stats) == CHUNKS and all(record.args["HAS_ENTROPY"] for record in stats)
