"""PPL (Kwon et al., CVPR 2023) on DenseCLIP: attribute prompts, probabilistic decoder, losses, inference."""

import logging
import math

import open_clip
import pytest
import torch

from clipdense.clip.text import tokenize_class_names
from clipdense.data.classnames import load_classnames
from clipdense.models import (
    AttributePromptEncoder,
    ContextTextEncoder,
    PPLSegmentor,
    ProbabilisticDecoder,
    count_flops,
    count_parameters,
    create_model,
    list_models,
)
from clipdense.models.ppl import diversity_loss, gaussian_kl, mc_pixel_nll, sample_mixture
from clipdense.models.segmentors import segmentation_cross_entropy

CLASSES = ["wall", "building, edifice", "sky", "chest of drawers"]
TINY = dict(clip_model="tiny-RN", input_resolution=None)


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="clipdense")


def tiny(**kw) -> PPLSegmentor:
    torch.manual_seed(0)
    return create_model("ppl_fpn_rn50", class_names=CLASSES, pretrained=None, **{**TINY, **kw})


def batch(b: int = 2, size: int = 64):
    torch.manual_seed(1)
    return torch.randn(b, 3, size, size), torch.randint(0, len(CLASSES), (b, size, size))


def test_registry_names():
    assert {"ppl_fpn_rn50", "ppl_fpn_rn101", "ppl_fpn_vitb16"} <= set(list_models("ppl_*"))


def test_attribute_prompts_encoded_in_one_batched_call():
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-RN").eval()
    ids = tokenize_class_names(open_clip.get_tokenizer("tiny-RN"), CLASSES)
    enc = AttributePromptEncoder(clip, ids, num_attributes=3)
    assert enc.contexts.shape == (3, 8, 32) and enc.contexts.requires_grad
    assert all(not p.requires_grad for p in enc.encoder.parameters())
    calls = []
    original = enc.encoder.forward_shared_prefix

    def counting(prefix, suffix, eot):
        calls.append((prefix.shape[0], suffix.shape[0]))
        return original(prefix, suffix, eot)

    enc.encoder.forward_shared_prefix = counting
    w = enc()
    assert w.shape == (3, 4, 32) and calls == [(3, 4)]  # K context sets x C class names, one pass
    del enc.encoder.forward_shared_prefix
    single = ContextTextEncoder(clip, ids, learn_contexts=False)  # DenseCLIP's encoder, one context set at a time
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(w[k].detach(), single(enc.contexts[k : k + 1])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(w[0], w[1])
    cache = enc.cache_text_embeddings()
    assert cache.shape == (3, 4, 32) and enc() is cache


def test_samples_are_drawn_evenly_from_the_components():
    torch.manual_seed(0)
    mu = torch.randn(2, 3, 4, 16)
    samples = sample_mixture(mu, torch.full((2, 3, 4), -40.0), 15)
    assert samples.shape == (2, 15, 4, 16)
    for n in range(15):  # sigma ~ 0: sample n is its component's mean, 5 per component
        torch.testing.assert_close(samples[:, n], mu[:, n // 5])
    wide = sample_mixture(mu, torch.zeros(2, 3, 4, 16), 15)  # diagonal log variances
    assert wide.shape == (2, 15, 4, 16) and not torch.allclose(wide[:, 0], wide[:, 1])
    with pytest.raises(ValueError, match="multiple"):
        sample_mixture(mu, torch.zeros(2, 3, 4), 14)
    with pytest.raises(ValueError, match="multiple"):
        tiny(n_samples=14)


@pytest.mark.parametrize(("sigma_type", "positivity"), [("isotropic", "exp"), ("diagonal", "softplus")])
def test_probabilistic_decoder_gives_positive_sigma(sigma_type, positivity):
    torch.manual_seed(0)
    dec = ProbabilisticDecoder(32, width=16, heads=2, layers=5, sigma_type=sigma_type, positivity=positivity)
    assert len(dec.decoder) == 5
    log_var = dec(torch.randn(2, 12, 32), torch.randn(2, 5, 32))
    assert log_var.shape == ((2, 12) if sigma_type == "isotropic" else (2, 12, 32))
    assert torch.isfinite(log_var).all() and (log_var.exp() > 0).all()
    # Starts near log_var_init (all Linear weights trunc_normal(0.02)).
    assert (log_var - (-5.0)).abs().max() < 0.5
    model = tiny(sigma_type=sigma_type, positivity=positivity)
    out = model(batch()[0])
    assert out["log_var"].shape == ((2, 3, 4) if sigma_type == "isotropic" else (2, 3, 4, 32))
    assert (out["sigma"] > 0).all() and out["sigma"].shape == (2, 4)


@pytest.mark.parametrize("diagonal", [False, True])
def test_kl_closed_form_matches_monte_carlo(diagonal):
    torch.manual_seed(0)
    d = 6
    mu = torch.randn(2, d) * 0.7
    log_var = torch.randn(2, d) * 0.5 if diagonal else torch.randn(2) * 0.5
    std = (0.5 * log_var).exp()
    std = std if diagonal else std[:, None].expand(-1, d)
    q = torch.distributions.Normal(mu, std)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1).mean()
    closed = gaussian_kl(mu, log_var)
    assert closed.item() == pytest.approx(mc.item(), rel=0.02)


def test_diversity_loss():
    b = torch.zeros(4)
    eye = torch.eye(8)
    orthonormal = torch.stack([eye[:3] * 1.0, eye[3:6] * 2.0, eye[[0, 4, 7]], eye[5:8]], dim=1)  # K x C x D
    assert diversity_loss(orthonormal, b).item() == pytest.approx(0.0, abs=1e-7)  # rows normalised: scale-free
    assert diversity_loss(orthonormal, b, normalize=False).item() > 0  # norm 2 rows differ from I
    torch.manual_seed(0)
    w = torch.randn(3, 4, 8)
    loss = diversity_loss(w, b)
    wc = torch.nn.functional.normalize(w.transpose(0, 1), dim=-1)
    expected = ((wc @ wc.transpose(1, 2) - torch.eye(3)) ** 2).sum((1, 2)).mean()
    assert loss.item() > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert diversity_loss(w, torch.full((4,), 1e3)).item() == 0.0  # a large margin switches it off


def test_pixel_loss_with_vanishing_sigma_is_denseclip_ce_on_mu():
    model = tiny(num_attributes=1, n_samples=4, use_prob_loss=False).train()
    model.prob_decoder.forward = lambda text, visual: torch.full(text.shape[:2], -60.0)
    images, labels = batch()
    labels[0, :8] = 255
    out = model(images)
    ref = segmentation_cross_entropy(out["score_map"] / model.tau, labels, 255, avg_non_ignore=False)
    torch.testing.assert_close(model.losses(out, labels)["pixel"], ref)
    # K = 3: the MC loss is -log of the mean over components of softmax(s(mu_k) / tau).
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 2, 2)
    nll, valid = mc_pixel_nll(maps.repeat_interleave(5, dim=1), labels, tau=0.07)
    up = torch.nn.functional.interpolate(maps.flatten(0, 1) / 0.07, size=(64, 64), mode="bilinear")
    probs = up.softmax(1).unflatten(0, (2, 3)).mean(1)
    expected = -probs.gather(1, labels.clamp_max(3)[:, None])[:, 0].log() * (labels != 255)
    torch.testing.assert_close(nll, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(valid, labels != 255)


def test_gradients_reach_trainable_parts_and_text_encoder_stays_frozen():
    model = tiny().train()
    encoder = model.text_encoder.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not any(n.startswith("text_encoder.encoder") for n in params)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, labels = batch()
    for _ in range(2):
        losses = model.losses(model(images), labels)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        for name in ("text_encoder.contexts", "diversity_bias", "backbone.conv1.weight"):
            assert model.get_parameter(name).grad.abs().sum() > 0, name
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prob_decoder.parameters())
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    for name in ("text_encoder.contexts", "diversity_bias", "prob_decoder.query_mlp.2.bias", "backbone.conv1.weight"):
        assert not torch.equal(model.get_parameter(name), params[name]), name


@pytest.mark.parametrize("mc", [True, False])
def test_eval_outputs(mc):
    model = tiny(mc_inference=mc).eval()
    images, labels = batch(2, 64)
    with torch.no_grad():
        torch.manual_seed(5)
        out = model(images)
        torch.manual_seed(5)
        again = model(images)
        losses = model.losses(out, labels)
    assert out["logits"].shape == (2, 4, 16, 16)
    assert out["score_maps"].shape == (2, 15, 4, 2, 2) and out["uncertainty"].shape == (2, 2, 2)
    assert out["sigma"].shape == (2, 4) and (out["sigma"] > 0).all()
    u = out["uncertainty"]
    assert (u >= 0).all() and (u <= math.log(4) + 1e-6).all()
    p = (out["score_maps"] / model.tau).softmax(2).mean(1)
    torch.testing.assert_close(u, -(p * p.log()).sum(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["logits"], again["logits"])  # same torch seed, same samples
    torch.testing.assert_close(out["uncertainty"], again["uncertainty"])
    if mc:  # logits are log of averaged probabilities
        torch.testing.assert_close(out["logits"].exp().sum(1), torch.ones(2, 16, 16))
    else:  # mean-only: the decoder sees the mixture-mean map, whatever the samples
        ref = model._decode(list(model.backbone(images)["features"]), out["score_map"]).detach()
        torch.testing.assert_close(out["logits"], ref)
    assert set(losses) == {"decode", "prob", "div", "kl"}


def test_eval_seed_and_cached_text_embeddings():
    model = tiny(eval_seed=3).eval()
    images, _ = batch(1, 64)
    with torch.no_grad():
        ref = model(images)
        model.cache_text_embeddings()
    model.text_encoder.encoder.forward = lambda *a: (_ for _ in ()).throw(AssertionError("text encoder ran"))
    with torch.no_grad():
        out = model(images)  # different global RNG state, same eval_seed samples, cached w
    torch.testing.assert_close(out["logits"], ref["logits"])
    torch.testing.assert_close(out["uncertainty"], ref["uncertainty"])
    model.train()
    assert model.text_encoder.text_cache is None


@pytest.mark.parametrize(
    ("flags", "keys"),
    [
        (dict(use_prob_loss=False, use_div_loss=False, use_kl_loss=False), {"decode", "pixel"}),
        (dict(use_prob_loss=False, use_kl_loss=False), {"decode", "pixel", "div"}),
        (dict(use_prob_loss=False, use_div_loss=False), {"decode", "pixel", "kl"}),
        (dict(use_prob_loss=False), {"decode", "pixel", "div", "kl"}),
        (dict(), {"decode", "prob", "div", "kl"}),
        (dict(use_pixel_loss=False, use_prob_loss=False), {"decode", "div", "kl"}),
    ],
)
def test_loss_flags(flags, keys):
    model = tiny(alpha=2.0, beta=1e-3, **flags).train()
    images, labels = batch()
    torch.manual_seed(0)
    out = model(images)
    losses = model.losses(out, labels)
    assert set(losses) == keys
    w, mu, log_var = out["attribute_embeddings"], out["means"], out["log_var"]
    if "div" in keys:
        torch.testing.assert_close(losses["div"], 2.0 * diversity_loss(w, model.diversity_bias))
    if "kl" in keys:
        torch.testing.assert_close(losses["kl"], 1e-3 * gaussian_kl(mu, log_var))
    if "prob" in keys:  # eq. 11 per image: L_pixel,b / g_b + log(g_b) / 2
        nll, _ = mc_pixel_nll(out["score_maps"], labels)
        log_g = log_var.flatten(1).mean(1)
        expected = (nll.flatten(1).mean(1) * (-log_g).exp() + 0.5 * log_g).mean()
        torch.testing.assert_close(losses["prob"], expected)
    with pytest.raises(ValueError, match="use_pixel_loss"):
        tiny(use_pixel_loss=False, use_prob_loss=True)


def test_post_model_context_option():
    model = tiny(post_model_context=True).train()
    assert model.context_decoder is not None and model.gamma.shape == (32,)
    out = model(batch()[0])
    assert not torch.allclose(out["means"][0], out["means"][1])  # per-image means
    assert tiny().context_decoder is None and tiny().gamma is None


def test_count_flops_on_tiny_model():
    model = tiny(mc_inference=False, n_samples=3)
    mean_only = count_flops(model, (64, 64))
    model.mc_inference = True
    mc = count_flops(model, (64, 64))
    assert 0 < mean_only["gflops"] < mc["gflops"] < mc["gflops_with_text_encoder"]
    assert mc["gflops_with_text_encoder"] - mc["gflops"] == pytest.approx(
        mean_only["gflops_with_text_encoder"] - mean_only["gflops"]
    )


def test_ppl_rn50_parameter_count():
    """Paper: 51.8M. Here: DenseCLIP RN50 (50.25M, paper 50.3M) minus its context decoder (3.95M),
    plus the 5-layer probabilistic decoder (6.45M), two more prompts and b."""
    classes = load_classnames("ade20k")
    torch.manual_seed(0)
    model = create_model("ppl_fpn_rn50", class_names=classes, pretrained=None)
    n = count_parameters(model)
    print(f"ppl_fpn_rn50: {n / 1e6:.3f}M params (paper 51.8M)")
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("backbone", "neck")}
    parts["decode_head"] = sum(p.numel() for p in model.decode_head.parameters())
    parts["prob_decoder"] = sum(p.numel() for p in model.prob_decoder.parameters())
    assert n == sum(parts.values()) + 3 * 8 * 512 + 150
    assert n == 52_753_806
    assert count_parameters(model, include_text_encoder=True) - n == sum(
        p.numel() for p in model.text_encoder.encoder.parameters()
    )


def test_vit_variant():
    torch.manual_seed(0)
    model = create_model("ppl_fpn_vitb16", class_names=CLASSES, pretrained=None, clip_model="tiny-ViT")
    images, labels = batch(1, 64)
    out = model(images)
    assert out["logits"].shape == (1, 4, 16, 16) and out["score_maps"].shape == (1, 15, 4, 8, 8)
    assert model.score_concat_index == 1  # the tiny ViT's dense stride is 8
    assert set(model.losses(out, labels)) == {"decode", "prob", "div", "kl"}
