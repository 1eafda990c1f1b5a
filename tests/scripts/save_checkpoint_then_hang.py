"""Save a checkpoint (step 1), then start a second save that blocks halfway through writing it.

``python save_checkpoint_then_hang.py CHECKPOINT MARKER``: the second save's state holds an object whose
pickling creates ``MARKER`` and then sleeps, so when ``MARKER`` exists the process is inside
``save_checkpoint``, its temporary file open, and a SIGKILL interrupts the write for certain.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from sdpo_ops.adapters import save_checkpoint


class BlocksWhilePickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).touch()
        time.sleep(600)
        return (BlocksWhilePickled, (self.marker,))


def main() -> None:
    checkpoint, marker = sys.argv[1], sys.argv[2]
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    save_checkpoint(checkpoint, model=model, step=1)
    with torch.no_grad():
        model.weight.fill_(2.0)
    # Some megabytes before the blocking object, so part of the new file is on disk when the process dies.
    save_checkpoint(
        checkpoint, model=model, step=2, extra={"bulk": torch.ones(1 << 20), "block": BlocksWhilePickled(marker)}
    )


if __name__ == "__main__":
    main()
