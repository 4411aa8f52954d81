"""Export a trained detector to TorchScript or ONNX: image batch in, boxes, scores and labels out.

Shape glossary: B images (fixed at export), S the trained input side, D ``max_detections``.

The exported model takes a batch ``images [B, 3, S, S]`` of RGB pixels 0-255 (uint8, or float32
with ``input_dtype="float32"``), already letterboxed to the trained size (longest side resized to
S, centred on a grey 114 canvas: what `anchordet.data.transforms` does), and returns

- ``boxes [B, D, 4]`` float32 xyxy in network-input pixels,
- ``scores [B, D]`` float32, sorted within each image,
- ``labels [B, D]`` int64 contiguous labels (``category_ids[label]`` in the sidecar), -1 in empty slots,
- ``num_detections [B]`` int64, the filled slots of each image,

after the head's decoding and NMS, with the head's own inference settings. Normalisation, the
anchors of size S, decoding and NMS (torchvision's, which ONNX has as NonMaxSuppression) are inside
the graph: fixed shapes throughout, via `select_padded`. A JSON sidecar beside the file says all of
this for a deployer: input size, dtype, normalisation, letterbox, category ids and names, anchors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from anchordet.data.transforms import PAD_VALUE
from anchordet.errors import ConfigError
from anchordet.models.heads.common import select_padded
from anchordet.module import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("onnx", "torchscript")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")


class ExportedDetector(nn.Module):
    """A `Detector` (a trained module's ``.detector``) as one fixed-shape function of a pixel batch
    (see above)."""

    def __init__(self, detector: nn.Module, image_size: int, max_detections: int | None = None) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.image_size = int(image_size)
        self.max_detections = int(max_detections or self.detector.head.max_per_image)
        # The anchors of the one input size the model is exported for, placed once.
        self.anchors = self.detector.anchor_grid((self.image_size, self.image_size), torch.device("cpu"))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (images.float() - self.pixel_mean) / self.pixel_std
        raw_per_level = self.detector(x)
        head = self.detector.head
        return select_padded(head.candidates(raw_per_level, self.anchors), head.nms_iou, self.max_detections)


def sidecar(module, image_size: int, batch_size: int, input_dtype: str, max_detections: int, fmt: str,
            extra: dict | None = None) -> dict:
    detector = module.detector
    return {
        "format": fmt, "task": module.task, **(extra or {}),
        "input": {"name": "images", "shape": [batch_size, 3, image_size, image_size], "dtype": input_dtype,
                  "pixels": "RGB 0-255", "letterbox": {"size": image_size, "pad_value": PAD_VALUE,
                                                       "placement": "centred, longest side resized to size"},
                  "normalisation": {"mean": [m * 255 for m in IMAGENET_MEAN], "std": [s * 255 for s in IMAGENET_STD],
                                    "inside_model": True}},
        "outputs": {"boxes": "[B, D, 4] float32 xyxy, network-input pixels", "scores": "[B, D] float32",
                    "labels": "[B, D] int64, -1 in empty slots", "num_detections": "[B] int64",
                    "max_detections": max_detections},
        "categories": [{"label": label, "id": i, "name": n} for label, (i, n) in
                       enumerate(zip(module.category_map.category_ids, module.category_map.names))],
        "anchors": {"strides": detector.used_strides,
                    "shapes_per_level": [detector.anchor_shapes_per_level[level].tolist()
                                         for level in detector.used_level_indices],
                    "offset": detector.anchor_offset},
    }


def export_model(module, image_size: int, path: str | Path, fmt: str, batch_size: int = 1,
                 input_dtype: str = "uint8", max_detections: int | None = None,
                 extra: dict | None = None) -> tuple[Path, Path]:
    """Write the exported model to ``path`` and its sidecar to ``<path>.json`` (plus the ``extra``
    entries, e.g. the checkpoint it came from); returns both paths."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: use one of {FORMATS}")
    if input_dtype not in INPUT_DTYPES:
        raise ConfigError(f"input_dtype={input_dtype!r}: use one of {list(INPUT_DTYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportedDetector(module.cpu().detector, image_size, max_detections).eval()
    example = torch.full((batch_size, 3, image_size, image_size), PAD_VALUE, dtype=INPUT_DTYPES[input_dtype])
    write_exported(wrapper, example, path, fmt)
    meta_path = path.with_name(path.name + ".json")
    meta_path.write_text(json.dumps(sidecar(module, image_size, batch_size, input_dtype, wrapper.max_detections,
                                            fmt, extra), indent=2))
    return path, meta_path


def write_exported(wrapper: ExportedDetector, example: Tensor, path: Path, fmt: str) -> None:
    """Trace ``wrapper`` on ``example`` (its batch size and dtype become the file's) and save it."""
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(path))
        else:
            import onnx

            # The TorchScript-based exporter: data-dependent shapes inside NMS are fine there.
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["images"], output_names=list(OUTPUT_NAMES))
            onnx.checker.check_model(onnx.load(str(path)))


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for an exported file (``session.run(None, {"images": array})``)."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_exported(path: str | Path, fmt: str, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run an exported file on ``images`` as a deployer would: TorchScript via `torch.jit.load`,
    ONNX via an onnxruntime CPU session. Returns (boxes, scores, labels, num_detections)."""
    if fmt == "torchscript":
        with torch.no_grad():
            return tuple(torch.jit.load(str(path), map_location="cpu")(images))
    outputs = onnx_session(path).run(list(OUTPUT_NAMES), {"images": images.numpy()})
    return tuple(torch.from_numpy(output) for output in outputs)


def compare_outputs(reference: tuple[Tensor, ...], exported: tuple[Tensor, ...]) -> dict:
    """How far an exported model's outputs are from the eager ones, over the filled slots."""
    boxes, scores, labels, counts = reference
    boxes_x, scores_x, labels_x, counts_x = exported
    same_counts = bool(torch.equal(counts.long(), counts_x.long()))
    filled = torch.arange(boxes.shape[1]).unsqueeze(0) < counts.long().unsqueeze(1)  # [B, D]
    if not same_counts or not filled.any():
        return {"same_num_detections": same_counts, "detections": int(counts.sum()),
                "max_box_diff": 0.0, "max_score_diff": 0.0, "same_labels": same_counts}
    return {"same_num_detections": True, "detections": int(counts.sum()),
            "max_box_diff": float((boxes[filled] - boxes_x[filled]).abs().max()),
            "max_score_diff": float((scores[filled] - scores_x[filled]).abs().max()),
            "same_labels": bool(torch.equal(labels[filled].long(), labels_x[filled].long()))}


if __name__ == "__main__":  # `python -m anchordet.export ckpt_path=... format=onnx|torchscript`
    from anchordet.trained import run_command  # the Hydra command lives with the other trained-model ones

    run_command("export")
