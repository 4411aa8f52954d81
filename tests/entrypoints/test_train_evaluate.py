"""`train.py` and `evaluate.py` end to end on tiny synthetic data, as a user runs them (subprocesses),
and `evaluate.py`'s numbers checked against pycocotools run directly on its detections.json."""

import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

pytestmark = pytest.mark.slow  # training and evaluation processes


@pytest.fixture(scope="module")
def trained_run(run_cli, tmp_path_factory):
    """One tiny training run shared by the tests below (ResNet-18, 64 px, 1 epoch)."""
    workdir = tmp_path_factory.mktemp("train")
    run_dir = workdir / "run"
    run_cli("train.py", "experiment=tiny", f"hydra.run.dir={run_dir}", cwd=workdir)
    return workdir, run_dir


def test_train_writes_checkpoints_tensorboard_and_caches(trained_run):
    workdir, run_dir = trained_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any((run_dir / "checkpoints").glob("epoch*-best.ckpt"))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "outputs" / "data" / "synthetic").is_dir()
    assert list((workdir / "outputs" / "cache" / "anchors").glob("*.json"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss_obj_step", "train/loss_cls_step", "train/loss_box_step", "val/mAP",
                "val/mAP_50", "val/mAP_75", "val/mAP_small", "val/mAP_medium", "val/mAP_large",
                "anchors/kmeans/mean_best_iou"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert any(tag.startswith("lr-") for tag in scalars)


def test_hparams_tab_holds_the_run_settings_and_final_metrics(trained_run):
    """The event file carries one HParams session (what TensorBoard's HParams tab reads) whose
    settings are the run's config and whose `hp/best` equals the best value in result.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    _, run_dir = trained_run
    event_files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # written before Lightning closed the logger
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    content = events.PluginTagToContent("hparams")
    session = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for key, value in session.hparams.items()}
    assert hparams["choice/backbone"] == "resnet18" and hparams["choice/experiment"] == "tiny"
    assert hparams["data.image_size"] == 64 and hparams["optim.optimizer.lr"] == pytest.approx(0.01)
    assert hparams["monitor"] == "val/mAP"
    assert not any(key.startswith(("paths.", "callbacks.", "logger.")) for key in hparams)
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {"hp/best", "hp/mAP", "hp/mAP_50"} <= metric_tags
    best = json.loads((run_dir / "result.json").read_text())["best"]
    assert events.Scalars("hp/best")[-1].value == pytest.approx(best, abs=1e-6)


def test_evaluate_matches_pycocotools_on_written_detections(run_cli, trained_run, tmp_path):
    workdir, run_dir = trained_run
    out_dir = tmp_path / "eval"
    result = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                 f"hydra.run.dir={out_dir}", cwd=workdir)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.stdout
    assert "| class" in result.stdout
    metrics = json.loads((out_dir / "metrics.json").read_text())
    overlays = sorted((out_dir / "overlays").glob("*.png"))
    assert len(overlays) == 4  # the tiny val split has 4 images; default num_overlays is 8
    from PIL import Image

    assert Image.open(overlays[0]).size[0] >= 64
    detections = json.loads((out_dir / "detections.json").read_text())
    annotation_file = metrics["annotation_file"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotation_file)
        if detections:
            evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
            evaluator.evaluate(); evaluator.accumulate(); evaluator.summarize()
    if detections:
        names = ["mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large"]
        for name, value in zip(names, evaluator.stats):
            assert metrics[name] == pytest.approx(value, abs=1e-4), name
        valid_ids = {c["id"] for c in gt.dataset["categories"]}
        assert {d["category_id"] for d in detections} <= valid_ids
        assert {d["image_id"] for d in detections} <= set(gt.getImgIds())
    assert metrics["num_images"] == len(gt.getImgIds())


def test_evaluate_bad_checkpoint_path_is_a_clear_error(run_cli, tmp_path):
    result = run_cli("evaluate.py", "ckpt_path=/nonexistent/last.ckpt", f"hydra.run.dir={tmp_path}",
                     cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "ckpt_path='/nonexistent/last.ckpt': no such checkpoint file" in result.stderr


def test_evaluate_rejects_data_with_other_classes(run_cli, trained_run, tmp_path):
    workdir, run_dir = trained_run
    from PIL import Image

    other = tmp_path / "other.json"
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 24), (90, 90, 90)).save(tmp_path / "images" / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10],
                             "area": 100, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "cat"}]}
    other.write_text(json.dumps(data))
    result = run_cli(
        "evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"data.val_images={tmp_path / 'images'}", f"data.val_annotations={other}",
        f"hydra.run.dir={tmp_path / 'out'}", cwd=workdir, check=False)
    assert result.returncode != 0
    # The file is named, and the map it is checked against (the checkpoint's).
    assert f"the categories of {other} differ from the category map in use" in result.stderr
    assert "checkpoint" in result.stderr and "Traceback" not in result.stderr
