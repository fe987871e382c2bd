import pytest
import torch
from torchvision.ops import box_iou

from slimdet.models import create_model, list_models
from slimdet.models.yolo import ARCHS, YoloDetector
from slimdet.models.yolo_loss import YoloLoss, anchor_points, decode_distances

YOLOS = [n for n in list_models() if n.startswith("yolo-")]


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 20.0, 60.0, 62.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 44.0]]), "labels": torch.tensor([0])},
    ]


@pytest.mark.parametrize("name", YOLOS)
def test_forward_returns_one_raw_tensor_per_level(name):
    model = create_model(name, num_classes=3, input_size=64).eval()
    raw = model(torch.rand(2, 3, 64, 64))
    assert isinstance(raw, tuple) and len(raw) == 3
    for r, s in zip(raw, (8, 16, 32), strict=True):
        assert r.shape == (2, 4 * ARCHS[name].reg_max + 3, 64 // s, 64 // s)


def test_registry_has_the_three_variants_in_size_order():
    assert {"yolo-test", "yolo-n", "yolo-s"} <= set(YOLOS)
    names = ("yolo-test", "yolo-n", "yolo-s")
    sizes = [sum(p.numel() for p in create_model(n, num_classes=10).parameters()) for n in names]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_input_size_must_fit_the_strides():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("yolo-test", num_classes=3, input_size=70)


def test_anchor_points_are_cell_centres():
    pts, strides = anchor_points([(2, 2), (1, 1)], (8, 16), device=torch.device("cpu"), dtype=torch.float32)
    assert pts.tolist() == [[4, 4], [12, 4], [4, 12], [12, 12], [8, 8]]
    assert strides.squeeze(1).tolist() == [8, 8, 8, 8, 16]


def test_decode_of_one_hot_distances_is_exact():
    reg_max = 8
    logits = torch.full((1, 1, 4, reg_max), -1e4)
    for side, d in enumerate((1, 2, 3, 4)):
        logits[0, 0, side, d] = 1e4
    box = decode_distances(logits, torch.tensor([[20.0, 30.0]]), torch.tensor([[8.0]]))
    assert box.tolist() == [[[12.0, 14.0, 44.0, 62.0]]]


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=3, input_size=64).train()
    images = torch.rand(2, 3, 64, 64)
    targets = _targets()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, parts = model.compute_loss(images, targets)
        assert set(parts) == {"box", "cls", "dfl"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # and the overfitted model finds the boxes it was trained on (BN still on batch statistics,
    # as during the 60 steps: the running averages have barely moved from their initial values)
    with torch.no_grad():
        dets = model.postprocess(model(images), conf_thres=0.05)
    for det, tgt in zip(dets, targets, strict=True):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) >= len(tgt["boxes"])
        assert box_iou(tgt["boxes"], det["boxes"]).amax(1).min() > 0.5


def test_assignment_puts_positives_inside_their_box_only():
    crit = YoloLoss(num_classes=2, reg_max=8, strides=(8, 16, 32), topk=5)
    pts, strides = anchor_points([(8, 8), (4, 4), (2, 2)], (8, 16, 32), device=torch.device("cpu"), dtype=torch.float32)
    a = len(pts)
    gt = torch.tensor([[[0.0, 0.0, 24.0, 24.0]]])
    pred = torch.tensor([[0.0, 0.0, 24.0, 24.0]]).expand(1, a, 4)
    scores = torch.full((1, a, 2), 0.5)
    fg, tgt_boxes, tgt_scores = crit.assign(scores, pred, pts, gt, torch.tensor([[1]]), torch.tensor([[True]]))
    assert 0 < fg.sum() <= 5
    inside = (pts[:, 0] < 24) & (pts[:, 1] < 24)
    assert not (fg[0] & ~inside).any()
    assert (tgt_boxes[0, fg[0]] == gt[0, 0]).all()
    assert tgt_scores[0, fg[0], 0].sum() == 0 and (tgt_scores[0, fg[0], 1] > 0).all()


def test_empty_targets_give_a_finite_background_only_loss():
    model = create_model("yolo-test", num_classes=3, input_size=64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    loss, parts = model.compute_loss(torch.rand(2, 3, 64, 64), empty)
    assert torch.isfinite(loss) and parts["box"] == 0.0 and parts["cls"] > 0
    loss.backward()


def test_postprocess_respects_thresholds_and_max_det():
    model = create_model("yolo-test", num_classes=3, input_size=64).eval()
    dets = model.predict(torch.rand(1, 3, 64, 64), conf_thres=0.0, max_det=7)[0]
    assert len(dets["boxes"]) <= 7
    assert (dets["boxes"] >= 0).all() and (dets["boxes"] <= 64).all()
    assert dets["labels"].dtype == torch.long and ((dets["labels"] >= 0) & (dets["labels"] < 3)).all()
    assert len(model.predict(torch.rand(1, 3, 64, 64), conf_thres=1.0)[0]["boxes"]) == 0


def test_output_layers_name_the_prediction_convs():
    model: YoloDetector = create_model("yolo-test", num_classes=3, input_size=64)
    modules = dict(model.named_modules())
    for name in model.output_layers():
        conv = modules[name]
        assert isinstance(conv, torch.nn.Conv2d) and conv.out_channels in (3, 4 * model.reg_max)
