"""Pieces of the training engine: data order, schedule, parameter groups, atomic checkpoints."""

import itertools

import pytest
import torch
from torch import nn

from clipdense.config import OptimConfig
from clipdense.runs import latest_checkpoint, load_weights, save_checkpoint
from clipdense.training.engine import SeededSamples, StepSampler, lr_factor, param_groups


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_resumes_at_any_step_and_splits_ranks():
    full = _take(StepSampler(10, batch_size=2, seed=3), 2 * 12)  # 12 steps: crosses 2 epochs (5 steps each)
    for start in (0, 1, 4, 5, 7):
        assert _take(StepSampler(10, batch_size=2, seed=3, start_step=start), 4) == full[2 * start : 2 * start + 4]
    epoch0 = [i for e, i in full[:10]]
    assert sorted(epoch0) == list(range(10)) and full[10][0] == 1
    # two ranks with batch 1 cover exactly the single-process batch of 2, in order
    r0 = _take(StepSampler(10, batch_size=1, rank=0, world_size=2, seed=3), 6)
    r1 = _take(StepSampler(10, batch_size=1, rank=1, world_size=2, seed=3), 6)
    assert [x for pair in zip(r0, r1, strict=True) for x in pair] == full[:12]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(3, batch_size=2, world_size=2)


def test_seeded_samples_do_not_depend_on_order_or_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    ds = SeededSamples(Noisy(), seed=1)
    a = ds[(0, 2)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _ = ds[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(ds[(0, 2)], a) and not torch.equal(ds[(1, 2)], a)


def test_poly_schedule_with_warmup():
    cfg = OptimConfig(lr=1e-4, warmup_iters=10, warmup_ratio=1e-6, power=0.9, min_lr=1e-6)
    total = 100
    lr = lambda s: 1e-4 * lr_factor(s, cfg, total, 1e-4)  # noqa: E731
    assert lr(0) == pytest.approx(1e-6 * ((1e-4 - 1e-6) + 1e-6), rel=1e-6)
    assert lr(50) == pytest.approx((1e-4 - 1e-6) * 0.5**0.9 + 1e-6)
    assert lr(100) == pytest.approx(1e-6)
    assert all(lr(s) < lr(s + 1) for s in range(9))  # warmup rises


def test_step_schedule_with_warmup_as_mmdet():
    # mmdet 1x: linear warmup 500 iters from 0.001, x0.1 at epochs 8 and 11 (here 10 iterations per epoch)
    cfg = OptimConfig(lr=2e-4, schedule="step", warmup_iters=5, warmup_ratio=1e-3, step_gamma=0.1)
    lr = lambda s: 2e-4 * lr_factor(s, cfg, 120, 2e-4, milestones=[80, 110])  # noqa: E731
    assert lr(0) == pytest.approx(2e-4 * 1e-3)
    assert lr(5) == lr(79) == pytest.approx(2e-4)
    assert lr(80) == lr(109) == pytest.approx(2e-5)
    assert lr(110) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, OptimConfig(schedule="cosine"), 10, 1.0)


def _denseclip_like() -> nn.Module:
    """Parameter names as the authors' DenseCLIP model has them (backbone, text encoder, context decoder, head)."""
    layer = nn.Module()
    layer.norm1, layer.linear = nn.LayerNorm(2), nn.Linear(2, 2)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(2, 2))
    model.backbone.norm = nn.LayerNorm(2)  # a backbone norm: the longer key "backbone" wins, so it decays
    model.text_encoder = nn.Linear(2, 2).requires_grad_(False)
    model.context_decoder = nn.Module()
    model.context_decoder.memory_proj = nn.Sequential(nn.LayerNorm(2), nn.Linear(2, 2))
    model.context_decoder.decoder = nn.ModuleList([layer])
    model.decode_head = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    model.gamma = nn.Parameter(torch.ones(2))
    return model


def _mmcv_custom_keys(name: str, base_lr: float, base_wd: float) -> tuple[float, float]:
    """mmcv's DefaultOptimizerConstructor with the authors' custom_keys, written out: keys sorted by length
    (longest first), the first key contained in the name sets lr_mult and decay_mult."""
    keys = {"backbone": (0.1, 1.0), "text_encoder": (0.0, 1.0), "norm": (1.0, 0.0)}
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in name:
            return base_lr * keys[key][0], base_wd * keys[key][1]
    return base_lr, base_wd


def test_param_groups_follow_the_authors_custom_keys():
    model = _denseclip_like()
    groups = param_groups(model, OptimConfig(lr=1.0, weight_decay=0.5, backbone_lr_mult=0.1))
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert id(model.text_encoder.weight) not in by_param  # frozen (lr x 0 there)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (by_param[id(p)]["lr"], by_param[id(p)]["weight_decay"]) == pytest.approx(
                _mmcv_custom_keys(name, 1.0, 0.5)
            ), name
    assert by_param[id(model.context_decoder.memory_proj[0].weight)]["weight_decay"] == 0.5  # not "norm" by name


def test_param_groups_context_decoder_1d_option():
    model = _denseclip_like()
    cfg = OptimConfig(lr=1.0, weight_decay=0.5, no_decay="context_decoder_1d")
    by_param = {id(p): g for g in param_groups(model, cfg) for p in g["params"]}
    cd = model.context_decoder
    for p in (cd.memory_proj[0].weight, cd.memory_proj[1].bias, cd.decoder[0].norm1.weight):
        assert by_param[id(p)]["weight_decay"] == 0.0
    assert by_param[id(cd.memory_proj[1].weight)]["weight_decay"] == 0.5
    assert by_param[id(model.backbone.norm.weight)]["weight_decay"] == 0.5
    with pytest.raises(ValueError, match="no_decay"):
        param_groups(model, OptimConfig(no_decay="bias"))


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = nn.Linear(3, 2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(tmp_path, model, {"step": step}, step)
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_0000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000003"]
    fresh = nn.Linear(3, 2)
    load_weights(fresh, folder / "model.safetensors")
    assert torch.all(fresh.weight == 3)
    assert torch.load(folder / "state.pt", weights_only=True)["step"] == 3
    # a crash while writing leaves a .partial folder that never becomes "latest"
    (tmp_path / "checkpoints" / ".step_0000004.partial").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000003"
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(nn.Linear(4, 2), folder / "model.safetensors")


def test_optimiser_choice():
    from clipdense.training.engine import build_optimizer

    model = nn.Linear(2, 2)
    assert isinstance(build_optimizer(model, OptimConfig(name="sgd", lr=0.01)), torch.optim.SGD)
    assert build_optimizer(model, OptimConfig(name="sgd", momentum=0.5)).param_groups[0]["momentum"] == 0.5
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimiser"):
        build_optimizer(model, OptimConfig(name="lamb"))


def test_sync_batchnorm_in_the_heads_only():
    """The authors' configs set norm_cfg=SyncBN on the neck and heads; the CLIP ResNet's BatchNorm2d are plain."""
    from clipdense.training.engine import convert_sync_batchnorm

    def model():
        m = nn.Module()
        m.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        m.decode_head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        return m

    heads = convert_sync_batchnorm(model(), "heads")
    assert type(heads.backbone[1]) is nn.BatchNorm2d and type(heads.decode_head[1]) is nn.SyncBatchNorm
    every = convert_sync_batchnorm(model(), "all")
    assert type(every.backbone[1]) is nn.SyncBatchNorm and type(every.decode_head[1]) is nn.SyncBatchNorm
    nested = nn.Module()
    nested.detector = model()
    nested.backbone_prefix = "detector.backbone."
    out = convert_sync_batchnorm(nested, "heads")
    assert type(out.detector.backbone[1]) is nn.BatchNorm2d and type(out.detector.decode_head[1]) is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="sync_bn"):
        convert_sync_batchnorm(model(), "on")
