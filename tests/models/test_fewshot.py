"""CoOp and PLOT: the Sinkhorn plan against POT, PLOT's reduction to CoOp, prompt assembly, and what a step trains."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipdense.models import create_model, list_models
from clipdense.models.fewshot import PLOT, CoOp, ot_similarity, sinkhorn

NAMES = ["red thing", "green thing", "blue thing"]


def _model(name, **kw):
    clip = "tiny-ViT" if "vit" in name else "tiny-RN"
    torch.manual_seed(0)
    return create_model(name, class_names=NAMES, pretrained=None, clip_model=clip, **kw)


def test_registered():
    assert {"coop_rn50", "coop_vitb16", "cocoop_rn50", "cocoop_vitb16", "plot_rn50", "plot_vitb16"} <= set(
        list_models()
    )


def _random_problems(seed, p=6, m=7, n=4):
    g = torch.Generator().manual_seed(seed)
    cost = 1 - F.cosine_similarity(  # 1 - cos of random unit vectors, as PLOT's costs
        torch.randn(p, m, 1, 16, generator=g, dtype=torch.float64),
        torch.randn(p, 1, n, 16, generator=g, dtype=torch.float64),
        dim=-1,
    )
    return cost, torch.full((p, m), 1 / m, dtype=torch.float64), torch.full((p, n), 1 / n, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_matches_pot(seed):
    """The plan equals POT's ``ot.sinkhorn`` (Sinkhorn-Knopp) with the same entropic regularisation eps = 0.1.

    The stopping rules differ: PLOT stops when the mean |r - r_prev| of its row scaling vector is below ``thresh``
    and updates r then c from r = c = 1; POT updates v then u from 1/n and checks the violation of the b marginal
    every 10 iterations (``stopThr``). After a fixed number of iterations the two plans are different iterates of
    the same fixed-point map, so they are compared where both have converged to the unique entropic plan (float64,
    thresholds far below the float32 resolution, enough iterations), which makes agreement to 1e-5 meaningful:
    any error in the kernel, the update order or the plan formula diag(r) K diag(c) would show.
    """
    ot = pytest.importorskip("ot")
    eps = 0.1
    cost, u, v = _random_problems(seed)
    plan = sinkhorn(torch.exp(-cost / eps), u, v, max_iter=10000, thresh=1e-14)
    for i in range(cost.shape[0]):
        ref = ot.sinkhorn(u[i].numpy(), v[i].numpy(), cost[i].numpy(), reg=eps, numItermax=10000, stopThr=1e-13)
        np.testing.assert_allclose(plan[i].numpy(), ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(plan[i].sum(1).numpy(), u[i].numpy(), atol=1e-9)
        np.testing.assert_allclose(plan[i].sum(0).numpy(), v[i].numpy(), atol=1e-9)


def test_sinkhorn_official_stopping_rule():
    """With PLOT's settings (100 iterations, thresh 1e-2) on float32: the column marginals are exact (c is updated
    last), the row marginals hold to the tolerance the rule buys, and the plan is close to POT's at 100 iterations."""
    ot = pytest.importorskip("ot")
    cost, u, v = _random_problems(3)
    plan = sinkhorn(torch.exp(-cost.float() / 0.1), u.float(), v.float())
    torch.testing.assert_close(plan.sum(1), v.float(), atol=1e-6, rtol=0)
    assert (plan.sum(2) - u.float()).abs().max() < 5e-3
    assert plan.sum(dim=(1, 2)).sub(1).abs().max() < 1e-5
    ref = ot.sinkhorn(u[0].numpy(), v[0].numpy(), cost[0].numpy(), reg=0.1, numItermax=100, stopThr=0, warn=False)
    assert np.abs(plan[0].double().numpy() - ref).max() < 5e-3


def test_sinkhorn_stops_early_and_ot_has_no_gradient_through_the_plan():
    local = F.normalize(torch.randn(2, 5, 8), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(3, 4, 8), dim=-1)
    sim = ot_similarity(local, text)
    assert sim.shape == (2, 4)
    sim.sum().backward()
    # d/d local of sum_mn T_mn <local_m, text_n> with T constant is sum_n T_mn text_n
    s = torch.einsum("bmd,ncd->bcmn", local.detach(), text).reshape(8, 5, 3)
    plan = sinkhorn(torch.exp(-(1 - s) / 0.1), torch.full((8, 5), 1 / 5), torch.full((8, 3), 1 / 3))
    expected = torch.einsum("bcmn,ncd->bmd", plan.view(2, 4, 5, 3), text)
    torch.testing.assert_close(local.grad, expected)


def test_plot_with_one_prompt_and_one_local_feature_is_coop():
    """N = 1 and M = 1: the plan is the single entry 1, so the logit is exp(logit_scale) * cos (CoOp's)."""
    coop, plot = _model("coop_rn50"), _model("plot_rn50", n_prompts=1)
    plot.prompt_learner.load_state_dict(coop.prompt_learner.state_dict())
    images = torch.randn(2, 3, 64, 64)
    global_feat = coop.image_features(images)
    text = plot.text_features()
    torch.testing.assert_close(text, coop.text_features())
    logits = plot.logits_from_features(global_feat, global_feat[:, None], text)
    torch.testing.assert_close(logits, coop(images))
    # PLOT's global feature is CLIP's encode_image, as CoOp's
    torch.testing.assert_close(plot.image_features(images)[0], global_feat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["plot_rn50", "plot_vitb16"])
def test_plot_local_features(name):
    model = _model(name)
    size = model.image_size
    g, local = model.image_features(torch.randn(2, 3, size, size))
    grid = (size // 32) ** 2 if "rn" in name else (size // 8) ** 2
    assert local.shape == (2, grid, 32) and g.shape == (2, 32)
    torch.testing.assert_close(local.norm(dim=-1), torch.ones(2, grid))
    assert model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_prompt_layouts():
    torch.manual_seed(0)
    model = _model("coop_rn50")
    pl = model.prompt_learner
    assert pl.ctx.shape == (1, 1, 16, 32) and pl.n_ctx == 16
    emb = model.text_encoder.token_embedding(pl.token_ids)
    out = pl(emb)
    assert out.shape == emb.shape  # the Xs are replaced in place
    torch.testing.assert_close(out[:, 1:17], pl.ctx[0, 0].expand(3, -1, -1))
    torch.testing.assert_close(out[:, 17:], emb[:, 17:])

    front = _model("coop_rn50", class_token_position="front", class_specific=True)
    pl = front.prompt_learner
    emb = front.text_encoder.token_embedding(pl.token_ids)
    out = pl(emb)
    assert pl.ctx.shape == (1, 3, 16, 32)
    for k, length in enumerate(pl.name_lens):  # SOT, name, contexts, "." EOT
        torch.testing.assert_close(out[k, 1 : 1 + length], emb[k, 17 : 17 + length])
        torch.testing.assert_close(out[k, 1 + length : 17 + length], pl.ctx[0, k])

    middle = _model("coop_rn50", class_token_position="middle")
    pl = middle.prompt_learner
    emb = middle.text_encoder.token_embedding(pl.token_ids)
    out = pl(emb)
    k, length = 0, pl.name_lens[0]
    torch.testing.assert_close(out[k, 1:9], pl.ctx[0, 0, :8])
    torch.testing.assert_close(out[k, 9 : 9 + length], emb[k, 17 : 17 + length])
    torch.testing.assert_close(out[k, 9 + length : 17 + length], pl.ctx[0, 0, 8:])

    plot = _model("plot_rn50")
    assert plot.prompt_learner.ctx.shape == (4, 1, 16, 32)
    assert plot.text_features().shape == (12, 32)


@pytest.mark.parametrize("name", ["coop_rn50", "plot_rn50"])
def test_shared_prefix_encoding_equals_the_whole_prompts(name, monkeypatch):
    """The text encoder runs [SOT] + contexts once per prompt set: features and context gradients are those of the
    whole (N*C) prompts, and the fallback (blocks it cannot split) gives the same."""
    model = _model(name).double().train()
    pl, enc = model.prompt_learner, model.text_encoder
    weights = torch.randn(pl.n_prompts * 3, 32, dtype=torch.float64)

    def features_and_grad(fn):
        text = fn()
        return text.detach(), torch.autograd.grad((text * weights).sum(), pl.ctx)[0]

    def whole():
        return F.normalize(enc(pl(enc.token_embedding(pl.token_ids)), pl.eot_index), dim=-1)

    shared, shared_grad = features_and_grad(model.text_features)
    ref, ref_grad = features_and_grad(whole)
    torch.testing.assert_close(shared, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(shared_grad, ref_grad, atol=1e-12, rtol=1e-9)
    assert enc.can_share_prefix
    monkeypatch.setattr(type(enc), "can_share_prefix", property(lambda self: False))
    fallback, _ = features_and_grad(model.text_features)
    torch.testing.assert_close(fallback, ref, atol=1e-12, rtol=0)


def test_coop_text_features_match_open_clip():
    """Contexts set to the embeddings of "a photo of a" give open_clip's encode_text of "a photo of a <name>."."""
    import open_clip

    model = _model("coop_rn50", ctx_init="a photo of a")
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-RN").eval()
    with torch.no_grad():
        ref = clip.encode_text(open_clip.get_tokenizer("tiny-RN")([f"a photo of a {n}." for n in NAMES]))
        torch.testing.assert_close(model.text_features(), F.normalize(ref, dim=-1), atol=1e-5, rtol=0)


def test_ctx_init_from_words():
    model = _model("coop_rn50", ctx_init="a photo of a")
    pl = model.prompt_learner
    assert pl.n_ctx == 4
    emb = model.text_encoder.token_embedding(pl.token_ids)
    torch.testing.assert_close(pl.ctx[0, 0], emb[0, 1:5])  # the words' own embeddings
    with pytest.raises(ValueError, match="identical"):
        _model("plot_rn50", ctx_init="a photo of a")


def test_ctx_init_counts_words_as_the_official_code():
    """The official prompt learner: ``n_ctx = len(ctx_init.split(" "))``, the contexts are the embeddings of the
    phrase's first n_ctx BPE tokens, the rest of "<phrase> <name>." stays fixed; CSC is ignored with an init."""
    phrase = "a low-resolution photo of a"  # 5 words, 7 BPE tokens ("low", "-", "resolution")
    model = _model("coop_rn50", ctx_init=phrase, class_specific=True)
    pl = model.prompt_learner
    tokenizer = open_clip.get_tokenizer("tiny-RN")
    ids = tokenizer([f"{phrase} {NAMES[1]}."])[0]
    emb = model.text_encoder.token_embedding
    assert pl.n_ctx == len(phrase.split(" ")) == 5 and pl.ctx.shape[1] == 1  # shared, despite class_specific
    torch.testing.assert_close(pl.ctx[0, 0], emb(ids[1:6]))
    prompts = pl(emb(pl.token_ids))
    length = pl.token_ids.shape[1]
    torch.testing.assert_close(prompts[1, 6:], emb(ids[6:length]))  # "of a <name>." and EOT, fixed
    tokens = _model("coop_rn50", ctx_init=phrase, class_specific=True, ctx_init_length="tokens").prompt_learner
    assert tokens.n_ctx == 7 and tokens.ctx.shape[1] == len(NAMES)
    with pytest.raises(ValueError, match="ctx_init_length"):
        _model("coop_rn50", ctx_init=phrase, ctx_init_length="bpe")


def test_random_init_std():
    torch.manual_seed(0)
    ctx = _model("plot_rn50").prompt_learner.ctx
    assert abs(ctx.std().item() - 0.02) < 0.003 and abs(ctx.mean().item()) < 0.003


@pytest.mark.parametrize("name", ["coop_rn50", "plot_rn50", "plot_vitb16", "cocoop_vitb16"])
def test_a_step_trains_only_the_contexts(name):
    """Gradients reach only the contexts (and CoCoOp's meta-net); CLIP (weights and BatchNorm statistics) is
    bit-identical after a step."""
    model = _model(name).train()
    meta = [f"meta_net.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")] if "cocoop" in name else []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_learner.ctx", *meta]
    learned = ("prompt_learner.ctx", "meta_net.")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(learned)}
    ctx = model.prompt_learner.ctx.detach().clone()
    opt = torch.optim.SGD([model.prompt_learner.ctx], lr=0.1, momentum=0.9, weight_decay=5e-4)
    size = model.image_size
    loss = F.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.prompt_learner.ctx.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model.prompt_learner.ctx, ctx)
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert all(not m.training for m in model.frozen_modules())


def test_cocoop_with_a_zero_meta_net_is_zero_shot_clip():
    """CoCoOp's contexts start as "a photo of a"; with the meta-net's shift zeroed its logits are zero-shot CLIP's
    (open_clip's encode_text and encode_image)."""
    import open_clip

    model = _model("cocoop_rn50").eval()
    net = model.meta_net
    assert model.prompt_learner.n_ctx == 4
    assert (net.linear1.in_features, net.linear1.out_features, net.linear2.out_features) == (32, 2, 32)  # D, D/16
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-RN").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        net.linear2.weight.zero_()
        net.linear2.bias.zero_()
        text = F.normalize(clip.encode_text(open_clip.get_tokenizer("tiny-RN")([f"a photo of a {n}." for n in NAMES])))
        ref = clip.logit_scale.exp() * F.normalize(clip.encode_image(images)) @ text.t()
        torch.testing.assert_close(model(images), ref, atol=1e-4, rtol=1e-5)


def test_cocoop_prompts_are_per_image():
    """Each image gets its own prompts (a batch equals its images one at a time); nothing is cached."""
    model = _model("cocoop_vitb16").eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.meta_net.linear2.weight, std=1.0)
        images = torch.randn(3, 3, model.image_size, model.image_size)
        feats = model.image_features(images)
        text = model.text_features(feats)
        batch = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(3)])
    assert text.shape == (3, 3, 32) and not torch.allclose(text[0], text[1], atol=1e-3)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    assert model.cache_text_features() is None and model.text_cache is None
    for bad in ({"class_specific": True}, {"class_token_position": "front"}):
        with pytest.raises(ValueError, match="shared by the classes"):
            _model("cocoop_rn50", **bad)


def test_text_cache():
    model = _model("plot_rn50").eval()
    images = torch.randn(2, 3, 64, 64)
    before = model(images)
    model.cache_text_features()
    assert model.text_cache is not None
    torch.testing.assert_close(model(images), before)
    model.train()
    assert model.text_cache is None


def test_classes_and_types():
    assert isinstance(_model("coop_rn50"), CoOp) and isinstance(_model("plot_rn50"), PLOT)
    with pytest.raises(ValueError, match="class_names"):
        create_model("coop_rn50", pretrained=None, clip_model="tiny-RN")
    with pytest.raises(ValueError, match="class_token_position"):
        _model("coop_rn50", class_token_position="left")


def test_explain_plans_are_forwards_and_keep_their_marginals():
    """PLOT.explain returns forward's logits, and for each top class the plans of forward's Sinkhorn (recomputed
    here by hand for one image and class): every prompt's map sums to 1/N, every cell sends ~1/M, and the
    prompts' score shares are the plan-weighted cosines over their total."""
    model = _model("plot_rn50", n_prompts=3).eval()
    model.thresh = 0.0  # all iterations: the row marginals hold to float precision
    images = torch.randn(2, 3, 64, 64)
    ex = model.explain(images, top_k=2)
    assert torch.allclose(ex.logits, model(images), atol=1e-5)
    assert torch.equal(ex.classes, model(images).topk(2, dim=-1).indices)
    b, k, n, h, w = ex.plans.shape
    assert (b, k, n) == (2, 2, 3) and h * w > 1
    assert torch.allclose(ex.plans.sum(dim=(-2, -1)), torch.full((2, 2, 3), 1 / 3), atol=1e-6)
    assert torch.allclose(ex.plans.sum(dim=2), torch.full((2, 2, h, w), 1 / (h * w)), atol=1e-5)
    assert torch.allclose(ex.shares.sum(dim=-1), torch.ones(2, 2), atol=1e-6)
    # by hand for image 1's second class: cosines of its local features with the class's 3 prompts, Sinkhorn plan
    _, local = model.image_features(images[1:])
    c = int(ex.classes[1, 1])
    text = model.text_features().view(3, len(NAMES), -1)[:, c]  # N x D
    cos = local[0] @ text.t()  # M x N
    plan = sinkhorn(torch.exp(-(1 - cos) / model.eps)[None], torch.full((1, h * w), 1 / (h * w)),
                    torch.full((1, 3), 1 / 3), model.max_iter, 0.0)[0]  # fmt: skip
    assert torch.allclose(ex.plans[1, 1], plan.t().reshape(3, h, w), atol=1e-6)
    per_prompt = (plan * cos).sum(dim=0)
    assert torch.allclose(ex.shares[1, 1], per_prompt / per_prompt.sum(), atol=1e-5)


def test_plot_global_term_pools_the_raw_prompt_features():
    """ImageNet's PLOT adds ``logit_scale * f @ normalize(mean_n(text_n)).T``, the N prompt features averaged before
    they are normalised (``text_feature_pool = text_features.mean(dim=0)`` precedes ``F.normalize``)."""
    model = _model("plot_rn50", n_prompts=3, global_logits=True).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        glob, local = model.image_features(images)
        raw = model.raw_text_features().view(3, len(NAMES), -1)
        norms = raw.norm(dim=-1)
        assert (norms.max(dim=0).values / norms.min(dim=0).values).min() > 1.001  # the two orders differ here
        text = F.normalize(raw, dim=-1)
        sim = torch.einsum("bmd,ncd->bcmn", local, text)
        p, m = 2 * len(NAMES), sim.shape[2]  # B x C transport problems
        kernel = torch.exp(-(1 - sim.reshape(p, m, 3)) / model.eps)
        u, v = torch.full((p, m), 1 / m), torch.full((p, 3), 1 / 3)
        plan = sinkhorn(kernel, u, v, model.max_iter, model.thresh).view_as(sim)
        scale = model.logit_scale.exp()
        official = scale * (plan * sim).sum(dim=(2, 3)) + scale * glob @ F.normalize(raw.mean(dim=0), dim=-1).t()
        torch.testing.assert_close(model(images), official, rtol=1e-5, atol=1e-5)
        model.cache_text_features()
        torch.testing.assert_close(model(images), official, rtol=1e-5, atol=1e-5)
        pooled_after = scale * glob @ F.normalize(text.mean(dim=0), dim=-1).t()
        assert not torch.allclose(official, scale * (plan * sim).sum(dim=(2, 3)) + pooled_after, atol=1e-6)
