"""Loss of the native detector: task-aligned assignment, BCE classification, CIoU and DFL box terms.

Assignment follows TOOD (Feng et al., ICCV 2021): for each ground-truth box, among the anchor
points inside it, the ``topk`` with the largest alignment ``score**alpha * iou**beta`` are
positives; an anchor claimed by several boxes goes to the one it overlaps most. Class targets are
the alignment normalised per box so that its best anchor gets that anchor's IoU. Box loss is
1 - CIoU (Zheng et al., AAAI 2020) plus Distribution Focal Loss over the distance bins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, complete_box_iou_loss

from slimdet.distributed import loss_normalizer


def anchor_points(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], *, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cell centres in pixels (``A x 2``) and each one's stride (``A x 1``), level by level."""
    points, stride_col = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([gx, gy], dim=-1).reshape(-1, 2))
        stride_col.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_col)


def expected_distances(box_logits: Tensor) -> Tensor:
    """``... x 4 x R`` logits to ``... x 4`` expected distances in stride units."""
    bins = torch.arange(box_logits.shape[-1], device=box_logits.device, dtype=box_logits.dtype)
    return (box_logits.softmax(-1) * bins).sum(-1)


def decode_distances(box_logits: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """Box logits (``B x A x 4 x R``) to xyxy boxes in pixels."""
    ltrb = expected_distances(box_logits) * strides
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


class YoloLoss(nn.Module):
    def __init__(
        self,
        num_classes: int,
        reg_max: int,
        strides: tuple[int, ...],
        *,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
    ) -> None:
        super().__init__()
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, strides
        self.topk, self.alpha, self.beta = topk, alpha, beta
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain

    def forward(
        self,
        box_logits: Tensor,
        cls_logits: Tensor,
        points: Tensor,
        strides: Tensor,
        targets: list[dict[str, Tensor]],
        *,
        assigned: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of a batch. ``assigned``: targets already assigned (what :meth:`assign` returns), e.g. from a
        distillation teacher's predictions, instead of assigning them from these predictions."""
        b, a, c = cls_logits.shape
        pred_boxes = decode_distances(box_logits, points, strides)
        if assigned is None:
            gt_boxes, gt_labels, gt_mask = pad_targets(targets, device=cls_logits.device)
            with torch.no_grad():
                assigned = self.assign(cls_logits.sigmoid(), pred_boxes, points, gt_boxes, gt_labels, gt_mask)
        fg, tgt_boxes, tgt_scores = assigned
        norm = loss_normalizer(tgt_scores.sum(), floor=1.0)  # the global batch's, under data-parallel training
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, tgt_scores, reduction="sum") / norm
        if fg.any():
            weight = tgt_scores.sum(-1)[fg]
            loss_box = (complete_box_iou_loss(pred_boxes[fg], tgt_boxes[fg], reduction="none") * weight).sum() / norm
            tgt_ltrb = torch.cat([points - tgt_boxes[..., :2], tgt_boxes[..., 2:] - points], dim=-1) / strides
            loss_dfl = (_dfl(box_logits[fg], tgt_ltrb[fg], self.reg_max) * weight).sum() / norm
        else:
            loss_box = loss_dfl = box_logits.sum() * 0.0
        total = self.box_gain * loss_box + self.cls_gain * loss_cls + self.dfl_gain * loss_dfl
        parts = {"box": loss_box.item(), "cls": loss_cls.item(), "dfl": loss_dfl.item()}
        return total, parts

    def assign(
        self, scores: Tensor, pred_boxes: Tensor, points: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Task-aligned assignment. Returns the foreground mask ``B x A``, target boxes ``B x A x 4``
        and soft class targets ``B x A x C``."""
        b, a, c = scores.shape
        m = gt_boxes.shape[1]
        fg = torch.zeros(b, a, dtype=torch.bool, device=scores.device)
        tgt_boxes = torch.zeros(b, a, 4, device=scores.device, dtype=scores.dtype)
        tgt_scores = torch.zeros(b, a, c, device=scores.device, dtype=scores.dtype)
        if m == 0:
            return fg, tgt_boxes, tgt_scores
        # anchor centres strictly inside each gt box: B x M x A
        lt = points[None, None] - gt_boxes[:, :, None, :2]
        rb = gt_boxes[:, :, None, 2:] - points[None, None]
        inside = (torch.cat([lt, rb], dim=-1).amin(-1) > 1e-9) & gt_mask[..., None]
        ious = torch.stack([box_iou(gt_boxes[i], pred_boxes[i]) for i in range(b)]).clamp(min=0)  # B x M x A
        cls_score = scores.gather(2, gt_labels.clamp(min=0)[:, None, :].expand(b, a, m)).transpose(1, 2)
        align = cls_score.pow(self.alpha) * ious.pow(self.beta) * inside
        k = min(self.topk, a)
        top = align.topk(k, dim=-1).indices
        chosen = torch.zeros_like(inside).scatter_(2, top, True) & inside  # B x M x A
        # an anchor claimed by several gts keeps the gt it overlaps most
        multi = chosen.sum(1) > 1
        if multi.any():
            best = F.one_hot(ious.argmax(1), m).transpose(1, 2).bool()
            chosen = torch.where(multi[:, None, :], best & chosen, chosen)
        fg = chosen.any(1)
        gt_idx = chosen.float().argmax(1)  # B x A
        batch = torch.arange(b, device=scores.device)[:, None]
        tgt_boxes = gt_boxes[batch, gt_idx]
        labels = gt_labels[batch, gt_idx]
        align = align * chosen
        norm_align = align / align.amax(-1, keepdim=True).clamp(min=1e-9) * (ious * chosen).amax(-1, keepdim=True)
        weight = norm_align.amax(1)  # B x A
        tgt_scores = F.one_hot(labels.clamp(min=0), c).to(scores.dtype) * (weight * fg)[..., None]
        return fg, tgt_boxes, tgt_scores


def pad_targets(targets: list[dict[str, Tensor]], *, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Targets as ``B x M x 4`` boxes, ``B x M`` labels (-1 for padding) and the ``B x M`` valid mask."""
    m = max((len(t["labels"]) for t in targets), default=0)
    b = len(targets)
    boxes = torch.zeros(b, m, 4, device=device)
    labels = torch.full((b, m), -1, dtype=torch.long, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"].to(device)
        labels[i, :n] = t["labels"].to(device)
    return boxes, labels, labels >= 0


def _dfl(box_logits: Tensor, tgt_ltrb: Tensor, reg_max: int) -> Tensor:
    """Distribution Focal Loss: cross-entropy to the two bins around each target distance."""
    tgt = tgt_ltrb.clamp(0, reg_max - 1 - 0.01)
    left = tgt.long()
    w_right = tgt - left
    logp = box_logits.log_softmax(-1)
    loss = -(logp.gather(-1, left[..., None]).squeeze(-1) * (1 - w_right)
             + logp.gather(-1, (left + 1)[..., None]).squeeze(-1) * w_right)  # fmt: skip
    return loss.mean(-1)
