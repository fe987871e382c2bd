import copy
import json
import math

import pytest
import torch
from torch import nn

from slimdet.errors import ConfigError
from slimdet.models import torchvision as tvm
from slimdet.models.registry import MODELS, create_model, list_models, model_from_config
from slimdet.profiling import torch_threads

# Every model registered by slimdet.models.torchvision, so that a new one is covered automatically.
TV_MODELS = [n for n in list_models() if MODELS.get(n).__module__ == tvm.__name__]
SIZE = 128  # a non-default input size: also checks that it reaches the model and its config
C = 3

# Two 128x128 images, one with two boxes (labels at both ends of the range), one with one.
TARGETS = [
    {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [70.0, 64.0, 120.0, 110.0]]), "labels": torch.tensor([0, C - 1])},
    {"boxes": torch.tensor([[30.0, 30.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
]


def images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def build(name: str, num_classes: int = C):
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, input_size=SIZE)


@pytest.fixture(scope="module", params=TV_MODELS)
def untrained(request):
    """One untrained model per registered name, shared by the tests that do not change it."""
    with torch_threads(1):  # set up before the per-test single-thread fixture of conftest.py
        return build(request.param).eval()


def test_the_registry_has_the_expected_torchvision_models():
    assert set(TV_MODELS) >= {
        "ssdlite320_mobilenet_v3_large",
        "fcos_mobilenet_v3_fpn",
        "retinanet_mobilenet_v3_fpn",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
    }


def test_model_config_round_trips_through_json(untrained):
    model = untrained
    name = model.model_config["name"]
    assert model.model_config == {"name": name, "num_classes": C, "input_size": SIZE}
    assert (model.num_classes, model.input_size) == (C, SIZE)
    clone = model_from_config(json.loads(json.dumps(model.model_config))).eval()
    assert type(clone) is type(model)
    clone.load_state_dict(model.state_dict())  # strict: same tensors, same shapes
    x = images()
    for a, b in zip(model(x), clone(x), strict=True):
        torch.testing.assert_close(a, b)


def test_default_input_size_is_160_and_bad_sizes_fail_loudly():
    assert create_model("ssdlite320_mobilenet_v3_large", num_classes=2).input_size == 160
    with pytest.raises(ConfigError, match="fcos_mobilenet_v3_fpn.*multiple of 32.*150"):
        create_model("fcos_mobilenet_v3_fpn", num_classes=2, input_size=150)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_returns_only_tensors(untrained, mode):
    model = copy.deepcopy(untrained).train(mode == "train")  # train mode updates batch-norm statistics
    with torch.no_grad():
        raw = model(images())
    assert isinstance(raw, tuple) and all(isinstance(t, torch.Tensor) for t in raw)
    assert all(t.shape[0] == 2 for t in raw)
    if isinstance(model, tvm.SingleStageDetector):
        num_anchors = model.anchors.shape[0]
        assert raw[0].shape == (2, num_anchors, C + model.label_offset)  # class logits
        assert raw[1].shape == (2, num_anchors, 4)  # box regression
        assert len(raw) == len(model.head_keys)
    else:  # padded final detections
        boxes, scores, labels = raw
        k = model.net.roi_heads.detections_per_img
        assert (boxes.shape, scores.shape, labels.shape) == ((2, k, 4), (2, k), (2, k))
        assert labels.dtype == torch.int64 and bool(((labels == -1) | (labels >= 1)).all())


def test_one_training_step_changes_the_weights(untrained):
    model = copy.deepcopy(untrained).train()
    loss, parts = model.compute_loss(images(), TARGETS)
    assert loss.dim() == 0 and loss.requires_grad and math.isfinite(loss.item())
    assert parts and all(isinstance(v, float) and math.isfinite(v) for v in parts.values())
    assert sum(parts.values()) == pytest.approx(loss.item(), rel=1e-5)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(".head." in k or "roi_heads" in k for k in changed)
    assert any("backbone" in k for k in changed)
    loss2, _ = model.compute_loss(images(), TARGETS)
    assert math.isfinite(loss2.item())


def test_predict_follows_the_detection_conventions(untrained):
    model = untrained.train()  # predict must switch to eval and back
    dets = model.predict(images(), conf_thres=0.0, iou_thres=0.6, max_det=50)
    assert model.training
    model.eval()
    assert len(dets) == 2
    for d in dets:
        n = d["boxes"].shape[0]
        assert 0 < n <= 50  # an untrained model still scores something above 0
        assert d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        assert d["labels"].dtype == torch.int64
        assert bool((d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all())
        assert bool((d["boxes"][:, 2:] >= d["boxes"][:, :2]).all())
        assert bool(((d["scores"] >= 0) & (d["scores"] <= 1)).all())
        assert bool(((d["labels"] >= 0) & (d["labels"] < C)).all())
    few = model.predict(images(), conf_thres=0.0, max_det=3)
    assert all(len(d["scores"]) <= 3 for d in few)
    strict = model.predict(images(), conf_thres=0.999)
    assert sum(len(d["scores"]) for d in strict) < sum(len(d["scores"]) for d in dets)


def test_label_helpers_shift_to_torchvision_and_back():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 3.0, 9.0]]), "labels": torch.tensor([0, 2])}]
    (tv,) = tvm.to_torchvision_targets(targets, label_offset=1, device=torch.device("cpu"))
    assert tv["labels"].tolist() == [1]  # shifted; the box with no width is dropped
    assert tv["boxes"].tolist() == [[0.0, 0.0, 5.0, 5.0]]
    assert tvm.from_torchvision_labels(tv["labels"], label_offset=1).tolist() == [0]
    (same,) = tvm.to_torchvision_targets(targets, label_offset=0, device=torch.device("cpu"))
    assert same["labels"].tolist() == [0]


def _crafted_raw(model, cls: int):
    """Single-stage head outputs in which the anchor nearest the image centre predicts slimdet class
    ``cls`` with near certainty and every other score is near zero."""
    with torch.no_grad():
        raw = [torch.zeros_like(t) for t in model(images(1))]
    logits = raw[0]
    logits.fill_(-10.0)
    if model.label_offset:  # softmax with a background column: make background win elsewhere
        logits[..., 0] = 10.0
    centre = (model.anchors[:, :2] + model.anchors[:, 2:]) / 2
    j = int((centre - SIZE / 2).norm(dim=1).argmin())
    logits[0, j, :] = -10.0
    logits[0, j, cls + model.label_offset] = 10.0
    if len(raw) == 3:  # FCOS: centerness, and sides at one point size from the centre
        raw[2].fill_(10.0)
        raw[1].fill_(1.0)
    return tuple(raw), j


@pytest.mark.parametrize("cls", [0, C - 1])
def test_postprocess_maps_torchvision_labels_back(untrained, cls):
    if isinstance(untrained, tvm.SingleStageDetector):
        raw, j = _crafted_raw(untrained, cls)
        (d,) = untrained.postprocess(raw, conf_thres=0.5)
        if len(raw) == 2:  # zero deltas decode to the anchor itself
            torch.testing.assert_close(d["boxes"][0], untrained.anchors[j].clamp(0, SIZE))
    else:
        boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [0.0, 0.0, 0.0, 0.0]]])
        raw = (boxes, torch.tensor([[0.99, 0.0]]), torch.tensor([[cls + 1, -1]]))
        (d,) = untrained.postprocess(raw, conf_thres=0.5)
    assert d["labels"].tolist() == [cls]
    assert d["scores"].item() > 0.9


def test_loss_sees_slimdet_label_0_as_an_object_of_class_0(untrained):
    """Label 0 must reach torchvision as class 0 of the objects, not as the background."""
    targets = [{"boxes": TARGETS[0]["boxes"], "labels": torch.zeros(2, dtype=torch.int64)}]
    if isinstance(untrained, tvm.SingleStageDetector):
        # Head outputs that predict the right class everywhere cost less than ones that predict
        # the class next to it (with label 0 read as background both would cost the same).
        costs = []
        for cls in (0, 1):
            raw, _ = _crafted_raw(untrained, cls)
            raw[0][..., cls + untrained.label_offset] = 5.0  # every anchor predicts cls
            costs.append(untrained.loss(raw, targets)[1]["classification"])
        assert costs[0] < costs[1]
    else:  # two-stage: look at the targets the second stage receives
        seen = []
        handle = untrained.net.roi_heads.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
        try:
            untrained.compute_loss(images(1), targets)
        finally:
            handle.remove()
        assert seen[0][0]["labels"].tolist() == [1, 1]
        assert not untrained.training  # compute_loss left the model's mode alone


def test_output_layers_are_the_prediction_layers_that_depend_on_the_classes(untrained):
    names = untrained.output_layers()
    modules = dict(untrained.named_modules())
    assert names and all(isinstance(modules[n], (nn.Conv2d, nn.Linear)) for n in names)
    other = build(untrained.model_config["name"], num_classes=C + 2)
    assert other.output_layers() == names

    def out_dims(model):
        return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    a, b = out_dims(untrained), out_dims(other)
    class_dependent = {n for n in a if a[n] != b[n]}
    assert class_dependent and class_dependent <= set(names)


def test_faster_rcnn_loss_needs_the_images():
    model = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    with pytest.raises(NotImplementedError, match="compute_loss"):
        model.loss(model(images()), TARGETS)
