"""slimdet's native compact detector: an anchor-free YOLO-style network.

Backbone of strided convs and C2f blocks (cross-stage partial blocks whose every bottleneck output
is concatenated, as in YOLOv8), an SPPF block, a PAN/FPN neck, and decoupled heads at strides
8, 16 and 32. Boxes are predicted as distributions over ``reg_max`` distance bins per side
(Distribution Focal Loss, Li et al., NeurIPS 2020). ``forward`` returns one raw tensor per level,
``B x (4 * reg_max + num_classes) x H x W``; decoding and NMS live in ``postprocess``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torchvision
from torch import Tensor, nn

from slimdet.models.base import Detections, Detector, Target
from slimdet.models.registry import register_model
from slimdet.models.yolo_loss import YoloLoss, anchor_points, decode_distances


@dataclass(frozen=True)
class YoloArch:
    """Widths of stem + 4 stages, C2f depths of the 4 stages, and the head widths."""

    widths: tuple[int, int, int, int, int]
    depths: tuple[int, int, int, int]
    head_width: int
    reg_max: int = 8


ARCHS: dict[str, YoloArch] = {
    "yolo-test": YoloArch(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 1), head_width=16),
    "yolo-n": YoloArch(widths=(16, 24, 48, 96, 128), depths=(1, 1, 1, 1), head_width=48),
    "yolo-s": YoloArch(widths=(16, 32, 64, 128, 192), depths=(1, 2, 2, 1), head_width=64),
}
STRIDES = (8, 16, 32)


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """1x1 conv, split in two halves, a chain of bottlenecks on one half, concat all, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        hidden = c_out // 2
        self.cv1 = ConvBNAct(c_in, 2 * hidden)
        self.blocks = nn.ModuleList(Bottleneck(hidden, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * hidden, c_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        # the second part feeds the bottlenecks; read from the convs, so channel pruning keeps it right
        split = self.cv1[0].out_channels - self.blocks[0].cv1[0].in_channels
        parts = [y[:, :split], y[:, split:]]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools concatenated (YOLOv5)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNAct(4 * hidden, c_out)

    def forward(self, x: Tensor) -> Tensor:
        y1 = self.cv1(x)
        y2 = self.pool(y1)
        y3 = self.pool(y2)
        return self.cv2(torch.cat([y1, y2, y3, self.pool(y3)], dim=1))


class Backbone(nn.Module):
    def __init__(self, arch: YoloArch) -> None:
        super().__init__()
        w, d = arch.widths, arch.depths
        self.stem = ConvBNAct(3, w[0], 3, 2)
        self.stage1 = nn.Sequential(ConvBNAct(w[0], w[1], 3, 2), C2f(w[1], w[1], d[0]))
        self.stage2 = nn.Sequential(ConvBNAct(w[1], w[2], 3, 2), C2f(w[2], w[2], d[1]))
        self.stage3 = nn.Sequential(ConvBNAct(w[2], w[3], 3, 2), C2f(w[3], w[3], d[2]))
        self.stage4 = nn.Sequential(ConvBNAct(w[3], w[4], 3, 2), C2f(w[4], w[4], d[3]), SPPF(w[4], w[4]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        return p3, p4, self.stage4(p4)


class Neck(nn.Module):
    """PAN: top-down (upsample + concat) then bottom-up (strided conv + concat)."""

    def __init__(self, arch: YoloArch) -> None:
        super().__init__()
        c3, c4, c5 = arch.widths[2:]
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, 1, shortcut=False)
        self.td3 = C2f(c4 + c3, c3, 1, shortcut=False)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, 1, shortcut=False)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, 1, shortcut=False)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat([self.up(p5), p4], dim=1))
        n3 = self.td3(torch.cat([self.up(t4), p3], dim=1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], dim=1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], dim=1))
        return n3, n4, n5


class HeadLevel(nn.Module):
    """Decoupled head of one level: a box branch and a class branch, each two 3x3 convs and a 1x1."""

    def __init__(self, c_in: int, width: int, num_classes: int, reg_max: int, stride: int) -> None:
        super().__init__()
        self.box = nn.Sequential(ConvBNAct(c_in, width, 3), ConvBNAct(width, width, 3))
        self.box_pred = nn.Conv2d(width, 4 * reg_max, 1)
        self.cls = nn.Sequential(ConvBNAct(c_in, width, 3), ConvBNAct(width, width, 3))
        self.cls_pred = nn.Conv2d(width, num_classes, 1)
        nn.init.constant_(self.box_pred.bias, 1.0)
        # prior: about 5 objects per image spread over this level's cells (YOLOv8's bias init)
        cells = (640 / stride) ** 2
        nn.init.constant_(self.cls_pred.bias, float(torch.log(torch.tensor(5 / num_classes / cells))))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.box_pred(self.box(x)), self.cls_pred(self.cls(x))], dim=1)


class YoloDetector(Detector):
    """Anchor-free YOLO-style detector (see module docstring)."""

    def __init__(self, num_classes: int, arch: YoloArch, input_size: int = 160) -> None:
        super().__init__(num_classes, input_size)
        if input_size % max(STRIDES):
            raise ValueError(f"input_size must be a multiple of {max(STRIDES)}, got {input_size}")
        self.arch = arch
        self.reg_max = arch.reg_max
        self.backbone = Backbone(arch)
        self.neck = Neck(arch)
        self.heads = nn.ModuleList(
            HeadLevel(c, arch.head_width, num_classes, arch.reg_max, s)
            for c, s in zip(arch.widths[2:], STRIDES, strict=True)
        )
        self.criterion = YoloLoss(num_classes, arch.reg_max, STRIDES)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        feats = self.neck(self.backbone(images))
        return tuple(head(f) for head, f in zip(self.heads, feats, strict=True))

    def output_layers(self) -> list[str]:
        """Module names of the final prediction convs, whose channels fix the output format."""
        return [f"heads.{i}.{p}" for i in range(len(self.heads)) for p in ("box_pred", "cls_pred")]

    def feature_layers(self) -> list[str]:
        """Per level, the first conv of the box branch: its input is the neck feature both branches
        read. Found by the weight it owns, so it survives compression that wraps or replaces the conv
        (quantized, decomposed, fused)."""
        out = []
        for i in range(len(self.heads)):
            prefix = f"heads.{i}.box."
            for name, module in self.named_modules():
                weight = getattr(module, "weight", None)
                if name.startswith(prefix) and isinstance(weight, Tensor) and weight.ndim == 4:
                    out.append(name)
                    break
            else:
                raise ValueError(f"{prefix}*: no conv found to take the level-{i} feature from")
        return out

    def split_raw(self, raw: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flatten levels: box logits ``B x A x 4 x R``, class logits ``B x A x C``, anchor
        points ``A x 2`` (pixels) and strides ``A x 1``."""
        b = raw[0].shape[0]
        flat = torch.cat([r.flatten(2) for r in raw], dim=2).transpose(1, 2)  # B x A x (4R + C)
        box_logits = flat[..., : 4 * self.reg_max].reshape(b, -1, 4, self.reg_max)
        cls_logits = flat[..., 4 * self.reg_max :]
        sizes = [(r.shape[2], r.shape[3]) for r in raw]
        points, strides = anchor_points(sizes, STRIDES, device=flat.device, dtype=flat.dtype)
        return box_logits, cls_logits, points, strides

    def postprocess(
        self, raw: tuple[Tensor, ...], *, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 100
    ) -> list[Detections]:
        box_logits, cls_logits, points, strides = self.split_raw(raw)
        boxes = decode_distances(box_logits, points, strides).clamp(0, self.input_size)
        scores = cls_logits.sigmoid()
        out: list[Detections] = []
        for b in range(scores.shape[0]):
            # every (anchor, class) pair above the threshold is a candidate (multi-label)
            anchor_idx, labels = (scores[b] > conf_thres).nonzero(as_tuple=True)
            cand_scores = scores[b, anchor_idx, labels]
            if cand_scores.numel() > 10 * max_det:
                top = cand_scores.topk(10 * max_det).indices
                anchor_idx, labels, cand_scores = anchor_idx[top], labels[top], cand_scores[top]
            cand_boxes = boxes[b, anchor_idx]
            keep = torchvision.ops.batched_nms(cand_boxes, cand_scores, labels, iou_thres)[:max_det]
            out.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": labels[keep]})
        return out

    def loss(
        self, raw: tuple[Tensor, ...], targets: list[Target], *, assigned: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Detection loss; ``assigned``: targets assigned elsewhere, e.g. on a teacher's predictions (see
        :class:`~slimdet.models.yolo_loss.YoloLoss`)."""
        box_logits, cls_logits, points, strides = self.split_raw(raw)
        return self.criterion(box_logits, cls_logits, points, strides, targets, assigned=assigned)


def _factory(name: str):
    def make(num_classes: int, input_size: int = 160) -> YoloDetector:
        return YoloDetector(num_classes, ARCHS[name], input_size=input_size)

    make.__doc__ = f"{name}: {asdict(ARCHS[name])}"
    return make


for _name in ARCHS:
    register_model(_name)(_factory(_name))
