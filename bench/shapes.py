"""Named shapes, benchmark cases and the profiles that pick them (``--bench-profile cpu|gpu|smoke``).

A *case* is everything a contender needs to build its inputs and run: the shape ``(N, H, V)``, the
support (``topk``: K or ``None`` for the full vocabulary), the dtype and the mode (``"fwd+bwd"`` or
``"fwd"``). The loss options are SDPO's official defaults (tail bucket, alpha 0.5, IS clip 2.0, T = 1)
and stay fixed across the suite, so two records of the same case are always the same computation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FWD_BWD = "fwd+bwd"
FWD = "fwd"


@dataclass(frozen=True)
class Shape:
    """One ``(N, H, V)`` shape; ``name`` says where it comes from (a model, or ``"synthetic"``)."""

    name: str
    n: int
    h: int
    v: int

    @property
    def id(self) -> str:
        return f"{self.name}-n{self.n}-h{self.h}-v{self.v}"


@dataclass(frozen=True)
class Case:
    """One benchmark computation: a shape, a support, a dtype and a mode, with the official loss options."""

    shape: Shape
    topk: int | None
    dtype: str = "float32"
    mode: str = FWD_BWD
    alpha: float = 0.5
    is_clip: float | None = 2.0
    add_tail: bool = True
    with_is: bool = True  # pass old_logprobs (the IS correction); off where a contender cannot do it
    with_mask: bool = True

    @property
    def k_label(self) -> str:
        return "full" if self.topk is None else f"k{self.topk}"

    @property
    def id(self) -> str:
        return f"{self.shape.id}-{self.k_label}-{self.dtype}-{self.mode}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        data = dict(data)
        data["shape"] = Shape(**data["shape"])
        return cls(**data)

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Profile:
    """Which cases a run benchmarks, and how many rounds.

    ``loss_shapes x topks x modes`` feed ``test_loss.py``; ``scaling_n`` / ``scaling_v`` feed
    ``test_scaling.py`` (one K, fwd+bwd).
    """

    name: str
    dtype: str
    loss_shapes: tuple[Shape, ...]
    topks: tuple[int | None, ...]
    modes: tuple[str, ...]
    scaling_n: tuple[Shape, ...]
    scaling_v: tuple[Shape, ...]
    scaling_topk: int | None
    rounds: int
    warmup_rounds: int
    e2e: bool = True
    # CPU peak RSS from a fresh subprocess per measurement (clean, ~5 s of imports each) or in-process
    # (the smoke profile: same measurement code, the heap may hide a little of the peak).
    memory_in_subprocess: bool = True
    contenders_scaling: tuple[str, ...] = field(default=("floor", "naive", "sdpo_torch", "sdpo_triton"))

    def loss_cases(self) -> list[Case]:
        return [
            Case(shape, topk, dtype=self.dtype, mode=mode)
            for shape in self.loss_shapes
            for topk in self.topks
            for mode in self.modes
        ]

    def scaling_cases(self, axis: str) -> list[Case]:
        shapes = self.scaling_n if axis == "n" else self.scaling_v
        return [Case(shape, self.scaling_topk, dtype=self.dtype) for shape in shapes]


# SPEC section 5: H in {896, 4096}, V in {32000, 151936}, N in {1024, 4096, 8192, 16384}.
# Named after a model with that (H, V) where one exists.
_GPU_HV = (
    ("h896-v32000", 896, 32000),  # synthetic: a 0.5B-class hidden size with a Llama-2 vocabulary
    ("qwen2.5-0.5b", 896, 151936),
    ("llama2-7b", 4096, 32000),
    ("qwen3-8b", 4096, 151936),
)
_GPU_NS = (1024, 4096, 8192, 16384)

GPU = Profile(
    name="gpu",
    dtype="bfloat16",
    loss_shapes=tuple(Shape(name, n, h, v) for name, h, v in _GPU_HV for n in _GPU_NS),
    topks=(None, 20, 100),
    modes=(FWD_BWD, FWD),
    scaling_n=tuple(Shape("qwen3-8b", n, 4096, 151936) for n in _GPU_NS),
    scaling_v=tuple(Shape("h4096", 8192, 4096, v) for v in (32000, 65536, 131072, 151936)),
    scaling_topk=100,
    rounds=10,
    warmup_rounds=3,
)

# Small enough that the whole CPU suite runs in a few minutes on 2 cores (fp32: CPU bf16 GEMMs are not
# representative). sdpo_loss's CPU chunk is a 32 MiB fp32 [C, V] buffer (C = 512 rows at V = 16384,
# 1024 at V = 8192), so N spans several chunks where the memory comparison matters. The CPU acceptance
# shape (N=4096, H=256, V=32768) lives in cpu_ratio.py.
CPU = Profile(
    name="cpu",
    dtype="float32",
    loss_shapes=(Shape("synthetic", 1024, 128, 16384),),
    topks=(None, 100),
    modes=(FWD_BWD,),
    scaling_n=tuple(Shape("synthetic", n, 128, 8192) for n in (512, 1024, 2048, 4096)),
    scaling_v=tuple(Shape("synthetic", 512, 128, v) for v in (4096, 8192, 16384, 32768)),
    scaling_topk=100,
    rounds=2,
    warmup_rounds=1,
    contenders_scaling=("floor", "naive", "sdpo_torch"),  # the Triton backend is benchmarked on CUDA only
)

# One tiny case per test, one round: the harness end to end in seconds (tests/test_bench_smoke.py).
SMOKE = Profile(
    name="smoke",
    dtype="float32",
    loss_shapes=(Shape("tiny", 48, 32, 384),),
    topks=(None, 20),
    modes=(FWD_BWD,),
    scaling_n=tuple(Shape("tiny", n, 32, 384) for n in (32, 64)),
    scaling_v=(),
    scaling_topk=20,
    rounds=1,
    warmup_rounds=0,
    e2e=False,
    memory_in_subprocess=False,
    contenders_scaling=("naive", "sdpo_torch"),
)

PROFILES = {p.name: p for p in (GPU, CPU, SMOKE)}
