"""The SDPO teacher: an exponential moving average of the student, run without gradient.

``teacher <- (1 - r) teacher + r student`` with ``r = update_rate`` (0.05 officially, 0.01 in the
rich-feedback runs; ``r = 0`` keeps the initial student, TRL's ``teacher_model_kind="base"``). Two ways of
holding the average:

- ``"copy"``: a full deep copy of the student (``requires_grad=False``, eval mode), averaged parameter by
  parameter; buffers are copied from the student. TRL's ``SyncTeacherModelCallback``, the official code.
- ``"shadow"``: for PEFT (LoRA) students and any model whose base is frozen: only the *trainable* parameters
  get a shadow copy, averaged like the copy; the teacher forward runs the student model itself with the
  shadow tensors swapped in (:meth:`EMATeacher.forward_context`). Frozen weights are shared, so the teacher
  costs the size of the adapter. The swap replaces the parameter *objects* for the duration of the context
  and never writes into the student's tensors, so a student graph built before or after stays valid.
  (TRL keeps a second PEFT adapter, initialised to zeros; here the shadow starts as a copy of the student's
  adapter, so the teacher starts equal to the student, as the official EMA does.)

When to average (SPEC section 4): TRL after every optimizer step, the official code once per generation
batch, after all the optimizer steps on it. Call both hooks in the training loop,
:meth:`EMATeacher.on_optimizer_step` after each ``optimizer.step()`` and
:meth:`EMATeacher.on_generation_batch_end` after the last step on a batch of rollouts; ``sync_on`` picks
the one that acts, and ``update_every`` thins it further (TRL's ``teacher_sync_steps``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sdpo_ops.adapters.heads import holds_quantized_weight

SyncOn = Literal["optimizer_step", "generation_batch"]


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT wrapper (``PeftModel`` or a model with injected adapters), recognised without importing peft."""
    return hasattr(model, "peft_config")


def _resolve(model: nn.Module, dotted_name: str) -> tuple[nn.Module, str]:
    """The module that owns parameter ``dotted_name`` and the parameter's local name."""
    owner_path, _, leaf = dotted_name.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), leaf


@torch.no_grad()
def _lerp_into(target: Tensor, source: Tensor, rate: float) -> None:
    """``target <- (1 - rate) target + rate source`` computed in fp32 and rounded once into ``target``."""
    mixed = torch.lerp(target.float(), source.detach().to(device=target.device, dtype=torch.float32), rate)
    target.copy_(mixed)


class EMATeacher:
    """EMA teacher of a student model, with a forward that never builds a graph.

    Args:
        student: the model being trained (a ``transformers`` causal LM, a PEFT model, any ``nn.Module``).
        update_rate: ``r`` in ``teacher <- (1 - r) teacher + r student``, in [0, 1]; 0 freezes the initial
            student.
        update_every: average on every n-th event of the ``sync_on`` kind (TRL's ``teacher_sync_steps``).
        sync_on: ``"optimizer_step"`` (TRL) or ``"generation_batch"`` (the official code): which hook acts.
        mode: ``"copy"``, ``"shadow"``, or ``"auto"`` (shadow for PEFT models, copy otherwise).

    Example:
        >>> student = torch.nn.Linear(2, 2)
        >>> teacher = EMATeacher(student, update_rate=0.5)
        >>> with torch.no_grad():
        ...     _ = student.weight.add_(1.0)
        >>> teacher.update(student)
        True
        >>> bool(torch.allclose(teacher.model.weight, student.weight - 0.5))
        True
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        update_rate: float = 0.05,
        update_every: int = 1,
        sync_on: SyncOn = "optimizer_step",
        mode: Literal["auto", "copy", "shadow"] = "auto",
    ):
        if not 0.0 <= update_rate <= 1.0:
            raise ValueError(f"update_rate must be in [0, 1], got {update_rate}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if sync_on not in ("optimizer_step", "generation_batch"):
            raise ValueError(f"sync_on must be 'optimizer_step' or 'generation_batch', got {sync_on!r}")
        if mode == "auto":
            mode = "shadow" if is_peft_model(student) else "copy"
        if mode not in ("copy", "shadow"):
            raise ValueError(f"mode must be 'auto', 'copy' or 'shadow', got {mode!r}")
        self.update_rate = float(update_rate)
        self.update_every = int(update_every)
        self.sync_on: SyncOn = sync_on
        self.mode = mode
        self.num_events = 0
        self.num_updates = 0
        if mode == "copy":
            self.model = copy.deepcopy(student)
            self.model.requires_grad_(False)
            self.model.eval()
            self.shadow: dict[str, nn.Parameter] = {}
        else:
            self.model = student
            self.shadow = {
                name: nn.Parameter(param.detach().clone(), requires_grad=False)
                for name, param in student.named_parameters()
                if param.requires_grad
            }
            if not self.shadow:
                raise ValueError(
                    "mode='shadow' averages the trainable parameters, but the student has none "
                    "(requires_grad is False everywhere)"
                )

    # ------------------------------------------------------------------ averaging

    @torch.no_grad()
    def update(self, student: nn.Module) -> bool:
        """Count one update request; on every ``update_every``-th, average the student in. Returns whether it did.

        ``update_rate == 0`` never changes the teacher (a frozen initial teacher).
        """
        self.num_events += 1
        if self.num_events % self.update_every != 0:
            return False
        self.num_updates += 1
        if self.update_rate == 0.0:
            return True
        student_params = dict(student.named_parameters())
        if self.mode == "shadow":
            for name, shadow in self.shadow.items():
                if name not in student_params:
                    raise KeyError(f"the student has no parameter {name!r} that the EMA teacher tracks")
                _lerp_into(shadow, student_params[name], self.update_rate)
            return True
        teacher_params = dict(self.model.named_parameters())
        if teacher_params.keys() != student_params.keys():
            missing = sorted(teacher_params.keys() ^ student_params.keys())[:5]
            raise KeyError(f"the student's parameters differ from the teacher's, e.g. {missing}")
        for name, teacher_param in teacher_params.items():
            _lerp_into(teacher_param, student_params[name], self.update_rate)
        student_buffers = dict(student.named_buffers())
        for name, buffer in self.model.named_buffers():
            if name in student_buffers:
                buffer.copy_(student_buffers[name])
        return True

    def on_optimizer_step(self, student: nn.Module) -> bool:
        """Call after every ``optimizer.step()``; averages when ``sync_on == "optimizer_step"`` (TRL)."""
        return self.update(student) if self.sync_on == "optimizer_step" else False

    def on_generation_batch_end(self, student: nn.Module) -> bool:
        """Call after the last optimizer step on a batch of rollouts; averages if ``sync_on == "generation_batch"``."""
        return self.update(student) if self.sync_on == "generation_batch" else False

    # ------------------------------------------------------------------ forward

    @contextmanager
    def forward_context(self) -> Iterator[nn.Module]:
        """Route a forward of :attr:`model` to the teacher's weights, without gradient, dropout off.

        Yields the model to call. In ``"copy"`` mode that is the frozen copy; in ``"shadow"`` mode it is the
        student with its trainable parameters replaced by the shadow ones and dropout off, restored on exit.
        """
        with torch.no_grad():
            if self.mode == "copy":
                yield self.model
                return
            originals: list[tuple[nn.Module, str, nn.Parameter]] = []
            training = [(module, module.training) for module in self.model.modules()]
            try:
                for name, shadow in self.shadow.items():
                    owner, leaf = _resolve(self.model, name)
                    originals.append((owner, leaf, owner._parameters[leaf]))
                    # Replace the entry, not the tensor's data: the student's own tensors stay untouched.
                    owner._parameters[leaf] = shadow
                _eval_except_quantized_layers(self.model)
                yield self.model
            finally:
                for owner, leaf, original in reversed(originals):
                    owner._parameters[leaf] = original
                for module, was_training in training:
                    module.training = was_training

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the teacher's weights, under ``torch.no_grad()``."""
        with self.forward_context() as model:
            return model(*args, **kwargs)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The teacher's weights (the copy's state dict or the shadow tensors) and the event counters."""
        weights = (
            self.model.state_dict()
            if self.mode == "copy"
            else {name: shadow.detach().clone() for name, shadow in self.shadow.items()}
        )
        return {"weights": weights, "num_events": self.num_events, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.mode == "copy":
            self.model.load_state_dict(state["weights"])
        else:
            if state["weights"].keys() != self.shadow.keys():
                raise KeyError("the saved shadow parameters differ from this teacher's")
            for name, value in state["weights"].items():
                self.shadow[name].copy_(value)
        self.num_events = int(state["num_events"])
        self.num_updates = int(state["num_updates"])


def _eval_except_quantized_layers(model: nn.Module) -> None:
    """Eval mode (dropout off) for every module but the quantised linear layers, whose mode changes no value: in eval
    mode without gradient bitsandbytes' CPU ``Linear4bit`` repacks its weight for inference, for good (on CPUs with
    AVX512-BF16), and the student, whose weights these are in ``"shadow"`` mode, could then no longer train."""
    for module in model.modules():
        if not holds_quantized_weight(module):
            module.training = False
