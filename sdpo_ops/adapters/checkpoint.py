"""Checkpoints for a hand-written SDPO loop: student, EMA teacher, optimizer, step and RNG in one file.

One call each way::

    save_checkpoint("run/checkpoint.pt", model=model, teacher=teacher, optimizer=optimizer, step=step)
    step = load_checkpoint("run/checkpoint.pt", model=model, teacher=teacher, optimizer=optimizer).step

The file is written atomically: to a temporary name in the same directory, flushed to disk, then renamed over
the old one (``os.replace``). A process killed mid-save leaves the previous checkpoint whole and loadable, and
at worst a stray ``*.tmp-*`` file beside it.

The RNG state covers Python's ``random``, torch's CPU generator, every CUDA device's generator (when CUDA is
initialised) and NumPy's global generator (when NumPy is imported), so a resumed loop samples the same rollouts
as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdpo_ops.adapters.teacher import EMATeacher

__all__ = ["LoadedCheckpoint", "atomic_write", "load_checkpoint", "save_checkpoint"]

# Bumped when the layout of the saved dict changes; a file of another version is refused, never misread.
CHECKPOINT_FORMAT = "sdpo_ops.checkpoint/1"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then move the result to ``path`` in one rename.

    The temporary file lives in ``path``'s directory (a rename is atomic only within one filesystem) and is
    fsynced before the rename, so ``path`` is always either the previous complete file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(descriptor)
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
        # As a tensor: the file then loads with torch.load(weights_only=True).
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached_gaussian)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype(numpy.uint32), position, has_gauss, cached_gaussian))


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored besides the objects it was given.

    Attributes:
        step: the ``step`` passed to :func:`save_checkpoint` (e.g. the number of completed optimizer steps).
        extra: the ``extra`` dict passed to :func:`save_checkpoint` (anything torch.save can store).
    """

    step: int
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    step: int,
    teacher: EMATeacher | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the training state to ``path`` atomically (the previous file stays intact until the rename).

    Args:
        path: the checkpoint file (its directory is created).
        model: the student; its ``state_dict()`` is saved.
        step: the loop's progress counter, returned by :func:`load_checkpoint`.
        teacher: the :class:`EMATeacher`, saved through :meth:`EMATeacher.state_dict` (the full copy or the
            shadow adapter, and its update counters). A frozen separate teacher needs no saving.
        optimizer, scheduler: anything with ``state_dict()``/``load_state_dict()``.
        extra: more picklable state (e.g. a data cursor).
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model": model.state_dict(),
        "teacher": None if teacher is None else teacher.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    teacher: EMATeacher | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
) -> LoadedCheckpoint:
    """Restore what :func:`save_checkpoint` wrote into the given objects (in place); returns the step.

    Build the model, teacher, optimizer and scheduler as for a fresh run, then call this before the first step.
    Raises ``ValueError`` when the file lacks a part that is asked for (e.g. a ``teacher`` but none was saved).
    """
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not an sdpo_ops checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    for name, target in (("teacher", teacher), ("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None and state[name] is None:
            raise ValueError(f"{path} holds no {name} state, but a {name} was given to restore")
    model.load_state_dict(state["model"])
    if teacher is not None:
        teacher.load_state_dict(state["teacher"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return LoadedCheckpoint(step=state["step"], extra=state["extra"])
