"""Checkpoints that are whole, finite and safe to load, and that always land.

- `AtomicCheckpointIO` (Lightning's checkpoint IO plugin): every checkpoint is written to a temporary
  file in its own folder, flushed to disk and renamed, so a crash, a kill or a full disk never leaves
  a half-written file under a checkpoint's name; a checkpoint whose weights are not all finite is
  refused before anything is written; a failed write raises `CheckpointWriteError`, one line naming
  the path and, for a full disk, the space needed.
- `LastCheckpoint`: ``last.ckpt`` after every training epoch, whatever the validation period, and
  when fit ends between epochs (``max_steps``, a stop request).
- `ExceptionCheckpoint`: ``on_exception.ckpt`` when training dies of an exception other than a
  failed checkpoint write (saving again onto a full disk would only bury the first error). It is not
  Lightning's ``OnExceptionCheckpoint``: that one makes ``fit(ckpt_path=None)`` look for a checkpoint
  to resume in the run folder, so a new run there would silently continue an old one.
- `read_checkpoint`: ``torch.load(weights_only=True)``; a checkpoint that needs arbitrary code to
  load is refused with its name unless the user opts in (``allow_unsafe_checkpoint=true``).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from anchordet.errors import ConfigError

log = logging.getLogger("anchordet.checkpointing")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; nothing was left under its name."""


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint would have held NaN or infinite weights; it was not written."""


def non_finite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [name for name, tensor in state_dict.items()
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _tensor_bytes(value: Any) -> int:
    """Bytes of all tensors inside a nested checkpoint: close to the file size (for the message)."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def describe_write_error(error: OSError, path: Path, size_bytes: int) -> str:
    """One line for the user: which file, why, and what would fix it."""
    if error.errno == errno.ENOSPC:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        return (f"cannot write checkpoint {path}: the disk is full (about {size_bytes / 2**20:.0f} MiB needed, "
                f"{free / 2**20:.0f} MiB free); free space or point hydra.run.dir at another disk")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write checkpoint {path}: the folder {path.parent} is not writable ({error.strerror}); "
                "point hydra.run.dir at a writable folder")
    return f"cannot write checkpoint {path}: {error}"


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an exception: torch.save reports a full disk as the zip writer's
    RuntimeError, with the OSError only in its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: finite weights only, written to a temporary file and renamed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteWeightsError(
                f"not writing checkpoint {path}: {len(bad)} weight tensors hold NaN or infinite values "
                f"(first: {', '.join(bad[:3])}); training has diverged, see the non-finite guard's message")
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Same folder as the target: the rename stays on one filesystem, so it is atomic.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            tmp = None
        except (OSError, RuntimeError) as error:
            cause = _os_error_in(error)
            if cause is None:
                raise
            raise CheckpointWriteError(describe_write_error(cause, path, _tensor_bytes(checkpoint))) from error
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` at the end of every training epoch and at the end of fit.

    Lightning's ``ModelCheckpoint`` saves after validation by default, so with validation every
    second epoch an odd epoch count used to lose its last epoch; saving at the end of the training
    epoch (after that epoch's validation, when it has one) does not depend on the validation period.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last") -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit that ends between epochs (max_steps, should_stop) has steps no epoch end saved.
        if self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_checkpoint(trainer, self.format_checkpoint_name({}))
            self._last_global_step_saved = trainer.global_step


class ExceptionCheckpoint(Callback):
    """``<dirpath>/on_exception.ckpt`` when fit dies of an exception, so the work can be resumed
    (``resume=true`` considers it); not after a failed checkpoint write or a non-finite refusal."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "on_exception") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (CheckpointWriteError, NonFiniteWeightsError)):
            return
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # a full, resumable one
        except Exception as error:  # never replace the exception that is ending the run
            log.error("could not write %s after the error above: %s", self.path, error)
        else:
            log.info("wrote %s; resume with ckpt_path=%s", self.path, self.path)


def read_checkpoint(path: str | os.PathLike, allow_unsafe: bool = False) -> dict:
    """Load a checkpoint file written by this project, with an error that says what is wrong.

    Tensors and plain Python values only (``torch.load(weights_only=True)``): unpickling arbitrary
    objects runs code, so a checkpoint that needs it is refused, naming the file and the opt-in.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r}: no such checkpoint file. Pass the path of a .ckpt written by "
            "train.py, e.g. outputs/runs/<date>/<time>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_unsafe)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler names the global it refused; anything else is a corrupt file.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise ConfigError(f"ckpt_path={str(path)!r} could not be read as a PyTorch checkpoint: it is not a "
                             "checkpoint file, or a damaged one") from None
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds objects that would run code when loaded (it needs "
            f"{refused.group(1)}); it was not written by this project's train.py. Load it only if you trust "
            "its source: pass allow_unsafe_checkpoint=true") from None
    except Exception as error:  # torch raises several types for corrupt files
        raise ConfigError(f"ckpt_path={str(path)!r} could not be read as a PyTorch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or "anchordet" not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={str(path)!r} is not an anchordet checkpoint (no 'anchordet' section): it was "
            "not written by train.py of this project")
    return checkpoint
