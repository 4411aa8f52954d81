"""Checkpoints: written whole or not at all, never with non-finite weights, loaded without running
code unless the user opts in."""

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

import anchordet.checkpointing as checkpointing
from anchordet.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    NonFiniteWeightsError,
    read_checkpoint,
)


def checkpoint(size: int = 1000, value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((size,), value)}, "anchordet": {"run_config": {}}, "global_step": 3}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_checkpoint_is_written_whole_and_loads(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(), path)
    assert leftovers(path.parent) == ["last.ckpt"]  # no temporary file left beside it
    assert read_checkpoint(path)["global_step"] == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path, value):
    path = tmp_path / "epoch000-best.ckpt"
    bad = checkpoint()
    bad["state_dict"]["w"][5] = value
    with pytest.raises(NonFiniteWeightsError, match=r"not writing checkpoint .*epoch000-best.ckpt.*1 weight tensors.*w"):
        AtomicCheckpointIO().save_checkpoint(bad, path)
    assert leftovers(tmp_path) == []


def test_a_full_disk_leaves_the_previous_checkpoint_intact_and_says_what_is_needed(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(value=1.0), path)
    real_save = torch.save

    def disk_full(obj, handle):
        handle.write(b"x" * 4096)  # part of the file gets onto the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*last.ckpt: the disk is full \(about 1 MiB needed"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(size=250_000, value=2.0), path)
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    assert leftovers(tmp_path) == ["last.ckpt"]
    assert read_checkpoint(path)["state_dict"]["w"][0].item() == 1.0  # the old one, whole


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpointing.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointWriteError, match=rf"folder {tmp_path} is not writable .*hydra.run.dir"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(), tmp_path / "last.ckpt")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True)
    return result.returncode == 0


def test_a_real_full_filesystem_leaves_no_file_under_the_checkpoint_name(tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root and mount rights); the monkeypatched "
                    "full-disk test above covers the same code")
    try:
        with pytest.raises(CheckpointWriteError, match="the disk is full"):
            AtomicCheckpointIO().save_checkpoint(checkpoint(size=500_000), small / "epoch000-best.ckpt")
        assert leftovers(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


class RunsCode:
    """Unpickling this creates a file: what a crafted checkpoint could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unless_the_user_opts_in(tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({**checkpoint(), "extra": RunsCode(marker)}, crafted)
    with pytest.raises(ValueError, match=r"crafted.ckpt.* would run code .*allow_unsafe_checkpoint=true"):
        read_checkpoint(crafted)
    assert not marker.exists()
    read_checkpoint(crafted, allow_unsafe=True)  # the documented opt-in really loads it
    assert marker.exists()


def test_missing_corrupt_and_foreign_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "none.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.ckpt.*could not be read"):
        read_checkpoint(tmp_path / "corrupt.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="foreign.ckpt.*not an anchordet checkpoint"):
        read_checkpoint(tmp_path / "foreign.ckpt")
    assert os.listdir(tmp_path)
