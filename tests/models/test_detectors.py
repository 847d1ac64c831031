"""DenseCLIP / PPL detectors on torchvision's RetinaNet and Mask R-CNN: auxiliary targets, losses, frozen text."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdense.config import OptimConfig
from clipdense.data.detection import CocoDetection, build_detection_train_transform, collate_detection
from clipdense.models import count_flops, count_parameters, create_model
from clipdense.models.detectors import box_target_bce, box_targets
from clipdense.training.engine import build_optimizer
from tiny_models import TINY_DETECTOR, TINY_RCNN, write_shapes_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = write_shapes_coco(tmp_path_factory.mktemp("shapes_coco"), num_train=4, num_val=2)
    ds = CocoDetection(root, "train", with_masks=True, transform=build_detection_train_transform(64, 80, flip_prob=0))
    return ds, collate_detection([ds[0], ds[1]])


def _model(name, classes, **kw):
    torch.manual_seed(0)
    extra = {"detector_kwargs": TINY_RCNN} if "maskrcnn" in name else {}
    return create_model(name, class_names=classes, pretrained=None, **{**TINY_DETECTOR, **extra, **kw})


def test_box_targets_match_an_independent_computation():
    # the hand-checked case: box (4, 8, 20, 17) at stride 4 covers columns 1..4 and rows 2..3
    target, mask = box_targets([torch.tensor([[4.0, 8, 20, 17]])], [torch.tensor([1])], 3, (10, 10))
    expected = torch.zeros(10, 10)
    expected[2:4, 1:5] = 1
    assert torch.equal(target[0, 1], expected) and target[0, [0, 2]].sum() == 0
    assert torch.equal(mask[0, 0], expected)

    rng = np.random.default_rng(0)
    h, w, k = 12, 17, 4
    corners = [np.sort(rng.uniform(-8, 80, (5, 2, 2)), axis=1) for _ in range(2)]  # per box: sorted (x, y) pairs
    boxes = [torch.tensor(c.reshape(5, 4), dtype=torch.float32) for c in corners]  # x0, y0, x1, y1
    labels = [torch.tensor(rng.integers(0, k, 5)) for _ in range(2)]
    target, mask = box_targets(boxes, labels, k, (h, w))
    ys, xs = np.mgrid[0:h, 0:w]
    for b in range(2):
        want = np.zeros((k, h, w))
        for (x0, y0, x1, y1), c in zip(boxes[b].numpy(), labels[b].numpy(), strict=True):
            cx0, cx1 = (np.clip(np.floor(v / 4), 0, w - 1) for v in (x0, x1))
            cy0, cy1 = (np.clip(np.floor(v / 4), 0, h - 1) for v in (y0, y1))
            want[c] = np.maximum(want[c], (xs >= cx0) & (xs < cx1) & (ys >= cy0) & (ys < cy1))
        assert np.array_equal(target[b].numpy(), want)
        assert np.array_equal(mask[b, 0].numpy(), want.max(0))


def test_box_bce_is_taken_only_inside_the_boxes():
    boxes, labels = [torch.tensor([[0.0, 0, 16, 8]]), torch.zeros(0, 4)], [torch.tensor([2]), torch.zeros(0).long()]
    target, mask = box_targets(boxes, labels, 3, (5, 6))
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    loss = box_target_bce(logits, target, mask)
    inside = mask.expand_as(target).bool()
    p = logits.sigmoid()
    manual = -(target * p.log() + (1 - target) * (1 - p).log())[inside].sum() / inside.sum()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert inside.sum() == 3 * 2 * 4  # 2 rows x 4 columns, every class
    loss.backward()
    assert logits.grad[~inside].abs().max() == 0 and logits.grad[inside].abs().min() > 0
    assert box_target_bce(logits, torch.zeros_like(target), torch.zeros_like(mask)).item() == 0  # no boxes: no loss


def test_aux_loss_uses_the_boxes_after_the_detectors_resize(shapes):
    ds, batch = shapes
    model = _model("denseclip_retinanet_rn50", ds.class_names, dropout=0.0).train()
    losses = model(batch["images"], batch["targets"])
    # independently: torchvision's transform (64 -> 128 px: boxes x2), the body, s / tau at stride 4
    image_list, resized = model.detector.transform(batch["images"], [dict(t) for t in batch["targets"]])
    assert torch.allclose(resized[0]["boxes"], 2 * batch["targets"][0]["boxes"])
    score = model.body(image_list.tensors)["score_map"]
    h, w = image_list.tensors.shape[-2:]
    target, mask = box_targets([t["boxes"] for t in resized], [t["labels"] for t in resized], 4, (h // 4, w // 4))
    logits = F.interpolate(score / 0.07, size=(h // 4, w // 4), mode="bilinear")
    assert losses["aux_box"].item() == pytest.approx(box_target_bce(logits, target, mask).item(), rel=1e-5)
    assert set(losses) == {"classification", "bbox_regression", "aux_box"}
    # the score map enters the FPN as s / tau on C5
    features = model.body(image_list.tensors)["features"]
    assert torch.allclose(features[3][:, -4:], score / 0.07, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        model(batch["images"])


def test_text_encoder_frozen_while_contexts_gamma_and_heads_train(shapes):
    ds, batch = shapes
    model = _model("denseclip_retinanet_rn50", ds.class_names).train()
    frozen = {k: v.clone() for k, v in model.text_encoder.encoder.state_dict().items()}
    contexts, gamma = model.text_encoder.contexts.detach().clone(), model.gamma.detach().clone()
    fpn = model.detector.backbone.fpn.layer_blocks[0][0].weight.detach().clone()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, backbone_lr_mult=0.1))
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.body.backbone.conv1.weight)] == pytest.approx(1e-3)  # backbone x0.1
    assert lrs[id(model.detector.backbone.fpn.layer_blocks[0][0].weight)] == pytest.approx(1e-2)  # FPN: full lr
    assert not any(id(p) in lrs for p in model.text_encoder.encoder.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        sum(model(batch["images"], batch["targets"]).values()).backward()
        optimizer.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.text_encoder.encoder.state_dict().items())
    assert not torch.equal(model.text_encoder.contexts, contexts)
    assert not torch.equal(model.gamma, gamma)
    assert not torch.equal(model.detector.backbone.fpn.layer_blocks[0][0].weight, fpn)


def test_mask_rcnn_shifts_labels_for_its_background_class(shapes):
    ds, batch = shapes
    model = _model("denseclip_maskrcnn_rn50", ds.class_names).train()
    seen = []
    handle = model.detector.transform.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    losses = model(batch["images"], batch["targets"])
    handle.remove()
    assert torch.equal(seen[0][0]["labels"], batch["targets"][0]["labels"] + 1)  # 0 is R-CNN's background
    assert {"loss_mask", "loss_classifier", "aux_box"} <= set(losses)
    model.eval()
    model.detector.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(batch["images"])
    assert out[0]["labels"].min() >= 0 and out[0]["labels"].max() < len(ds.class_names)
    assert out[0]["masks"].shape[1:] == (1, 64, 64)  # at the input image's size


def test_ppl_mask_rcnn_losses(shapes):
    ds, batch = shapes
    model = _model("ppl_maskrcnn_rn50", ds.class_names, n_samples=6).train()
    losses = model(batch["images"], batch["targets"])
    assert {"prob", "div", "kl", "loss_mask"} <= set(losses) and "aux_box" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.text_encoder.contexts.grad.abs().sum() > 0
    assert model.body.prob_decoder.query_mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.encoder.parameters())


def test_counts_exclude_the_text_encoder_and_baselines_have_no_language(shapes):
    ds, _ = shapes
    guided = _model("denseclip_retinanet_rn50", ds.class_names)
    plain = _model("clip_retinanet_rn50", ds.class_names)
    assert plain.text_encoder is None and plain.body.attnpool is None
    text = sum(p.numel() for p in guided.text_encoder.encoder.parameters())
    assert count_parameters(guided, include_text_encoder=True) - count_parameters(guided) == text
    for model in (guided, plain, _model("ppl_maskrcnn_rn50", ds.class_names)):
        flops = count_flops(model, (128, 128))
        assert flops["gflops"] > 0
        assert (flops["gflops_with_text_encoder"] > flops["gflops"]) == (model.text_encoder is not None)
    assert count_flops(guided, (128, 128))["gflops"] > count_flops(plain, (128, 128))["gflops"]


def test_detectors_need_a_clip_resnet():
    with pytest.raises(ValueError, match="ResNets"):
        create_model("denseclip_retinanet_rn50", class_names=["a"], pretrained=None, clip_model="tiny-ViT")
    with pytest.raises(ValueError, match="guidance"):
        create_model("denseclip_retinanet_rn50", class_names=["a"], pretrained=None, clip_model="tiny-RN", guidance="x")
