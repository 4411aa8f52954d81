"""Drawing helpers for the TensorBoard picture callbacks and for ``evaluate.py``'s overlays.

Pictures are ``uint8 Tensor[3, H, W]`` RGB (what ``SummaryWriter.add_image`` and ``write_png`` take).
Boxes are ``Tensor[N, 4]`` **xyxy in pixels of the image passed in** (the network input); every
helper that upscales the image scales the boxes with it, so callers never rescale boxes themselves.

Boxes and labels are drawn by torchvision (``draw_bounding_boxes``, ``make_grid``); feature-map
pictures and the matplotlib plots (scatter, histogram, precision-recall) live in ``plots.py``.
Small network inputs are upscaled by an integer factor first (256 -> 512): a 14 pt label on a
256 px image covers a fifth of a small object, and integer factors keep box edges on whole pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

MIN_SIDE = 512
LINE_WIDTH = 2
FONT_SIZE = 14
Color = tuple[int, int, int]
# matplotlib's tab10: distinguishable, and readable on photos and on grey letterbox padding alike.
PALETTE: tuple[Color, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
GT_COLOR: Color = (0, 255, 0)
POSITIVE_COLOR: Color = (255, 40, 40)
IGNORED_COLOR: Color = (255, 200, 0)
NEGATIVE_COLOR: Color = (0, 170, 255)
BAND_BACKGROUND: Color = (30, 30, 30)


@functools.lru_cache(maxsize=1)
def font_path() -> str | None:
    """A TrueType font file (matplotlib ships DejaVu Sans), or None: torchvision's ``font_size`` is
    silently ignored without one, which leaves an unreadable 11 px bitmap font."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # a broken font cache must not stop training; fall back to PIL's bitmap font
        return None
    return path if path and Path(path).is_file() else None


@functools.lru_cache(maxsize=8)
def _pil_font(size: int):
    path = font_path()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default()


def color_of(index: int) -> Color:
    return PALETTE[int(index) % len(PALETTE)]


# ---------------------------------------------------------------------------- basic image ops
def upscale_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """Smallest integer factor that brings the short side to at least ``min_side`` (1 = no change)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def upscale(image: Tensor, min_side: int = MIN_SIDE, mode: str = "bilinear") -> tuple[Tensor, int]:
    """uint8 [3, H, W] -> (uint8 [3, f*H, f*W], f). ``mode="nearest"`` keeps feature-map cells square."""
    factor = upscale_factor(image.shape[-2], image.shape[-1], min_side)
    if factor == 1:
        return image, 1
    # [3, H, W] -> [1, 3, H, W]: interpolate wants a batch dimension.
    scaled = F.interpolate(image[None].float(), scale_factor=factor, mode=mode,
                           **({"align_corners": False} if mode == "bilinear" else {}))
    return scaled[0].round().clamp(0, 255).to(torch.uint8), factor


def as_uint8_rgb(image: Tensor) -> Tensor:
    """uint8 or [0, 1] float, 1 or 3 channels, any device -> uint8 [3, H, W] on the CPU."""
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.contiguous()


def draw_boxes(
    image: Tensor, boxes_xyxy: Tensor, labels: Sequence[str] | None = None,
    colors: Color | Sequence[Color] = POSITIVE_COLOR, width: int = LINE_WIDTH,
    font_size: int = FONT_SIZE, label_below: bool = False,
) -> Tensor:
    """Draw xyxy boxes (pixels of ``image``) on uint8 [3, H, W]; boxes are clipped to the image.

    Labels are tags with the box colour as background, just above the box (``label_below``: just
    below), falling back inside the box at the image edge: tags outside the box do not hide the
    object, and putting two kinds of boxes on opposite sides keeps their tags apart. Boxes fully
    outside the image are dropped; an empty box list returns the image unchanged.
    """
    image = as_uint8_rgb(image)
    boxes = boxes_xyxy.detach().cpu().float().reshape(-1, 4)
    if boxes.shape[0] == 0:
        return image
    height, width_px = image.shape[-2:]
    clipped = torch.stack([boxes[:, 0].clamp(0, width_px - 1), boxes[:, 1].clamp(0, height - 1),
                           boxes[:, 2].clamp(0, width_px - 1), boxes[:, 3].clamp(0, height - 1)], dim=1)
    visible = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep = visible.nonzero().flatten().tolist()
    if not keep:
        return image
    single = isinstance(colors, tuple) and len(colors) == 3 and isinstance(colors[0], int)
    color_list = [tuple(colors)] * boxes.shape[0] if single else [tuple(c) for c in colors]
    picture = draw_bounding_boxes(image, clipped[keep], colors=[color_list[i] for i in keep], width=width)
    if labels is None:
        return picture
    return _draw_tags(picture, clipped[keep], [labels[i] for i in keep], [color_list[i] for i in keep],
                      font_size, label_below)


def _draw_tags(image: Tensor, boxes: Tensor, texts: Sequence[str], colors: Sequence[Color],
               font_size: int, below: bool) -> Tensor:
    # PIL wants (H, W, 3); torchvision's own label drawing cannot place tags outside the box.
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    font = _pil_font(font_size)
    height = canvas.height
    for (x1, y1, x2, y2), text, color in zip(boxes.tolist(), texts, colors):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 4, bottom - top + 4
        if below:
            y = y2 + 1 if y2 + 1 + tag_h <= height else y2 - tag_h
        else:
            y = y1 - tag_h if y1 - tag_h >= 0 else y1 + 1
        x = min(max(0, x1), max(0, canvas.width - tag_w))
        draw.rectangle([x, y, x + tag_w, y + tag_h], fill=color)
        # Black on light colours, white on dark (ITU-R BT.601 luma).
        luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if luma > 128 else (255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def add_band(image: Tensor, title: str | None = None, legend: Sequence[tuple[str, Color]] = (),
             font_size: int = FONT_SIZE, min_width: int | None = None) -> Tensor:
    """Append a dark band below ``image`` with an optional title and colour swatches + text.

    Entries wrap onto further rows when they do not fit; the band height depends only on the
    number of rows, so panels with the same text layout can be put in one ``make_grid``.
    """
    image = as_uint8_rgb(image)
    width = max(image.shape[-1], min_width or 0)
    font = _pil_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(font_size * 1.5)
    swatch, gap = font_size, font_size
    items: list[tuple[int, int, str, Color | None]] = []  # (x, row, text, swatch colour)
    row, x = 0, gap // 2
    if title:
        items.append((x, row, title, None))
        row += 1
    for text, color in legend:
        item_width = swatch + 4 + int(measure.textlength(text, font=font)) + gap
        if x + item_width > width and x > gap // 2:
            row, x = row + 1, gap // 2
        items.append((x, row, text, tuple(color)))
        x += item_width
    rows = row + 1 if (legend or title) else 0
    if rows == 0:
        return image
    band = Image.new("RGB", (width, rows * line_height + 4), BAND_BACKGROUND)
    draw = ImageDraw.Draw(band)
    for x, row, text, color in items:
        top = 2 + row * line_height
        if color is None:
            draw.text((x, top), text, fill=(255, 255, 255), font=font)
            continue
        draw.rectangle([x, top + 2, x + swatch, top + 2 + swatch], fill=color)
        draw.text((x + swatch + 4, top), text, fill=(255, 255, 255), font=font)
    # PIL (H, W, 3) -> (3, H, W).
    band_tensor = torch.from_numpy(np.asarray(band).copy()).permute(2, 0, 1)
    if image.shape[-1] < width:
        image = F.pad(image, (0, width - image.shape[-1]), value=0)
    return torch.cat([image, band_tensor], dim=1)


def tile(images: Sequence[Tensor], nrow: int | None = None, padding: int = 4) -> Tensor:
    """Same-size or ragged uint8 [3, H, W] pictures -> one grid picture (ragged ones padded)."""
    images = [as_uint8_rgb(i) for i in images]
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    padded = [F.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2]), value=0) for i in images]
    nrow = nrow or math.ceil(math.sqrt(len(padded)))
    return make_grid(torch.stack(padded), nrow=nrow, padding=padding, pad_value=255)


# ---------------------------------------------------------------------------- anchors
def _shape_label(w: float, h: float) -> str:
    return f"{w:.0f}x{h:.0f} h/w={h / w:.2f}"


def _centred_boxes(wh: Tensor, centres: Tensor) -> Tensor:
    """(w, h) [A, 2] around centres [A, 2] or [1, 2] -> xyxy [A, 4]."""
    return torch.cat([centres - wh / 2, centres + wh / 2], dim=1)


def draw_anchor_shapes(
    image: Tensor, shapes_per_level: Sequence[Tensor], level_names: Sequence[str],
    strides: Sequence[int] | None = None, min_side: int = MIN_SIDE,
) -> Tensor:
    """Every anchor shape ``(w, h)`` (input px) of every level drawn on ``image``.

    First panel: all shapes centred on the image centre, coloured by level, with a legend: the
    shapes' relative sizes at a glance. Then one panel per level with its shapes on a small grid of
    centres, each labelled with size and aspect ratio (labels of nested boxes sharing one centre
    would overlap).
    """
    base, factor = upscale(as_uint8_rgb(image), min_side)
    height, width = base.shape[-2:]
    centre = torch.tensor([[width / 2, height / 2]])
    wh_per_level = [s.detach().cpu().float().reshape(-1, 2) for s in shapes_per_level]
    level_boxes = [_centred_boxes(wh * factor, centre) for wh in wh_per_level]
    all_colors = [color_of(i) for i, b in enumerate(level_boxes) for _ in range(b.shape[0])]

    def level_title(i: int) -> str:
        return f"{level_names[i]}" + (f" stride {strides[i]}" if strides else "")

    legend = [(f"{level_title(i)}: {len(b)}", color_of(i)) for i, b in enumerate(level_boxes)]
    panels = [add_band(draw_boxes(base, torch.cat(level_boxes), colors=all_colors),
                       "all anchor shapes, one centre", legend)]
    for i, wh in enumerate(wh_per_level):
        if wh.shape[0] == 0:
            continue
        # Centres of a cols x rows grid over the picture, one shape per cell, in shape order.
        cols = math.ceil(math.sqrt(wh.shape[0]))
        rows = math.ceil(wh.shape[0] / cols)
        slot = torch.arange(wh.shape[0])
        centres = torch.stack([(slot % cols + 0.5) * width / cols, (slot // cols + 0.5) * height / rows], dim=1)
        labels = [_shape_label(w, h) for w, h in wh.tolist()]
        panel = draw_boxes(base, _centred_boxes(wh * factor, centres), labels=labels, colors=color_of(i))
        panels.append(add_band(panel, level_title(i), [("w x h in input px, ratio h/w", color_of(i))]))
    return tile(panels, nrow=min(len(panels), 2))


def draw_matching(
    image: Tensor, gt_boxes: Tensor, positive_boxes: Tensor, ignored_boxes: Tensor | None,
    negative_boxes: Tensor, min_side: int = MIN_SIDE,
) -> Tensor:
    """GT boxes with the anchors a matcher made positive, ignored and (a sample of) negative.

    All boxes xyxy in ``image`` pixels. ``ignored_boxes=None`` means the matcher has no ignored
    role; the legend then says so instead of showing an empty class.
    """
    picture, factor = upscale(as_uint8_rgb(image), min_side)
    picture = draw_boxes(picture, negative_boxes * factor, colors=NEGATIVE_COLOR)
    if ignored_boxes is not None:
        picture = draw_boxes(picture, ignored_boxes * factor, colors=IGNORED_COLOR)
    picture = draw_boxes(picture, positive_boxes * factor, colors=POSITIVE_COLOR)
    picture = draw_boxes(picture, gt_boxes * factor, colors=GT_COLOR, width=LINE_WIDTH + 1)
    legend = [(f"GT ({len(gt_boxes)})", GT_COLOR), (f"positive ({len(positive_boxes)})", POSITIVE_COLOR),
              (f"ignored ({len(ignored_boxes)})" if ignored_boxes is not None else "ignored (n/a)", IGNORED_COLOR),
              (f"negative sample ({len(negative_boxes)})", NEGATIVE_COLOR)]
    return add_band(picture, legend=legend)


# ---------------------------------------------------------------------------- predictions
def draw_detections(
    image: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None, pred_boxes: Tensor, pred_scores: Tensor,
    pred_labels: Tensor | None, class_names: Sequence[str] | None, score_threshold: float = 0.3,
    max_detections: int = 100, min_side: int = MIN_SIDE,
) -> Tensor:
    """GT (green, thick, "GT name" tag below the box) and predictions with score >= threshold (class
    colour, thin, "name score" tag above the box), at most ``max_detections`` of the highest scores;
    boxes xyxy in ``image`` pixels. ``class_names=None`` draws class-agnostic boxes (proposals)
    labelled with their score only; ``score_threshold=-inf`` shows the top ``max_detections``."""
    picture, factor = upscale(as_uint8_rgb(image), min_side)
    # GT first: the thin prediction boxes and their tags then stay visible on top of the thick GT.
    gt = gt_boxes.detach().cpu().float().reshape(-1, 4) * factor
    gt_texts = None
    if class_names is not None and gt_labels is not None:
        gt_texts = [f"GT {class_name(class_names, label)}" for label in gt_labels.detach().cpu().tolist()]
    picture = draw_boxes(picture, gt, labels=gt_texts, colors=GT_COLOR, width=LINE_WIDTH + 1, label_below=True)
    scores = pred_scores.detach().cpu().float()
    keep = (scores >= score_threshold).nonzero().flatten()
    keep = keep[scores[keep].argsort(descending=True)][:max_detections]
    boxes = pred_boxes.detach().cpu().float()[keep] * factor
    labels = pred_labels.detach().cpu()[keep].tolist() if pred_labels is not None else [0] * len(keep)
    # Draw the weakest first so the strongest boxes end on top.
    order = list(range(len(keep)))[::-1]
    if class_names is None:
        texts = [f"{scores[keep[i]]:.2f}" for i in order]
        colors = [POSITIVE_COLOR] * len(order)
    else:
        texts = [f"{class_name(class_names, labels[i])} {scores[keep[i]]:.2f}" for i in order]
        colors = [color_of(labels[i]) for i in order]
    picture = draw_boxes(picture, boxes[order], labels=texts, colors=colors)
    kind = "proposals" if class_names is None else "predictions"
    shown = f"top {len(keep)} {kind}" if math.isinf(score_threshold) else f"{kind} >= {score_threshold:g} ({len(keep)})"
    legend = [(f"GT ({len(gt)})", GT_COLOR), (shown, POSITIVE_COLOR if class_names is None else PALETTE[0])]
    return add_band(picture, legend=legend)


def class_name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def write_prediction_overlays(
    images_uint8: Tensor | Sequence[Tensor], predictions: Sequence[dict], targets: Sequence[dict],
    class_names: Sequence[str] | None, out_dir: str | Path, score_threshold: float = 0.3,
) -> list[Path]:
    """Write one PNG per image: GT and predictions above ``score_threshold`` drawn on the input.

    images_uint8: [B, 3, S, S] or a list of [3, S, S] network inputs; predictions: per image
    ``{"boxes" [D, 4] xyxy input px, "scores" [D], "labels" [D]}``; targets: per image ``{"boxes"
    [M, 4] xyxy input px, "labels" [M]}`` plus an optional ``"image_id"`` that names the file
    (``<image_id>.png``, else ``<index>.png``). ``class_names=None``: class-agnostic (proposals).
    Returns the written paths.
    """
    if not len(images_uint8) == len(predictions) == len(targets):
        raise ValueError(
            f"write_prediction_overlays needs one prediction and one target per image, got "
            f"{len(images_uint8)} images, {len(predictions)} predictions, {len(targets)} targets")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, prediction, target) in enumerate(zip(images_uint8, predictions, targets)):
        picture = draw_detections(
            image, target["boxes"], target.get("labels"), prediction["boxes"], prediction["scores"],
            prediction.get("labels"), class_names, score_threshold)
        name = f"{int(target['image_id'])}.png" if "image_id" in target else f"{index:05d}.png"
        path = out_dir / name
        write_png(picture, str(path))
        written.append(path)
    return written
