"""Drawing helpers for the TensorBoard picture callbacks and for ``evaluate.py``'s overlays.

Pictures are ``uint8 Tensor[3, H, W]`` RGB (what ``SummaryWriter.add_image`` and ``write_png`` take).
Boxes are ``Tensor[N, 4]`` **xyxy in pixels of the image passed in** (the network input); every
helper that upscales the image scales the boxes with it, so callers never rescale boxes themselves.

Boxes and labels are drawn by torchvision (``draw_bounding_boxes``, ``make_grid``); matplotlib (Agg
canvas, never pyplot's global state) only draws the plots: scatter, histogram, precision-recall.
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


def figure_to_image(figure) -> Tensor:
    """Render a matplotlib ``Figure`` on an Agg canvas -> uint8 [3, H, W]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    # (H, W, 4) RGBA -> (3, H, W) RGB.
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()


def new_figure(width_in: float, height_in: float, dpi: int = 100, constrained: bool = True):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained" if constrained else None)


# ---------------------------------------------------------------------------- feature maps
def robust_normalise(values: Tensor, low: float = 1.0, high: float = 99.0, dim: int | None = None) -> Tensor:
    """Map values to [0, 1] with the ``low``..``high`` percentiles as black and white.

    Min-max scaling lets one hot pixel wash the rest of a ReLU map out to black; percentiles keep
    the contrast of the bulk. ``dim``: normalise each slice along it separately (e.g. per channel).
    """
    values = values.detach().float()
    quantiles = values.new_tensor([low / 100.0, high / 100.0])
    if dim is None:
        lo, hi = torch.quantile(values.flatten(), quantiles)
    else:
        # [.., n, ..] -> [n, rest]: one quantile pair per slice, broadcast back below.
        moved = values.movedim(dim, 0)
        lo, hi = torch.quantile(moved.reshape(moved.shape[0], -1), quantiles, dim=1)
        shape = [1] * values.ndim
        shape[dim] = -1
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    return ((values - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)


@functools.lru_cache(maxsize=4)
def _colormap_table(name: str) -> Tensor:
    import matplotlib

    return torch.from_numpy(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().to(torch.uint8)


def colormap_image(values01: Tensor, name: str = "inferno") -> Tensor:
    """float [H, W] in [0, 1] -> uint8 [3, H, W] through a matplotlib colour table."""
    index = (values01.detach().cpu().float().clamp(0, 1) * 255).round().long()
    # [H, W] indices -> [H, W, 3] colours -> [3, H, W].
    return _colormap_table(name)[index].permute(2, 0, 1).contiguous()


def channel_grid(feature: Tensor, num_channels: int = 16, tile_min_side: int = 96) -> Tensor:
    """The first ``num_channels`` channels of ``feature [C, H, W]`` as grey tiles, each normalised on
    its own (1-99 percentiles), upscaled with nearest so every cell stays visible -> uint8 picture."""
    channels = feature.detach().float().cpu()[:num_channels]
    tiles = (robust_normalise(channels, dim=0) * 255).round().to(torch.uint8)  # [n, H, W]
    # [n, H, W] -> [n, 3, H, W] grey, then integer nearest upscaling.
    tiles = tiles[:, None].expand(-1, 3, -1, -1)
    factor = upscale_factor(tiles.shape[-2], tiles.shape[-1], tile_min_side)
    tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return make_grid(tiles, nrow=math.ceil(math.sqrt(tiles.shape[0])), padding=2, pad_value=255)


def mean_heatmap(feature: Tensor, min_side: int = 256, colormap: str = "inferno") -> Tensor:
    """Channel mean of ``feature [C, H, W]``, 1-99 percentile normalised, as a colour map picture."""
    mean = feature.detach().float().cpu().mean(dim=0)
    image = colormap_image(robust_normalise(mean), colormap)
    return upscale(image, min_side, mode="nearest")[0]


def pca_rgb(feature: Tensor, min_side: int = 256, seed: int = 0) -> Tensor:
    """Project the C channels of ``feature [C, H, W]`` on their top three principal components
    (``torch.pca_lowrank``) and show them as R, G, B -> uint8 [3, H', W'].

    Pixels with similar feature vectors get similar colours, so regions the network groups together
    show up as patches. Each component's sign is fixed (largest loading positive) and pca_lowrank's
    random start is seeded, so colours do not flip between epochs for no reason.
    """
    channels, height, width = feature.shape
    # [C, H, W] -> [H*W, C]: one row per pixel, one column per channel.
    rows = feature.detach().float().cpu().reshape(channels, height * width).T
    q = min(3, channels, height * width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, components = torch.pca_lowrank(rows, q=q, center=True)  # [C, q]
    index = components.abs().argmax(dim=0)
    signs = torch.sign(components[index, torch.arange(q)])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = (rows - rows.mean(dim=0, keepdim=True)) @ components  # [H*W, q]
    if q < 3:
        projected = F.pad(projected, (0, 3 - q))
    rgb = robust_normalise(projected, dim=1)
    # [H*W, 3] -> [3, H, W].
    image = (rgb.T.reshape(3, height, width) * 255).round().to(torch.uint8)
    return upscale(image, min_side, mode="nearest")[0]


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


def anchor_shape_scatter(gt_wh: Tensor, shapes_per_level: Sequence[Tensor], level_names: Sequence[str],
                         max_points: int = 20000, seed: int = 0) -> Tensor:
    """Scatter of GT box (w, h) (input px) with the anchor shapes on top, log-log axes -> picture."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    gt = gt_wh.detach().cpu().float().reshape(-1, 2)
    if gt.shape[0] > max_points:  # a few thousand points show the density as well as a million
        gt = gt[torch.randperm(gt.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]]
    figure = new_figure(6, 5)
    axes = figure.add_subplot()
    positive = gt[(gt > 0).all(dim=1)]
    axes.scatter(positive[:, 0].numpy(), positive[:, 1].numpy(), s=6, alpha=0.35, color="0.35",
                 label=f"GT boxes ({gt_wh.shape[0]})", rasterized=True)
    for i, (name, shapes) in enumerate(zip(level_names, shapes_per_level)):
        shapes = shapes.detach().cpu().float().reshape(-1, 2)
        if shapes.shape[0]:
            axes.scatter(shapes[:, 0].numpy(), shapes[:, 1].numpy(), s=90, marker="X",
                         color=np.array(color_of(i)) / 255, edgecolors="black", label=f"anchors {name}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log", base=2)
    for axis in (axes.xaxis, axes.yaxis):
        # Powers of two in plain pixels (4, 8, 16 ...), the natural steps of strides and anchor sizes.
        axis.set_major_locator(LogLocator(base=2))
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("width (input px)")
    axes.set_ylabel("height (input px)")
    axes.set_title("GT box sizes and anchor shapes")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left", fontsize=9)
    return figure_to_image(figure)


def best_iou_histogram(best_iou: Tensor, threshold: float = 0.5) -> Tensor:
    """Histogram of every GT box's best shape-IoU with any anchor, with the recall threshold marked."""
    values = best_iou.detach().cpu().float().numpy()
    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    axes.hist(values, bins=np.linspace(0, 1, 41), color=np.array(PALETTE[0]) / 255)
    axes.axvline(threshold, color="red", linestyle="--", label=f"IoU {threshold}")
    mean = float(values.mean()) if values.size else 0.0
    recall = float((values >= threshold).mean()) if values.size else 0.0
    axes.set_title(f"best anchor IoU per GT box: mean {mean:.3f}, recall@{threshold} {recall:.3f}")
    axes.set_xlabel("best shape IoU with any anchor")
    axes.set_ylabel("GT boxes")
    axes.legend()
    return figure_to_image(figure)


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
        gt_texts = [f"GT {_name(class_names, label)}" for label in gt_labels.detach().cpu().tolist()]
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
        texts = [f"{_name(class_names, labels[i])} {scores[keep[i]]:.2f}" for i in order]
        colors = [color_of(labels[i]) for i in order]
    picture = draw_boxes(picture, boxes[order], labels=texts, colors=colors)
    kind = "proposals" if class_names is None else "predictions"
    shown = f"top {len(keep)} {kind}" if math.isinf(score_threshold) else f"{kind} >= {score_threshold:g} ({len(keep)})"
    legend = [(f"GT ({len(gt)})", GT_COLOR), (shown, POSITIVE_COLOR if class_names is None else PALETTE[0])]
    return add_band(picture, legend=legend)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def precision_recall_figure(
    precision: np.ndarray, class_names: Sequence[str], iou_index: int = 0, area_index: int = 0,
    max_dets_index: int = -1, max_classes: int = 80,
) -> Tensor | None:
    """Per-class precision-recall curves from COCOeval's ``precision [T, R, K, A, M]`` -> picture.

    Defaults read IoU 0.5 (T index 0), area "all" (A index 0) and the largest maxDets (M index -1),
    the setting of the AP50 number. Classes without ground truth (all -1) are skipped; one small
    panel per class because eighty curves in one axes are unreadable. None when no class has GT.
    """
    curves = np.asarray(precision)[iou_index, :, :, area_index, max_dets_index]  # [R, K]
    recall = np.linspace(0.0, 1.0, curves.shape[0])  # COCOeval's 101 recall points
    present = [k for k in range(curves.shape[1]) if (curves[:, k] > -1).any()][:max_classes]
    if not present:
        return None
    columns = min(len(present), max(1, math.ceil(math.sqrt(len(present)))))
    rows = math.ceil(len(present) / columns)
    # No constrained layout and shared, outer-only tick labels: with 80 panels the layout solver
    # and per-axes tick text are most of the drawing time.
    figure = new_figure(1.9 * columns + 0.6, 1.6 * rows + 0.7, dpi=80, constrained=False)
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for panel, axes in enumerate(grid.flat):
        if panel >= len(present):
            axes.set_axis_off()
            continue
        k = present[panel]
        values = np.where(curves[:, k] > -1, curves[:, k], np.nan)
        ap = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        axes.plot(recall, values, color=np.array(color_of(k)) / 255, linewidth=1.5)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.05)
        axes.set_xticks([0, 0.5, 1])
        axes.set_yticks([0, 0.5, 1])
        axes.grid(True, alpha=0.3)
        axes.tick_params(labelsize=7)
        axes.text(0.03, 0.06, f"{_name(class_names, k)}\nAP50 {ap:.2f}", transform=axes.transAxes, fontsize=8,
                  bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    figure.subplots_adjust(left=0.6 / figure.get_figwidth(), right=0.99, bottom=0.4 / figure.get_figheight(),
                           top=1 - 0.55 / figure.get_figheight(), wspace=0.08, hspace=0.08)
    figure.suptitle("precision (y) vs recall (x) per class; IoU 0.5, area all, maxDets 100", fontsize=10)
    return figure_to_image(figure)


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
