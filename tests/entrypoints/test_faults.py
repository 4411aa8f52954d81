"""Faults a user meets, run as the user runs them: a diverging run, an odd epoch count, a kill in the
middle of an epoch, a crafted checkpoint, a full disk, a NaN on one DDP rank, output into a file.
Each test names what the user sees and checks that no work is lost or corrupted."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts training processes

TINY = ("experiment=tiny", "data.num_train=32")  # 8 steps per epoch at batch 4


def checkpoints(run_dir: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True)
            for p in sorted((run_dir / "checkpoints").glob("*.ckpt"))}


def all_finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_a_diverging_run_stops_with_one_message_and_leaves_only_finite_checkpoints(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *TINY, "optim.optimizer.lr=1e6", "optim.scheduler.warmup_steps=0",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite training step")
    # The learning rate the step ran with (1e6 as set, less what the cosine schedule took off).
    lr_now = float(re.search(r"optim\.optimizer\.lr \(now ([^)]+)\)", last_line).group(1))
    assert 5e5 < lr_now <= 1e6, last_line
    assert "loss_obj=" in last_line and "Traceback" not in result.stderr
    saved = checkpoints(run_dir)
    assert "on_exception.ckpt" in saved  # the last good weights, to resume from with a lower lr
    assert all(all_finite(c) for c in saved.values()), list(saved)
    assert not (run_dir / "result.json").exists()


def test_the_default_validation_period_still_leaves_last_ckpt_after_every_epoch(run_cli, tmp_path):
    odd, short = tmp_path / "odd", tmp_path / "short"
    run_cli("train.py", *TINY, "trainer.check_val_every_n_epoch=2", "trainer.max_epochs=3",
            "callbacks.step_checkpoint.every_n_train_steps=8",
            f"hydra.run.dir={odd}", cwd=tmp_path)
    saved = checkpoints(odd)
    assert saved["last.ckpt"]["global_step"] == 24 and saved["last.ckpt"]["epoch"] == 2
    assert {"epoch001-best.ckpt", "step-0000024.ckpt"} <= set(saved)  # names as documented
    # A run that ends between epochs (max_steps) saves its last step too.
    run_cli("train.py", *TINY, "trainer.max_steps=3", f"hydra.run.dir={short}", cwd=tmp_path)
    assert checkpoints(short)["last.ckpt"]["global_step"] == 3


EXACT = (*TINY, "trainer.deterministic=true", "trainer.max_epochs=1",
         "callbacks.step_checkpoint.every_n_train_steps=2")


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_mid_epoch_then_resumed_equals_the_uninterrupted_run(run_cli, tmp_path, workers):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = (*EXACT, f"data.num_workers={workers}")
    run_cli("train.py", *common, f"hydra.run.dir={straight}", cwd=tmp_path)
    # SIGKILL right after step 5 (faults.KillAtStep): no clean-up; the newest checkpoint is step 4's.
    result = run_cli("train.py", *common, "+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=5",
                     f"hydra.run.dir={killed}", cwd=tmp_path, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert list(checkpoints(killed)) == ["step-0000004.ckpt"]
    run_cli("train.py", *common, "resume=true", f"hydra.run.dir={killed}", cwd=tmp_path)

    expected, resumed = checkpoints(straight)["last.ckpt"], checkpoints(killed)["last.ckpt"]
    assert resumed["global_step"] == expected["global_step"] == 8
    differences = {name: (resumed["state_dict"][name].float() - tensor.float()).abs().max().item()
                   for name, tensor in expected["state_dict"].items()}
    assert max(differences.values()) == 0.0, {k: v for k, v in differences.items() if v}


def test_evaluate_and_resume_refuse_a_checkpoint_that_would_run_code(run_cli, tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    (tmp_path / "make.py").write_text(
        "import sys, torch\n"
        "class RunsCode:\n"
        "    def __reduce__(self):\n"
        f"        return (open, ({str(marker)!r}, 'w'))\n"
        "torch.save({'state_dict': {}, 'anchordet': {}, 'x': RunsCode()}, sys.argv[1])\n")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(tmp_path / "make.py"), str(crafted)], check=True)
    for script, extra in (("evaluate.py", ()), ("train.py", TINY)):
        result = run_cli(script, *extra, f"ckpt_path={crafted}", f"hydra.run.dir={tmp_path / script}",
                         cwd=tmp_path, check=False)
        assert result.returncode != 0 and "would run code" in result.stderr, result.stderr[-2000:]
        assert "allow_unsafe_checkpoint=true" in result.stderr
        assert not marker.exists()


def test_a_full_disk_shows_the_first_error_once_and_leaves_no_file_under_a_checkpoint_name(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *TINY, "+callbacks.fill_disk._target_=faults.FillDisk",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert result.returncode == 1
    # The log line (stdout, like every log line) and the exit message (stderr), nothing else.
    assert result.stdout.count("cannot write checkpoint") == 1 and result.stderr.count("cannot write checkpoint") == 1
    assert "the disk is full (about" in result.stderr and "MiB needed" in result.stderr
    assert "Traceback" not in result.stderr and "on_exception" not in result.stderr
    assert list((run_dir / "checkpoints").iterdir()) == []  # neither a partial file nor a temporary one


def test_a_nan_on_one_ddp_rank_stops_every_rank(run_cli, tmp_path):
    result = run_cli("train.py", *TINY, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "+callbacks.nan._target_=faults.NanLossOnRank", "+callbacks.nan.rank=1",
                     "+callbacks.nan.step=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
                     timeout=300)  # a rank left waiting for its peer fails here, not forever
    assert result.returncode != 0
    # DDP averages the gradients, so rank 1's NaN reaches rank 0's too. Every rank stops on the same step
    # with one message naming both ranks; rank 0 always prints it, rank 1 only if the launcher has not
    # ended it first.
    messages = [line for line in result.stderr.splitlines() if line.startswith("error: non-finite training step 2")]
    assert 1 <= len(messages) <= 2 and len(set(messages)) == 1, messages
    assert "the loss is not finite and the gradients are not finite (loss_obj=nan" in messages[0]
    assert "on rank 1)" in messages[0] and "the gradients are not finite (loss_obj=" in messages[0]
    assert "on rank 0)" in messages[0]


def test_output_into_a_file_shows_progress_lines_and_no_avoidable_warnings(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *TINY, "trainer.enable_progress_bar=true",
                     "callbacks.progress_bar={_target_: anchordet.progress.progress_bar, every_n_steps: 4}",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    log = (run_dir / "train.log").read_text()
    assert "step 4/8 epoch 0: loss_obj=" in log and " loss=" in log and "images/s" in log and "left" in log
    assert "step 8/8 epoch 0" in log and "validation after step 8 (epoch 0): val/mAP=" in log
    assert "model: 14.4 M parameters" in log
    for avoidable in ("was called without a model", "no last checkpoint available", "Total FLOPs",
                      "overridden `on_after_batch_transfer`", "anchor fitness"):
        assert avoidable not in result.stderr + result.stdout, avoidable
