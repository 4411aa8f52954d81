"""Drawing helpers: boxes land on exactly the pixels they should, upscaling moves boxes with the
image, feature pictures normalise as documented, and the overlay writer produces readable PNGs."""

import numpy as np
import pytest
import torch
from torchvision.io import read_image

from anchordet import plots, viz

RED = (255, 0, 0)


def pixel_grid(size: int):
    return torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")  # ys, xs


@pytest.mark.parametrize("width, expected_count", [(1, 34), (2, 60)])
def test_box_changes_exactly_its_border_pixels(width, expected_count):
    # Box x 2..10, y 3..12 inclusive: 9 x 10 pixels. Width 1: 2*9 + 2*10 - 4 = 34 border pixels;
    # width 2: 90 minus the (9-4) x (10-4) = 30 inner ones = 60.
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    out = viz.draw_boxes(image, torch.tensor([[2.0, 3.0, 10.0, 12.0]]), colors=RED, width=width)
    ys, xs = pixel_grid(20)
    inside = (xs >= 2) & (xs <= 10) & (ys >= 3) & (ys <= 12)
    border = inside & ((xs < 2 + width) | (xs > 10 - width) | (ys < 3 + width) | (ys > 12 - width))
    changed = (out != 0).any(dim=0)
    assert changed.sum().item() == expected_count
    assert torch.equal(changed, border)
    assert out[:, 3, 2].tolist() == list(RED)


def test_empty_and_outside_boxes_leave_the_image_alone():
    image = torch.full((3, 16, 16), 7, dtype=torch.uint8)
    assert torch.equal(viz.draw_boxes(image, torch.zeros(0, 4)), image)
    assert torch.equal(viz.draw_boxes(image, torch.tensor([[20.0, 20.0, 30.0, 30.0]])), image)


def test_labels_need_a_truetype_font_and_are_drawn_above_the_box():
    assert viz.font_path() is not None and viz.font_path().endswith(".ttf")
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    out = viz.draw_boxes(image, torch.tensor([[20.0, 50.0, 80.0, 90.0]]), labels=["cat 0.9"], colors=RED)
    above = (out[:, :50] != 0).any(dim=0)
    # The tag (filled with the box colour) sits in the rows just above y = 50, starting at x = 20.
    assert above[35:50, 20:40].float().mean() > 0.5
    assert not above[:, :20].any()


def test_upscale_uses_an_integer_factor_up_to_the_minimum_side():
    image = torch.zeros(3, 256, 256, dtype=torch.uint8)
    assert viz.upscale_factor(256, 256, 512) == 2
    assert viz.upscale_factor(64, 64, 512) == 8
    assert viz.upscale_factor(600, 800, 512) == 1
    big, factor = viz.upscale(image, 512)
    assert factor == 2 and big.shape == (3, 512, 512)


def test_detection_boxes_move_with_the_upscaled_image():
    image = torch.zeros(3, 256, 256, dtype=torch.uint8)
    picture = viz.draw_detections(image, torch.tensor([[10.0, 20.0, 60.0, 80.0]]), None, torch.zeros(0, 4),
                                  torch.zeros(0), None, None)
    # Factor 2: the GT box runs from x = 20 to 120 and y = 40 to 160 in the 512 px picture.
    assert picture.shape[-1] == 512 and picture.shape[-2] > 512  # the legend band lies below
    assert picture[:, 100, 20].tolist() == list(viz.GT_COLOR)
    assert picture[:, 40, 70].tolist() == list(viz.GT_COLOR)
    assert picture[:, 100, 10].tolist() == [0, 0, 0]
    assert picture[:, 100, 70].tolist() == [0, 0, 0]  # inside the box: untouched


def test_predictions_below_the_threshold_are_not_drawn():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    gt = torch.tensor([[5.0, 5.0, 20.0, 20.0]])
    pred = torch.tensor([[30.0, 30.0, 50.0, 50.0]])
    names = ["cat", "dog"]
    none = viz.draw_detections(image, gt, torch.tensor([0]), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), names, 0.5)
    low = viz.draw_detections(image, gt, torch.tensor([0]), pred, torch.tensor([0.2]), torch.tensor([1]), names, 0.5)
    high = viz.draw_detections(image, gt, torch.tensor([0]), pred, torch.tensor([0.8]), torch.tensor([1]), names, 0.5)
    # The legend counts drawn predictions, so compare only the picture above the band (8 x 64).
    assert torch.equal(none[:, :512], low[:, :512])
    assert not torch.equal(none[:, :512], high[:, :512])
    assert high[:, 300, 240].tolist() == list(viz.color_of(1))  # left edge of the dog box, x = 30 * 8


def test_anchor_shapes_are_centred_and_coloured_by_level():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    shapes = [torch.tensor([[16.0, 16.0]]), torch.tensor([[32.0, 16.0]])]
    picture = viz.draw_anchor_shapes(image, shapes, ["P3", "P4"], [8, 16])
    # 64 -> 512 (factor 8); a 16 x 16 shape becomes 128 x 128 around (256, 256): x, y from 192 to 320.
    # make_grid pads by 4, so the first panel starts at (4, 4).
    assert picture[:, 4 + 256, 4 + 192].tolist() == list(viz.color_of(0))  # (y, x) on its left edge
    # The 32 x 16 shape of level 1: 256 x 128 around the centre, left edge at x = 128.
    assert picture[:, 4 + 256, 4 + 128].tolist() == list(viz.color_of(1))
    assert picture.shape[0] == 3 and picture.dtype == torch.uint8


def test_matching_picture_has_a_legend_band():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]])
    picture = viz.draw_matching(image, box, box + 1, None, torch.zeros(0, 4))
    assert picture.shape[-1] == 512 and picture.shape[-2] > 512
    assert picture[:, 8 * 8, 8 * 8 + 20].tolist() == list(viz.GT_COLOR)
    assert picture[:, 9 * 8, 9 * 8 + 20].tolist() == list(viz.POSITIVE_COLOR)


def test_robust_normalise_uses_percentiles():
    values = torch.arange(101.0)  # 1st percentile = 1, 99th = 99 (linear interpolation)
    normalised = plots.robust_normalise(values)
    assert normalised[50].item() == pytest.approx((50 - 1) / 98)
    assert normalised[0].item() == 0.0 and normalised[100].item() == 1.0
    # One hot pixel does not wash out the rest: the bulk keeps its contrast.
    spiky = torch.cat([torch.arange(100.0), torch.tensor([1e6])])
    assert plots.robust_normalise(spiky)[50].item() > 0.4


def test_channel_grid_normalises_each_channel_on_its_own():
    feature = torch.rand(16, 8, 8, generator=torch.Generator().manual_seed(0))
    scaled = feature.clone()
    scaled[3] *= 1000.0
    grid, grid_scaled = plots.channel_grid(feature), plots.channel_grid(scaled)
    # 8 px maps -> factor ceil(96 / 8) = 12 -> 96 px tiles; 4 x 4 tiles with 2 px padding: 4*96 + 5*2.
    assert grid.shape == (3, 394, 394)
    assert torch.equal(grid, grid_scaled)


def test_mean_heatmap_uses_the_colormap_ends():
    feature = torch.zeros(2, 4, 4)
    feature[:, :, 2:] = 1.0  # right half hot
    heat = plots.mean_heatmap(feature, min_side=8)
    table = plots._colormap_table("inferno")
    assert heat.shape == (3, 8, 8)
    assert heat[:, 0, 0].tolist() == table[0].tolist()
    assert heat[:, 0, 7].tolist() == table[255].tolist()


def test_pca_image_has_three_channels_separates_regions_and_is_stable():
    # Two kinds of pixels: left half has feature vector a, right half b (plus a little noise).
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    feature = torch.empty(32, 8, 8)
    feature[:, :, :4] = a[:, None, None]
    feature[:, :, 4:] = b[:, None, None]
    feature += 0.01 * torch.randn(32, 8, 8, generator=generator)
    image = plots.pca_rgb(feature, min_side=8)
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert image.float().std() > 0  # not constant
    left, right = image[:, :, :4].float().mean(dim=(1, 2)), image[:, :, 4:].float().mean(dim=(1, 2))
    assert (left - right).abs().max() > 100  # the first component tells the halves apart
    assert torch.equal(image, plots.pca_rgb(feature, min_side=8))


def test_plots_render_to_rgb_pictures():
    shapes = [torch.tensor([[10.0, 20.0]]), torch.tensor([[40.0, 30.0]])]
    scatter = plots.anchor_shape_scatter(torch.rand(50, 2) * 60 + 2, shapes, ["P3", "P4"])
    histogram = plots.best_iou_histogram(torch.rand(50))
    for picture in (scatter, histogram):
        assert picture.dtype == torch.uint8 and picture.shape[0] == 3 and picture.float().std() > 0


def test_precision_recall_figure_skips_classes_without_ground_truth():
    precision = np.full((10, 101, 3, 4, 3), -1.0)
    assert plots.precision_recall_figure(precision, ["a", "b", "c"]) is None
    precision[:, :, 1] = np.linspace(1.0, 0.0, 101)[None, :, None, None]
    picture = plots.precision_recall_figure(precision, ["a", "b", "c"])
    assert picture is not None and picture.shape[0] == 3


def test_write_prediction_overlays_writes_one_png_per_image(tmp_path):
    images = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    predictions = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1])},
                   {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    targets = [{"boxes": torch.tensor([[12.0, 12.0, 48.0, 48.0]]), "labels": torch.tensor([1]), "image_id": 42},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 7}]
    paths = viz.write_prediction_overlays(images, predictions, targets, ["cat", "dog"], tmp_path / "overlays", 0.3)
    assert [p.name for p in paths] == ["42.png", "7.png"]
    first = read_image(str(paths[0]))
    assert first.shape[0] == 3 and first.shape[-1] == 512
    assert first[:, 20 * 2 + 10, 10 * 2].tolist() == list(viz.color_of(1))  # prediction's left edge
    with pytest.raises(ValueError, match="one prediction and one target per image"):
        viz.write_prediction_overlays(images, predictions[:1], targets, None, tmp_path, 0.3)
