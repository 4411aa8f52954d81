"""Placing anchor shapes on feature-map grids.

Shape glossary: A anchors per cell (per level), H/W (Hl/Wl) grid size of a level, N = sum over levels
of Hl * Wl * Al placed anchors.  Placed anchors are xyxy in network-input pixels, ordered
``(level, y, x, a)`` -- the order a head gets from ``(B, A*K, H, W) -> (B, H*W*A, K)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def place_anchors(
    shapes: Tensor, stride: float, height: int, width: int, offset: float = 0.5
) -> Tensor:
    """Anchors xyxy ``[H*W*A, 4]`` in ``(y, x, a)`` order for shapes ``[A, 2]`` (w, h).

    The anchors of cell ``(x, y)`` are centred at ``((x + offset) * stride, (y + offset) * stride)``:
    offset 0.5 is the cell centre (YOLO), offset 0 the cell's top-left corner (torchvision's
    ``AnchorGenerator``).
    """
    if shapes.ndim != 2 or shapes.shape[1] != 2:
        raise ValueError(f"anchor shapes must have shape [A, 2] of (w, h), got {tuple(shapes.shape)}")
    shapes = shapes.float()
    rows = (torch.arange(height, device=shapes.device, dtype=torch.float32) + offset) * stride
    cols = (torch.arange(width, device=shapes.device, dtype=torch.float32) + offset) * stride
    centre_y, centre_x = torch.meshgrid(rows, cols, indexing="ij")
    # (H, W) centres -> (H, W, 1, 2) so they broadcast against the (1, 1, A, 2) shapes.
    centres = torch.stack([centre_x, centre_y], dim=-1)[:, :, None, :]
    half = 0.5 * shapes[None, None, :, :]
    # (H, W, A, 4) -> (H*W*A, 4): row-major flatten gives the (y, x, a) order.
    return torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)


@dataclass
class AnchorGrid:
    """All placed anchors of one network input size, in ``(level, y, x, a)`` order.

    Per anchor (``N`` rows): ``boxes [N, 4]`` xyxy input px; ``cell_xy [N, 2]`` float (column, row)
    of the anchor's cell; ``anchor_wh [N, 2]`` its shape (w, h); ``stride [N, 1]`` float.

    Per level: ``shapes_per_level`` (``[Al, 2]`` each), ``strides``, ``grid_sizes`` ``(Hl, Wl)`` and
    ``num_per_level[l] = Hl * Wl * Al`` (a level with no shapes contributes nothing).

    Per anchor shape (``K = sum_l Al`` rows, level order), what a matcher that picks a shape and then
    a cell needs, built once per grid instead of on every step: ``shape_wh [K, 2]``,
    ``shape_stride [K, 1]`` float, ``shape_grid_wh [K, 2]`` int64 ``(Wl, Hl)`` of the shape's level,
    ``shape_per_cell [K]`` int64 ``Al``, and ``shape_first_anchor [K]`` int64, the row of the shape at
    cell (0, 0); the shape at cell ``(x, y)`` is row ``first + (y * Wl + x) * Al``.

    ``input_size`` ``(H, W)`` is the network input the grid was placed for: the image frame that
    boxes are clipped to and that cross-boundary rules test against.
    """

    boxes: Tensor
    cell_xy: Tensor
    anchor_wh: Tensor
    stride: Tensor
    shapes_per_level: list[Tensor]
    strides: list[float]
    grid_sizes: list[tuple[int, int]]
    num_per_level: list[int]
    input_size: tuple[int, int]
    shape_wh: Tensor
    shape_stride: Tensor
    shape_grid_wh: Tensor
    shape_per_cell: Tensor
    shape_first_anchor: Tensor

    @property
    def num_anchors(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def build(
        cls,
        shapes_per_level: Sequence[Tensor],
        strides: Sequence[float],
        grid_sizes: Sequence[tuple[int, int]],
        input_size: tuple[int, int],
        offset: float = 0.5,
        device: torch.device | str | None = None,
    ) -> AnchorGrid:
        """Place ``shapes_per_level[l] [Al, 2]`` on a ``grid_sizes[l] = (Hl, Wl)`` grid of stride
        ``strides[l]``, for a network input of ``input_size = (H, W)`` pixels."""
        if not len(shapes_per_level) == len(strides) == len(grid_sizes):
            raise ValueError(
                f"AnchorGrid.build needs one entry per level: got {len(shapes_per_level)} shape sets, "
                f"{len(strides)} strides and {len(grid_sizes)} grid sizes"
            )
        if not shapes_per_level:
            raise ValueError("AnchorGrid.build needs at least one pyramid level")
        if device is None:
            device = shapes_per_level[0].device
        shapes_per_level = [s.to(device=device, dtype=torch.float32).reshape(-1, 2) for s in shapes_per_level]
        grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]
        boxes, cell_xy, anchor_wh, stride, num_per_level = [], [], [], [], []
        for shapes, level_stride, (height, width) in zip(shapes_per_level, strides, grid_sizes):
            num_shapes = shapes.shape[0]
            boxes.append(place_anchors(shapes, float(level_stride), height, width, offset))
            rows = torch.arange(height, device=device, dtype=torch.float32)
            cols = torch.arange(width, device=device, dtype=torch.float32)
            grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
            # (H, W) -> (H*W, 1, 2) -> (H*W, A, 2) -> (H*W*A, 2): same (y, x, a) order as the boxes.
            cells = torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 1, 2).expand(-1, num_shapes, 2)
            cell_xy.append(cells.reshape(-1, 2))
            # (A, 2) repeated for each of the H*W cells -> (H*W*A, 2).
            anchor_wh.append(shapes.repeat(height * width, 1))
            count = height * width * num_shapes
            stride.append(torch.full((count, 1), float(level_stride), device=device))
            num_per_level.append(count)

        # Per-shape tables: Python lists of a handful of levels, turned into tensors once per grid.
        level_start = [sum(num_per_level[:level]) for level in range(len(num_per_level))]
        per_shape = [(float(level_stride), width, height, shapes.shape[0], level_start[level] + a)
                     for level, (shapes, level_stride, (height, width))
                     in enumerate(zip(shapes_per_level, strides, grid_sizes)) for a in range(shapes.shape[0])]
        column = list(zip(*per_shape)) if per_shape else [[]] * 5
        return cls(
            boxes=torch.cat(boxes),
            cell_xy=torch.cat(cell_xy),
            anchor_wh=torch.cat(anchor_wh),
            stride=torch.cat(stride),
            shapes_per_level=shapes_per_level,
            strides=[float(s) for s in strides],
            grid_sizes=grid_sizes,
            num_per_level=num_per_level,
            input_size=(int(input_size[0]), int(input_size[1])),
            shape_wh=torch.cat(shapes_per_level),
            shape_stride=torch.tensor(column[0], dtype=torch.float32, device=device).reshape(-1, 1),
            shape_grid_wh=torch.tensor(list(zip(column[1], column[2])), dtype=torch.long,
                                       device=device).reshape(-1, 2),
            shape_per_cell=torch.tensor(column[3], dtype=torch.long, device=device),
            shape_first_anchor=torch.tensor(column[4], dtype=torch.long, device=device),
        )

    def split_per_level(self, tensor: Tensor, dim: int = 0) -> list[Tensor]:
        """Split a tensor whose ``dim`` runs over the N anchors into per-level pieces."""
        return list(tensor.split(self.num_per_level, dim=dim))
