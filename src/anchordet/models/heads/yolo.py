"""YOLOv2-style single-stage head on FPN levels: objectness, classes and YOLO box offsets per anchor.

Shape glossary
    B       images in the batch
    Cin     channels of every input feature level (the FPN's F)
    Ct      channels inside the conv tower
    A       anchors per cell on one level (``num_anchors_per_level[l]``)
    C       classes; labels are contiguous ``0..C-1``
    K       outputs per anchor, ``5 + C``: ``tx, ty, tw, th, objectness, C class logits``
    Hl, Wl  size of pyramid level ``l``
    N       anchors over all levels, ``sum_l Hl*Wl*A``, ordered ``(level, y, x, a)`` like AnchorGrid
    M       ground-truth boxes per image after padding (``gt.mask`` marks the real ones)
    P       positive (matched) anchors in the whole batch
    Q       (anchor, class) candidates of the whole batch entering NMS
    D       detections kept for one image

Boxes are xyxy in absolute pixels of the network input. Decoding is ``YoloBoxCoder`` (Redmon &
Farhadi, "YOLO9000", 2017): ``x = (cx + sigmoid(tx)) * stride``, ``w = pw * exp(tw)``.

The head meets the contract of ``models/heads/common.py``: the detector matches, and ``loss`` trains
on whatever ``MatchResult`` any matcher gives (YOLO's best-shape cell, or IoU thresholds as in
RetinaNet, whose ignore band it respects).

Design choices
    * One conv tower shared by all levels, one 1x1 predictor per level. The FPN already puts every
      level into the same feature space, so sharing the tower gives each tower weight the gradient of
      every level (as in RetinaNet). The predictor cannot be shared: anchor ``a`` means a different
      k-means shape on each level, and the number of anchors may even differ between levels.
    * Classes are one-vs-all sigmoids with BCE (YOLOv3), so the inference score of class ``c`` is
      ``sigmoid(obj) * sigmoid(cls_c)``, independent per class like the training target.
    * Anchor roles: foreground and ignored as the matcher says, plus YOLOv2/v3's ignore rule: a
      background anchor whose *decoded prediction* already overlaps some GT by more than
      ``ignore_iou`` gets no objectness loss (it is a good box, just not the chosen one).
      ``anchor_roles`` returns exactly the roles the loss uses, so the pictures show the truth.
    * Objectness target of a positive is 1, not its IoU (YOLOv3, not YOLOv2's rescoring): early in
      training the predicted boxes barely overlap anything, and an IoU target would then teach
      "no object here" exactly where the objects are.
    * Loss normalisation: objectness is summed over every anchor and divided by B, as the darknet
      region/yolo layers do (cost per image, averaged over the batch). Dividing by the number of
      positives (RetinaNet) would make the weight of all those negatives swing with how crowded
      the batch is, and averaging over anchors would shrink the gradient of each positive to 1/N.
      Box and class terms exist only on positives and are divided by max(1, P).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import (
    clip_boxes_to_image,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from anchordet.boxes import YoloBoxCoder
from anchordet.matching import BACKGROUND, FOREGROUND, IGNORE, MatchResult, PaddedTargets, best_iou_with_gt
from anchordet.models.heads.common import DETECTIONS, Candidates, anchors_per_level, concat_levels, select_per_image

BOX_LOSSES = ("giou", "diou", "ciou", "l1")
IOU_BOX_LOSSES = {
    "giou": generalized_box_iou_loss,  # Rezatofighi et al. 2019
    "diou": distance_box_iou_loss,  # Zheng et al. 2020
    "ciou": complete_box_iou_loss,  # Zheng et al. 2020
}
NUM_BOX_OUTPUTS = 4  # tx, ty, tw, th
OBJECTNESS_INDEX = 4
CLASS_OFFSET = 5


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        if channels % 32:
            raise ValueError(
                f"head.norm='group' uses 32 groups, but the tower has {channels} channels; set "
                f"head.tower_channels to a multiple of 32 or use head.norm=batch"
            )
        return nn.GroupNorm(32, channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"head.norm={norm!r} is not supported; use 'group' or 'batch'")


class YoloHead(nn.Module):
    """Predicts ``(tx, ty, tw, th, objectness, class logits)`` for every anchor of every level.

    ``task = "detections"``: class-labelled boxes, judged by COCO mAP.

    Args:
        in_channels: Cin of the feature levels.
        num_anchors: A, one int for every level or one per level.
        num_classes: C.
        num_levels: number of feature levels the head receives (the used levels only).
        tower_depth: 3x3 conv + norm + LeakyReLU blocks before the predictors (0 = none).
        tower_channels: Ct, defaults to ``in_channels``.
        norm: "group" (GroupNorm, 32 groups; independent of the batch size) or "batch".
        prior_prob: initial probability of objectness and of every class (Lin et al., "Focal Loss
            for Dense Object Detection", 2017): keeps the thousands of negatives from swamping the
            first steps.
        box_loss: "giou", "diou", "ciou" on decoded xyxy boxes, or "l1" on
            ``(sigmoid(tx), sigmoid(ty), tw, th)`` against the encoded target.
        ignore_iou: background anchors whose decoded box overlaps a GT above this IoU get no
            objectness loss (YOLOv2/v3: they are good boxes, just not the chosen one).
        obj_weight, noobj_weight: weights of the objectness BCE of positives and of negatives.
        cls_weight, box_weight: weights of the class and box terms. 5.0 for an IoU box loss follows
            YOLOX (Ge et al. 2021), whose IoU loss is on the same per-positive scale.
        score_thresh, topk_pre_nms, nms_iou, max_detections: inference settings of ``postprocess``.
        box_coder: defaults to ``YoloBoxCoder()``.
    """

    task = DETECTIONS

    def __init__(
        self,
        in_channels: int,
        num_anchors: int | Sequence[int],
        num_classes: int,
        num_levels: int,
        tower_depth: int = 2,
        tower_channels: int | None = None,
        norm: str = "group",
        prior_prob: float = 0.01,
        box_loss: str = "giou",
        ignore_iou: float = 0.5,
        obj_weight: float = 1.0,
        noobj_weight: float = 1.0,
        cls_weight: float = 1.0,
        box_weight: float = 5.0,
        score_thresh: float = 0.05,
        topk_pre_nms: int = 1000,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        box_coder: YoloBoxCoder | None = None,
    ) -> None:
        super().__init__()
        self.num_anchors_per_level = anchors_per_level(num_anchors, num_levels, "YoloHead")
        if num_classes < 1:
            raise ValueError(f"YoloHead num_classes must be >= 1, got {num_classes}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"head.box_loss={box_loss!r} is not supported; use one of {BOX_LOSSES}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"head.prior_prob must be in (0, 1), got {prior_prob}")

        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_outputs = CLASS_OFFSET + num_classes
        self.box_loss = box_loss
        self.ignore_iou = ignore_iou
        self.obj_weight, self.noobj_weight = obj_weight, noobj_weight
        self.cls_weight, self.box_weight = cls_weight, box_weight
        self.score_thresh, self.topk_pre_nms = score_thresh, topk_pre_nms
        self.nms_iou, self.max_detections = nms_iou, max_detections
        self.box_coder = box_coder or YoloBoxCoder()

        tower_channels = tower_channels or in_channels
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(tower_depth):
            # A bias before a normalisation layer would be cancelled by its mean subtraction.
            blocks += [
                nn.Conv2d(channels, tower_channels, 3, padding=1, bias=False),
                _norm_layer(norm, tower_channels),
                nn.LeakyReLU(0.1, inplace=True),  # the darknet activation of YOLOv2/v3
            ]
            channels = tower_channels
        self.tower = nn.Sequential(*blocks)
        self.predictors = nn.ModuleList(
            nn.Conv2d(channels, a * self.num_outputs, 1) for a in self.num_anchors_per_level
        )
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # sigmoid(b) = prior  <=>  b = -log((1 - prior) / prior)
        prior_bias = -math.log((1.0 - prior_prob) / prior_prob)
        with torch.no_grad():
            for predictor in self.predictors:
                # (A*K,) -> (A, K): output channel a*K + k belongs to anchor a, output k.
                bias = predictor.bias.view(-1, self.num_outputs)
                bias[:, OBJECTNESS_INDEX:] = prior_bias

    # ------------------------------------------------------------------ forward
    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: list of [B, Cin, Hl, Wl] -> raw outputs, list of [B, Hl*Wl*A, K] in (y, x, a) order."""
        if len(features) != self.num_levels:
            raise ValueError(
                f"YoloHead was built for {self.num_levels} levels but got {len(features)} feature maps"
            )
        raw_per_level = []
        for feature, predictor, num_anchors in zip(features, self.predictors, self.num_anchors_per_level):
            out = predictor(self.tower(feature))
            batch, _, height, width = out.shape
            # (B, A*K, H, W) -> (B, A, K, H, W) -> (B, H, W, A, K) -> (B, H*W*A, K): AnchorGrid order.
            out = out.view(batch, num_anchors, self.num_outputs, height, width)
            raw_per_level.append(out.permute(0, 3, 4, 1, 2).reshape(batch, -1, self.num_outputs))
        return raw_per_level

    def _decode(self, raw: Tensor, anchors) -> Tensor:
        """raw [B, N, K] -> boxes [B, N, 4] xyxy input px; anchor fields [N, ·] broadcast over B."""
        return self.box_coder.decode(
            raw[..., :NUM_BOX_OUTPUTS], anchors.cell_xy, anchors.anchor_wh, anchors.stride
        )

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _roles(self, pred_boxes: Tensor, gt: PaddedTargets, match: MatchResult) -> MatchResult:
        """The matcher's roles plus the ignore rule, from decoded boxes [B, N, 4] (no gradient)."""
        best_iou = best_iou_with_gt(pred_boxes, gt.boxes, gt.mask)  # [B, N]; padding never counts
        ignored = (match.labels == BACKGROUND) & (best_iou > self.ignore_iou)
        return MatchResult(match.matched_gt, match.labels.masked_fill(ignored, IGNORE))

    def anchor_roles(self, raw_per_level: list[Tensor], anchors, gt: PaddedTargets,
                     match: MatchResult) -> MatchResult:
        """The roles ``loss`` trains with: labels 1 positive, 0 negative, -1 ignored (matcher's or
        the head's ignore rule), ``[B, N]`` each."""
        raw = concat_levels(raw_per_level, anchors, "YoloHead")
        return self._roles(self._decode(raw.detach(), anchors), gt, match)

    def loss(self, raw_per_level: list[Tensor], anchors, gt: PaddedTargets,
             match: MatchResult) -> dict[str, Tensor]:
        """Loss terms, each already weighted: ``loss_obj``, ``loss_cls``, ``loss_box`` (scalars).

        raw_per_level: list of [B, Hl*Wl*A, K]; anchors: the ``AnchorGrid`` of this input size;
        gt: ``PaddedTargets`` (boxes [B, M, 4] xyxy input px, labels [B, M], mask [B, M]); match:
        the detector's ``MatchResult`` (matched_gt [B, N], labels [B, N]).
        """
        raw = concat_levels(raw_per_level, anchors, "YoloHead")  # [B, N, K]
        batch_size = raw.shape[0]
        gt_boxes = gt.boxes.float()
        pred_boxes = self._decode(raw, anchors)  # [B, N, 4]
        roles = self._roles(pred_boxes.detach(), gt, match)
        positive = roles.labels == FOREGROUND  # [B, N]
        # A tensor, not int(): no device sync; at least 1 so a batch without objects stays finite.
        num_positive = positive.sum().clamp(min=1).to(raw.dtype)

        # Objectness over every anchor that is not ignored: positives towards 1, negatives towards 0.
        obj_weights = torch.where(
            positive, self.obj_weight, torch.where(roles.labels == BACKGROUND, self.noobj_weight, 0.0)
        ).to(raw.dtype)  # [B, N]
        obj_bce = F.binary_cross_entropy_with_logits(
            raw[..., OBJECTNESS_INDEX], positive.to(raw.dtype), reduction="none"
        )  # [B, N]
        loss_obj = (obj_bce * obj_weights).sum() / batch_size

        # Boolean indexing keeps only positives; an empty batch yields [0, ·] and sums to exactly 0
        # while staying in the graph, so backward works on images without boxes.
        gt_index = roles.matched_gt.clamp(min=0)  # [B, N], padding slot 0 where unmatched (masked below)
        pos_raw = raw[positive]  # [P, K]
        pos_gt_boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))[positive]  # [P, 4]
        pos_labels = gt.labels.gather(1, gt_index)[positive]  # [P]

        cls_target = F.one_hot(pos_labels, self.num_classes).to(raw.dtype)  # [P, C]
        cls_bce = F.binary_cross_entropy_with_logits(pos_raw[:, CLASS_OFFSET:], cls_target, reduction="sum")
        loss_cls = self.cls_weight * cls_bce / num_positive

        if self.box_loss == "l1":
            box_terms = self._l1_box_loss(pos_raw, pos_gt_boxes, positive, anchors)
        else:
            box_terms = IOU_BOX_LOSSES[self.box_loss](pred_boxes[positive], pos_gt_boxes, reduction="none")
        loss_box = self.box_weight * box_terms.sum() / num_positive
        return {"loss_obj": loss_obj, "loss_cls": loss_cls, "loss_box": loss_box}

    def _l1_box_loss(self, pos_raw: Tensor, pos_gt_boxes: Tensor, positive: Tensor, anchors) -> Tensor:
        """L1 on (sigmoid(tx), sigmoid(ty), tw, th): the in-cell offset in [0, 1] and the log size."""
        anchor_index = positive.nonzero()[:, 1]  # [P] index into N of every positive
        target = self.box_coder.encode(
            pos_gt_boxes,
            anchors.cell_xy[anchor_index],
            anchors.anchor_wh[anchor_index],
            anchors.stride[anchor_index],
        )  # [P, 4]
        # Compare offsets after the sigmoid: the encoded logits of a centre near a cell border are
        # huge (clamped at logit(1 - eps)) while the box barely differs.
        pred = torch.cat([pos_raw[:, 0:2].sigmoid(), pos_raw[:, 2:NUM_BOX_OUTPUTS]], dim=1)
        goal = torch.cat([target[:, 0:2].sigmoid(), target[:, 2:4]], dim=1)
        return F.l1_loss(pred, goal, reduction="none")  # [P, 4]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def candidates(self, raw_per_level: list[Tensor], anchors) -> Candidates:
        """The ``topk_pre_nms`` best (anchor, class) pairs per image, fixed-shape ``[B, k]``.

        Score of class c = sigmoid(obj) * sigmoid(cls_c); boxes decoded and clipped to
        ``anchors.input_size``; ``valid`` = above ``score_thresh``; NMS groups are the classes.
        """
        raw = concat_levels(raw_per_level, anchors, "YoloHead")  # [B, N, K]
        boxes = clip_boxes_to_image(self._decode(raw, anchors), anchors.input_size)  # [B, N, 4]
        scores = raw[..., OBJECTNESS_INDEX:CLASS_OFFSET].sigmoid() * raw[..., CLASS_OFFSET:].sigmoid()
        # (B, N, C) -> (B, N*C): candidate n*C + c is anchor n with class c.
        flat_scores = scores.flatten(1)
        k = min(self.topk_pre_nms, flat_scores.shape[1])
        top_scores, top_index = flat_scores.topk(k, dim=1)  # [B, k], sorted descending
        anchor_index = top_index // self.num_classes
        top_labels = top_index % self.num_classes
        top_boxes = boxes.gather(1, anchor_index[..., None].expand(-1, -1, 4))  # [B, k, 4]
        return Candidates(top_boxes, top_scores, top_labels, top_labels, top_scores > self.score_thresh,
                          self.num_classes)

    @property
    def max_per_image(self) -> int:
        return self.max_detections

    @torch.no_grad()
    def postprocess(self, raw_per_level: list[Tensor], anchors) -> list[dict]:
        """Raw outputs -> per image ``{"boxes" [D,4] xyxy input px, "scores" [D], "labels" [D] int64}``:
        the valid `candidates` through class-wise NMS at ``nms_iou``, at most ``max_detections``
        per image, sorted by score."""
        return select_per_image(self.candidates(raw_per_level, anchors), self.nms_iou, self.max_per_image)
