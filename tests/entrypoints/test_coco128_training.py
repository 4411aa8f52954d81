"""`train.py data=coco` on real COCO files (../shared/data/coco128), val = train, a few steps."""

import json
from pathlib import Path

import pytest

COCO128 = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (COCO128 / "annotations" / "instances_train2017.json").is_file(),
    reason=f"real COCO sample not found at {COCO128} (the shared/ folder beside the checkout)")]


def test_train_on_coco128_with_the_coco_data_config(run_cli, tmp_path):
    images, annotations = COCO128 / "train2017", COCO128 / "annotations" / "instances_train2017.json"
    run_dir = tmp_path / "run"
    run_cli("train.py", "data=coco", "backbone=resnet18", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
            f"data.train_images={images}", f"data.train_annotations={annotations}",
            f"data.val_images={images}", f"data.val_annotations={annotations}",
            "data.image_size=128", "data.batch_size=4", "data.num_workers=0",
            "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "callbacks.feature_pictures=null", "callbacks.anchor_pictures.num_stat_images=8",
            f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["monitor"] == "val/mAP" and result["best"] is not None
    assert Path(result["last_checkpoint"]).is_file()
    log_text = (run_dir / "train.log").read_text()
    # 929 = 939 annotations - 10 crowd regions: what k-means was fitted to.
    assert "over 929 boxes" in log_text
