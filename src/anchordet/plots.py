"""Feature-map pictures and matplotlib plots for the TensorBoard callbacks.

Pictures are ``uint8 Tensor[3, H, W]`` RGB, like ``viz.py``'s. Feature maps are ``Tensor[C, H, W]``
of one image. matplotlib draws on an Agg canvas of its own (never pyplot's global state), so plotting
from a callback cannot disturb a user's figures or need a display.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from anchordet.viz import PALETTE, class_name, color_of, upscale, upscale_factor


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
        axes.text(0.03, 0.06, f"{class_name(class_names, k)}\nAP50 {ap:.2f}", transform=axes.transAxes, fontsize=8,
                  bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    figure.subplots_adjust(left=0.6 / figure.get_figwidth(), right=0.99, bottom=0.4 / figure.get_figheight(),
                           top=1 - 0.55 / figure.get_figheight(), wspace=0.08, hspace=0.08)
    figure.suptitle("precision (y) vs recall (x) per class; IoU 0.5, area all, maxDets 100", fontsize=10)
    return figure_to_image(figure)


# ---------------------------------------------------------------------------- benchmarks
def fit_curves_figure(rows: Sequence[dict]):
    """The fit benchmark's picture: each model's headline metric (AP50 for detectors, AR@1000 for
    proposal models, dashed) against optimiser step and against training seconds, all models on the
    same two axes. `rows` are `anchordet.bench_fit`'s records; headers and diverged marks are skipped."""
    figure = new_figure(11, 4.2)
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    models = list(dict.fromkeys(row["model"] for row in rows))
    for index, model in enumerate(models):
        marks = [row for row in rows if row["model"] == model and "step" in row and not row.get("diverged")]
        metric = "AP50" if marks and "AP50" in marks[0] else "AR@1000"
        if not marks:
            continue
        style = {"color": f"C{index % 10}", "marker": "o", "markersize": 3,
                 "linestyle": "-" if metric == "AP50" else "--", "label": f"{model} ({metric})"}
        values = [row[metric] for row in marks]
        by_step.plot([row["step"] for row in marks], values, **style)
        by_time.plot([row["train_seconds"] for row in marks], values, **style)
    by_step.set_xlabel("optimiser step")
    by_time.set_xlabel("training seconds (evaluation excluded)")
    by_step.set_ylabel("AP50 (detectors) / AR@1000 (proposals)")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
    by_time.legend(fontsize=8, loc="best")
    setup = next((row["setup"] for row in rows if "setup" in row), None)
    if setup:
        figure.suptitle(f"fit benchmark: {setup['data']}, {setup['image_size']} px, batch {setup['batch_size']}, "
                        f"ResNet-{setup['depth']}, {setup['precision']} on {setup['device']}", fontsize=10)
    return figure
