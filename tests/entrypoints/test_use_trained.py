"""Using a trained checkpoint as a user does after training: `predict.py` on a folder of images,
`evaluate.py` on another annotation file, `export.py` to ONNX and TorchScript. Each output is read
back the way its consumer reads it: predictions through pycocotools' `loadRes`, overlays opened,
exported models run by `torch.jit.load` and onnxruntime beside the eager model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from anchordet.checkpointing import read_checkpoint
from anchordet.data.transforms import DetectionTransform
from anchordet.data.coco import read_rgb
from anchordet.export import ExportedDetector, compare_outputs, run_exported
from anchordet.trained import rebuild_module
from anchordet.viz import upscale_factor

pytestmark = pytest.mark.slow  # training, prediction and export processes

# 1 epoch of the tiny set, with Lightning's EMA callback: the checkpoint's state_dict holds the
# averaged weights, which every command must use.
EMA = "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging"
NO_FLOOR = "+head.score_thresh=0.0"


@pytest.fixture(scope="module")
def yolo_run(run_cli, tmp_path_factory):
    """(workdir, checkpoint, val images dir, val annotation file) of one tiny YOLO run with EMA."""
    workdir = tmp_path_factory.mktemp("yolo")
    run_cli("train.py", "experiment=tiny", "trainer.max_epochs=2", EMA, f"hydra.run.dir={workdir / 'run'}",
            cwd=workdir)
    ckpt = workdir / "run" / "checkpoints" / "last.ckpt"
    evaluated = workdir / "eval"
    # No score floor: a 2-epoch model's scores are low, and the comparisons need detections.
    run_cli("evaluate.py", f"ckpt_path={ckpt}", NO_FLOOR, f"hydra.run.dir={evaluated}", cwd=workdir)
    annotations = Path(json.loads((evaluated / "metrics.json").read_text())["annotation_file"])
    return workdir, ckpt, annotations.parent.parent / "val2017", annotations, evaluated


def test_the_ema_weights_are_the_checkpoint_weights(yolo_run):
    _, ckpt, *_ = yolo_run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())


def test_predict_equals_evaluate_on_the_same_images_and_skips_unreadable_files(run_cli, yolo_run, tmp_path):
    workdir, ckpt, val_images, annotations, evaluated = yolo_run
    source = tmp_path / "photos"
    shutil.copytree(val_images, source)
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "pred"
    result = run_cli("predict.py", f"ckpt_path={ckpt}", f"source={source}", "score_threshold=0.0", NO_FLOOR,
                     "num_workers=0", f"hydra.run.dir={out}", cwd=workdir)
    assert "broken.jpg" in result.stdout and "skipping" in result.stdout  # log lines go to stdout

    gt = COCO(str(annotations))
    listed = json.loads((out / "images.json").read_text())["images"]
    assert sorted(Path(i["file_name"]).name for i in listed) == sorted(i["file_name"] for i in gt.dataset["images"])
    predicted = COCO(str(out / "images.json")).loadRes(str(out / "predictions.json"))

    # The same model on the same files: predict's rows equal evaluate's detections, image by image.
    evaluated_rows = json.loads((evaluated / "detections.json").read_text())
    assert evaluated_rows, "the tiny model produced no detections to compare"
    id_of_name = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
    for image in listed:
        gt_id = id_of_name[Path(image["file_name"]).name]
        ours = sorted(predicted.imgToAnns[image["id"]], key=lambda r: -r["score"])
        theirs = sorted((r for r in evaluated_rows if r["image_id"] == gt_id), key=lambda r: -r["score"])
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) < 1e-5
            assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-3
            assert a["category_name"] == gt.cats[a["category_id"]]["name"]
        overlay = Image.open(out / "overlays" / f"{Path(image['file_name']).stem}.png")
        # Drawn on the original image: enlarged by a whole factor when small (readable labels), with
        # a legend band below.
        factor = upscale_factor(image["height"], image["width"])
        assert overlay.width == factor * image["width"] and overlay.height > factor * image["height"]


def test_predict_on_a_missing_source_names_it(run_cli, yolo_run, tmp_path):
    workdir, ckpt, *_ = yolo_run
    result = run_cli("predict.py", f"ckpt_path={ckpt}", f"source={tmp_path / 'nowhere'}",
                     f"hydra.run.dir={tmp_path / 'out'}", cwd=workdir, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: source='{tmp_path / 'nowhere'}'")


def test_evaluate_on_another_annotation_file_without_plus_or_train_paths(run_cli, yolo_run, tmp_path):
    workdir, ckpt, val_images, annotations, _ = yolo_run
    # A COCO 2017 layout holding half of the validation images: data.root=...
    data = json.loads(annotations.read_text())
    kept = data["images"][: len(data["images"]) // 2]
    subset = {**data, "images": kept,
              "annotations": [a for a in data["annotations"] if a["image_id"] in {i["id"] for i in kept}]}
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(subset))
    (tmp_path / "coco" / "val2017").symlink_to(val_images)
    run_cli("evaluate.py", f"ckpt_path={ckpt}", f"data.root={tmp_path / 'coco'}", NO_FLOOR, f"hydra.run.dir={tmp_path / 'a'}",
            cwd=workdir)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["num_images"] == len(kept)
    assert metrics["annotation_file"] == str(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    # ... and the explicit pair of paths.
    run_cli("evaluate.py", f"ckpt_path={ckpt}", f"data.val_images={val_images}",
            f"data.val_annotations={tmp_path / 'coco' / 'annotations' / 'instances_val2017.json'}",
            "data.batch_size=1", NO_FLOOR, f"hydra.run.dir={tmp_path / 'b'}", cwd=workdir)
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["num_images"] == len(kept) and again["mAP"] == metrics["mAP"]


def letterboxed(files: list[Path], size: int) -> torch.Tensor:
    transform = DetectionTransform(size, train=False)
    return torch.stack([transform(read_rgb(f), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))[0]
                        for f in files])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_gives_the_eager_detections(run_cli, yolo_run, tmp_path, fmt):
    workdir, ckpt, val_images, *_ = yolo_run
    out = tmp_path / "export"
    run_cli("export.py", f"ckpt_path={ckpt}", f"format={fmt}", "batch_size=2", NO_FLOOR, f"hydra.run.dir={out}", cwd=workdir)
    model = out / ("model.onnx" if fmt == "onnx" else "model.pt")
    sidecar = json.loads((out / f"{model.name}.json").read_text())
    checkpoint = read_checkpoint(ckpt)
    size = checkpoint["anchordet"]["run_config"]["data"]["image_size"]
    assert sidecar["input"]["shape"] == [2, 3, size, size] and sidecar["weights"] == "ema"
    assert [c["id"] for c in sidecar["categories"]] == checkpoint["anchordet"]["category_map"]["category_ids"]

    images = letterboxed(sorted(val_images.glob("*.jpg"))[:2], size)
    module = rebuild_module(checkpoint, {"score_thresh": 0.0}).eval()
    with torch.no_grad():
        eager = ExportedDetector(module.detector, size)(images)
        # The export wrapper is the detector's own eager inference, in fixed-shape form.
        predictions = module.detector.predict(module.on_after_batch_transfer((images, None))[0])
    for i, prediction in enumerate(predictions):
        n = int(eager[3][i])
        assert n == len(prediction["scores"])
        order = prediction["scores"].argsort(descending=True)
        assert torch.allclose(eager[0][i, :n], prediction["boxes"][order], atol=1e-3)
        assert torch.equal(eager[2][i, :n], prediction["labels"][order])
    assert int(eager[3].sum()) > 0, "nothing detected: the comparison would be empty"
    diff = compare_outputs(eager, run_exported(model, fmt, images))
    assert diff["same_num_detections"] and diff["same_labels"], diff
    assert diff["max_box_diff"] <= 1e-3 and diff["max_score_diff"] <= 1e-4, diff


def test_export_rejects_an_unknown_format_by_name(run_cli, yolo_run, tmp_path):
    workdir, ckpt, *_ = yolo_run
    result = run_cli("export.py", f"ckpt_path={ckpt}", "format=tflite", f"hydra.run.dir={tmp_path}",
                     cwd=workdir, check=False)
    assert result.returncode == 1 and "format='tflite'" in result.stderr and "Traceback" not in result.stderr


def test_an_rpn_checkpoint_predicts_and_exports_proposals(run_cli, tmp_path):
    run_cli("train.py", "head=rpn", "experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    images = sorted((tmp_path / "outputs" / "data").rglob("val2017/*.jpg"))
    # The module forms of predict and export (`python -m anchordet.predict`), from a folder outside the checkout.
    run_cli("-m anchordet.predict", f"ckpt_path={ckpt}", f"source={images[0].parent}", "max_detections=50",
            "overlays=false", f"hydra.run.dir={tmp_path / 'pred'}", cwd=tmp_path)
    proposals = COCO(str(tmp_path / "pred" / "images.json")).loadRes(str(tmp_path / "pred" / "predictions.json"))
    per_image = [len(proposals.imgToAnns[i]) for i in proposals.getImgIds()]
    assert len(per_image) == len(images) and all(0 < n <= 50 for n in per_image)
    assert {a["category_name"] for a in proposals.dataset["annotations"]} == {"object"}
    run_cli("-m anchordet.export", f"ckpt_path={ckpt}", "format=onnx", "max_detections=50", f"hydra.run.dir={tmp_path / 'x'}",
            cwd=tmp_path)
    sidecar = json.loads((tmp_path / "x" / "model.onnx.json").read_text())
    assert sidecar["task"] == "proposals" and sidecar["outputs"]["max_detections"] == 50
