"""``bench.memory_table``, the README's memory figures: its prices hold the bounds that follow from the shapes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import memory_table  # noqa: E402
from sdpo_ops.device_policy import CUDA_POLICY  # noqa: E402

H = memory_table.LOSS_HIDDEN_SIZE


@pytest.mark.parametrize("vocab", [32768, 151936])
def test_loss_prices_follow_the_shapes(vocab):
    small, large = 4096, 65536
    # The materialised loss holds at least the student's and the teacher's fp32 [N, V] log-probs.
    assert memory_table.loss_peak_bytes(large, vocab, H, fused=False) >= 2 * large * vocab * 4
    # The fused loss grows with N only by per-row terms (dH in bf16, the top-K ids and values, a few floats) and by
    # its working set filling up to its budget (the dZ staging takes what the budget leaves, at most the call's rows),
    # never by a [N, V] term: 16x the tokens adds less than one bf16 [N, V] would.
    growth = memory_table.loss_peak_bytes(large, vocab, H, fused=True) - memory_table.loss_peak_bytes(
        small, vocab, H, fused=True
    )
    assert 0 < growth <= (large - small) * (2 * H + 16 * memory_table.TOPK + 64) + CUDA_POLICY.working_bytes
    assert growth < (large - small) * vocab * 2


def test_a_training_step_peaks_lower_fused_by_at_least_the_logits():
    smollm2 = memory_table.MODEL_SIZES[0]
    # SmolLM2-135M's shape with 2 of its 30 layers: the same head and logits, a fraction of the trace
    size = dataclasses.replace(smollm2, config={**smollm2.config, "num_hidden_layers": 2})
    fused, materialised = (memory_table.step_peak_bytes(size, fused=flag) for flag in (True, False))
    assert fused["static"] == materialised["static"]
    tokens = memory_table.STEP_BATCH * memory_table.STEP_COMPLETION
    # at least the student's bf16 [B, T, V] logits, which the fused step never forms
    assert materialised["total"] - fused["total"] >= tokens * size.config["vocab_size"] * 2
