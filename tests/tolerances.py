"""Every tolerance of the suite in one table (never loosened to make a test pass).

fp32 comparisons are elementwise. bf16/fp16 comparisons are norm-relative (``||a - b|| / ||b||``) and
bounded by the error of the same-dtype naive path against an fp64 ground truth, times a small margin.
"""

import torch

ELEMENTWISE = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-10},
    torch.float32: {"rtol": 2e-4, "atol": 2e-5},
}

# fp32 against fp64, norm-relative: fp32 sums in another order (chunks, staged dW passes, emulated fp32-output
# GEMMs) than the reference's; measured <= 1e-6 on the tests' tiny shapes (tests/test_device_policy.py).
FP32_NORM_RELATIVE = 1e-5

# Margin over the naive same-dtype path's own error (CCE's principle).
LOW_PRECISION_MARGIN = 2.0
# Absolute floor of the norm-relative error bound, for cases where the naive path happens to be exact.
LOW_PRECISION_FLOOR = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def norm_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


# fp64 results that are exactly 0 or >= 0 in exact arithmetic (teacher == student, a divergence's sign):
# a few ulps of the O(1) terms that cancel.
FP64_ZERO_ATOL = 1e-13
FP64_NONNEGATIVE_SLACK = 1e-12

# Trainer equivalence (our TRL adapter vs TRL's SDPOTrainer, fp32): logged values, and weight updates
# after several optimizer steps (two fp32 ulps of 1.0 absolute: parameters of order 1 moved by SGD).
TRAINER_LOG = {"rtol": 1e-5, "atol": 1e-6}
TRAINER_WEIGHT_UPDATE = {"rtol": 1e-4, "atol": 2 * torch.finfo(torch.float32).eps}
