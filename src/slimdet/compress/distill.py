"""Knowledge distillation for detectors: a compressed student learns from the original model.

The student's loss is a weighted sum, every weight in :class:`DistillConfig`:

- ``det``: the student's own detection loss against the ground truth;
- ``cls``: classification distillation. The teacher's class scores, softened by a temperature T,
  are soft targets: per anchor and class the binary KL divergence between
  ``sigmoid(t / T)`` and ``sigmoid(s / T)``, times T^2 (Hinton et al., 2015), normalised like
  the detection loss's classification term (by the sum of the teacher's best class scores);
- ``box``: box distillation. The box head predicts a distribution over distance bins per side
  (Distribution Focal Loss); the student matches the teacher's softened distributions (KL, T^2)
  at the locations the task-aligned assigner gives the ground-truth boxes when it scores the
  teacher's predictions, weighted by their alignment (localization distillation, Zheng et al.,
  CVPR 2022);
- ``feat``: feature imitation on the neck features that enter the heads (one per level). Where
  the student's channels differ from the teacher's (pruned, decomposed), a 1x1 adapter conv maps
  the student's feature to the teacher's width; the squared error is weighted separately over
  the cells inside ground-truth boxes and the rest, so the few object cells are not drowned by
  background (the foreground / background split of FGD, Yang et al., CVPR 2022).

- ``layers``: layer-wise imitation for a pruned student. Pruning keeps a subset of each layer's
  channels, index-selected, so every batch norm of the student whose scale, shift and statistics
  are the teacher's for some of its channels tells which teacher channel each student channel is
  (:func:`matched_channels`, found once at the start and kept in checkpoints); the output of every
  such layer is pulled toward the teacher's matching channels (squared error relative to the
  teacher's per-channel variance). Dense, direct supervision of each layer restores what pruning
  removed faster than the losses at the outputs alone (the layer-wise reconstruction of ThiNet,
  Luo et al., ICCV 2017, and channel pruning, He et al., ICCV 2017, here as a training loss).

Before the first step (``reconstruct_batches``, :meth:`Distiller.reconstruct`), a pruned student is first
brought close to the teacher in closed form: layer by layer from the input, each conv's output is mapped onto
the teacher's conv output on the kept channels by a least-squares 1x1 map fitted on a few batches, which is then
merged into the conv (few-sample knowledge distillation, Li et al., CVPR 2020). Pruning leaves the kept
channels' weights as they were while their inputs lost channels; the refit re-solves for what the removed
inputs carried, so fine-tuning starts near the teacher rather than from the broken pruned model.

The detection loss can assign its targets with the teacher's predictions instead of the student's
(``assign``), so a student that still predicts poorly learns toward the teacher's stable positives.

All distillation terms are exactly zero when the student computes what the teacher
computes. The teacher runs in eval mode without gradients; the adapters train with the student
(their parameters are :meth:`Distiller.parameters`) and are dropped afterwards: the student's
checkpoint is unchanged in format.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimdet.distributed import loss_normalizer
from slimdet.errors import ConfigError
from slimdet.models.base import Detector, Target
from slimdet.models.yolo import YoloDetector
from slimdet.models.yolo_loss import decode_distances, pad_targets

#: ``teacher: original`` in a recipe: the model before compression (see the finetune step)
ORIGINAL = "original"


class DistillConfig(BaseModel):
    """Teacher and loss weights of detection distillation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    #: "original" (in a recipe: the model before the first compression step) or a checkpoint path
    teacher: str = ORIGINAL
    #: weight of the student's detection loss against the ground truth
    det: float = Field(1.0, ge=0)
    # Default weights: three times the gains the detection loss gives the terms they shadow (its
    # classification term 0.5, its distribution term DFL 1.5), and 3 for the features, so that the
    # distillation terms weigh about as much as the detection loss. Chosen on digits-det's val split
    # among 1x, 3x, 6x and 10x those gains (benchmarks/RESULTS.md, "Distillation").
    #: weight of classification distillation (soft teacher scores)
    cls: float = Field(1.5, ge=0)
    #: weight of box distillation (teacher distance distributions at assigned locations)
    box: float = Field(4.5, ge=0)
    #: weight of neck-feature imitation
    feat: float = Field(3.0, ge=0)
    #: softening temperature of the class scores and box distributions
    temperature: float = Field(2.0, gt=0)
    #: share of the feature loss given to the cells inside ground-truth boxes (the rest: background)
    feat_fg_share: float = Field(0.7, ge=0, le=1)
    #: seed of the adapters' initial weights
    seed: int = 0
    #: batches of training images the adapters are first fitted on by least squares (student feature ->
    #: teacher feature, ridge-regularised), so that feature imitation pulls in a meaningful direction
    #: from the first step; 0 keeps the random start. Off by default: on digits-det's val split (pruned
    #: yolo-s, 2 epochs) 4 batches gave mAP@.5 0.9541 against 0.9557 from the random start
    #: (``bench_distill.py --sweep``, "gains-3x-fit")
    adapter_fit_batches: int = Field(0, ge=0)
    #: weight of layer-wise imitation: every batch-norm output of the student that is a subset of the teacher's
    #: channels (a pruned student: found by its batch-norm parameters, which pruning only index-selects) is
    #: pulled toward the teacher's matching channels. On digits-det's val split (pruned yolo-s, 2 epochs,
    #: ``bench_distill.py --sweep``) weight 1 gave mAP@.5 0.9567 and 3 gave 0.9565, against 0.9557 without
    layers: float = Field(1.0, ge=0)
    #: whose predictions the student's detection loss assigns its targets with: ``student`` (its own, as
    #: without distillation) or ``teacher`` (the teacher's scores and boxes pick the positive anchors and set
    #: the soft class targets, so a student that still predicts poorly gets the teacher's stable assignment).
    #: On digits-det's val split (pruned yolo-s, 2 epochs) ``teacher`` gave mAP@.5 0.9564 against 0.9567
    assign: Literal["student", "teacher"] = "student"
    #: batches of training images on which, before the first step, each conv of a pruned student is refitted
    #: in closed form so that its output matches the teacher's on the kept channels (few-sample distillation:
    #: a least-squares 1x1 map merged into the conv, layer by layer from the input); 0: off. Chosen on
    #: digits-det's val split (pruned yolo-s, 2 epochs, ``bench_distill.py --sweep``, "layers1-recon4")
    reconstruct_batches: int = Field(4, ge=0)


class Distiller(nn.Module):
    """Teacher, adapters and feature taps for one student; call it to get the loss of a batch.

    Use as a context manager (or call :meth:`close`) so the hooks on the student are removed.
    """

    def __init__(self, student: Detector, teacher: Detector, cfg: DistillConfig) -> None:
        super().__init__()
        check_pair(student, teacher)
        self.cfg = cfg
        self.teacher = [teacher.eval()]  # a list: not a submodule, so not trained, saved or moved with us
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._student_taps = _Taps(student)
        self._teacher_taps = _Taps(teacher)
        self.adapters = nn.ModuleDict()
        #: per level, the relative residual of the least-squares adapter start (set by :meth:`prepare`)
        self.adapter_fit: dict[str, float] = {}
        #: per layer, the relative residual to the teacher before and after :meth:`reconstruct` (by :meth:`prepare`)
        self.reconstruction: dict[str, tuple[float, float]] = {}
        if cfg.feat > 0:
            s_ch, t_ch = _feature_channels(student, self._student_taps), _feature_channels(teacher, self._teacher_taps)
            with torch.random.fork_rng(devices=[]):  # the same adapters whatever ran before: reproducible runs
                torch.manual_seed(cfg.seed)
                for level, (cs, ct) in enumerate(zip(s_ch, t_ch, strict=True)):
                    if cs != ct:  # a 1x1 conv from the student's width to the teacher's
                        self.adapters[str(level)] = nn.Conv2d(cs, ct, 1)
        self._models = (student, teacher)
        #: layer name -> the teacher channel of each of the student's channels (``layers`` > 0)
        self.layer_map: dict[str, Tensor] = matched_channels(student, teacher) if cfg.layers > 0 else {}
        self._tap_layers()

    def forward(self, student: Detector, images: Tensor, targets: list[Target]) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its named parts: the detection parts, ``det``, ``kd_cls``, ``kd_box``, ``kd_feat``."""
        cfg = self.cfg
        teacher = self.teacher[0]
        want_feat = cfg.feat > 0
        want_layers = bool(self.layer_map)
        with torch.no_grad(), self._teacher_taps.capture(want_feat), self._teacher_layers.capture(want_layers):
            t_raw = teacher(images)
        with self._student_taps.capture(want_feat), self._student_layers.capture(want_layers):
            s_raw = student(images)
        s_box, s_cls, points, strides = student.split_raw(s_raw)
        t_box, t_cls, _, _ = teacher.split_raw(t_raw)
        if s_cls.shape != t_cls.shape or s_box.shape != t_box.shape:
            raise ConfigError(
                f"distillation: the student's outputs {tuple(s_cls.shape)} / {tuple(s_box.shape)} differ from the "
                f"teacher's {tuple(t_cls.shape)} / {tuple(t_box.shape)} (classes, anchors or box bins)"
            )
        # the ground truth assigned on the teacher's predictions: box distillation's weights, and with
        # ``assign: teacher`` the detection loss's targets
        by_teacher = _teacher_assignment(student, t_box, t_cls, points, strides, targets) \
            if cfg.box > 0 or cfg.assign == "teacher" else None  # fmt: skip
        det, parts = student.loss(s_raw, targets, assigned=by_teacher if cfg.assign == "teacher" else None)
        zero = det.new_zeros(())
        kd_cls = cls_distill_loss(s_cls, t_cls, cfg.temperature) if cfg.cls > 0 else zero
        kd_box = zero
        if by_teacher is not None and cfg.box > 0:
            kd_box = box_distill_loss(s_box, t_box, by_teacher[2].sum(-1), cfg.temperature)
        kd_feat = zero
        if want_feat:
            sizes = [(r.shape[2], r.shape[3]) for r in s_raw]
            masks = foreground_masks(targets, points, sizes, device=images.device)
            s_feats, t_feats = self._student_taps.features, self._teacher_taps.features
            for level, (sf, tf, mask) in enumerate(zip(s_feats, t_feats, masks, strict=True)):
                adapter = self.adapters[str(level)] if str(level) in self.adapters else None
                kd_feat = kd_feat + feature_loss(adapter(sf) if adapter is not None else sf, tf, mask,
                                                 fg_share=cfg.feat_fg_share)  # fmt: skip
            kd_feat = kd_feat / len(s_feats)
        kd_layers = self._layer_loss() if want_layers else zero
        total = cfg.det * det + cfg.cls * kd_cls + cfg.box * kd_box + cfg.feat * kd_feat + cfg.layers * kd_layers
        kd = {"kd_cls": kd_cls.item(), "kd_box": kd_box.item(), "kd_feat": kd_feat.item()}
        if want_layers:
            kd["kd_layers"] = kd_layers.item()
        parts = {**parts, "det": det.item(), **kd}
        return total, parts

    def _layer_loss(self) -> Tensor:
        """Mean over the matched layers of the squared error to the teacher's channels, per channel relative to
        the teacher's variance in the batch (so that every layer weighs alike whatever its scale)."""
        losses = []
        for s, t, index in zip(self._student_layers.features, self._teacher_layers.features,
                               self.layer_map.values(), strict=True):  # fmt: skip
            t = t.detach()[:, index]
            var = t.var(dim=(0, 2, 3), keepdim=True) + 1e-4
            losses.append(((s - t).pow(2) / var).mean())
        return torch.stack(losses).mean()

    def _tap_layers(self) -> None:
        """Output taps on the layers of ``layer_map`` (replacing earlier ones) in the student and the teacher."""
        for taps in (getattr(self, "_student_layers", None), getattr(self, "_teacher_layers", None)):
            if taps is not None:
                taps.close()
        names = list(self.layer_map)
        self._student_layers, self._teacher_layers = (_Taps(m, names, outputs=True) for m in self._models)

    def get_extra_state(self) -> dict[str, Any]:
        """The channel map goes into checkpoints: after training the student's batch norms no longer match the
        teacher's, so a resumed run takes the map it started with."""
        return {"layer_map": {name: index.tolist() for name, index in self.layer_map.items()}}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if "_extra_state" not in state_dict:  # written before layer-wise imitation existed: keep this map
            state_dict = {**state_dict, "_extra_state": self.get_extra_state()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.layer_map = {name: torch.tensor(index, dtype=torch.long) for name, index in state["layer_map"].items()}
        self._tap_layers()

    def prepare(self, student: Detector, loader: Any, *, progress: bool = True) -> None:
        """Called by :func:`slimdet.train.train` before the first step of a new run: refits the student's convs
        on the first ``reconstruct_batches`` batches of ``loader`` (relative residuals before and after go to
        ``self.reconstruction``), then fits the adapters on the first ``adapter_fit_batches`` batches (the
        residuals go to ``self.adapter_fit``)."""
        if self.layer_map and self.cfg.reconstruct_batches:
            batches = list(itertools.islice(loader, self.cfg.reconstruct_batches))
            self.reconstruction = self.reconstruct(student, batches, progress=progress)
        if self.adapters and self.cfg.adapter_fit_batches:
            self.adapter_fit = self.fit_adapters(student, itertools.islice(loader, self.cfg.adapter_fit_batches))

    @torch.no_grad()
    def reconstruct(
        self, student: Detector, batches: list[Any], *, ridge: float = 1e-3, progress: bool = True
    ) -> dict[str, tuple[float, float]]:
        """Refit each conv of a pruned student, in forward order, so that its output matches the teacher's
        conv output on the channels it kept (few-sample knowledge distillation, Li et al., CVPR 2020).

        For every layer of :attr:`layer_map` whose batch norm follows a plain (ungrouped) conv, over every cell
        of ``batches`` ((images, targets) pairs; both models in eval mode) solve the ridge-regularised least
        squares ``min ||Q z_s + c - z_t||^2`` for a ``C x C`` matrix ``Q`` and shift ``c``, where ``z_s`` is the
        student's conv output (its inputs already carry the refits of the layers before it) and ``z_t`` the
        teacher's on the matching channels; then merge it: the conv's weight becomes ``Q W`` and the batch
        norm's running mean ``mean - c``. Returns per layer the relative residual
        ``||z - z_t||^2 / ||z_t - mean z_t||^2`` before and after (Q = I, c = 0 is always a candidate, so after
        is at most before, up to the ridge term).
        """
        teacher = self.teacher[0]
        modules = dict(student.named_modules())
        layers = {name: conv for name in self.layer_map if (conv := _conv_before(modules, name)) is not None}
        if not layers or not batches:
            return {}
        was_training = student.training
        student.eval()  # also for the order pass: a training-mode forward would move the batch-norm statistics
        out: dict[str, tuple[float, float]] = {}
        taps: list[_Taps] = []
        try:
            names = _forward_order(student, list(layers), batches[0][0][:1])
            t_taps, s_taps = _Taps(teacher, names), _Taps(student, names)  # batch-norm inputs: the convs' outputs
            taps = [t_taps, s_taps]
            targets = []
            for images, _ in batches:
                with t_taps.capture(True):
                    teacher(images)
                targets.append(t_taps.features)
            for i, name in enumerate(tqdm(names, desc="reconstruct", unit="layer", disable=not progress)):
                fit = _LeastSquares()
                for b, (images, _) in enumerate(batches):
                    with s_taps.capture(True):
                        student(images)
                    fit.add(s_taps.features[i], targets[b][i][:, self.layer_map[name]])
                x, after = fit.solve(ridge)  # (C + 1) x C: Q^T and the shift
                before = fit.identity_residual()
                if after < before:  # merge Q into the conv and the shift into the batch norm's running mean
                    conv, bn = layers[name], modules[name]
                    q = x[:-1].T.to(conv.weight.dtype)
                    conv.weight.copy_((q @ conv.weight.flatten(1)).view_as(conv.weight))
                    bn.running_mean.sub_(x[-1].to(bn.running_mean.dtype))
                out[name] = (before, min(after, before))
        finally:
            for tap in taps:
                tap.close()
            student.train(was_training)
        return out

    @torch.no_grad()
    def fit_adapters(self, student: Detector, batches: Any, *, ridge: float = 1e-3) -> dict[str, float]:
        """Set each adapter to the least-squares map from the student's features to the teacher's.

        Over every cell of ``batches`` ((images, targets) pairs; both models in eval mode) solve
        ``min ||W s + b - t||^2 + ridge * tr(S^T S) / c_s * ||W||^2`` per level: the normal equations of a
        1x1 conv. A random adapter makes the first steps of feature imitation push the student toward
        noise; the fitted one starts from the best the current student can express, so the gradient
        asks only for what is missing. Returns the relative residual ``||W s + b - t||^2 / ||t - mean t||^2``
        per level (1.0 would mean the student's features explain nothing of the teacher's).
        """
        if not self.adapters:
            return {}
        teacher = self.teacher[0]
        levels = [int(k) for k in self.adapters]
        fits = {level: _LeastSquares() for level in levels}
        was_training = student.training
        student.eval()
        try:
            for images, _ in batches:
                with self._teacher_taps.capture(True):
                    teacher(images)
                with self._student_taps.capture(True):
                    student(images)
                for level in levels:
                    fits[level].add(self._student_taps.features[level], self._teacher_taps.features[level])
        finally:
            student.train(was_training)
        residual = {}
        for level in levels:
            x, residual[str(level)] = fits[level].solve(ridge)  # (cs + 1) x ct
            adapter = self.adapters[str(level)]
            adapter.weight.copy_(x[:-1].T[:, :, None, None])
            adapter.bias.copy_(x[-1])
        return residual

    def close(self) -> None:
        """Remove the feature hooks from the student and the teacher."""
        for taps in (self._student_taps, self._teacher_taps, self._student_layers, self._teacher_layers):
            taps.close()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def matched_channels(student: nn.Module, teacher: nn.Module, *, tol: float = 1e-6) -> dict[str, Tensor]:
    """For each BatchNorm2d of ``student`` whose channels are a subset of the same-named teacher layer's, the
    teacher channel of each student channel.

    Structured pruning removes channels by index selection, so a kept channel's batch-norm scale, shift and
    running statistics are the teacher's exactly: a channel matches the teacher channel with the same four
    values (within ``tol``), and a layer counts only if every channel matches a distinct one. Layers of an
    unrelated teacher, or of a student that has trained since, match nothing.
    """
    teacher_modules = dict(teacher.named_modules())
    out = {}
    for name, s in student.named_modules():
        t = teacher_modules.get(name)
        if not isinstance(s, nn.BatchNorm2d) or not isinstance(t, nn.BatchNorm2d) or s.running_mean is None:
            continue
        if t.running_mean is None or s.num_features > t.num_features or s.weight is None or t.weight is None:
            continue
        keys = [torch.stack([m.weight, m.bias, m.running_mean, m.running_var], 1).detach().double() for m in (s, t)]
        dist = torch.cdist(*keys)
        best = dist.min(1)
        if float(best.values.max()) <= tol and len(set(best.indices.tolist())) == s.num_features:
            out[name] = best.indices
    return out


def check_pair(student: Detector, teacher: Detector) -> None:
    """Raise ConfigError unless the student can learn from the teacher's outputs."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, YoloDetector):
            raise ConfigError(
                f"distillation: the {name} is a {type(model).__name__} ({model.model_config.get('name', '?')}); "
                "distillation needs dense per-anchor outputs and supports the yolo-* models"
            )
    for attr in ("num_classes", "input_size", "reg_max"):
        if getattr(student, attr) != getattr(teacher, attr):
            raise ConfigError(
                f"distillation: the teacher's {attr} is {getattr(teacher, attr)} but the student's is "
                f"{getattr(student, attr)}; the teacher must predict the same classes at the same input size"
            )


def load_teacher(path: str | Path) -> Detector:
    """A slimdet checkpoint as a frozen teacher (loaded with ``weights_only=True``)."""
    from slimdet.models import load_model

    model, _ = load_model(path)
    return model.eval()


# --- loss terms ------------------------------------------------------------------------------


def cls_distill_loss(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """Binary KL between softened teacher and student class scores (``B x A x C``), times T^2.

    Normalised by the sum over anchors of the teacher's best (unsoftened) class score, so that
    it scales like the detection loss's classification term, which divides by its target sum.
    """
    t = temperature
    p = torch.sigmoid(t_logits / t)
    log_q, log_1q = F.logsigmoid(s_logits / t), F.logsigmoid(-s_logits / t)
    log_p, log_1p = F.logsigmoid(t_logits / t), F.logsigmoid(-t_logits / t)
    kl = p * (log_p - log_q) + (1 - p) * (log_1p - log_1q)
    norm = loss_normalizer(torch.sigmoid(t_logits).amax(-1).sum(), floor=1.0)
    return kl.sum() * t * t / norm


def box_distill_loss(s_box: Tensor, t_box: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """KL between softened teacher and student distance distributions (``B x A x 4 x R``), times T^2,
    averaged over the 4 sides and weighted per anchor by ``weight`` (``B x A``, normalised to sum 1)."""
    total = loss_normalizer(weight.sum())
    if total <= 0:
        return s_box.sum() * 0.0
    t = temperature
    log_p = F.log_softmax(t_box / t, dim=-1)
    log_q = F.log_softmax(s_box / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)  # B x A
    return (kl * weight).sum() / total * t * t


def feature_loss(s_feat: Tensor, t_feat: Tensor, fg: Tensor, *, fg_share: float) -> Tensor:
    """Squared error per cell (mean over channels), with a share ``fg_share`` of each image's weight
    spread over its foreground cells (``fg``: ``B x H x W`` bool) and the rest over the background."""
    if s_feat.shape != t_feat.shape:
        raise ConfigError(
            f"distillation: student feature {tuple(s_feat.shape)} and teacher feature {tuple(t_feat.shape)} differ"
        )
    err = (s_feat - t_feat).pow(2).mean(1)  # B x H x W
    fgf = fg.to(err.dtype)
    n_fg = fgf.flatten(1).sum(1).clamp(min=1.0)[:, None, None]
    n_bg = (1 - fgf).flatten(1).sum(1).clamp(min=1.0)[:, None, None]
    has_fg = (fgf.flatten(1).sum(1) > 0).to(err.dtype)[:, None, None]
    share = fg_share * has_fg  # an image without objects gives all its weight to the background
    w = fgf * share / n_fg + (1 - fgf) * (1 - share) / n_bg
    return (err * w).sum() / err.shape[0]


def _conv_before(modules: dict[str, nn.Module], bn_name: str) -> nn.Conv2d | None:
    """The plain conv that feeds batch norm ``bn_name`` (its predecessor in the same ``nn.Sequential``), if any."""
    parent_name, _, index = bn_name.rpartition(".")
    parent = modules.get(parent_name)
    if not isinstance(parent, nn.Sequential) or not index.isdigit() or int(index) == 0:
        return None
    conv = parent[int(index) - 1]
    bn = modules[bn_name]
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.bias is not None:
        return None
    return conv if isinstance(bn, nn.BatchNorm2d) and conv.out_channels == bn.num_features else None


def _forward_order(model: nn.Module, names: list[str], images: Tensor) -> list[str]:
    """``names`` sorted by when their modules run in a forward pass of ``images``."""
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n in names]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    first = {n: i for i, n in reversed(list(enumerate(order)))}
    return sorted(names, key=lambda n: first.get(n, len(order)))


class _LeastSquares:
    """Normal equations of a 1x1 conv ``t ~ W s + b`` accumulated over the cells of feature batches (float64),
    with what the residual's scale needs: per target channel the sums of ``t^2`` and ``t``."""

    def __init__(self) -> None:
        self.gram: Any = 0
        self.cross: Any = 0
        self.t_sq: Any = 0
        self.t_sum: Any = 0
        self.diff_sq: Any = 0  # sum of (s - t)^2, where the widths agree: the residual of the identity map
        self.cells = 0

    def add(self, s_feat: Tensor, t_feat: Tensor) -> None:
        s, t = _cells(s_feat), _cells(t_feat)
        s1 = torch.cat([s, s.new_ones(len(s), 1)], 1)
        self.gram, self.cross = self.gram + s1.T @ s1, self.cross + s1.T @ t
        self.t_sq, self.t_sum, self.cells = self.t_sq + t.pow(2).sum(0), self.t_sum + t.sum(0), self.cells + len(t)
        if s.shape == t.shape:
            self.diff_sq = self.diff_sq + (s - t).pow(2).sum()

    def _variance(self) -> Tensor:
        return (self.t_sq - self.t_sum.pow(2) / self.cells).sum().clamp(min=1e-12)

    def solve(self, ridge: float) -> tuple[Tensor, float]:
        """The ridge-regularised solution ``[W^T; b]`` (``(c_s + 1) x c_t``; the ridge is ``ridge`` times the mean
        diagonal of ``S^T S``, none on the bias) and its relative residual ``||W s + b - t||^2 / ||t - mean t||^2``."""
        g, c = self.gram, self.cross
        cs = g.shape[0] - 1
        reg = torch.zeros_like(g)
        reg.diagonal()[:cs] = ridge * g.diagonal()[:cs].sum() / cs
        x = torch.linalg.solve(g + reg, c)
        err = (self.t_sq - 2 * (x * c).sum(0) + (x * (g @ x)).sum(0)).sum()
        return x, float(err / self._variance())

    def identity_residual(self) -> float:
        """The relative residual of ``t ~ s`` (same widths)."""
        return float(self.diff_sq / self._variance())


def _cells(feature: Tensor) -> Tensor:
    """``B x C x H x W`` -> ``(B H W) x C`` in float64 (normal equations lose precision in float32)."""
    return feature.detach().permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).double()


def foreground_masks(
    targets: list[Target], points: Tensor, sizes: list[tuple[int, int]], *, device: torch.device
) -> list[Tensor]:
    """Per level, ``B x H x W`` masks of the cells whose centre lies inside a ground-truth box."""
    boxes, _, valid = pad_targets(targets, device=device)
    if boxes.shape[1] == 0:
        inside = torch.zeros(len(targets), points.shape[0], dtype=torch.bool, device=device)
    else:
        x, y = points[:, 0][None, None], points[:, 1][None, None]
        bx = boxes[..., None]
        inside = (x > bx[:, :, 0]) & (x < bx[:, :, 2]) & (y > bx[:, :, 1]) & (y < bx[:, :, 3])
        inside = (inside & valid[..., None]).any(1)  # B x A
    out, start = [], 0
    for h, w in sizes:
        out.append(inside[:, start : start + h * w].reshape(-1, h, w))
        start += h * w
    return out


@torch.no_grad()
def _teacher_assignment(
    student: YoloDetector, t_box: Tensor, t_cls: Tensor, points: Tensor, strides: Tensor, targets: list[Target]
) -> tuple[Tensor, Tensor, Tensor]:
    """The task-aligned assigner's foreground mask, target boxes and soft class targets (``B x A x C``; summed
    over classes: each anchor's alignment weight) when it scores the teacher's predictions."""
    boxes, labels, valid = pad_targets(targets, device=t_cls.device)
    return student.criterion.assign(t_cls.sigmoid(), decode_distances(t_box, points, strides), points, boxes,
                                    labels, valid)  # fmt: skip


# --- feature taps ------------------------------------------------------------------------------


class _Taps:
    """Forward hooks that keep, while capturing, the inputs of a detector's ``feature_layers()`` (or of the
    layers ``names``), or with ``outputs`` their outputs; ``features`` lists them in the order of the names."""

    def __init__(self, model: Detector, names: list[str] | None = None, *, outputs: bool = False) -> None:
        names = model.feature_layers() if names is None else names
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"distillation: {type(model).__name__} has no module(s) {missing} to take features from")
        self.names = names
        self.features: list[Tensor] = []
        self._on = False
        self._slots: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n, outputs)) if outputs
                         else modules[n].register_forward_pre_hook(self._hook(n, outputs)) for n in names]  # fmt: skip

    def _hook(self, name: str, outputs: bool) -> Any:
        def keep(_module: nn.Module, args: tuple[Any, ...], *out: Any) -> None:
            if self._on:
                self._slots[name] = out[0] if outputs else args[0]

        return keep

    def capture(self, on: bool) -> _Capture:
        return _Capture(self, on)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Capture:
    def __init__(self, taps: _Taps, on: bool) -> None:
        self.taps, self.on = taps, on

    def __enter__(self) -> None:
        self.taps._slots = {}
        self.taps._on = self.on

    def __exit__(self, *exc: object) -> None:
        taps = self.taps
        taps._on = False
        if self.on and exc[0] is None:
            missing = [n for n in taps.names if n not in taps._slots]
            if missing:
                raise ConfigError(f"distillation: the forward pass never ran {missing}: no features to imitate")
            taps.features = [taps._slots[n] for n in taps.names]
        taps._slots = {}


def _feature_channels(model: Detector, taps: _Taps) -> list[int]:
    """Channels of each tapped feature, from one forward pass at batch 1 (eval mode, no grad)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), taps.capture(True):
            model(model.example_inputs(1))
    finally:
        model.train(was)
    return [f.shape[1] for f in taps.features]
