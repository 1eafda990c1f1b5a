"""The EMA teacher of ``sdpo_ops.adapters.trl.SDPOTrainer``: saved in every checkpoint, restored on resume.

TRL's ``SDPOTrainer`` checkpoints the student, optimizer, scheduler and RNG but not the teacher: at start-up it
rebuilds the EMA copy from the base model's path, and its ``PEFTAdapterEMACallback`` restarts the shadow adapter
from zeros, so ``trainer.train(resume_from_checkpoint=...)`` silently resets the teacher to the initial model.
Here the teacher of ``teacher_model_kind="ema"`` is written into each checkpoint folder as
:data:`TEACHER_STATE_FILE` (safetensors) and loaded before the first resumed step:

- a full EMA copy (no PEFT): the teacher model's full state dict (keys as in ``model.state_dict()``);
- pure-LoRA PEFT: the EMA shadow of the student's adapter (keys as ``peft.get_peft_model_state_dict``), which
  is what the ``"teacher"`` adapter holds.

``teacher_model_kind="base"`` (the initial model, rebuilt identically) and ``"live"`` (the student) need nothing.
Under DDP and FSDP2 the file is one consolidated state dict: every rank joins the gather of FSDP2's sharded
tensors, the main process writes, and every rank reads the whole file on resume (FSDP2 re-shards it). Under
DeepSpeed ZeRO-3 the partitioned teacher is gathered as TRL's own EMA sync gathers it.

The file's metadata names its kind (:data:`EMA_COPY` or :data:`EMA_LORA_ADAPTER`): resuming with the other kind
of teacher is an error; resuming an EMA run from a checkpoint without the file is a warning.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from trl.experimental.sdpo.teacher_sync import PEFTAdapterEMACallback

from sdpo_ops.adapters.checkpoint import atomic_write

__all__ = ["EMA_COPY", "EMA_LORA_ADAPTER", "TEACHER_STATE_FILE", "LoRAEMATeacherCallback"]

TEACHER_STATE_FILE = "sdpo_teacher.safetensors"
EMA_COPY = "ema_copy"
EMA_LORA_ADAPTER = "ema_lora_adapter"
_FORMAT = "sdpo_ops.trl_teacher/1"


def _full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), any other tensor as is."""
    if isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    return tensor


def _has_dtensors(module: nn.Module) -> bool:
    return any(isinstance(p, torch.distributed.tensor.DTensor) for p in module.parameters())


def _is_zero3_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def zero3_gathered(parameters: list[nn.Parameter], *, modified: bool = False) -> Iterator[None]:
    """ZeRO-3 partitioned ``parameters`` whole inside the context (a collective), others as they are.

    ``modified=True``: what rank 0 wrote into them is broadcast and partitioned again on exit (every rank must
    write the same values); otherwise writes are discarded.
    """
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modified else None):
        yield


def gather_model_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's full state dict on CPU. Every rank must call it; under FSDP2 only the main rank gets tensors."""
    if _has_dtensors(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with zero3_gathered(list(module.parameters())):
        return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


@torch.no_grad()
def load_model_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (every rank passes the whole of it) into a plain, FSDP2 or ZeRO-3 module."""
    if _has_dtensors(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
        return
    with zero3_gathered(list(module.parameters()), modified=True):
        module.load_state_dict(state)


def write_teacher_state(checkpoint_dir: str, tensors: dict[str, Tensor], kind: str, *, is_writer: bool) -> None:
    """Write ``tensors`` as ``<checkpoint_dir>/`` :data:`TEACHER_STATE_FILE` (atomically) if ``is_writer``."""
    if not is_writer:
        return
    # Separate contiguous CPU copies: safetensors refuses tensors sharing storage (tied embeddings).
    tensors = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in tensors.items()}
    metadata = {"format": _FORMAT, "kind": kind}
    atomic_write(
        os.path.join(checkpoint_dir, TEACHER_STATE_FILE),
        lambda temporary: save_file(tensors, temporary, metadata=metadata),
    )


def read_teacher_state(checkpoint_dir: str, kind: str) -> dict[str, Tensor] | None:
    """The tensors saved by :func:`write_teacher_state` (on CPU), or None when the checkpoint has no teacher file."""
    path = os.path.join(checkpoint_dir, TEACHER_STATE_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an sdpo_ops teacher state of format {_FORMAT!r}: {metadata}")
        if metadata.get("kind") != kind:
            raise ValueError(
                f"{path} holds a {metadata.get('kind')!r} teacher, but this run's teacher is {kind!r} "
                "(teacher_model_kind='ema' with a LoRA student keeps an EMA adapter, without PEFT a full EMA copy)"
            )
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no iterator


class LoRAEMATeacherCallback(PEFTAdapterEMACallback):
    """TRL's ``PEFTAdapterEMACallback`` (same EMA, same ``"teacher"`` adapter), working under FSDP2, checkpointable.

    Under FSDP2 the student's adapter tensors are DTensor shards, while the teacher adapter, added after
    sharding, holds plain tensors: TRL copies one into the other and fails ("aten.copy_.default got mixed
    torch.Tensor and DTensor"). Here the student's adapter is gathered whole first (a collective, on every rank
    at each sync step), so the shadow and the teacher adapter are plain full tensors, identical on every rank.

    Under DeepSpeed ZeRO-3 the engine partitions (and hooks) only the parameters that exist when it is built: the
    trainer creates the teacher adapter before that (:meth:`initialize_teacher_adapter`), not at train begin as
    TRL does (TRL's callback then fails: its shadow is copied from numel-0 shards, and generation's gather finds an
    unregistered parameter). The student's adapter is gathered to read it, the teacher's to write it.
    """

    resumed_from_checkpoint_adapter = False

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [p for name, p in self._peft_model().named_parameters() if f".{adapter_name}." in name]

    def _get_student_state_dict(self) -> dict[str, Tensor]:
        model = self._peft_model()
        with zero3_gathered(self._adapter_parameters(model.active_adapter or "default")):
            # Copies: a gathered ZeRO-3 parameter is emptied again on exit.
            return {
                key: _full_tensor(value).detach().clone() for key, value in super()._get_student_state_dict().items()
            }

    def _peft_model(self) -> nn.Module:
        return self.model if self.accelerator is None else self.accelerator.unwrap_model(self.model)

    def initialize_teacher_adapter(self) -> None:
        """Create the ``"teacher"`` adapter (zeros) and its shadow now; idempotent (TRL calls it at train begin)."""
        self._initialize_teacher_adapter()

    def _initialize_teacher_adapter(self) -> None:
        if self._initialized:
            return
        model = self._peft_model()
        adapter_name = model.active_adapter or "default"
        self.teacher_adapter_config = model.peft_config.get(adapter_name)
        self._initialized = True
        if self.teacher_adapter_name in model.peft_config:
            # Resuming: transformers loaded every adapter of the checkpoint, this one included (PEFT saves them
            # all). TRL would add it again and fail ("Adapter with name 'teacher' already exists"); here the
            # shadow continues from it, as it equals the shadow at the last sync.
            from peft import get_peft_model_state_dict

            with zero3_gathered(self._adapter_parameters(self.teacher_adapter_name)):
                teacher_state = get_peft_model_state_dict(model, adapter_name=self.teacher_adapter_name)
                self.shadow_weights = {key: _full_tensor(v).detach().clone() for key, v in teacher_state.items()}
            self.resumed_from_checkpoint_adapter = True
            return
        # TRL starts the teacher adapter at zero (the base model's outputs), then averages the student in.
        self.shadow_weights = {key: torch.zeros_like(value) for key, value in self._get_student_state_dict().items()}
        model.add_adapter(self.teacher_adapter_name, self.teacher_adapter_config)
        self._copy_shadow_into_teacher_adapter()

    def _copy_shadow_into_teacher_adapter(self) -> None:
        from peft import set_peft_model_state_dict

        model = self._peft_model()
        student_adapter = model.active_adapter
        # As TRL: activating the teacher adapter while loading it, then the student's again, leaves the student's
        # adapter the trainable one.
        model.set_adapter(self.teacher_adapter_name)
        with zero3_gathered(self._adapter_parameters(self.teacher_adapter_name), modified=True):
            set_peft_model_state_dict(model, self.shadow_weights, adapter_name=self.teacher_adapter_name)
        model.set_adapter(student_adapter)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.sync_steps != 0:
            return
        if self.accelerator is None and "accelerator" in kwargs:
            self.accelerator = kwargs["accelerator"]
        self._initialize_teacher_adapter()
        for key, student_value in self._get_student_state_dict().items():
            if key in self.shadow_weights:
                shadow = self.shadow_weights[key]
                shadow.data = (1 - self.update_rate) * shadow.data + self.update_rate * student_value.data
        self._copy_shadow_into_teacher_adapter()

    def state_tensors(self) -> dict[str, Tensor]:
        """The EMA shadow (keys as ``get_peft_model_state_dict``), what the ``"teacher"`` adapter holds."""
        self._initialize_teacher_adapter()
        return dict(self.shadow_weights)

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state_tensors` into the shadow and the ``"teacher"`` adapter."""
        self._initialize_teacher_adapter()
        if tensors.keys() != self.shadow_weights.keys():
            difference = sorted(tensors.keys() ^ self.shadow_weights.keys())[:5]
            raise ValueError(f"the saved EMA adapter does not match this model's LoRA adapter, e.g. {difference}")
        for key, shadow in self.shadow_weights.items():
            shadow.copy_(tensors[key])
        self._copy_shadow_into_teacher_adapter()
