"""Test setup shared by every test module.

Without CUDA the Triton kernels run under the interpreter, which Triton decides when a ``@triton.jit``
function is *defined*: the variable must be set before ``sdpo_ops.kernels`` is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' shapes are tiny: one intra-op thread is faster than two fighting over a loaded machine.
torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # With CUDA the kernels compile for the GPU; the interpreter tests feed them CPU tensors.
        if os.environ.get("TRITON_INTERPRET") != "1":
            skip_interpret = pytest.mark.skip(reason="interpreter tests: run them with TRITON_INTERPRET=1")
            for item in items:
                if "interpret" in item.keywords:
                    item.add_marker(skip_interpret)
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
