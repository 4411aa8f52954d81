"""Region proposal network of Faster R-CNN on FPN levels: objectness and R-CNN box deltas per anchor.

Shape glossary
    B       images in the batch
    Cin     channels of every input feature level (the FPN's F)
    A       anchors per cell (the same on every level)
    L       feature levels the head receives (P2-P6 by default)
    K       outputs per anchor, 5: ``dx, dy, dw, dh, objectness logit``
    Hl, Wl  size of pyramid level ``l``
    N       anchors over all levels, ``sum_l Hl*Wl*A``, ordered ``(level, y, x, a)`` like AnchorGrid
    M       ground-truth boxes per image after padding (``gt.mask`` marks the real ones)
    P       sampled positive anchors in the whole batch
    Q       proposal candidates of the whole batch entering NMS
    D       proposals of one image

Boxes are xyxy in absolute pixels of the network input. Raw layout of ``forward``: per level
``[B, Hl*Wl*A, 5]``, anchor ``(y, x, a)`` of the level at row ``(y*Wl + x)*A + a``, columns
``0:4`` the deltas ``(dx, dy, dw, dh)`` of ``RcnnDeltaCoder`` (weights 1, 1, 1, 1; ``dw, dh`` clamped
at log(1000/16) before ``exp``) relative to that anchor, column ``4`` the objectness logit.

The RPN is class-agnostic (``task = "proposals"``): ``num_classes`` is accepted (the assembly passes
it to every head) and ignored; proposals carry label 0. It meets the head contract of
``models/heads/common.py``: the detector matches (the IoU matcher by default; any matcher's
``MatchResult`` trains), and the loss samples from the matcher's roles.

References: Ren et al., "Faster R-CNN", 2015 (anchors, IoU matching, 256 sampled anchors, NMS 0.7);
Lin et al., "Feature Pyramid Networks", 2017 (one head shared over P2-P6, per-level top-n before
NMS); the smooth L1 beta 1/9 and the per-level top-n / NMS settings follow the public Detectron
and torchvision configurations of those papers.

Design choices
    * One 3x3 conv + ReLU shared by all levels, then the 1x1 predictors, shared too by default
      (FPN): with grid anchors, anchor ``a`` on level ``l + 1`` is anchor ``a`` on level ``l`` scaled
      by 2, exactly as the features are, so one predictor fits all levels. k-means anchors break
      that symmetry (anchor ``a`` is a different shape on each level); ``share_predictors=False``
      gives every level its own 1x1 convs for them.
    * No normalisation layer and zero-mean N(0, 0.01) weights with zero bias (the papers' init):
      the first objectness is 0.5 everywhere, which is right for a balanced 1:1 sample.
    * Both losses are divided by the number of *sampled* anchors of the batch (positives and
      negatives), not by the positives: the box term then weighs less in images with few
      positives, as in the Faster R-CNN formulation with lambda balancing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from anchordet.boxes import RcnnDeltaCoder
from anchordet.matching import BalancedSampler, MatchResult, PaddedTargets
from anchordet.models.heads.common import (
    PROPOSALS,
    Candidates,
    anchors_per_level,
    check_level_sizes,
    concat_levels,
    select_per_image,
)

NUM_BOX_OUTPUTS = 4  # dx, dy, dw, dh
OBJECTNESS_INDEX = 4
NUM_OUTPUTS = 5


class RpnHead(nn.Module):
    """Predicts ``(dx, dy, dw, dh, objectness)`` for every anchor of every level.

    Args:
        in_channels: Cin of the feature levels.
        num_anchors: A, one int (or one per level, all equal when the predictors are shared).
        num_classes: ignored; the RPN is class-agnostic.
        num_levels: number of feature levels the head receives.
        conv_depth: shared 3x3 conv + ReLU blocks before the predictors (the papers use 1).
        share_predictors: one pair of 1x1 convs for every level (FPN) or one pair per level.
        batch_size_per_image, positive_fraction: the ``BalancedSampler`` of the loss (256, 0.5).
        smooth_l1_beta: the box loss is smooth L1 with this beta on the deltas (1/9).
        obj_weight, box_weight: weights of ``loss_obj`` and ``loss_box``.
        pre_nms_top_n_train / pre_nms_top_n_test: proposals kept per level and image before NMS
            (2000 / 1000); ``postprocess`` picks by ``self.training``.
        post_nms_top_n_train / post_nms_top_n_test: proposals kept per image after NMS (2000 / 1000).
        nms_iou: NMS threshold, levels and images kept apart (0.7).
        min_size: boxes narrower or lower than this after clipping are dropped (px).
        score_thresh: proposals with sigmoid objectness below this are dropped (0 = none).
        box_coder: defaults to ``RcnnDeltaCoder()`` (weights 1, 1, 1, 1).
    """

    task = PROPOSALS

    def __init__(
        self,
        in_channels: int,
        num_anchors: int | Sequence[int],
        num_classes: int | None = None,
        num_levels: int = 5,
        conv_depth: int = 1,
        share_predictors: bool = True,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        smooth_l1_beta: float = 1.0 / 9.0,
        obj_weight: float = 1.0,
        box_weight: float = 1.0,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_iou: float = 0.7,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
        box_coder: RcnnDeltaCoder | None = None,
    ) -> None:
        super().__init__()
        del num_classes  # class-agnostic: every proposal is "object"
        self.num_anchors_per_level = anchors_per_level(num_anchors, num_levels, "RpnHead")
        if share_predictors and len(set(self.num_anchors_per_level)) != 1:
            raise ValueError(
                f"head.share_predictors=true needs the same number of anchors on every level, got "
                f"{self.num_anchors_per_level}; set head.share_predictors=false"
            )
        if conv_depth < 0:
            raise ValueError(f"head.conv_depth must be >= 0, got {conv_depth}")
        if min(pre_nms_top_n_train, pre_nms_top_n_test, post_nms_top_n_train, post_nms_top_n_test) < 1:
            raise ValueError("head.pre_nms_top_n_* and head.post_nms_top_n_* must be >= 1")
        if smooth_l1_beta < 0:
            raise ValueError(f"head.smooth_l1_beta must be >= 0, got {smooth_l1_beta}")

        self.num_levels = num_levels
        self.share_predictors = bool(share_predictors)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.obj_weight, self.box_weight = float(obj_weight), float(box_weight)
        self.pre_nms_top_n = {"train": int(pre_nms_top_n_train), "test": int(pre_nms_top_n_test)}
        self.post_nms_top_n = {"train": int(post_nms_top_n_train), "test": int(post_nms_top_n_test)}
        self.nms_iou, self.min_size, self.score_thresh = float(nms_iou), float(min_size), float(score_thresh)
        self.box_coder = box_coder or RcnnDeltaCoder()

        blocks: list[nn.Module] = []
        for _ in range(conv_depth):
            blocks += [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*blocks)
        predictor_anchors = self.num_anchors_per_level[:1] if self.share_predictors else self.num_anchors_per_level
        self.objectness = nn.ModuleList(nn.Conv2d(in_channels, a, 1) for a in predictor_anchors)
        self.box_deltas = nn.ModuleList(nn.Conv2d(in_channels, a * NUM_BOX_OUTPUTS, 1) for a in predictor_anchors)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward
    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: list of [B, Cin, Hl, Wl] -> raw outputs, list of [B, Hl*Wl*A, 5] in (y, x, a) order."""
        if len(features) != self.num_levels:
            raise ValueError(f"RpnHead was built for {self.num_levels} levels but got {len(features)} feature maps")
        raw_per_level = []
        for level, (feature, num_anchors) in enumerate(zip(features, self.num_anchors_per_level)):
            predictor = 0 if self.share_predictors else level
            hidden = self.conv(feature)
            logits = self.objectness[predictor](hidden)  # [B, A, H, W]
            deltas = self.box_deltas[predictor](hidden)  # [B, A*4, H, W]
            batch, _, height, width = logits.shape
            # (B, A*4, H, W) -> (B, A, 4, H, W) -> (B, H, W, A, 4): output channel a*4 + k is anchor a, delta k.
            deltas = deltas.view(batch, num_anchors, NUM_BOX_OUTPUTS, height, width).permute(0, 3, 4, 1, 2)
            # (B, A, H, W) -> (B, H, W, A, 1)
            logits = logits.permute(0, 2, 3, 1)[..., None]
            # (B, H, W, A, 5) -> (B, H*W*A, 5): AnchorGrid order.
            raw_per_level.append(torch.cat([deltas, logits], dim=-1).reshape(batch, -1, NUM_OUTPUTS))
        return raw_per_level

    # ------------------------------------------------------------------ training
    def anchor_roles(self, raw_per_level: list[Tensor], anchors, gt: PaddedTargets,
                     match: MatchResult) -> MatchResult:
        """The matcher's roles, unchanged: the loss samples its anchors from them every step
        (a fresh random draw, so the sample itself is not a role)."""
        check_level_sizes(raw_per_level, anchors, "RpnHead")
        return match

    def loss(self, raw_per_level: list[Tensor], anchors, gt: PaddedTargets,
             match: MatchResult) -> dict[str, Tensor]:
        """``loss_obj`` (BCE on the sampled anchors) and ``loss_box`` (smooth L1 on the sampled
        positives' deltas), both summed and divided by the number of sampled anchors of the batch.

        raw_per_level: list of [B, Hl*Wl*A, 5]; anchors: the ``AnchorGrid`` of this input size;
        gt: ``PaddedTargets`` (the labels are unused: class-agnostic); match: the detector's
        ``MatchResult``, whose labels (1 / 0 / -1) the ``BalancedSampler`` draws from.
        """
        raw = concat_levels(raw_per_level, anchors, "RpnHead")  # [B, N, 5]
        with torch.no_grad():
            sampled_positive, sampled_negative = self.sampler(match.labels)  # [B, N] each
        sampled = sampled_positive | sampled_negative
        # A tensor, not int(): no device sync; at least 1 so a batch without anchors stays finite.
        num_sampled = sampled.sum().clamp(min=1).to(raw.dtype)

        obj_bce = F.binary_cross_entropy_with_logits(
            raw[..., OBJECTNESS_INDEX][sampled], sampled_positive[sampled].to(raw.dtype), reduction="sum"
        )
        loss_obj = self.obj_weight * obj_bce / num_sampled

        # Indexing keeps only sampled positives; none gives [0, 4] tensors whose sum is exactly 0
        # while staying in the graph, so backward works on images without boxes.
        image_index, anchor_index = sampled_positive.nonzero(as_tuple=True)  # [P] each
        target_boxes = gt.boxes.float()[image_index, match.matched_gt[image_index, anchor_index]]  # [P, 4]
        target_deltas = self.box_coder.encode(anchors.boxes[anchor_index], target_boxes)  # [P, 4]
        pred_deltas = raw[image_index, anchor_index, :NUM_BOX_OUTPUTS]  # [P, 4]
        box_l1 = F.smooth_l1_loss(pred_deltas, target_deltas, beta=self.smooth_l1_beta, reduction="sum")
        loss_box = self.box_weight * box_l1 / num_sampled
        return {"loss_obj": loss_obj, "loss_box": loss_box}

    # ------------------------------------------------------------------ inference
    @property
    def max_per_image(self) -> int:
        """post_nms_top_n of the current mode (train / test: ``Detector.predict`` runs in eval mode)."""
        return self.post_nms_top_n["train" if self.training else "test"]

    @torch.no_grad()
    def candidates(self, raw_per_level: list[Tensor], anchors) -> Candidates:
        """Per level and image the ``pre_nms_top_n`` highest objectness logits (of the current
        mode), decoded and clipped to ``anchors.input_size``, fixed-shape ``[B, K]``; ``valid`` =
        at least ``min_size`` wide and high and scoring at least ``score_thresh``; NMS groups are
        the levels (levels are kept apart, as in the FPN RPN)."""
        pre_nms_top_n = self.pre_nms_top_n["train" if self.training else "test"]
        check_level_sizes(raw_per_level, anchors, "RpnHead")
        anchors_per_level = anchors.split_per_level(anchors.boxes)  # list of [Hl*Wl*A, 4]
        boxes, logits, levels = [], [], []
        for level, (raw, level_anchors) in enumerate(zip(raw_per_level, anchors_per_level)):
            raw = raw.float()  # [B, Nl, 5]
            k = min(pre_nms_top_n, raw.shape[1])
            top_logits, top_index = raw[..., OBJECTNESS_INDEX].topk(k, dim=1)  # [B, k]
            top_deltas = raw[..., :NUM_BOX_OUTPUTS].gather(1, top_index[..., None].expand(-1, -1, 4))  # [B, k, 4]
            boxes.append(self.box_coder.decode(top_deltas, level_anchors[top_index]))  # [B, k, 4]
            logits.append(top_logits)
            levels.append(torch.full_like(top_index, level))
        boxes = clip_boxes_to_image(torch.cat(boxes, dim=1), anchors.input_size)  # [B, K, 4]
        scores = torch.cat(logits, dim=1).sigmoid()  # [B, K]
        levels = torch.cat(levels, dim=1)  # [B, K]
        wh = boxes[..., 2:4] - boxes[..., 0:2]
        valid = (wh >= self.min_size).all(dim=-1) & (scores >= self.score_thresh)  # [B, K]
        return Candidates(boxes, scores, torch.zeros_like(levels), levels, valid, len(raw_per_level))

    @torch.no_grad()
    def postprocess(self, raw_per_level: list[Tensor], anchors) -> list[dict]:
        """Raw outputs -> per image ``{"boxes" [D,4] xyxy input px, "scores" [D], "labels" [D] int64 zeros}``:
        the valid `candidates` through NMS at ``nms_iou`` per image and level, then the
        ``post_nms_top_n`` best of each image, sorted by score (sigmoid objectness)."""
        return select_per_image(self.candidates(raw_per_level, anchors), self.nms_iou, self.max_per_image)
