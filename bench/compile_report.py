"""Compile the Triton kernels exactly as production launches them, for sm_90, without a GPU; report the code.

Every Triton launch of sdpo_ops goes through ``sdpo_ops.kernels.launch.launch``, which hands a
``LaunchRecord`` (kernel, grid, arguments, num_warps) to ``record_launches()``. On ``meta`` tensors nothing
runs, so a real-size call is traced here: ``sdpo_loss(..., backend="triton")`` and its backward at N=8192,
H=4096, V=151936, bf16, for each production mode (``MODES``). Each record is turned into the specialisation
Triton's JIT would pick for that call on a GPU (``specialise``), every distinct one is compiled once with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (ptxas ships in the triton wheel), and
the compiled code is read:

- registers and spills from the cubin's resource usage (``cuobjdump -res-usage``, also in the wheel):
  ``REG`` is what the driver reports as ``n_regs``; ``LOCAL`` bytes / 4 is what Triton reports as
  ``n_spills`` (``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4`` in its driver);
- the width of each *row access*: a ``tl.load``/``tl.store`` whose pointer is ``<row pointer> + cols``
  (the kernels' name for the column vector of a row tile; the student's candidate sub-blocks included),
  read from the inline PTX global accesses that its source line compiled to (debug locations of the LLVM
  IR), and the count of 128-bit global loads (``LDG.E.128``) in the SASS.

Assumption (the only one not read from the call): tensor allocations are 16-byte aligned. The CUDA caching
allocator hands out 512-byte aligned blocks; a meta tensor's ``data_ptr()`` is its byte offset from an
aligned base, so views (e.g. ``buffer[:C]``) are specialised on their real offsets.

    python -m bench.compile_report [--modes NAME ...] [--out DIR] [--json]
    PYTHONPATH=/tmp/triton36 python -m bench.compile_report  # another triton, from
    pip install --no-deps --target /tmp/triton36 triton==3.6.0  # (torch imports beside it)

Writes ``bench/results/sm90-compile/<triton version>.md``. These are compiler figures, not GPU timings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)
SHAPE = {"N": 8192, "H": 4096, "V": 151936}
ODD_VOCAB = 50257  # GPT-2's: V % 16 = 1
DTYPE = torch.bfloat16
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "sm90-compile"
# A row access: tl.load / tl.store whose pointer is "<row pointer> + cols" (the column vector of a row tile).
_ROW_ACCESS = re.compile(r"tl\.(load|store)\(\s*(\w+)\s*\+\s*cols\b")
_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One production call: ``sdpo_loss`` keyword arguments and what needs a gradient."""

    name: str
    loss_kwargs: dict
    with_targets: bool = True  # target_ids and old_logprobs (the IS correction)
    hidden_grad: bool = True
    weight_grad: bool = True
    target_logprob_grad: bool = False  # backward through return_outputs' target_logprobs too
    backward: bool = True
    vocab: int | None = None  # else SHAPE["V"]
    # ``sdpo_loss_from_teacher_topk`` with the teacher's top-K log-probs and ids (K = loss_kwargs' topk) instead
    teacher_topk: bool = False


MODES = (
    Mode("topk100", dict(topk=100, add_tail=True, alpha=0.5)),  # the official defaults
    Mode("topk256", dict(topk=256, add_tail=True, alpha=0.5)),
    Mode("topk20-no-tail", dict(topk=20, add_tail=False, alpha=0.5)),
    Mode("topk100-alpha0", dict(topk=100, add_tail=True, alpha=0.0)),
    Mode("topk100-alpha1", dict(topk=100, add_tail=True, alpha=1.0)),
    Mode("topk100-no-targets", dict(topk=100, add_tail=True, alpha=0.5), with_targets=False),
    Mode("full-vocab", dict(topk=None, alpha=0.5)),
    Mode("full-vocab-alpha0", dict(topk=None, alpha=0.0)),
    Mode("full-vocab-alpha1", dict(topk=None, alpha=1.0)),
    Mode("reduction-none", dict(topk=100, reduction="none")),  # per-token upstream gradient: recompute path
    Mode("target-logprob-grad", dict(topk=100, return_outputs=True), target_logprob_grad=True),
    Mode("frozen-head", dict(topk=100), weight_grad=False),  # no dW
    Mode("frozen-hidden", dict(topk=100), hidden_grad=False),  # no dH
    Mode("no-grad", dict(topk=100), hidden_grad=False, weight_grad=False, backward=False),
    Mode("softcap-T0.7", dict(topk=100, logit_softcap=30.0, temperature=0.7)),  # Gemma 2: the transform on load
    Mode("full-vocab-softcap", dict(topk=None, logit_softcap=30.0)),
    # an odd vocabulary (GPT-2's): the host pads the [C, V] row stride to a multiple of 16 elements
    # (CUDA_POLICY.row_stride_multiple), so the row pointers stay 16-byte aligned and the row accesses 128-bit
    Mode(f"topk100-V{ODD_VOCAB}", dict(topk=100, add_tail=True, alpha=0.5), vocab=ODD_VOCAB),
    # a served teacher's top-K log-probs: its stats stage (teacher_row_stats) reads the student's buffer
    Mode("teacher-topk100", dict(topk=100), teacher_topk=True),
    Mode(f"teacher-topk100-V{ODD_VOCAB}", dict(topk=100), teacher_topk=True, vocab=ODD_VOCAB),
)


@contextlib.contextmanager
def _meta_tensors_choose_cuda_configs() -> Iterator[None]:
    """Inside the block a meta tensor reports ``is_cuda``, so each launcher picks its CUDA tile config.

    The launchers choose (BLOCK_V, num_warps) by ``tensor.is_cuda`` and would otherwise trace the
    interpreter's config on meta. Once they treat meta as CUDA themselves this is a no-op.
    """
    saved = torch.Tensor.__dict__.get("is_cuda")
    torch.Tensor.is_cuda = property(lambda self: self.device.type in ("cuda", "meta"))
    try:
        yield
    finally:
        if saved is None:
            del torch.Tensor.is_cuda  # back to TensorBase's own attribute
        else:
            torch.Tensor.is_cuda = saved


def trace(mode: Mode) -> list:
    """The ``LaunchRecord`` of every Triton launch of one forward (+ backward) at ``SHAPE`` (V: the mode's own
    where it has one), on meta tensors."""
    from sdpo_ops import sdpo_loss, sdpo_loss_from_teacher_topk
    from sdpo_ops.kernels.launch import record_launches

    N, H, V = SHAPE["N"], SHAPE["H"], mode.vocab or SHAPE["V"]

    def meta(*shape, dtype=DTYPE, grad=False):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)

    student_hidden, student_weight = meta(N, H, grad=mode.hidden_grad), meta(V, H, grad=mode.weight_grad)
    teacher_hidden, teacher_weight = meta(N, H), meta(V, H)
    targets = {}
    if mode.with_targets:
        targets = dict(target_ids=meta(N, dtype=torch.int64), old_logprobs=meta(N, dtype=torch.float32))
    grad_context = contextlib.nullcontext() if mode.backward else torch.no_grad()
    with _meta_tensors_choose_cuda_configs(), record_launches() as records, grad_context:
        if mode.teacher_topk:
            kwargs = dict(mode.loss_kwargs)
            k = kwargs.pop("topk")
            out = sdpo_loss_from_teacher_topk(
                student_hidden, student_weight, meta(N, k, dtype=torch.float32), meta(N, k, dtype=torch.int64),
                backend="triton", **targets, **kwargs,
            )  # fmt: skip
        else:
            out = sdpo_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, backend="triton",
                **targets, **mode.loss_kwargs,
            )  # fmt: skip
        if mode.backward:
            loss = out.loss if mode.loss_kwargs.get("return_outputs") else out
            total = loss.sum()
            if mode.target_logprob_grad:
                total = total + out.target_logprobs.sum()
            total.backward()
    return list(records)


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """What ``JITFunction.run`` would compile for one launch: ``ASTSource`` inputs and backend options."""

    kernel: Any  # triton JITFunction
    signature: dict[str, str]  # parameter -> type ("*bf16", "i32", "i64", "fp32", "constexpr", ...)
    constexprs: dict[tuple[int, ...], Any]  # parameter path -> value (given constexprs and specialised ints)
    attrs: dict[tuple[int, ...], Any]  # parameter path -> [["tt.divisibility", 16]] or []
    options: dict[str, Any]  # the backend's parsed options (num_warps, num_stages, ...)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def param_names(self) -> list[str]:
        return [param.name for param in self.kernel.params]

    def key(self) -> tuple:
        return (
            self.name,
            tuple(self.signature.items()),
            tuple(sorted((path, repr(value)) for path, value in self.constexprs.items())),
            tuple(sorted((path, repr(value)) for path, value in self.attrs.items())),
            self.options["num_warps"],
        )

    def constexpr_values(self) -> dict[str, Any]:
        names = self.param_names
        return {names[path[0]]: value for path, value in self.constexprs.items()}

    def divisible_by_16(self) -> list[str]:
        names = self.param_names
        return [names[path[0]] for path, attr in self.attrs.items() if ["tt.divisibility", 16] in attr]


def specialise(record, target: GPUTarget = SM90) -> Specialisation:
    """The specialisation Triton's JIT picks for ``record``'s launch on ``target``, by Triton's own code.

    ``JITFunction.run`` binds the arguments with a binder made by ``create_function_from_signature`` (each
    non-constexpr argument goes through the C++ ``native_specialize_impl``: dtype of a tensor, 16-byte
    alignment of its ``data_ptr()``, an int 1 turned into a constexpr, ``% 16 == 0`` into a divisibility
    attribute, i32 or i64 by value) and turns the result into (signature, constexprs, attrs, options) with
    ``_pack_args``. Both are called here as ``run`` calls them, with ``target``'s backend instead of the
    active driver's. The same calls work on triton 3.6, 3.7 and 3.9; what differs between those releases
    is inside them (3.7 made ``_pack_args`` drop constexpr values from the attrs, 3.7 and 3.9 added the
    ``instrumentation_mode`` / ``fpsan_homomorphic_casts`` run options, which default when absent, and
    3.9 keeps keyword-only kernel parameters keyword-only in the binder).
    """
    kernel = record.kernel
    if not isinstance(kernel, JITFunction):
        raise TypeError(
            f"{record.name} is a {type(kernel).__name__}, not a JITFunction: the kernels were imported under "
            "TRITON_INTERPRET=1; run this report in a process without it"
        )
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**record.args, "num_warps": record.num_warps}
    bound_args, specialization, binder_options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, binder_options
    )
    return Specialisation(kernel, signature, constexprs, attrs, dict(options.__dict__))


@dataclasses.dataclass(frozen=True)
class RowAccess:
    """One row access of the kernel source and the global memory instructions its line compiled to."""

    kind: str  # "load" | "store"
    line: int
    widths: tuple[int, ...]  # bits per instruction, e.g. (128, 128)

    @property
    def vectorised(self) -> bool:
        return bool(self.widths) and all(width == 128 for width in self.widths)


@dataclasses.dataclass
class CompileResult:
    kernel: str
    modes: list[str]
    constexprs: dict[str, Any]
    divisible_by_16: list[str]
    signature: dict[str, str]
    num_warps: int
    registers: int
    spills: int  # Triton's n_spills: local memory bytes / 4
    spill_instructions: int  # STL in the SASS
    row_accesses: list[RowAccess]
    sass_ldg: int
    sass_ldg_128: int
    sass_instructions: int  # static SASS instructions of the kernel
    sass_loops: list[int]  # static instructions of each loop body (backward branch), in code order
    shared_bytes: int
    compile_seconds: float
    triton_version: str = triton.__version__

    @property
    def row_loads(self) -> list[RowAccess]:
        return [access for access in self.row_accesses if access.kind == "load"]

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["constexprs"] = {name: repr(value) for name, value in self.constexprs.items()}
        return data


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes) of the cubin's one kernel, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", file.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return int(match.group(1)), int(match.group(2))


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", file.name], capture_output=True, text=True).stdout


def sass_loops(sass: str) -> tuple[int, list[int]]:
    """(static instructions, the instruction count of each loop body): a loop is a branch to a lower address, its
    body every instruction from the target to the branch (an inner loop counts in its outer one too)."""
    instructions = [(int(address, 16), text) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    addresses = [address for address, _ in instructions]
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            loops.append(sum(start <= other <= address for other in addresses))
    return len(instructions), loops


def ctas_per_sm(result: CompileResult) -> int:
    """Resident CTAs per H100/H200 SM: 64K registers (allocated per warp in units of 256), 228 KB shared memory
    (1 KB reserved per CTA), 64 warps, 32 CTAs."""
    registers_per_warp = -(-max(result.registers, 1) * 32 // 256) * 256
    by_registers = 65536 // (registers_per_warp * result.num_warps)
    by_shared = 228 * 1024 // (result.shared_bytes + 1024)
    return min(by_registers, by_shared, 64 // result.num_warps, 32)


def student_instructions_per_row(result: CompileResult, vocab: int = SHAPE["V"]) -> dict[str, int] | None:
    """SASS instructions per thread and row of ``_student_row_stats_kernel`` with top-K, from its loop bodies.

    Pass 1: one body per BLOCK_V tile. Pass 2 (the kernel with survivor batches, ``BATCH`` among its constexprs):
    the group loop (its body holds the batch loop's) runs ceil(K / GROUP) + 1 times, the batch loop once when at
    most BATCH keys survive ("per row"), or GROUP * SUB / BATCH times per group when every candidate key survives
    (the bound; all-equal logits merge one group's worth and then none survive the raised threshold). The kernel
    before it (two loops): one network per group. The rest is counted once. K = 100 taken for K_PAD = 128."""
    constexprs = result.constexprs
    if result.kernel != "_student_row_stats_kernel" or not constexprs.get("HAS_TOPK"):
        return None
    k = {128: 100}.get(constexprs["K_PAD"], constexprs["K_PAD"])
    tiles = -(-vocab // constexprs["BLOCK_V"])
    groups = -(-k // constexprs["GROUP"])
    loops = result.sass_loops
    if "BATCH" not in constexprs:  # the kernel before the survivor batches: [pass 1, pass 2]
        pass1, pass2 = loops[0], loops[-1]
        straight = result.sass_instructions - pass1 - pass2
        return {"pass 1 tile": pass1, "pass 2 group": pass2, "per row": pass1 * tiles + pass2 * groups + straight}
    if len(loops) != 3:
        raise ValueError(f"expected the loops [pass 1, batch, group], got {loops}")
    pass1, batch, group = loops
    straight = result.sass_instructions - pass1 - group
    common = pass1 * tiles + (group - batch) * (groups + 1) + straight
    batches_per_group = -(-constexprs["GROUP"] * constexprs["SUB"] // constexprs["BATCH"])
    return {
        "pass 1 tile": pass1,
        "pass 2 group": group - batch,
        "pass 2 batch": batch,
        "per row": common + batch,
        "per row, every key survives": common + batch * batches_per_group * groups,
    }


def _access_bits(modifiers: str) -> int:
    """Bits moved by one ``ld.global`` / ``st.global`` from its modifiers, e.g. ``.v4.b32`` -> 128."""
    parts = modifiers.split(".")
    vector = next((int(part[1:]) for part in parts if re.fullmatch(r"v\d", part)), 1)
    element = next((int(part[1:]) for part in parts if re.fullmatch(r"[bfsu]\d+", part)), 0)
    return vector * element


_LLVM_BITS = {"half": 16, "bfloat": 16, "float": 32, "double": 64}


def _llvm_type_bits(llvm_type: str) -> int:
    """Bits of an LLVM IR value type: ``<4 x float>`` -> 128, ``i64`` -> 64."""
    vector = re.fullmatch(r"<(\d+) x (\w+)>", llvm_type)
    count, element = (int(vector.group(1)), vector.group(2)) if vector else (1, llvm_type)
    return count * (int(element[1:]) if element.startswith("i") else _LLVM_BITS.get(element, 0))


def global_accesses(llir: str) -> list[tuple[str, int, str, int]]:
    """``(kind, bits, file, line)`` of every global memory access in the LLVM IR of a compiled kernel.

    Triton lowers global loads and stores to inline PTX (``ld.global.v4.b32`` ...), which reaches the PTX as
    written; a native ``load``/``store`` on ``addrspace(1)`` is read as well. The source line is the debug
    location of the instruction: the PTX's ``.loc`` lines are no guide, since from triton 3.9 on a load in a
    loop is emitted under the ``.loc`` of a later line.
    """
    metadata = dict(re.findall(r"^(!\d+) = (.*)$", llir, re.M))

    def file_of(scope: str) -> str:
        for _ in range(64):  # scope chains are short; the bound only guards against a cycle
            node = metadata.get(scope, "")
            if node.startswith("!DIFile"):
                fields = dict(re.findall(r'(\w+): "([^"]*)"', node))
                return os.path.join(fields.get("directory", ""), fields.get("filename", ""))
            link = re.search(r"\bfile: (!\d+)", node) or re.search(r"\bscope: (!\d+)", node)
            if link is None:
                return ""
            scope = link.group(1)
        return ""

    accesses = []
    for text in llir.splitlines():
        dbg = re.search(r"!dbg (!\d+)", text)
        location = (
            re.match(r"!DILocation\(line: (\d+).*?scope: (!\d+)", metadata.get(dbg.group(1), "")) if dbg else None
        )
        if location is None:
            continue
        where = (file_of(location.group(2)), int(location.group(1)))
        if " asm " in text:
            ptx = text.replace("\\0A", "\n").replace("\\09", "\t")  # LLVM escapes newline and tab in asm strings
            accesses += [(kind, _access_bits(modifiers), *where) for kind, modifiers in _PTX_ACCESS.findall(ptx)]
        elif native := re.search(r"= load (<[^>]+>|\w+), ptr addrspace\(1\)", text):
            accesses.append(("ld", _llvm_type_bits(native.group(1)), *where))
        elif native := re.search(r"\bstore (<[^>]+>|\w+) [^,]+, ptr addrspace\(1\)", text):
            accesses.append(("st", _llvm_type_bits(native.group(1)), *where))
    return accesses


def _source_key(path: str) -> str:
    """A source file named from its package on (``sdpo_ops/kernels/x.py``): Triton's compile cache is keyed by the
    source text, so a kernel compiled from another checkout carries that checkout's absolute paths."""
    parts = pathlib.PurePath(os.path.realpath(path)).parts
    return "/".join(parts[parts.index("sdpo_ops") :]) if "sdpo_ops" in parts else parts[-1]


def _jit_source_lines(kernel) -> dict[tuple[str, int], str]:
    """``(file, line) -> text`` of the kernel and the ``@triton.jit`` helpers in its module's namespace.

    The text each JITFunction captured when it was defined, i.e. what was compiled: the file on disk may
    have been edited since (line numbers shifted) while this process runs.
    """
    lines = {}
    for value in [kernel, *kernel.fn.__globals__.values()]:
        if isinstance(value, JITFunction):
            file = _source_key(value.fn.__code__.co_filename)
            for offset, text in enumerate(value.raw_src):
                lines[(file, value.starting_line_number + offset)] = text
    return lines


def row_accesses(spec: Specialisation, llir: str) -> list[RowAccess]:
    """The row accesses of the kernel (and its helpers) and the global accesses each one compiled to."""
    wanted = {}
    for where, text in _jit_source_lines(spec.kernel).items():
        match = _ROW_ACCESS.search(text)
        if match:
            wanted[where] = "ld" if match.group(1) == "load" else "st"
    widths: dict[tuple[str, int], list[int]] = {where: [] for where in wanted}
    for kind, bits, file, line in global_accesses(llir):
        where = (_source_key(file), line)
        if wanted.get(where) == kind:
            widths[where].append(bits)
    # helpers' lines that this kernel does not call compile to nothing here: report what it has
    kinds = {"ld": "load", "st": "store"}
    return [RowAccess(kinds[wanted[where]], where[1], tuple(bits)) for where, bits in sorted(widths.items()) if bits]


def compile_specialisation(spec: Specialisation, modes: list[str]) -> CompileResult:
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs), target=SM90, options=spec.options
    )
    seconds = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    registers, local_bytes = _resource_usage(cubin)
    sass = _sass(cubin)
    instructions, loops = sass_loops(sass)
    return CompileResult(
        kernel=spec.name,
        modes=modes,
        constexprs=spec.constexpr_values(),
        divisible_by_16=spec.divisible_by_16(),
        signature=dict(spec.signature),
        num_warps=spec.options["num_warps"],
        registers=registers,
        spills=local_bytes // 4,
        spill_instructions=len(re.findall(r"\bSTL\b", sass)),
        row_accesses=row_accesses(spec, compiled.asm["llir"]),
        sass_ldg=len(re.findall(r"\bLDG\b", sass)),
        sass_ldg_128=len(re.findall(r"\bLDG\.E\.128\b", sass)),
        sass_instructions=instructions,
        sass_loops=loops,
        shared_bytes=compiled.metadata.shared,
        compile_seconds=seconds,
    )


def compile_production(modes=MODES, log=None) -> list[CompileResult]:
    """Trace every mode, specialise every launch, compile each distinct specialisation once."""
    specs: dict[tuple, tuple[Specialisation, list[str]]] = {}
    for mode in modes:
        records = trace(mode)
        if not records:
            raise RuntimeError(f"mode {mode.name} launched no Triton kernel")
        for record in records:
            spec = specialise(record)
            specs.setdefault(spec.key(), (spec, []))[1].append(mode.name)
    results = []
    # grouped by kernel, in the order the modes first launch them
    for spec, mode_names in sorted(specs.values(), key=lambda item: item[0].name):
        result = compile_specialisation(spec, sorted(set(mode_names), key=mode_names.index))
        if log:
            log(f"  compiled {result.kernel} ({result.compile_seconds:.1f} s)")
        results.append(result)
    return results


def _summary(result: CompileResult) -> str:
    # the flags, ALPHA_MODE, K_PAD and the tile widths identify a specialisation; the details list everything
    shown = [
        f"{name}={value}"
        for name, value in result.constexprs.items()
        if isinstance(value, bool) or name in ("ALPHA_MODE", "K_PAD")
    ]
    block = [f"{name}={value}" for name, value in result.constexprs.items() if name.startswith("BLOCK")]
    # a pointer off 16 bytes (a view at an odd offset, e.g. chunk rows of an [N] output) is a specialisation
    # of its own: one more JIT compile on the GPU, and no vector access through it
    unaligned = [
        name for name, kind in result.signature.items() if kind.startswith("*") and name not in result.divisible_by_16
    ]
    return ", ".join(shown + block + ([f"not 16-B aligned: {', '.join(unaligned)}"] if unaligned else []))


def _source_state() -> str:
    """The commit the kernels were read from, and whether sdpo_ops had uncommitted edits."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "sdpo_ops").rstrip("\n")  # lines "XY path": keep the X column
    return f"commit {commit}" + (
        f", with uncommitted edits in: {' '.join(line[3:] for line in dirty.splitlines())}" if dirty else ""
    )


def _row_access_text(accesses: list[RowAccess], kind: str) -> str:
    chosen = [access for access in accesses if access.kind == kind]
    if not chosen:
        return "-"
    return "; ".join(f"L{access.line}: " + "/".join(str(width) for width in access.widths) for access in chosen)


def markdown(results: list[CompileResult], source_state: str) -> str:
    version = triton.__version__
    lines = [
        f"# sm_90 compile of the production specialisations (triton {version})",
        "",
        f"`python -m bench.compile_report` with triton {version}, torch {torch.__version__}: every Triton launch "
        f'of `sdpo_loss(..., backend="triton")` and its backward traced on meta tensors at N={SHAPE["N"]}, '
        f"H={SHAPE['H']}, V={SHAPE['V']} (mode `topk100-V{ODD_VOCAB}`: V={ODD_VOCAB}, row stride padded to a "
        "multiple of 16), bf16, specialised by Triton's own JIT code (16-byte aligned "
        'allocations assumed) and compiled for `GPUTarget("cuda", 90, 32)` with the wheel\'s ptxas. '
        f"Compiler figures, not GPU measurements. Kernels of {source_state}.",
        "",
        "- registers: `REG` of `cuobjdump -res-usage` (the driver's `n_regs`); spills: `LOCAL` bytes / 4 "
        "(Triton's `n_spills`), STL: spill stores in the SASS;",
        "- row loads / stores: bits per global access (inline PTX) compiled from each source line that reads or writes "
        "`<row pointer> + cols` (L = line in the kernel's file; 128 = vectorised); LDG.E.128: 128-bit global "
        "loads of all LDG in the SASS.",
        "",
        "- SASS: static instructions, and those of each loop body (a branch to a lower address); shared: bytes per "
        "CTA; CTAs/SM: resident per H100/H200 SM by registers, shared memory and warps.",
        "",
        "| kernel | specialisation | modes | warps | registers | spills | STL | row loads (bits) | "
        "row stores (bits) | LDG.E.128 / LDG | SASS (loops) | shared | CTAs/SM | triton |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|---|---:|---:|---|",
    ]
    for result in results:
        loops = ", ".join(map(str, result.sass_loops)) or "-"
        lines.append(
            f"| {result.kernel} | {_summary(result)} | {', '.join(result.modes)} | {result.num_warps} | "
            f"{result.registers} | {result.spills} | {result.spill_instructions} | "
            f"{_row_access_text(result.row_accesses, 'load')} | {_row_access_text(result.row_accesses, 'store')} | "
            f"{result.sass_ldg_128} / {result.sass_ldg} | {result.sass_instructions} ({loops}) | "
            f"{result.shared_bytes} | {ctas_per_sm(result)} | {version} |"
        )
    at_default_vocab = {mode.name for mode in MODES if mode.vocab is None}
    per_row = [
        (result, student_instructions_per_row(result)) for result in results if at_default_vocab & set(result.modes)
    ]
    per_row = [(result, counts) for result, counts in per_row if counts]
    if per_row:
        lines += [
            "",
            f"`_student_row_stats_kernel` SASS instructions per thread and row at V={SHAPE['V']} (loop bodies times "
            "their trip counts, plus the straight-line code once; `compile_report.student_instructions_per_row`):",
            "",
            "| specialisation | pass 1 tile | pass 2 group | pass 2 batch | per row (<= BATCH survivors) | "
            "per row if every candidate key survives (bound) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for result, counts in per_row:
            lines.append(
                f"| {_summary(result)} | {counts['pass 1 tile']} | {counts['pass 2 group']} | "
                f"{counts.get('pass 2 batch', '-')} | {counts['per row']} | "
                f"{counts.get('per row, every key survives', '-')} |"
            )
    unaligned = sum("not 16-B aligned" in _summary(result) for result in results)
    if unaligned:
        lines += [
            "",
            f"{unaligned} of the {len(results)} specialisations have a pointer off 16 bytes, typically a per-chunk "
            "view of an `[N]` fp32 output whose offset, chunk start * 4 bytes, is not a multiple of 16 (a chunk "
            "size that is not a multiple of 4 rows). Each is one more JIT compile on the GPU.",
        ]
    lines += ["", "## Specialisations in full", ""]
    for number, result in enumerate(results, start=1):
        signature = ", ".join(
            f"{name}: {kind}{' (div 16)' if name in result.divisible_by_16 else ''}"
            for name, kind in result.signature.items()
            if kind != "constexpr"
        )
        constexprs = ", ".join(f"{name}={value}" for name, value in result.constexprs.items())
        lines += [f"{number}. `{result.kernel}`, num_warps={result.num_warps}: {signature}; constexpr: {constexprs}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="*", help=f"a subset of {[mode.name for mode in MODES]}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <triton version>.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    args = parser.parse_args(argv)
    # Triton decides between compiling and interpreting when a kernel is *defined*, and sdpo_ops.kernels is
    # imported lazily (in trace): without the variable from here on they compile (specialise checks it).
    os.environ.pop("TRITON_INTERPRET", None)
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        print("triton.backends.nvidia is missing: nothing to compile for sm_90", file=sys.stderr)
        return 2
    modes = MODES
    if args.modes:
        unknown = set(args.modes) - {mode.name for mode in MODES}
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}")
        modes = tuple(mode for mode in MODES if mode.name in args.modes)
    log = None if args.json else (lambda message: print(message, file=sys.stderr))
    source_state = _source_state()  # before the kernels are imported: what they were read from
    results = compile_production(modes, log=log)
    text = markdown(results, source_state)
    if args.json:
        report = {
            "triton": triton.__version__,
            "modes": [mode.name for mode in modes],
            "vocab": {mode.name: mode.vocab or SHAPE["V"] for mode in modes},
            "results": [result.to_json() for result in results],
        }
        print(json.dumps(report))
    else:
        print(text)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{triton.__version__}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
