import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from anchordet.anchors import AnchorGrid, GridAnchors, place_anchors
from anchordet.anchors.grid import grid_anchor_shapes

R2 = math.sqrt(2.0)


def test_grid_shapes_by_hand():
    # ratio = h / w, area = size^2: r = 0.5 -> (32 * sqrt 2, 32 / sqrt 2), r = 2 -> the transpose.
    (level,) = grid_anchor_shapes([[32.0]], [0.5, 1.0, 2.0])
    torch.testing.assert_close(level, torch.tensor([[32 * R2, 32 / R2], [32.0, 32.0], [32 / R2, 32 * R2]]))
    # Ratio-major, size-minor order with two sizes.
    (level,) = grid_anchor_shapes([[10.0, 20.0]], [1.0, 4.0])
    torch.testing.assert_close(level, torch.tensor([[10.0, 10.0], [20.0, 20.0], [5.0, 20.0], [10.0, 40.0]]))


def test_grid_shapes_match_torchvision_cell_anchors():
    sizes, ratios = ((32.0, 40.0), (64.0,), (128.0, 161.0, 203.0)), (0.5, 1.0, 2.0)
    generator = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * 3)
    ours = grid_anchor_shapes([list(s) for s in sizes], list(ratios))
    for shapes, cell in zip(ours, generator.cell_anchors):
        centred = torch.cat([-shapes / 2, shapes / 2], dim=1)
        # torchvision rounds its cell anchors to whole pixels; ours are exact.
        torch.testing.assert_close(centred, cell.float(), atol=0.5, rtol=0.0)


def test_grid_anchors_build_checks_levels_and_reports():
    anchors = GridAnchors(sizes_per_level=[32, 64], aspect_ratios=(1.0,))  # shorthand: one size per level
    shapes, report = anchors.build(torch.tensor([[32.0, 32.0], [64.0, 16.0]]), num_levels=2)
    assert [s.tolist() for s in shapes] == [[[32.0, 32.0]], [[64.0, 64.0]]]
    # (64, 16) vs (32, 32): inter 32*16 = 512, union 1024 + 1024 - 512 = 1536 -> 1/3; vs (64, 64): 1/4.
    assert report["grid"]["mean_best_iou"] == pytest.approx((1 + 1 / 3) / 2)
    shapes, report = GridAnchors([[32.0]]).build(None, num_levels=1)
    assert shapes[0].shape == (3, 2) and report == {}
    with pytest.raises(ValueError, match=r"anchor\.sizes_per_level has 2 levels but backbone\.levels has 3.*anchor=kmeans"):
        anchors.build(None, num_levels=3)
    with pytest.raises(ValueError, match="aspect_ratios"):
        grid_anchor_shapes([[32.0]], [0.0])


def test_place_anchors_on_a_2x2_grid_by_hand():
    boxes = place_anchors(torch.tensor([[10.0, 20.0]]), stride=8, height=2, width=2, offset=0.5)
    # Centres (4,4), (12,4), (4,12), (12,12) in (y, x) order, each +- (5, 10).
    expected = torch.tensor(
        [[-1.0, -6.0, 9.0, 14.0], [7.0, -6.0, 17.0, 14.0], [-1.0, 2.0, 9.0, 22.0], [7.0, 2.0, 17.0, 22.0]]
    )
    torch.testing.assert_close(boxes, expected)


def test_place_anchors_order_is_y_x_a():
    boxes = place_anchors(torch.tensor([[2.0, 2.0], [4.0, 4.0]]), stride=10, height=1, width=2, offset=0.0)
    # Cell (x=0) anchors a=0, a=1, then cell (x=1): centres (0, 0), (0, 0), (10, 0), (10, 0).
    expected = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [-2.0, -2.0, 2.0, 2.0], [9.0, -1.0, 11.0, 1.0], [8.0, -2.0, 12.0, 2.0]])
    torch.testing.assert_close(boxes, expected)


def test_place_anchors_offset_0_equals_torchvision_anchor_generator():
    generator = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, 48, 64), [(48, 64)])
    feature = torch.zeros(1, 8, 3, 4)  # a 3 x 4 grid of stride 16
    (theirs,) = generator(images, [feature])
    (shapes,) = grid_anchor_shapes([[32.0]], [0.5, 1.0, 2.0])
    ours = place_anchors(shapes, stride=16, height=3, width=4, offset=0.0)
    assert ours.shape == theirs.shape == (3 * 4 * 3, 4)
    torch.testing.assert_close(ours, theirs, atol=0.5, rtol=0.0)


def test_anchor_grid_two_levels_and_an_empty_level():
    shapes_per_level = [torch.tensor([[8.0, 8.0], [16.0, 8.0]]), torch.zeros(0, 2), torch.tensor([[50.0, 60.0]])]
    strides, grid_sizes = [8, 16, 32], [(2, 3), (1, 2), (1, 1)]
    grid = AnchorGrid.build(shapes_per_level, strides, grid_sizes, (16, 24), offset=0.5)
    assert grid.num_per_level == [2 * 3 * 2, 0, 1]
    assert grid.num_anchors == 13 and grid.input_size == (16, 24)
    assert grid.boxes.shape == (13, 4) and grid.cell_xy.shape == (13, 2) and grid.stride.shape == (13, 1)
    torch.testing.assert_close(grid.boxes[:12], place_anchors(shapes_per_level[0], 8, 2, 3))
    torch.testing.assert_close(grid.boxes[12], torch.tensor([-9.0, -14.0, 41.0, 46.0]))  # centre (16, 16)
    # Index 9 = level 0, (y, x, a) = (1, 1, 1): cell (column 1, row 1), shape (16, 8).
    assert grid.cell_xy[9].tolist() == [1.0, 1.0]
    assert grid.anchor_wh[9].tolist() == [16.0, 8.0]
    assert grid.stride[:, 0].tolist() == [8.0] * 12 + [32.0]
    # Every anchor's centre is (cell + offset) * stride and its size is its shape.
    centre = 0.5 * (grid.boxes[:, :2] + grid.boxes[:, 2:])
    torch.testing.assert_close(centre, (grid.cell_xy + 0.5) * grid.stride)
    torch.testing.assert_close(grid.boxes[:, 2:] - grid.boxes[:, :2], grid.anchor_wh)
    assert [t.shape[0] for t in grid.split_per_level(grid.boxes)] == [12, 0, 1]
    # Per-shape tables, level order: the two level-0 shapes, then the level-2 shape.
    torch.testing.assert_close(grid.shape_wh, torch.tensor([[8.0, 8.0], [16.0, 8.0], [50.0, 60.0]]))
    assert grid.shape_stride[:, 0].tolist() == [8.0, 8.0, 32.0]
    assert grid.shape_grid_wh.tolist() == [[3, 2], [3, 2], [1, 1]]  # (Wl, Hl)
    assert grid.shape_per_cell.tolist() == [2, 2, 1]
    assert grid.shape_first_anchor.tolist() == [0, 1, 12]
    # The shape at cell (x, y) is row first + (y * Wl + x) * Al: shape 1 at (1, 1) is row 9.
    assert grid.shape_first_anchor[1] + (1 * 3 + 1) * grid.shape_per_cell[1] == 9
    with pytest.raises(ValueError, match="one entry per level"):
        AnchorGrid.build(shapes_per_level, strides[:2], grid_sizes, (16, 24))


def test_hand_given_sizes_must_grow_from_fine_to_coarse_levels():
    GridAnchors([[32, 40], [40, 81], [128]])  # touching levels are fine
    with pytest.raises(ValueError, match=r"level 1 has sizes \[16.0\], smaller than level 0's \[32.0\]"):
        GridAnchors([[32], [16], [128]])
    with pytest.raises(ValueError, match="not ordered by level"):
        GridAnchors([[32, 300], [64, 128]])  # level 0 reaches further than level 1
