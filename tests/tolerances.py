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

# Trainer equivalence over several optimizer steps (our TRL adapter vs TRL's SDPOTrainer; DDP/FSDP2 vs one process):
# both sides run the tiny models in TRAINER_DTYPE, float64, so no CPU's BLAS/oneDNN kernels can tell them apart. In
# fp32 two CPUs (Intel AVX-512, AMD) differ by ~1e-7 relative after 3 SGD steps at lr 0.5, more on near-zero update
# entries: a 4.5e-7 difference broke the former fp32 bound. In float64 the two trainers differ by at most 1.2e-16
# absolute in any weight update (updates up to 0.14) and 1e-12 relative in any logged value (measured on every
# equivalence case, 2-core AMD EPYC, torch 2.13.0 CPU): the float64 bound below sits 10^5 above that, and far below
# what a wrong loss moves (alpha off by 0.01, or no IS weight: 1e-4 to 1e-2, see test_trl_adapter.py).
TRAINER_DTYPE = torch.float64
TRAINER_LOG = ELEMENTWISE[torch.float64]
TRAINER_WEIGHT_UPDATE = ELEMENTWISE[torch.float64]

# Where one side cannot run in float64, bounds measured by tests/scripts/measure_trainer_noise.py (TRL against itself
# with its inputs moved by one fp32 ulp, random sign: the rounding differences two CPUs' kernels make), 10x the
# largest measured: a tiny Gemma 2 in fp32 (float64 trains to NaN in TRL: its eager attention takes a float64 mask's
# softmax in fp32, -inf on left-padded rows), every initial weight moved: updates 2.4e-7 absolute, logs 1.7e-6
# relative (ours vs TRL: 6e-8, 1.9e-6); the teacher server in float64, whose log-probs TRL stores as float32 and
# turns into the teacher's tail/renormalisation in fp32 arithmetic, every served log-prob moved: updates 1.9e-7,
# logs 3.4e-6 (ours, in float64 throughout, vs TRL: 1.2e-7, 7.9e-6 on a loss of 0.0046).
TRAINER_FP32_LOG = {"rtol": 1e-4, "atol": 1e-9}
TRAINER_FP32_WEIGHT_UPDATE = {"rtol": 0.0, "atol": 2.5e-6}

# DDP (2 processes) against one process, float64: the processes pad their batches to other lengths, so the tokens sit
# at other positions, whose rotary tables transformers computes in fp32. Measured: updates 5.8e-9 absolute, grad norm
# 7.3e-9 relative, metrics TRL logs from fp32 8.7e-8 relative; bounds 10x (a missing gradient sync moves the second
# step's loss by ~10%).
DDP_VS_ONE_PROCESS_LOG = {"rtol": 1e-6, "atol": 1e-10}
DDP_VS_ONE_PROCESS_WEIGHT_UPDATE = {"rtol": 0.0, "atol": 6e-8}

# QLoRA (tests/test_qlora.py: NF4 base, LoRA on q/v, 2 SGD steps at lr 2.0, LoRA updates up to 0.51) trains in
# fp32 (4-bit weights have no float64). Measured by tests/scripts/measure_trainer_noise.py (qlora): TRL against TRL
# with every weight of the fp32 model moved by one fp32 ulp before quantisation, two perturbation seeds: LoRA updates
# 1.4e-6 absolute, logs 3.8e-6 relative (grad_norm); ours vs TRL 8.3e-7, 2.0e-6 (2-core AMD EPYC with AVX512-BF16,
# torch 2.13.0 CPU, bitsandbytes 0.50.2). Bounds 10x the largest noise; distillation_alpha off by 0.01 moves the
# updates by 2.4e-3 and the logs by 5.9e-3 relative.
TRAINER_QLORA_LOG = {"rtol": 4e-5, "atol": 1e-9}
TRAINER_QLORA_WEIGHT_UPDATE = {"rtol": 0.0, "atol": 1.4e-5}
