"""Weight sharing: each layer's nonzero weights snapped to a k-means codebook of 2^bits centroids.

Deep compression's second stage (Han, Mao & Dally, "Deep Compression", ICLR 2016, section 3). A
shared layer keeps a trainable ``weight_centroids`` parameter (2^bits values) and an integer
``weight_index`` buffer of the weight's shape; its forward uses ``[centroids, 0][index]``. Pruned
positions index the fixed zero after the centroids, so they stay exactly zero and no centroid is
spent on them. Because the weight is a gather from the centroids, backpropagation adds up the
gradients of all weights of a cluster into its centroid: fine-tuning after ``share_weights`` is
Han et al.'s centroid fine-tuning by gradient aggregation, with any optimizer.

Centroids start evenly spaced between the smallest and largest nonzero weight (Han et al.'s
*linear* initialisation, section 3.2): they found it more accurate than density-based (quantile)
initialisation because the few large weights, which matter most, keep centroids of their own;
``init="quantile"`` is available for comparison. Lloyd iterations then minimise the squared error.

The transform is recorded (kind ``"share"``) and replayed by ``load_model``; the compressed
archive (``slimdet.export.archive``) Huffman-codes the indices and the zero positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import Tensor, nn

from slimdet.compress.patterns import LayerPatterns, check_pattern, matches, output_layers
from slimdet.compress.sparse_storage import sparse_storage_bytes
from slimdet.compress.sparsity import _is_masked, make_permanent
from slimdet.errors import CheckpointError, ConfigError
from slimdet.models.base import Detector
from slimdet.models.registry import record_transform, register_replay
from slimdet.registry import closest

__all__ = ["LayerShare", "ShareConfig", "ShareInit", "ShareResult", "StageBytes", "is_shared", "kmeans_1d",
           "share_weights", "shared_layers", "shared_weight", "stage_bytes"]  # fmt: skip

LAYER_TYPES = (nn.Conv2d, nn.Linear)
MAX_BITS = 8


class ShareInit(StrEnum):
    LINEAR = "linear"  # evenly spaced over [min, max] of the nonzero weights (Han et al.'s choice)
    QUANTILE = "quantile"  # at evenly spaced quantiles (density-based initialisation)


class ShareConfig(LayerPatterns):
    """Which layers share their weights, with how many bits of index. Patterns in ``ignore`` and
    ``overrides`` are module names (a name also covers its children) or regular expressions matched
    against the whole name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: index width: 2^bits centroids per layer
    bits: int = Field(4, ge=1, le=MAX_BITS)
    #: per-layer bits, first matching pattern wins
    overrides: dict[str, int] = Field(default_factory=dict)
    #: at most this many Lloyd iterations per layer (it stops earlier when no assignment changes)
    iters: int = Field(30, ge=1)
    init: ShareInit = ShareInit.LINEAR

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            check_pattern(pattern)
            if not 1 <= bits <= MAX_BITS:
                raise ValueError(f"override {pattern!r}: bits must be in [1, {MAX_BITS}], got {bits}")
        return value

    def layer_bits(self, name: str) -> int:
        return next((b for pattern, b in self.overrides.items() if matches(name, pattern)), self.bits)


@dataclass(frozen=True)
class StageBytes:
    """Bytes of a model at each stage of deep compression (Han et al., ICLR 2016, table 1).

    ``dense``: the FP32 state dict; ``pruned``: shared layers as FP32 nonzeros plus their positions
    (cheapest of dense, bitmap and CSR, ``sparse_storage_bytes``); ``shared``: fixed-width indices
    instead of the values, plus the codebooks; ``huffman``: the archive file (None when not encoded).
    Tensors outside the shared layers count at their raw size in every stage, as the archive stores
    them.
    """

    dense_bytes: int
    pruned_bytes: int
    shared_bytes: int
    huffman_bytes: int | None = None

    def ratios(self) -> dict[str, float]:
        """Compression ratio of each stage against the dense FP32 state dict."""
        stages = {"pruned": self.pruned_bytes, "shared": self.shared_bytes, "huffman": self.huffman_bytes}
        return {k: self.dense_bytes / v for k, v in stages.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios()}


@dataclass(frozen=True)
class LayerShare:
    """One shared layer: its codebook size, zeros and the error sharing introduced."""

    name: str
    shape: tuple[int, ...]
    bits: int
    nonzeros: int
    #: centroids that some weight uses (at most 2^bits)
    clusters_used: int
    #: ||W_shared - W|| / ||W|| (Frobenius), 0 for an all-zero weight
    rel_error: float
    stages: StageBytes

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bits": self.bits, "numel": self.numel,
                "nonzeros": self.nonzeros, "sparsity": 1 - self.nonzeros / max(1, self.numel),
                "clusters_used": self.clusters_used, "rel_error": self.rel_error,
                **self.stages.to_dict()}  # fmt: skip


@dataclass(frozen=True)
class ShareResult:
    """What ``share_weights`` did, and the model's bytes per stage (``stages.huffman_bytes``: the size
    ``write_archive`` writes for the model as it is now)."""

    layers: tuple[LayerShare, ...]
    skipped: dict[str, str]
    #: layers whose sparsity masks were folded into plain weights first
    made_permanent: tuple[str, ...]
    stages: StageBytes
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rel_error(self) -> float:
        """Relative error over all shared weights (numel-weighted RMS of the per-layer errors)."""
        total = sum(layer.numel for layer in self.layers)
        return (sum(layer.rel_error**2 * layer.numel for layer in self.layers) / max(1, total)) ** 0.5

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rel_error": self.rel_error, **self.stages.to_dict(),
                "made_permanent": list(self.made_permanent), "layers": [layer.to_dict() for layer in self.layers],
                "skipped": dict(self.skipped)}  # fmt: skip


def share_weights(model: Detector, cfg: ShareConfig) -> ShareResult:
    """Replace the weights of the model's Conv2d and Linear layers by per-layer codebooks, in place.

    Sparsity masks (``slimdet.compress.sparsify``) are first made permanent on the whole model; the
    zeros they leave are kept exactly and are not clustered.

    Raises:
        ConfigError: a pattern in ``ignore``/``overrides`` matches no layer, or no layer is left.
    """
    targets, skipped = _select(model, cfg)
    made_permanent = make_permanent(model) if any(_is_masked(m) for m in model.modules()) else []
    layers = []
    for name, module in targets.items():
        bits = cfg.layer_bits(name)
        weight = module.weight.detach()
        nonzero = weight != 0
        centroids, assign = kmeans_1d(weight[nonzero], 2**bits, init=cfg.init, iters=cfg.iters)
        index = torch.full(weight.shape, 2**bits, dtype=_index_dtype(bits), device=weight.device)
        index[nonzero] = assign.to(index.dtype)
        _attach(module, centroids.to(weight.dtype), index)
        norm = float(weight.norm())
        error = float((shared_weight(module).detach() - weight).norm()) / norm if norm else 0.0
        layers.append(LayerShare(name, tuple(weight.shape), bits, int(nonzero.sum()), int(assign.unique().numel()),
                                 error, _layer_stages(module)))  # fmt: skip
    record_transform(model, {"kind": "share", "layers": {layer.name: layer.bits for layer in layers},
                             "config": cfg.model_dump(mode="json")})  # fmt: skip
    from slimdet.export.archive import archive_bytes

    return ShareResult(
        layers=tuple(layers),
        skipped=skipped,
        made_permanent=tuple(made_permanent),
        stages=stage_bytes(model, huffman_bytes=len(archive_bytes(model))),
        config=cfg.model_dump(mode="json"),
    )


@torch.no_grad()
def kmeans_1d(
    values: Tensor, k: int, *, init: ShareInit | str = ShareInit.LINEAR, iters: int = 30
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on scalars: ``k`` ascending centroids and each value's nearest one.

    On a line, the nearest of sorted centroids is found by binary search among the midpoints
    between them, so every value is used (no subsampling) at O(n log k) per iteration. A centroid
    that loses all its values keeps its place.
    """
    v = values.detach().flatten().double()
    if v.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=values.device)
        return torch.zeros(k, dtype=values.dtype, device=values.device), empty
    if ShareInit(init) is ShareInit.LINEAR:
        centroids = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64, device=v.device)
    else:
        centroids = torch.quantile(v.cpu().float(), torch.linspace(0, 1, k)).double().to(v.device)
    assign = None
    for _ in range(iters):
        new = _nearest(v, centroids)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, assign, v)
        counts = torch.bincount(assign, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
    centroids = centroids.to(values.dtype)
    return centroids, _nearest(values.detach().flatten(), centroids)


def shared_weight(module: nn.Module) -> Tensor:
    """The weight of a shared layer, ``[centroids, 0][index]`` (differentiable in the centroids)."""
    table = torch.cat([module.weight_centroids, module.weight_centroids.new_zeros(1)])
    return table[module.weight_index.long()]


def is_shared(module: nn.Module) -> bool:
    return "weight_centroids" in module._parameters and "weight_index" in module._buffers


def shared_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The shared layers of ``model`` by name."""
    return {name: module for name, module in model.named_modules() if is_shared(module)}


def stage_bytes(model: nn.Module, *, huffman_bytes: int | None = None) -> StageBytes:
    """Bytes of ``model``'s state dict at each deep-compression stage (see :class:`StageBytes`)."""
    shared = shared_layers(model)
    keys = {f"{name}.weight_{part}" for name in shared for part in ("centroids", "index")}
    raw = sum(t.numel() * t.element_size() for key, t in model.state_dict().items() if key not in keys)
    per_layer = [_layer_stages(module) for module in shared.values()]
    return StageBytes(
        dense_bytes=raw + sum(s.dense_bytes for s in per_layer),
        pruned_bytes=raw + sum(s.pruned_bytes for s in per_layer),
        shared_bytes=raw + sum(s.shared_bytes for s in per_layer),
        huffman_bytes=huffman_bytes,
    )


@register_replay("share", final=True)
def _replay(model: Detector, entry: dict[str, Any]) -> Detector:
    """Give the recorded layers empty codebooks and indices; load_state_dict then fills them."""
    modules = dict(model.named_modules())
    for name, bits in entry["layers"].items():
        module = modules.get(name)
        if not isinstance(module, LAYER_TYPES) or "weight" not in module._parameters:
            raise CheckpointError(
                f"model config: transform 'share' names layer {name!r}, which is not a Conv2d or Linear layer "
                f"with a plain weight in model {model.model_config.get('name')!r}"
            )
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise CheckpointError(f"model config: transform 'share', layer {name!r}: bits must be an integer in "
                                  f"[1, {MAX_BITS}], got {bits!r}")  # fmt: skip
        weight = module.weight.detach()
        index = torch.full(weight.shape, 2**bits, dtype=_index_dtype(bits), device=weight.device)
        _attach(module, weight.new_zeros(2**bits), index)
    return model


def _nearest(v: Tensor, centroids: Tensor) -> Tensor:
    return torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)


def _index_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if 2**bits < 256 else torch.int16  # 2^bits centroids plus the zero


def _layer_stages(module: nn.Module) -> StageBytes:
    k = module.weight_centroids.numel()
    nonzero = (module.weight_index != k).float()
    value_bits = module.weight_centroids.element_size() * 8
    return StageBytes(
        dense_bytes=nonzero.numel() * module.weight_centroids.element_size(),
        pruned_bytes=sparse_storage_bytes(nonzero, bits=value_bits).sparse_bytes,
        shared_bytes=sparse_storage_bytes(nonzero, bits=max(1, (k - 1).bit_length())).sparse_bytes
        + k * module.weight_centroids.element_size(),
    )


def _select(model: Detector, cfg: ShareConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to share, and the skipped ones with the reason."""
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    for kind, patterns in (("ignore", cfg.ignore), ("overrides", tuple(cfg.overrides))):
        for pattern in patterns:
            if not any(matches(name, pattern) for name in candidates):
                hint = closest(pattern, [n for n, _ in model.named_modules() if n])  # prefixes match too
                raise ConfigError(f"share: {kind} pattern {pattern!r} matches no Conv2d or Linear layer"
                                  + (f" (did you mean {hint!r}?)" if hint else ""))  # fmt: skip
    outputs = [] if cfg.include_output_layers else output_layers(model)
    targets, skipped = {}, {}
    for name, module in candidates.items():
        if is_shared(module):
            skipped[name] = "already shared"
        elif any(matches(name, p) for p in cfg.ignore):
            skipped[name] = "ignored"
        elif any(matches(name, p) for p in outputs):
            skipped[name] = "output layer (include_output_layers is false)"
        elif "weight" not in module._parameters and not _is_masked(module):
            skipped[name] = "weight is not a plain parameter (another transform owns it)"
        else:
            targets[name] = module
    if not targets:
        raise ConfigError(f"share: no layer left to share ({len(candidates)} Conv2d/Linear layers, all skipped: "
                          f"{sorted(set(skipped.values()))})")  # fmt: skip
    return targets, skipped


def _attach(module: nn.Module, centroids: Tensor, index: Tensor) -> None:
    """Replace ``module.weight`` by ``weight_centroids`` and ``weight_index`` (as torch's pruning
    reparametrization does for ``weight_orig``/``weight_mask``)."""
    requires_grad = module.weight.requires_grad
    del module._parameters["weight"]
    module.register_parameter("weight_centroids", nn.Parameter(centroids.detach().clone(), requires_grad))
    module.register_buffer("weight_index", index)
    module.register_forward_pre_hook(_compute_weight)
    module.register_forward_hook(_detach_weight)
    module.register_load_state_dict_post_hook(_refresh_weight)
    _refresh_weight(module, None)


def _compute_weight(module: nn.Module, args: Any) -> None:
    module.weight = shared_weight(module)


def _detach_weight(module: nn.Module, args: Any, output: Any) -> None:
    # A weight with its autograd graph cannot be deep-copied (slimdet.train's EMA copies the model);
    # the graph of this forward keeps its own reference, so no gradient is lost.
    module.weight = module.weight.detach()


def _refresh_weight(module: nn.Module, incompatible_keys: Any) -> None:
    # ``module.weight`` stays readable between forwards (after attaching and after load_state_dict).
    with torch.no_grad():
        module.weight = shared_weight(module)
