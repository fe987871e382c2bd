"""Unstructured and N:M weight sparsity by magnitude, kept through fine-tuning.

``sparsify(model, SparsityConfig(...))`` zeroes the smallest-magnitude weights of Conv2d and Linear
layers: a fraction of the weights (over all layers at once, or layer by layer), or all but n of
every m consecutive weights along the input dimension (NVIDIA's 2:4 semi-structured format). The
masks are applied with ``torch.nn.utils.prune``: a layer keeps ``weight_orig`` (a parameter) and
``weight_mask`` (a buffer), and its forward uses ``weight_orig * weight_mask``, so any optimizer
keeps the zeros. The transform is recorded in ``model.model_config`` and replayed by
``load_model``; ``make_permanent`` folds the masks into plain weights.

Zeros in the weights do not make dense runtimes faster: the gain is storage (counted by
``sparse_storage_bytes``, index cost included), and speed only where kernels skip zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn.utils import prune

from slimdet.compress.patterns import LayerPatterns, check_pattern, matches, output_layers
from slimdet.compress.sparse_storage import SparseStorage, nm_groups, nm_ungroup, sparse_storage_bytes
from slimdet.errors import CheckpointError, ConfigError
from slimdet.models.base import Detector
from slimdet.models.registry import record_transform, refuse_after_final, register_replay
from slimdet.registry import closest

__all__ = ["NOTE", "LayerSparsity", "SparsityConfig", "SparsityMode", "SparsityResult", "SparsityScope",
           "make_permanent", "masked_weight", "sparse_storage_bytes", "sparsify"]  # fmt: skip

NOTE = (
    "Dense runtimes (PyTorch eager, ONNX Runtime CPU) do not run faster from zeros in the weights; the gain is "
    "storage, and speed only on hardware or kernels that skip zeros (e.g. 2:4 sparse tensor cores)"
)
LAYER_TYPES = (nn.Conv2d, nn.Linear)


class SparsityMode(StrEnum):
    UNSTRUCTURED = "unstructured"  # any weight may be zeroed
    N_M = "n_m"  # n of every m consecutive weights along the input dimension are kept


class SparsityScope(StrEnum):
    GLOBAL = "global"  # one magnitude threshold over all selected layers
    LAYER = "layer"  # each layer reaches the sparsity on its own


class SparsityConfig(LayerPatterns):
    """What to zero and where. Patterns in ``ignore`` and ``overrides`` are module names (a name also
    covers its children) or regular expressions matched against the whole name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SparsityMode = SparsityMode.UNSTRUCTURED
    #: fraction of the weights zeroed (unstructured mode; n:m zeroes 1 - n/m of every layer)
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: SparsityScope = SparsityScope.GLOBAL
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    #: per-layer sparsity (unstructured mode), first matching pattern wins; these layers are
    #: sparsified on their own, the global threshold covers the rest
    overrides: dict[str, float] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, sparsity in value.items():
            check_pattern(pattern)
            if not 0.0 <= sparsity < 1.0:
                raise ValueError(f"override {pattern!r}: sparsity must be in [0, 1), got {sparsity}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SparsityConfig:
        if self.n >= self.m:
            raise ValueError(f"n:m sparsity keeps n of every m weights: n must be < m, got n={self.n}, m={self.m}")
        if self.overrides and self.mode is SparsityMode.N_M:
            raise ValueError("overrides set a per-layer sparsity and apply to mode 'unstructured' only; "
                             "use ignore to leave layers dense in mode 'n_m'")  # fmt: skip
        return self

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.mode is SparsityMode.N_M else self.sparsity


@dataclass(frozen=True)
class LayerSparsity:
    """One masked layer: its achieved sparsity and storage."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    storage: SparseStorage

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "numel": self.numel, "zeros": self.zeros,
                "sparsity": self.sparsity, **self.storage.to_dict()}  # fmt: skip


@dataclass(frozen=True)
class SparsityResult:
    """What ``sparsify`` did. ``dense_bytes``/``sparse_bytes`` count the masked layers' weights;
    ``model_*_bytes`` the whole state dict (masks not counted: the sparse index replaces them)."""

    mode: str
    target_sparsity: float
    layers: tuple[LayerSparsity, ...]
    skipped: dict[str, str]
    model_dense_bytes: int
    note: str = field(default=NOTE)

    @property
    def sparsity(self) -> float:
        """Zeros over all weights of the masked layers."""
        return sum(layer.zeros for layer in self.layers) / max(1, sum(layer.numel for layer in self.layers))

    @property
    def dense_bytes(self) -> int:
        return sum(layer.storage.dense_bytes for layer in self.layers)

    @property
    def sparse_bytes(self) -> int:
        return sum(layer.storage.sparse_bytes for layer in self.layers)

    @property
    def model_sparse_bytes(self) -> int:
        return self.model_dense_bytes - self.dense_bytes + self.sparse_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "model_dense_bytes": self.model_dense_bytes,
            "model_sparse_bytes": self.model_sparse_bytes,
            "note": self.note,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": dict(self.skipped),
        }


def sparsify(model: Detector, cfg: SparsityConfig) -> SparsityResult:
    """Zero the smallest-magnitude weights of the model's Conv2d and Linear layers, in place.

    Magnitudes are those of the weights the forward uses, so zeros from an earlier call stay zero.

    Raises:
        ConfigError: a pattern in ``ignore``/``overrides`` matches no layer, or no layer is left.
    """
    refuse_after_final(model, "sparsify")
    targets, skipped = _select(model, cfg)
    weights = {name: masked_weight(module) for name, module in targets.items()}
    if cfg.mode is SparsityMode.N_M:
        masks = {name: nm_mask(w, n=cfg.n, m=cfg.m) for name, w in weights.items()}
    else:
        masks = _unstructured_masks(weights, cfg)
    for name, module in targets.items():
        _attach(module, masks[name])
    record_transform(model, {"kind": "sparsity", "layers": list(targets), "permanent": False,
                             "config": cfg.model_dump(mode="json")})  # fmt: skip
    layers = []
    for name, module in targets.items():
        w = masked_weight(module)
        nm = {"n": cfg.n, "m": cfg.m} if cfg.mode is SparsityMode.N_M else {}
        storage = sparse_storage_bytes(w, bits=w.element_size() * 8, **nm)
        layers.append(LayerSparsity(name, tuple(w.shape), int((w == 0).sum()), storage))
    return SparsityResult(mode=cfg.mode.value, target_sparsity=cfg.target_sparsity, layers=tuple(layers),
                          skipped=skipped, model_dense_bytes=_state_dict_bytes(model))  # fmt: skip


def make_permanent(model: Detector) -> list[str]:
    """Fold the sparsity masks into plain ``weight`` parameters (the zeros stay); returns the layers.

    The recorded sparsity entries are marked ``permanent``, so ``load_model`` expects plain weights.
    Fine-tuning afterwards no longer keeps the zeros.
    """
    modules = dict(model.named_modules())
    done, transforms = [], []
    for entry in model.model_config.get("transforms", []):
        if entry.get("kind") == "sparsity" and not entry.get("permanent"):
            for name in entry["layers"]:
                if _is_masked(modules[name]):
                    _detach_hooks(modules[name])
                    prune.remove(modules[name], "weight")
                    done.append(name)
            entry = {**entry, "permanent": True}
        transforms.append(entry)
    model.model_config = {**model.model_config, "transforms": transforms}
    return done


def masked_weight(module: nn.Module) -> Tensor:
    """The weight a layer's forward uses (``weight_orig * weight_mask`` on a masked layer), detached.

    Read this rather than ``module.weight`` on a masked layer: torch's pruning hook only refreshes
    ``module.weight`` at the next forward, so it is stale right after an optimizer step.
    """
    if _is_masked(module):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def nm_mask(weight: Tensor, *, n: int, m: int) -> Tensor:
    """0/1 mask keeping the n largest magnitudes of every m consecutive weights along the input dim."""
    groups = nm_groups(weight.detach().abs(), m)
    keep = groups.topk(n, dim=1).indices
    return nm_ungroup(torch.zeros_like(groups).scatter_(1, keep, 1.0), weight.shape)


@register_replay("sparsity")
def _replay(model: Detector, entry: dict[str, Any]) -> Detector:
    """Recreate the masks (all ones) on the recorded layers; load_state_dict then fills them."""
    if entry.get("permanent"):
        return model  # the state dict holds plain weights with the zeros in them
    modules = dict(model.named_modules())
    for name in entry["layers"]:
        module = modules.get(name)
        if not isinstance(module, LAYER_TYPES):
            raise CheckpointError(
                f"model config: transform 'sparsity' names layer {name!r}, which is not a Conv2d or Linear "
                f"layer of model {model.model_config.get('name')!r}"
            )
        if not _is_masked(module):
            _attach(module, torch.ones_like(module.weight))
    return model


def _unstructured_masks(weights: dict[str, Tensor], cfg: SparsityConfig) -> dict[str, Tensor]:
    per_layer = {name: _override(name, cfg) for name in weights}
    masks: dict[str, Tensor] = {}
    shared = []
    for name, w in weights.items():
        sparsity = per_layer[name]
        if sparsity is None and cfg.scope is SparsityScope.LAYER:
            sparsity = cfg.sparsity
        if sparsity is None:
            shared.append(name)
        else:
            masks[name] = _smallest_zeroed(w.abs().flatten(), sparsity).view_as(w)
    if shared:  # one threshold over the concatenated magnitudes: exactly round(s * total) zeros
        device = weights[shared[0]].device
        flat = torch.cat([weights[name].abs().flatten().to(device) for name in shared])
        pieces = _smallest_zeroed(flat, cfg.sparsity).split([weights[name].numel() for name in shared])
        for name, piece in zip(shared, pieces, strict=True):
            masks[name] = piece.view_as(weights[name]).to(weights[name].device)
    return masks


def _smallest_zeroed(scores: Tensor, sparsity: float) -> Tensor:
    mask = torch.ones_like(scores)
    k = round(sparsity * scores.numel())
    if k:
        mask[scores.topk(k, largest=False).indices] = 0.0
    return mask


def _select(model: Detector, cfg: SparsityConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to mask, and the skipped ones with the reason."""
    candidates = {name: mod for name, mod in model.named_modules() if isinstance(mod, LAYER_TYPES)}
    for kind, patterns in (("ignore", cfg.ignore), ("overrides", tuple(cfg.overrides))):
        for pattern in patterns:
            if not any(matches(name, pattern) for name in candidates):
                hint = closest(pattern, list(candidates))
                raise ConfigError(
                    f"sparsify: {kind} pattern {pattern!r} matches no Conv2d or Linear layer"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                )
    outputs = [] if cfg.include_output_layers else output_layers(model)
    targets, skipped = {}, {}
    for name, module in candidates.items():
        if any(matches(name, p) for p in cfg.ignore):
            skipped[name] = "ignored"
        elif any(matches(name, p) for p in outputs):
            skipped[name] = "output layer (include_output_layers is false)"
        elif _override(name, cfg) == 0.0:
            skipped[name] = "override sparsity 0"
        elif cfg.mode is SparsityMode.N_M and module.weight.shape[1] % cfg.m:
            skipped[name] = f"{module.weight.shape[1]} input channels per group: not a multiple of m={cfg.m}"
        else:
            targets[name] = module
    if not targets:
        raise ConfigError(f"sparsify: no layer left to sparsify ({len(candidates)} Conv2d/Linear layers, all skipped: "
                          f"{sorted(set(skipped.values()))})")  # fmt: skip
    return targets, skipped




def _override(name: str, cfg: SparsityConfig) -> float | None:
    return next((s for pattern, s in cfg.overrides.items() if matches(name, pattern)), None)






def _is_masked(module: nn.Module) -> bool:
    return "weight_orig" in module._parameters and "weight_mask" in module._buffers


def _attach(module: nn.Module, mask: Tensor) -> None:
    """Mask ``module.weight`` with torch's pruning reparametrization (combined with an earlier mask)."""
    prune.custom_from_mask(module, "weight", mask)
    if _detach_weight not in module._forward_hooks.values():
        module.register_forward_hook(_detach_weight)
        module.register_load_state_dict_post_hook(_refresh_weight)
    _refresh_weight(module, None)


def _detach_hooks(module: nn.Module) -> None:
    for hooks in (module._forward_hooks, module._load_state_dict_post_hooks):
        for key in [k for k, hook in hooks.items() if hook in (_detach_weight, _refresh_weight)]:
            del hooks[key]


def _detach_weight(module: nn.Module, args: Any, output: Any) -> None:
    # The pruning hook leaves ``weight_orig * weight_mask`` with its autograd graph on the module;
    # such a module cannot be deep-copied (as the EMA of slimdet.train does). The graph of this
    # forward keeps its own reference, so dropping it here changes no gradient.
    if _is_masked(module):
        module.weight = module.weight.detach()


def _refresh_weight(module: nn.Module, incompatible_keys: Any) -> None:
    # After load_state_dict (and on attach) ``module.weight`` reflects the loaded weight and mask.
    if _is_masked(module):
        with torch.no_grad():
            module.weight = module.weight_orig * module.weight_mask


def _state_dict_bytes(model: nn.Module) -> int:
    state = model.state_dict()
    return sum(
        t.numel() * t.element_size()
        for key, t in state.items()
        if not (key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state)
    )
