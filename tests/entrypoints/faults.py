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


class NanLossOnRank(L.Callback):
    """Turn the images of one batch on one rank into NaN (so its loss is NaN), at optimiser step
    ``step``: the other ranks see finite losses and must still stop, not wait."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = int(rank), int(step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


class FillDisk(L.Callback):
    """Make every checkpoint write fail as on a full disk, after part of the file was written."""

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        import errno

        import anchordet.checkpointing as checkpointing

        def disk_full(obj, handle) -> None:
            handle.write(b"\0" * 65536)
            raise OSError(errno.ENOSPC, "No space left on device")

        checkpointing.torch.save = disk_full
