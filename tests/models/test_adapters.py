"""Tip-Adapter and PLOT-Adapter against a write-out of the authors' code (``gaopengcuhk/Tip-Adapter`` ``main.py``,
``utils.py``; ``CHENGY12/PLOT`` ``plot-adapter/main.py``, ``utils.py``) on random tensors, in their tensor layouts."""

import pytest
import torch
import torch.nn.functional as F

from clipdense.inference.adapters import FewShotAdapterConfig, adapter_recipe
from clipdense.models import create_model, list_models
from clipdense.models.adapters import search_grid
from clipdense.training.adapters import search_alpha_beta

NAMES = ["red thing", "green thing", "blue thing"]


def _adapter(name, cache_size, clip="tiny-ViT", **kw):
    torch.manual_seed(0)
    return create_model(name, class_names=NAMES, pretrained=None, clip_model=clip, cache_size=cache_size, **kw)


def _official_sinkhorn(K, u, v):  # plot-adapter/utils.py Sinkhorn
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(100):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < 1e-2:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


def _official_tip_plot(image_features_map, weight, cache_values, beta, n_cls, k_shot, thre, N=2):
    """``tip_plot``: image_features_map M x B x D, the adapter's weight (N NK) x D, cache_values NK x C."""
    M, batch_size, _ = image_features_map.shape
    affinity = image_features_map @ weight.t()
    affinity = affinity.view(M, batch_size, N, n_cls * k_shot).permute(0, 2, 1, 3)
    feat_exp = ((-1) * (beta - beta * affinity)).exp()
    feat_exp = F.normalize(feat_exp, dim=-1)
    sim = feat_exp @ cache_values
    sim = sim.view(M, N, batch_size * n_cls).permute(2, 0, 1)
    wdist = 1.0 - sim
    xx = torch.zeros(batch_size * n_cls, M, dtype=sim.dtype).fill_(1.0 / M)
    yy = torch.zeros(batch_size * n_cls, N, dtype=sim.dtype).fill_(1.0 / N)
    T = _official_sinkhorn(torch.exp(-wdist / thre), xx, yy)
    return 100.0 * torch.sum(T * sim, dim=(1, 2)).contiguous().view(batch_size, n_cls)


def test_registered():
    assert {"tip_adapter_rn50", "tip_adapter_f_rn50", "plot_adapter_rn50"} <= set(list_models())


def test_search_grid_is_the_official_list():
    scale, steps = 12, 200
    official = [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]
    assert search_grid(scale, steps) == official and len(official) == 200 and official[-1] < scale


def test_search_keeps_the_first_best_with_beta_outer():
    """Ties: the official loop (``if acc > best_acc``, beta outer, alpha inner) keeps the first best setting."""
    labels = torch.tensor([0, 1])
    base = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # base alone gets 50%
    cache = {0.1: torch.tensor([[0.0, 0.0], [0.0, 0.0]]), 0.2: torch.tensor([[0.0, 0.0], [0.0, 2.0]]),
             0.3: torch.tensor([[0.0, 0.0], [0.0, 5.0]])}  # fmt: skip
    acc, beta, alpha = search_alpha_beta(base, cache.__getitem__, labels, [0.1, 0.2, 0.3], [0.25, 1.0, 2.0], False)
    assert (acc, beta, alpha) == (100.0, 0.2, 1.0)  # beta 0.2 alpha 1.0 is first to reach 100% (0.3/0.25 is later)


def test_tip_adapter_logits_are_the_official_formula():
    """``100 f W^T + alpha * exp(-beta (1 - f K)) V`` with K D x NK, V NK x C one-hot."""
    model = _adapter("tip_adapter_rn50", cache_size=6, templates=None)
    g = torch.Generator().manual_seed(1)
    d = model.cache.keys.weight.shape[1]
    keys = F.normalize(torch.randn(6, d, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    model.cache.fill(keys, labels)
    model.cache.clip_weights.copy_(F.normalize(torch.randn(3, d, generator=g), dim=-1))
    model.cache.alpha.fill_(1.7)
    model.cache.beta.fill_(5.5)
    images = torch.randn(4, 3, model.image_size, model.image_size, generator=g)
    f = F.normalize(model.visual(images), dim=-1)
    cache_keys, cache_values = keys.t(), F.one_hot(labels).float()  # the official layouts
    official = (
        100.0 * f @ model.cache.clip_weights.t() + ((-1) * (5.5 - 5.5 * (f @ cache_keys))).exp() @ cache_values * 1.7
    )
    torch.testing.assert_close(model(images), official, rtol=1e-5, atol=1e-4)


def test_tip_adapter_keys_average_raw_features_then_normalise():
    """Tip-Adapter's ``build_cache_model`` averages ``encode_image`` (unnormalised) over the passes, then
    normalises; PLOT-Adapter averages normalised features (its CustomCLIP normalises) and adds the mean local key."""
    g = torch.Generator().manual_seed(2)
    passes = [torch.randn(5, 8, generator=g) * (1 + i) for i in range(3)]
    tip = _adapter("tip_adapter_rn50", cache_size=5, templates=None)
    official = torch.cat([p.unsqueeze(0) for p in passes]).mean(dim=0)
    official = official / official.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(tip.keys_from_cache_features([sum(passes) / 3]), official)

    local = [F.normalize(torch.randn(5, 4, 8, generator=g), dim=-1) for _ in range(3)]  # B x M x D per pass
    glob = [F.normalize(p, dim=-1) for p in passes]
    keys = torch.cat([p.unsqueeze(0) for p in glob]).mean(dim=0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    keymaps = torch.cat([p.permute(1, 0, 2).unsqueeze(0) for p in local]).mean(dim=0)  # M x B x D, as the code
    keymaps = (keymaps / keymaps.norm(dim=-1, keepdim=True)).permute(2, 0, 1)  # d x M x B
    official = torch.cat([keys, keymaps.mean(dim=1).t()], dim=0)
    mine = type(_adapter("plot_adapter_rn50", 5, templates=None)).keys_from_cache_features(
        [sum(glob) / 3, sum(local) / 3]
    )
    torch.testing.assert_close(mine, official)


@pytest.mark.parametrize("clip", ["tiny-RN", "tiny-ViT"])
def test_plot_adapter_cache_logits_are_tip_plot(clip):
    """The transported cache logits equal ``tip_plot`` (M x B x D maps, two key sets, eps 0.3, Sinkhorn over all
    B x C problems at once)."""
    k_shot, n_cls = 2, 3
    model = _adapter("plot_adapter_rn50", cache_size=k_shot * n_cls, clip=clip, templates=None)
    g = torch.Generator().manual_seed(3)
    d = model.cache.keys.weight.shape[1]
    keys = torch.cat([F.normalize(torch.randn(6, d, generator=g), dim=-1), 0.3 * torch.randn(6, d, generator=g)])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # class-major, as the official k-shot draw
    model.cache.fill(keys, labels)
    local = F.normalize(torch.randn(4, 9, d, generator=g), dim=-1)  # B x M x D
    beta = 3.0
    mine = model.cache_logits((None, local, None), beta)
    official = _official_tip_plot(local.permute(1, 0, 2), keys, F.one_hot(labels).float(), beta, n_cls, k_shot, 0.3)
    torch.testing.assert_close(mine, official, rtol=1e-5, atol=1e-4)


def test_plot_adapter_fuses_as_the_official_test():
    """At test time: ``100 f W^T + alpha tip_plot + 0.5 * CustomCLIP logits``, the latter 0.5 (OT + global) with
    logit_scale; in training the PLOT term is left out."""
    model = _adapter("plot_adapter_rn50", cache_size=3, templates=None)
    model.cache_text_features()
    g = torch.Generator().manual_seed(4)
    d = model.cache.keys.weight.shape[1]
    model.cache.fill(F.normalize(torch.randn(6, d, generator=g), dim=-1), torch.tensor([0, 1, 2]))
    model.cache.clip_weights.copy_(F.normalize(torch.randn(3, d, generator=g), dim=-1))
    model.cache.alpha.fill_(0.7)
    model.cache.beta.fill_(2.0)
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=g)
    glob, local = model.plot.image_features(images)
    raw = model.plot.raw_text_features().view(4, 3, -1)
    text = F.normalize(raw, dim=-1)
    scale = model.plot.logit_scale.exp()
    sim = torch.einsum("bmd,ncd->bcmn", local, text)
    plan = _official_sinkhorn(
        torch.exp(-(1 - sim.reshape(6, -1, 4)) / 0.1),
        torch.full((6, sim.shape[2]), 1 / sim.shape[2]),
        torch.full((6, 4), 0.25),
    ).view_as(sim)
    custom = 0.5 * scale * (plan * sim).sum(dim=(2, 3)) + 0.5 * scale * glob @ F.normalize(raw.mean(0), dim=-1).t()
    tip = _official_tip_plot(local.permute(1, 0, 2), model.cache.keys.weight, model.cache.values, 2.0, 3, 1, 0.3)
    zero_shot = 100.0 * glob @ model.cache.clip_weights.t()
    torch.testing.assert_close(model(images), zero_shot + 0.7 * tip + 0.5 * custom, rtol=1e-5, atol=1e-3)
    feats = model.train_features(images)
    torch.testing.assert_close(model.base_logits(feats, training=True), zero_shot)


def test_only_the_keys_train():
    model = _adapter("plot_adapter_rn50", cache_size=3, templates=None)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["cache.keys.weight"]
    tip = _adapter("tip_adapter_f_rn50", cache_size=3, templates=None)
    assert [n for n, p in tip.named_parameters() if p.requires_grad] == ["cache.keys.weight"]


def test_recipe_takes_the_authors_values():
    r = adapter_recipe("tip_adapter_f_rn50", "dtd", FewShotAdapterConfig(), None, None)
    assert (r.init_beta, r.init_alpha, r.search_scale, r.search_step, r.epochs) == (1, 2, (13.0, 13.0), (200, 20), 20)
    assert (r.lr, r.adam_eps, r.weight_decay, r.batch_size, r.augment_epochs) == (0.001, 1e-4, 0.01, 256, 10)
    assert adapter_recipe("tip_adapter_rn50", "dtd", FewShotAdapterConfig(), None, None).epochs == 0
    p = adapter_recipe("plot_adapter_rn50", "oxford_flowers", FewShotAdapterConfig(plot_run="x"), None, None)
    assert (p.init_beta, p.init_alpha, p.search_scale, p.search_step, p.epochs) == (
        2.32,
        0.2,
        (3.0, 20.0),
        (20, 200),
        80,
    )
    with pytest.raises(ValueError, match="plot_run"):
        adapter_recipe("plot_adapter_rn50", "dtd", FewShotAdapterConfig(), None, None)
    with pytest.raises(ValueError, match="training-free"):
        adapter_recipe("tip_adapter_rn50", "dtd", FewShotAdapterConfig(), 5, None)
    with pytest.raises(ValueError, match="select"):
        adapter_recipe("tip_adapter_rn50", "dtd", FewShotAdapterConfig(select="test"), None, None)
