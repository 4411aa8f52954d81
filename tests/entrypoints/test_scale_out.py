"""Scale-out: real multi-process DDP (2 CPU processes, gloo) under Hydra, sweeps, exact resume.

Each test starts `train.py` / `evaluate.py` in fresh processes, as a user would; Lightning then
starts the second rank by re-running the script.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow  # every test here starts training processes

DDP = ("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_ddp_run_writes_one_folder_with_one_writer(run_cli, tmp_path):
    # No hydra.run.dir given: the default outputs/runs/<date>/<time> is what ranks used to disagree on.
    run_cli("train.py", "experiment=tiny", *DDP, cwd=tmp_path)
    run_dirs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the second rank ran, in this folder
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch000-best.ckpt", "last.ckpt"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json.loads((run_dir / "result.json").read_text())["monitor"] == "val/mAP"


def test_ddp_inside_a_multirun_sweep(run_cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli("train.py", "-m", "experiment=tiny", *DDP, "optim.optimizer.lr=0.01,0.02",
            f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep_dir / job / "train_ddp_process_1.log").is_file()
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["run"] for row in rows] == ["0", "1"]
    assert "optim.optimizer.lr=0.01" in rows[0]["overrides"] and "optim.optimizer.lr=0.02" in rows[1]["overrides"]
    assert all(Path(row["best_checkpoint"]).is_file() for row in rows)
    assert not (tmp_path / "outputs" / "runs").exists()  # no stray single-run folders from ranks


def test_validation_on_two_ranks_equals_one_process_with_21_images(run_cli, tmp_path):
    # Score threshold 0 so an under-trained model still writes 100 detections per image:
    # a rank counting its padded duplicate image twice, or skipping one, changes the rows.
    run_dir = tmp_path / "run"
    run_cli("train.py", "experiment=tiny", "data.num_val=21", "head.score_thresh=0.0",
            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    outputs = {}
    for devices in (1, 2):
        out_dir = tmp_path / f"eval{devices}"
        run_cli("evaluate.py", f"ckpt_path={checkpoint}", f"devices={devices}", "accelerator=cpu",
                f"hydra.run.dir={out_dir}", cwd=tmp_path)
        outputs[devices] = (json.loads((out_dir / "metrics.json").read_text()),
                            json.loads((out_dir / "detections.json").read_text()))
    (metrics1, detections1), (metrics2, detections2) = outputs[1], outputs[2]
    assert metrics1["num_images"] == metrics2["num_images"] == 21
    assert len(detections1) > 21
    # Same rows per image; values equal up to float noise (a rank's batches differ in size, and
    # batched convolutions round differently), so compare sorted rows with a tolerance.
    per_image = lambda rows: {i: sum(r["image_id"] == i for r in rows) for i in {r["image_id"] for r in rows}}
    assert per_image(detections2) == per_image(detections1)
    as_tensor = lambda rows: torch.tensor(sorted([r["image_id"], r["category_id"], *r["bbox"]] for r in rows))
    torch.testing.assert_close(as_tensor(detections2), as_tensor(detections1), rtol=0, atol=0.05)
    for name in ("mAP", "mAP_50", "mAP_75", "AR_100"):
        assert metrics2[name] == pytest.approx(metrics1[name], abs=1e-4)


def write_mostly_empty_dataset(root: Path) -> dict[str, Path]:
    """4 images, only one with an object: with 2 ranks one rank sees only empty images."""
    images = root / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for image_id in range(1, 5):
        Image.new("RGB", (64, 48), (30 * image_id, 90, 90)).save(images / f"{image_id}.jpg")
        entries.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 64, "height": 48})
    annotations.append({"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 12],
                        "area": 240, "iscrowd": 0})
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps({"images": entries, "annotations": annotations,
                                           "categories": [{"id": 1, "name": "box"}]}))
    return {"images": images, "annotations": annotation_file}


def test_ddp_rank_with_only_empty_images_finishes(run_cli, tmp_path):
    data = write_mostly_empty_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py", *DDP, "data=coco", "backbone=resnet18", "anchor=grid",
        "trainer.check_val_every_n_epoch=1", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
        f"data.train_images={data['images']}", f"data.train_annotations={data['annotations']}",
        f"data.val_images={data['images']}", f"data.val_annotations={data['annotations']}",
        "data.image_size=64", "data.batch_size=1", "data.num_workers=0", "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300)  # a hang fails here, not forever
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), result.stderr[-2000:]
    assert checkpoint_state(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4  # 2 per rank x 2 epochs


EXACT = ("experiment=tiny", "trainer.deterministic=true", "optim.scheduler.warmup_steps=0",
         "optim.scheduler.min_lr_factor=1.0")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(run_cli, tmp_path):
    # Constant learning rate: a 1-epoch run plans its schedule for 1 epoch, so with warm-up/cosine
    # "1 epoch, then continue to 2" is legitimately a different schedule from "2 epochs".
    straight, first = tmp_path / "straight", tmp_path / "first"
    run_cli("train.py", *EXACT, "trainer.max_epochs=2", f"hydra.run.dir={straight}", cwd=tmp_path)
    run_cli("train.py", *EXACT, "trainer.max_epochs=1", f"hydra.run.dir={first}", cwd=tmp_path)
    resumed_log_dir = tmp_path / "resume_launch"
    result = run_cli("train.py", *EXACT, "trainer.max_epochs=2",
                     f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={resumed_log_dir}",
                     cwd=tmp_path)
    log_text = (resumed_log_dir / "train.log").read_text()
    assert "anchors from the checkpoint" in log_text and "k-means anchors (k=" not in log_text

    expected = checkpoint_state(straight / "checkpoints" / "last.ckpt")
    resumed = checkpoint_state(first / "checkpoints" / "last.ckpt")  # the resumed run writes into its own folder
    assert resumed["global_step"] == expected["global_step"] == 4
    assert resumed["epoch"] == expected["epoch"]
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    # Logging continued in the same TensorBoard run folder.
    assert len(list((first / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert not (resumed_log_dir / "tensorboard").exists(), result.stdout[-500:]
