"""Faults a test injects into a training process started by `run_cli`, at a known point of the run
(`+callbacks.<name>._target_=faults.<Class>`), so no test has to poll files or sleep."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process (no clean-up, no exception checkpoint, like a lost node) at the start of
    the batch that would make optimiser step ``step + 1``, i.e. right after step ``step`` finished
    and every checkpoint due at it was written."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
