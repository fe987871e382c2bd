"""torchvision detectors behind slimdet's :class:`~slimdet.models.base.Detector` interface.

Every model here is built from scratch (``weights=None, weights_backbone=None``: nothing is
downloaded), with the class count of the dataset and with torchvision's internal transform set
so that it does not resize (the data pipeline already letterboxes to ``input_size``).

Single-stage models (SSDlite, FCOS, RetinaNet) split torchvision's ``forward`` in two:
``forward`` runs normalization, backbone and head and returns the head tensors; ``postprocess``
and ``loss`` regenerate the (cached) anchors and call torchvision's own decoding and loss code.
Faster R-CNN is two-stage and data-dependent: its ``forward`` returns padded final detections and
it overrides ``compute_loss``.

Label conventions: SSD and Faster R-CNN reserve torchvision label 0 for the background, so
slimdet label ``k`` is torchvision label ``k + 1`` (``label_offset = 1``); FCOS and RetinaNet use
sigmoid classifiers without a background class (``label_offset = 0``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import detection as tv_detection
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from slimdet.errors import ConfigError
from slimdet.models.base import Detections, Detector, Target
from slimdet.models.registry import register_model

Raw = tuple[Tensor, ...]


def check_input_size(name: str, input_size: int) -> None:
    """Torchvision derives anchor strides as ``input_size // feature_size``, which is the backbone's
    stride only when the input is a multiple of it: 32 makes every level up to stride 32 exact (the
    FPN models' P6/P7 stay approximate unless the input is a multiple of 128, as in torchvision)."""
    if not isinstance(input_size, int) or input_size < 32 or input_size % 32:
        raise ConfigError(f"model {name!r}: input_size must be a positive multiple of 32, got {input_size!r}")


def to_torchvision_targets(targets: list[Target], *, label_offset: int, device: torch.device) -> list[Target]:
    """slimdet targets as torchvision wants them: only ``boxes`` and shifted ``labels``, on ``device``.

    Boxes with no width or height are dropped (torchvision's box encoders divide by their size).
    """
    out = []
    for t in targets:
        boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = t["labels"].to(device=device, dtype=torch.int64).reshape(-1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out.append({"boxes": boxes[keep], "labels": labels[keep] + label_offset})
    return out


def from_torchvision_labels(labels: Tensor, *, label_offset: int) -> Tensor:
    """Inverse of the label shift in :func:`to_torchvision_targets`."""
    return labels - label_offset


@contextmanager
def overridden(obj: object, **values: Any) -> Iterator[None]:
    """Set attributes of ``obj`` for the duration of a block, then restore them."""
    saved = {k: getattr(obj, k) for k in values}
    try:
        for k, v in values.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


class TorchvisionDetector(Detector):
    """A torchvision detection model held as ``self.net``, with slimdet's label convention."""

    #: torchvision label of slimdet label 0 (1 where torchvision reserves 0 for the background).
    label_offset: int = 0

    def __init__(self, net: nn.Module, *, num_classes: int, input_size: int) -> None:
        super().__init__(num_classes, input_size)
        self.net = net

    def output_layers(self) -> list[str]:
        """Module names of the final prediction layers whose output channels define the output
        format (class logits, box regression); pruning must leave their outputs alone."""
        raise NotImplementedError


class SingleStageDetector(TorchvisionDetector):
    """Shared plumbing of SSD, FCOS and RetinaNet.

    ``forward(images)`` returns the head tensors concatenated over feature levels, in the order of
    ``head_keys``; each is ``B x num_anchors x K``. Subclasses say how torchvision computes the loss
    and decodes detections from them.
    """

    #: names of torchvision's head outputs, in the order ``forward`` returns them.
    head_keys: tuple[str, ...] = ("cls_logits", "bbox_regression")

    def __init__(self, net: nn.Module, *, num_classes: int, input_size: int) -> None:
        super().__init__(net, num_classes=num_classes, input_size=input_size)
        transform = net.transform
        self.register_buffer("pixel_mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(transform.image_std).view(1, 3, 1, 1), persistent=False)
        # Feature shapes depend only on input_size; run the backbone once to learn them.
        was_training = net.backbone.training
        net.backbone.eval()
        with torch.no_grad():
            features = list(net.backbone(torch.zeros(1, 3, input_size, input_size)).values())
        net.backbone.train(was_training)
        self.grid_sizes = [tuple(f.shape[-2:]) for f in features]
        image_list = ImageList(torch.zeros(1, 3, input_size, input_size), [(input_size, input_size)])
        dummies = [torch.zeros(1, 1, h, w) for h, w in self.grid_sizes]
        anchors = net.anchor_generator(image_list, dummies)[0]
        self.register_buffer("anchors", anchors, persistent=False)
        per_location = anchors.shape[0] // sum(h * w for h, w in self.grid_sizes)
        self.anchors_per_level = [h * w * per_location for h, w in self.grid_sizes]

    def forward(self, images: Tensor) -> Raw:
        x = (images - self.pixel_mean) / self.pixel_std
        features = list(self.net.backbone(x).values())
        head = self.net.head(features)
        return tuple(head[k] for k in self.head_keys)

    def _anchors(self, raw: Raw) -> list[Tensor]:
        anchors = self.anchors.to(dtype=raw[0].dtype)
        return [anchors] * raw[0].shape[0]

    def loss(self, raw: Raw, targets: list[Target]) -> tuple[Tensor, dict[str, float]]:
        """Torchvision's loss for these head outputs; the parts are named as torchvision names them."""
        tv_targets = to_torchvision_targets(targets, label_offset=self.label_offset, device=raw[0].device)
        parts = self._torchvision_loss(dict(zip(self.head_keys, raw, strict=True)), self._anchors(raw), tv_targets)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def postprocess(
        self, raw: Raw, *, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 100
    ) -> list[Detections]:
        """Torchvision's decoding and per-class NMS with these thresholds; slimdet labels."""
        image_sizes = [(self.input_size, self.input_size)] * raw[0].shape[0]
        head = dict(zip(self.head_keys, raw, strict=True))
        with overridden(self.net, score_thresh=conf_thres, nms_thresh=iou_thres, detections_per_img=max_det):
            dets = self._torchvision_decode(head, self._anchors(raw), image_sizes)
        for d in dets:
            d["labels"] = from_torchvision_labels(d["labels"], label_offset=self.label_offset)
        return dets

    def _torchvision_loss(
        self, head: dict[str, Tensor], anchors: list[Tensor], targets: list[Target]
    ) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _torchvision_decode(
        self, head: dict[str, Tensor], anchors: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        # FCOS and RetinaNet decode level by level.
        split_head = {k: list(v.split(self.anchors_per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(self.anchors_per_level)) for a in anchors]
        return self.net.postprocess_detections(split_head, split_anchors, image_sizes)


class SSDLiteAdapter(SingleStageDetector):
    """SSDlite (MobileNetV3-Large) from torchvision.

    Raw output: ``(cls_logits, bbox_regression)``, shapes ``B x A x (num_classes + 1)`` (softmax
    logits, column 0 is the background) and ``B x A x 4`` (box deltas against the default boxes,
    weights 10, 10, 5, 5).
    """

    label_offset = 1

    def _torchvision_loss(
        self, head: dict[str, Tensor], anchors: list[Tensor], targets: list[Target]
    ) -> dict[str, Tensor]:
        net: SSD = self.net
        matched = []
        for a, t in zip(anchors, targets, strict=True):
            if t["boxes"].numel() == 0:
                matched.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
            else:
                matched.append(net.proposal_matcher(box_iou(t["boxes"], a)))
        return net.compute_loss(targets, head, anchors, matched)

    def _torchvision_decode(
        self, head: dict[str, Tensor], anchors: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        return self.net.postprocess_detections(head, anchors, image_sizes)

    def output_layers(self) -> list[str]:
        # Each prediction block is (depthwise conv-bn-act, 1x1 conv); the 1x1 conv predicts.
        heads = ("classification_head", "regression_head")
        n = len(self.net.head.classification_head.module_list)
        return [f"net.head.{h}.module_list.{i}.1" for h in heads for i in range(n)]


class FCOSAdapter(SingleStageDetector):
    """FCOS from torchvision, on an FPN backbone with levels P3-P7.

    Raw output: ``(cls_logits, bbox_regression, bbox_ctrness)``, shapes ``B x P x num_classes``
    (sigmoid logits), ``B x P x 4`` (distances to the box sides, normalized by the point's level
    size) and ``B x P x 1`` (centerness logits), P the number of locations over all levels.
    """

    head_keys = ("cls_logits", "bbox_regression", "bbox_ctrness")

    def _torchvision_loss(
        self, head: dict[str, Tensor], anchors: list[Tensor], targets: list[Target]
    ) -> dict[str, Tensor]:
        return self.net.compute_loss(targets, head, anchors, self.anchors_per_level)

    def output_layers(self) -> list[str]:
        return [
            "net.head.classification_head.cls_logits",
            "net.head.regression_head.bbox_reg",
            "net.head.regression_head.bbox_ctrness",
        ]


class RetinaNetAdapter(SingleStageDetector):
    """RetinaNet from torchvision, on an FPN backbone with levels P3-P7.

    Raw output: ``(cls_logits, bbox_regression)``, shapes ``B x A x num_classes`` (sigmoid logits)
    and ``B x A x 4`` (box deltas against the anchors, weights 1, 1, 1, 1); 9 anchors per location.
    """

    def _torchvision_loss(
        self, head: dict[str, Tensor], anchors: list[Tensor], targets: list[Target]
    ) -> dict[str, Tensor]:
        return self.net.compute_loss(targets, head, anchors)

    def output_layers(self) -> list[str]:
        return ["net.head.classification_head.cls_logits", "net.head.regression_head.bbox_reg"]


class FasterRCNNAdapter(TorchvisionDetector):
    """Faster R-CNN (MobileNetV3-Large FPN) from torchvision.

    Raw output: the final detections, padded to K = ``net.roi_heads.detections_per_img`` per image:
    ``(boxes B x K x 4, scores B x K, labels B x K)``, labels in torchvision's numbering
    (1..num_classes) and -1 for padding. The second stage runs on data-dependent proposals, so there
    are no fixed head tensors to return: ``compute_loss`` runs torchvision's training path with the
    targets, and ``loss(raw, targets)`` is not available.
    """

    label_offset = 1

    @contextmanager
    def _mode(self, training: bool) -> Iterator[None]:
        # Only the containers that branch on self.training; batch norm layers keep their own mode.
        net = self.net
        parts = [net, net.transform, net.rpn, net.roi_heads]
        saved = [p.training for p in parts]
        try:
            for p in parts:
                p.training = training
            yield
        finally:
            for p, was in zip(parts, saved, strict=True):
                p.training = was

    def forward(self, images: Tensor) -> Raw:
        with self._mode(False):
            dets = self.net(list(images))
        k = self.net.roi_heads.detections_per_img
        b = images.shape[0]
        boxes = images.new_zeros(b, k, 4)
        scores = images.new_zeros(b, k)
        labels = torch.full((b, k), -1, dtype=torch.int64, device=images.device)
        for i, d in enumerate(dets):
            n = d["scores"].shape[0]
            boxes[i, :n], scores[i, :n], labels[i, :n] = d["boxes"], d["scores"], d["labels"]
        return boxes, scores, labels

    def compute_loss(self, images: Tensor, targets: list[Target]) -> tuple[Tensor, dict[str, float]]:
        """Sum of torchvision's four losses (RPN objectness and boxes, ROI classifier and boxes)."""
        tv_targets = to_torchvision_targets(targets, label_offset=self.label_offset, device=images.device)
        with self._mode(True):
            parts = self.net(list(images), tv_targets)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def loss(self, raw: Raw, targets: list[Target]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError(
            "Faster R-CNN's loss needs the targets during the forward pass; use compute_loss(images, targets)"
        )

    @torch.no_grad()
    def predict(
        self, images: Tensor, *, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 100
    ) -> list[Detections]:
        # The thresholds act inside forward (second-stage NMS), so set them before it runs.
        kw = {"conf_thres": conf_thres, "iou_thres": iou_thres, "max_det": max_det}
        roi = self.net.roi_heads
        with overridden(roi, score_thresh=conf_thres, nms_thresh=iou_thres, detections_per_img=max_det):
            return super().predict(images, **kw)

    def postprocess(
        self, raw: Raw, *, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 100
    ) -> list[Detections]:
        """Strip the padding; apply ``conf_thres``, and ``iou_thres``/``max_det`` where they are
        stricter than the thresholds ``forward`` ran with."""
        out = []
        for boxes, scores, labels in zip(*raw, strict=True):
            keep = (labels >= 0) & (scores > conf_thres)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, iou_thres)[:max_det]
            labels = from_torchvision_labels(labels[keep], label_offset=self.label_offset)
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels})
        return out

    def output_layers(self) -> list[str]:
        return [
            "net.rpn.head.cls_logits",
            "net.rpn.head.bbox_pred",
            "net.roi_heads.box_predictor.cls_score",
            "net.roi_heads.box_predictor.bbox_pred",
        ]


def _mobilenet_fpn_p3_p7() -> nn.Module:
    """MobileNetV3-Large (random init) with an FPN on strides 8, 16, 32 and extra P6, P7 levels."""
    backbone = torchvision.models.mobilenet_v3_large(weights=None)
    # Stages of MobileNetV3-Large: [stem, s4, s8, s16, s32, last]; take s8, s16 and the 960-ch last.
    return _mobilenet_extractor(backbone, True, 6, returned_layers=[2, 3, 5], extra_blocks=LastLevelP6P7(256, 256))


@register_model("ssdlite320_mobilenet_v3_large")
def ssdlite320_mobilenet_v3_large(num_classes: int, input_size: int = 160) -> SSDLiteAdapter:
    """torchvision's SSDlite with a MobileNetV3-Large backbone, at ``input_size`` instead of 320."""
    check_input_size("ssdlite320_mobilenet_v3_large", input_size)
    net = tv_detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    # The builder fixes the size at 320; normalize as before but resize to (= keep) input_size.
    t, size = net.transform, (input_size, input_size)
    net.transform = GeneralizedRCNNTransform(*size, t.image_mean, t.image_std, size_divisible=1, fixed_size=size)
    return SSDLiteAdapter(net, num_classes=num_classes, input_size=input_size)


@register_model("fcos_mobilenet_v3_fpn")
def fcos_mobilenet_v3_fpn(num_classes: int, input_size: int = 160) -> FCOSAdapter:
    """FCOS (torchvision) on a MobileNetV3-Large FPN; one point per location, sizes 8 to 128."""
    check_input_size("fcos_mobilenet_v3_fpn", input_size)
    net = tv_detection.FCOS(_mobilenet_fpn_p3_p7(), num_classes, min_size=input_size, max_size=input_size)
    return FCOSAdapter(net, num_classes=num_classes, input_size=input_size)


@register_model("retinanet_mobilenet_v3_fpn")
def retinanet_mobilenet_v3_fpn(num_classes: int, input_size: int = 160) -> RetinaNetAdapter:
    """RetinaNet (torchvision) on a MobileNetV3-Large FPN; torchvision's default anchors (32 to 512)."""
    check_input_size("retinanet_mobilenet_v3_fpn", input_size)
    net = tv_detection.RetinaNet(_mobilenet_fpn_p3_p7(), num_classes, min_size=input_size, max_size=input_size)
    return RetinaNetAdapter(net, num_classes=num_classes, input_size=input_size)


@register_model("fcos_resnet50_fpn")
def fcos_resnet50_fpn(num_classes: int, input_size: int = 160) -> FCOSAdapter:
    """torchvision's stock FCOS (ResNet-50 FPN, P3-P7)."""
    check_input_size("fcos_resnet50_fpn", input_size)
    net = tv_detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, min_size=input_size, max_size=input_size
    )
    return FCOSAdapter(net, num_classes=num_classes, input_size=input_size)


@register_model("retinanet_resnet50_fpn")
def retinanet_resnet50_fpn(num_classes: int, input_size: int = 160) -> RetinaNetAdapter:
    """torchvision's stock RetinaNet (ResNet-50 FPN, P3-P7, anchors 32 to 512)."""
    check_input_size("retinanet_resnet50_fpn", input_size)
    net = tv_detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, min_size=input_size, max_size=input_size
    )
    return RetinaNetAdapter(net, num_classes=num_classes, input_size=input_size)


@register_model("fasterrcnn_mobilenet_v3_large_320_fpn")
def fasterrcnn_mobilenet_v3_large_320_fpn(num_classes: int, input_size: int = 160) -> FasterRCNNAdapter:
    """torchvision's low-resolution Faster R-CNN (MobileNetV3-Large FPN), at ``input_size`` instead of 320.

    The second stage keeps up to 100 detections above score 0.001 after NMS at IoU 0.6 (slimdet's
    ``predict`` defaults); ``predict`` replaces these with its own arguments. Training samples 128
    RoIs per image instead of 512: the input has a quarter of the area of the 320 model's.
    """
    check_input_size("fasterrcnn_mobilenet_v3_large_320_fpn", input_size)
    net = tv_detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=input_size,
        max_size=input_size,
        box_score_thresh=0.001,
        box_nms_thresh=0.6,
        box_detections_per_img=100,
        box_batch_size_per_image=128,
    )
    return FasterRCNNAdapter(net, num_classes=num_classes, input_size=input_size)
