"""DenseCLIP segmentors, backbones, text side and registry: paper sizes, invariants and independent parity checks."""

import copy
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

import clipdense
from clipdense.clip.loading import CLIPLoadError
from clipdense.clip.text import tokenize_class_names
from clipdense.data.classnames import load_classnames
from clipdense.models import (
    AttentionPool,
    CLIPFPNSegmentor,
    CLIPResNetBackbone,
    CLIPViTBackbone,
    ContextDecoder,
    ContextTextEncoder,
    DenseCLIPSegmentor,
    PreModelPrompter,
    TimmBackbone,
    count_flops,
    count_parameters,
    create_model,
    list_models,
)
from clipdense.models.backbones import vit_adapters

CLASSES = ["wall", "building, edifice", "sky", "chest of drawers"]
TINY = {
    "rn": dict(clip_model="tiny-RN", input_resolution=None),
    "vit": dict(clip_model="tiny-ViT", input_resolution=None),
}


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="clipdense")


def tiny(name: str, arch: str = "rn", **kw):
    torch.manual_seed(0)
    return create_model(name, class_names=CLASSES, pretrained=None, **{**TINY[arch], **kw})


def clip_model(name: str):
    torch.manual_seed(0)
    return open_clip.create_model(name).eval()


# Paper, Table 1 (ADE20K, 150 classes): params (M, text encoder excluded) and GFLOPs at 1024 x 1024.
# The counts only match with the positional grids DenseCLIP stores at its training crop (RN: 512 ->
# 16 x 16 + 1 rows of the attention pool, 0.42M more than CLIP's 7 x 7; ViT-B/16: 640 -> 40 x 40 + 1,
# 1.08M more): without them RN50 is 49.82M (-0.95%) and ViT-B 104.19M (-1.05%).
PAPER = {
    "clip_fpn_rn50": (31.0, 248.8),
    "denseclip_fpn_rn50": (50.3, 269.2),
    "clip_fpn_rn101": (50.0, 326.6),
    "denseclip_fpn_rn101": (67.8, 346.3),
    "denseclip_fpn_vitb16": (105.3, None),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameters_and_flops_match_paper(name):
    params, gflops = PAPER[name]
    model = create_model(name, class_names=load_classnames("ade20k"), pretrained=None)
    n = count_parameters(model, include_text_encoder=False) / 1e6
    assert abs(n - params) / params < 0.005, f"{name}: {n:.3f}M vs paper {params}M"
    if isinstance(model, DenseCLIPSegmentor):
        text = sum(p.numel() for p in model.text_encoder.encoder.parameters())
        assert count_parameters(model, include_text_encoder=True) == n * 1e6 + text
    if gflops is not None:
        flops = count_flops(model, (1024, 1024))
        print(f"{name}: {n:.2f}M params, {flops['gflops']:.1f} GFLOPs (paper {params}M, {gflops})")
        # FlopCounterMode counts convolutions, matmuls and attention only; fvcore also counts norms and
        # resizes, hence a few tenths of a percent less here.
        assert abs(flops["gflops"] - gflops) / gflops < 0.01
        has_text = isinstance(model, DenseCLIPSegmentor)
        assert (flops["gflops_with_text_encoder"] > flops["gflops"] + 15) == has_text


def test_registry_names_and_errors():
    expected = {
        "denseclip_fpn_rn50",
        "denseclip_fpn_rn101",
        "denseclip_fpn_vitb16",
        "clip_fpn_rn50",
        "clip_fpn_rn101",
        "clip_fpn_vitb16",
        "denseclip_upernet_rn50",
        "denseclip_fpn_rn50_prompt_only",
        "denseclip_fpn_rn50_pre",
        "denseclip_fpn_timm_resnet50",
        "denseclip_fpn_timm_swin_t",
        "denseclip_fpn_timm",
    }
    assert expected <= set(list_models())
    assert clipdense.list_models("clip_fpn_*") == ["clip_fpn_rn101", "clip_fpn_rn50", "clip_fpn_vitb16"]
    assert clipdense.create_model is create_model
    with pytest.raises(ValueError, match="unknown model"):
        create_model("denseclip_fpn_rn18", class_names=CLASSES)
    with pytest.raises(ValueError, match="class_names"):
        create_model("denseclip_fpn_rn50", num_classes=4, pretrained=None, clip_model="tiny-RN")
    # The default asks for weights: with none to be had it must fail, never fall back to random ones.
    with pytest.raises(CLIPLoadError):
        create_model("clip_fpn_rn50", num_classes=4, clip_model="tiny-RN")
    baseline = create_model("clip_fpn_rn50", num_classes=4, pretrained=None, clip_model="tiny-RN")
    assert isinstance(baseline, CLIPFPNSegmentor) and baseline.num_classes == 4


def test_attribute_contract():
    model = tiny("denseclip_fpn_rn50")
    for attr in ("backbone", "text_encoder", "context_decoder", "gamma", "neck", "decode_head"):
        assert getattr(model, attr) is not None
    assert model.class_names == CLASSES and model.num_classes == 4
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if "contexts" in n] == ["text_encoder.contexts"]
    assert model.text_encoder.contexts.shape == (1, 8, 32)
    assert 0 < model.text_encoder.contexts.abs().max() <= 2.0  # trunc_normal_ defaults: std 1, cut at 2
    assert isinstance(model.context_decoder, ContextDecoder)
    assert model.score_concat_index == 3 and model.tau == 0.07 and model.aux_weight == 0.4


def test_gamma_initialised_per_channel():
    model = tiny("denseclip_fpn_rn50")
    assert model.gamma.shape == (model.text_encoder.embed_dim,)
    assert torch.all(model.gamma == 1e-4)


def test_score_map_is_cosine_of_dense_and_text_embeddings():
    model = tiny("denseclip_fpn_rn50").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        feats = model.backbone(x)
        z_bar, z = feats["global_embed"], feats["dense_embed"]
        visual = torch.cat([z_bar[:, None], z.flatten(2).transpose(1, 2)], 1)
        t0 = model.text_encoder().expand(2, -1, -1)
        t = t0 + model.gamma * model.context_decoder(t0, visual)
    torch.testing.assert_close(out["text_embeddings"], t)
    expected = F.cosine_similarity(z[:, None], t[:, :, :, None, None], dim=2)  # B x K x h x w
    assert out["score_map"].shape == (2, 4, 2, 3)
    torch.testing.assert_close(out["score_map"], expected, atol=1e-5, rtol=0)


def test_losses_equal_independent_cross_entropy():
    model = tiny("denseclip_fpn_rn50").eval()
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (2, 64, 96))
    labels[:, :10] = 255
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
        losses = model.losses(out, labels)
    up = lambda t: F.interpolate(t, size=(64, 96), mode="bilinear", align_corners=False)  # noqa: E731
    # mmseg 0.x (the authors' code): the mean runs over all pixels, ignored ones contributing 0
    ce = lambda t: F.cross_entropy(up(t), labels, ignore_index=255, reduction="sum") / labels.numel()  # noqa: E731
    aux = 0.4 * ce(out["score_map"] / 0.07)
    decode = ce(out["logits"])
    assert set(losses) == {"decode", "aux_identity"}
    torch.testing.assert_close(losses["aux_identity"], aux)
    torch.testing.assert_close(losses["decode"], decode)
    all_ignored = model.losses(out, torch.full((2, 64, 96), 255))
    assert all(v.item() == 0 for v in all_ignored.values())
    # avg_non_ignore=True (the ShapesWorld configs): the mean over labelled pixels only
    share = (labels != 255).float().mean()
    for name in ("denseclip_fpn_rn50", "clip_fpn_rn50", "ppl_fpn_rn50"):
        assert tiny(name, avg_non_ignore=True).avg_non_ignore and not tiny(name).avg_non_ignore
    model.avg_non_ignore = True
    labelled = model.losses(out, labels)
    torch.testing.assert_close(labelled["decode"] * share, decode)
    torch.testing.assert_close(labelled["aux_identity"] * share, aux)


def test_text_encoder_frozen_while_contexts_and_gamma_train():
    model = tiny("denseclip_fpn_rn50").train()
    encoder = model.text_encoder.encoder
    assert all(not p.requires_grad for p in encoder.parameters())
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    for part in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        assert f"text_encoder.encoder.{part}" in frozen_names
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    contexts, gamma = model.text_encoder.contexts.detach().clone(), model.gamma.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    for _ in range(3):
        out = model(torch.randn(2, 3, 64, 64))
        loss = sum(model.losses(out, torch.randint(0, 4, (2, 64, 64))).values())
        optimizer.zero_grad()
        loss.backward()
        assert model.text_encoder.contexts.grad.abs().sum() > 0
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    assert not torch.equal(model.text_encoder.contexts, contexts)
    assert not torch.equal(model.gamma, gamma)


def test_prompt_sequence_layout_and_eot_pooling():
    """With contexts set to real word embeddings, the encoder must equal open_clip's encode_text on the
    same 13-token sentence: SOT + 8 context words + class tokens + EOT, pooled at argmax + 8."""
    clip = clip_model("tiny-RN")
    tokenizer = open_clip.get_tokenizer("tiny-RN")
    ids = tokenize_class_names(tokenizer, CLASSES, 5)
    assert ids.shape == (4, 5)
    text = ContextTextEncoder(clip, ids, n_ctx=8)
    enc = text.encoder
    assert enc.context_length == 13 and enc.positional_embedding.shape == (13, 32)
    torch.testing.assert_close(enc.positional_embedding, clip.positional_embedding[:13])
    assert torch.equal(enc.attn_mask, torch.full((13, 13), float("-inf")).triu(1))
    assert torch.equal(text.eot_index, ids.argmax(-1) + 8)
    words = tokenizer(["there is a photo of a room with"])[0, 1:9]
    assert (words > 0).all() and (words < 49406).all()
    with torch.no_grad():
        text.contexts.copy_(clip.token_embedding(words)[None])
        ours = text()[0]
        sentences = tokenizer([f"there is a photo of a room with {c.split(',')[0]}" for c in CLASSES])
        ref = clip.encode_text(sentences)
    assert torch.equal(sentences.argmax(-1), text.eot_index)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_per_image_contexts_give_per_image_text_embeddings():
    clip = clip_model("tiny-RN")
    text = ContextTextEncoder(
        clip, tokenize_class_names(open_clip.get_tokenizer("tiny-RN"), CLASSES), learn_contexts=False
    )
    assert text.contexts is None
    contexts = torch.randn(3, 8, 32)
    with torch.no_grad():
        t = text(contexts)
        single = text(contexts[1:2])
    assert t.shape == (3, 4, 32)
    torch.testing.assert_close(t[1:2], single, atol=1e-5, rtol=0)
    assert not torch.allclose(t[0], t[1])


def test_cached_text_embeddings_replace_the_text_encoder():
    model = tiny("denseclip_fpn_rn50").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cache = model.cache_text_embeddings()
    assert cache.shape == (4, 32)

    def fail(*args, **kwargs):
        raise AssertionError("text encoder ran although its output is cached")

    model.text_encoder.encoder.forward = fail
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out["logits"], ref["logits"])
    model.train()
    assert model.text_encoder.text_cache is None
    model.eval()
    del model.text_encoder.encoder.forward
    model.cache_text_embeddings()
    model.load_state_dict(model.state_dict())
    assert model.text_encoder.text_cache is None
    assert "text_encoder.text_cache" not in model.state_dict()


def _pool_reference(pool, x):
    """DenseCLIP's AttentionPool2d, written with F.multi_head_attention_forward (sequence-first)."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).permute(2, 0, 1)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    n = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
    spatial = pool.positional_embedding[1:].reshape(1, n, n, c).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(h, w), mode="bilinear").reshape(c, h * w).permute(1, 0)
    tokens = tokens + torch.cat([pool.positional_embedding[:1], spatial])[:, None]
    out, _ = F.multi_head_attention_forward(
        query=tokens,
        key=tokens,
        value=tokens,
        embed_dim_to_check=c,
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    out = out.permute(1, 2, 0)
    return out[:, :, 0], out[:, :, 1:].reshape(b, -1, h, w)


def test_resnet_backbone_matches_clip_and_denseclip_pool():
    clip = clip_model("tiny-RN")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = clip.encode_image(x)
        backbone = CLIPResNetBackbone(clip.visual).eval()
        out = backbone(x)
        big = backbone(torch.randn(2, 3, 96, 128))
    torch.testing.assert_close(out["global_embed"], ref, atol=1e-5, rtol=0)
    assert [f.shape[1:] for f in out["features"]] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert backbone.out_channels == [32, 64, 128, 256] and backbone.embed_dim == 32
    assert out["dense_embed"].shape == (2, 32, 2, 2) and big["dense_embed"].shape == (2, 32, 3, 4)
    c5 = big["features"][-1]
    with torch.no_grad():
        g, d = _pool_reference(backbone.attnpool, c5)
    torch.testing.assert_close(big["global_embed"], g, atol=1e-5, rtol=0)
    torch.testing.assert_close(big["dense_embed"], d, atol=1e-5, rtol=0)
    resized = CLIPResNetBackbone(clip_model("tiny-RN").visual, input_resolution=512)
    assert resized.attnpool.positional_embedding.shape == (16 * 16 + 1, 256)
    assert all(
        "attnpool" not in n for n, _ in CLIPResNetBackbone(clip.visual, with_embeddings=False).named_parameters()
    )
    assert all(p.requires_grad for n, p in backbone.named_parameters() if ".bn" in n or n.startswith("bn"))


def test_attention_pool_same_math_as_clip():
    torch.manual_seed(0)
    pool = AttentionPool(64, 4, 16, spatial_dim=7).eval()
    x = torch.randn(2, 64, 5, 6)
    with torch.no_grad():
        g, d = pool(x)
        g_ref, d_ref = _pool_reference(pool, x)
    assert g.shape == (2, 16) and d.shape == (2, 16, 5, 6)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=0)


def test_vit_backbone_matches_clip_and_builds_pyramid():
    clip = clip_model("tiny-ViT")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = clip.encode_image(x)
        backbone = CLIPViTBackbone(clip.visual, drop_path=0.1).eval()
        out = backbone(x)
        big = backbone(torch.randn(2, 3, 64, 96))
    torch.testing.assert_close(out["global_embed"], ref, atol=1e-5, rtol=0)
    assert backbone.out_indices == (0, 0, 0, 1)
    assert [tuple(f.shape[2:]) for f in big["features"]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert big["dense_embed"].shape == (2, 32, 8, 12)
    twice = CLIPViTBackbone(clip.visual, class_embedding_twice=True, drop_path=0).eval()
    with torch.no_grad():
        assert not torch.allclose(twice(x)["global_embed"], ref)
        # the authors' forward: pos[0] + class_embedding at the class position, i.e. CLIP with that sum as
        # its class position embedding
        authors = copy.deepcopy(clip)
        authors.visual.positional_embedding[0] += authors.visual.class_embedding
        torch.testing.assert_close(twice(x)["global_embed"], authors.encode_image(x), atol=1e-5, rtol=0)
    stochastic = CLIPViTBackbone(clip.visual, drop_path=0.5).train()
    assert [type(m).__name__ for m in stochastic.drop_paths] == ["Identity", "StochasticDepth"]
    torch.manual_seed(0)
    with torch.no_grad():
        runs = [stochastic(x)["global_embed"] for _ in range(8)]
    assert any(not torch.allclose(runs[0], r) for r in runs[1:])
    resized = CLIPViTBackbone(clip_model("tiny-ViT").visual, input_resolution=640)
    assert resized.positional_embedding.shape == (80 * 80 + 1, 64)


def test_vit_b16_adapters_are_the_reference_ones():
    adapters = vit_adapters(24, 16)
    kinds = [[type(m).__name__ for m in (a if isinstance(a, torch.nn.Sequential) else [a])] for a in adapters]
    assert kinds == [
        ["GroupNorm", "ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"],
        ["GroupNorm", "ConvTranspose2d"],
        ["GroupNorm"],
        ["GroupNorm", "MaxPool2d"],
    ]
    x = torch.randn(1, 24, 8, 12)
    assert [tuple(a(x).shape[2:]) for a in adapters] == [(32, 48), (16, 24), (8, 12), (4, 6)]


@pytest.mark.parametrize(
    ("name", "arch", "score_size"),
    [
        ("denseclip_fpn_rn50", "rn", (2, 3)),
        ("denseclip_fpn_vitb16", "vit", (8, 12)),
        ("denseclip_fpn_rn50_pre", "rn", (2, 3)),
        ("denseclip_fpn_rn50_prompt_only", "rn", (2, 3)),
        ("denseclip_upernet_rn50", "rn", (2, 3)),
        ("clip_fpn_rn50", "rn", None),
        ("clip_fpn_vitb16", "vit", None),
    ],
)
def test_output_shapes(name, arch, score_size):
    model = tiny(name, arch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
        losses = model.losses(out, torch.randint(0, 4, (2, 64, 96)))
    assert out["logits"].shape == (2, 4, 16, 24)
    if score_size is None:
        assert set(out) == {"logits"} and set(losses) == {"decode"}
        return
    assert out["score_map"].shape == (2, 4, *score_size)
    assert out["text_embeddings"].shape == (2, 4, 32)
    assert set(losses) == {"decode", "aux_identity"}
    assert model.score_concat_index == (1 if arch == "vit" else 3)  # the map at the dense stride (8 for tiny-ViT)


def test_prompting_variants():
    pre = tiny("denseclip_fpn_rn50_pre").eval()
    assert isinstance(pre.context_decoder, PreModelPrompter) and pre.gamma is None
    assert pre.text_encoder.contexts is None and pre.context_decoder.queries.shape == (1, 8, 32)
    with torch.no_grad():
        t = pre(torch.randn(2, 3, 64, 64))["text_embeddings"]
    assert not torch.allclose(t[0], t[1])  # contexts come from each image
    only = tiny("denseclip_fpn_rn50_prompt_only").eval()
    assert only.context_decoder is None and only.gamma is None and only.text_encoder.contexts is not None
    with torch.no_grad():
        t = only(torch.randn(2, 3, 64, 64))["text_embeddings"]
    torch.testing.assert_close(t[0], t[1])  # language prompt only: no image context
    full = tiny("denseclip_fpn_rn50")
    extra = sum(p.numel() for p in full.context_decoder.parameters()) + full.gamma.numel()
    assert count_parameters(full) - count_parameters(only) == extra


def test_timm_backbones():
    resnet = TimmBackbone("resnet18", output_dim=32).eval()
    swin = TimmBackbone(
        "swin_tiny_patch4_window7_224",
        output_dim=32,
        timm_kwargs=dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), img_size=64, strict_img_size=False),
    ).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        r, s = resnet(x), swin(x)
    assert [tuple(f.shape[1:]) for f in r["features"]] == [(64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]
    assert swin.channels_last
    assert [tuple(f.shape[1:]) for f in s["features"]] == [(32, 16, 24), (64, 8, 12), (128, 4, 6), (256, 2, 3)]
    for out in (r, s):
        assert out["global_embed"].shape == (2, 32) and out["dense_embed"].shape == (2, 32, 2, 3)
    assert resnet.attnpool.num_heads == 8 and swin.attnpool.num_heads == 4
    model = tiny("denseclip_fpn_timm", timm_model="resnet18").eval()
    with torch.no_grad():
        assert model(x)["logits"].shape == (2, 4, 16, 24)


def test_timm_weights_are_loaded_or_refused(tmp_path):
    import timm

    torch.manual_seed(3)
    reference = timm.create_model("resnet18").state_dict()
    torch.save(reference, tmp_path / "r18.pth")
    loaded = TimmBackbone("resnet18", str(tmp_path / "r18.pth")).trunk.state_dict()
    assert loaded and all(torch.equal(v, reference[k]) for k, v in loaded.items())
    with pytest.raises(RuntimeError, match="not found"):
        TimmBackbone("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="pretrained=False"):  # offline (HF_HUB_OFFLINE=1): refuse, never random
        TimmBackbone("resnet18", True)


def test_count_flops_on_tiny_model():
    model = tiny("denseclip_fpn_rn50")
    flops = count_flops(model, (64, 64))
    assert 0 < flops["gflops"] < flops["gflops_with_text_encoder"]
    # Text encoder, 1 layer of width 32: qkv + out (4 x 32^2) and MLP (8 x 32^2) per token, attention 2 x keys x 32
    # per token. [SOT] + 8 contexts run once (9 keys); the K=4 class names' 4 tokens each see 13 keys; then the
    # projection to 32 of the K EOT tokens.
    expected = 9 * (12 * 32 * 32 + 2 * 9 * 32) + 4 * (4 * (12 * 32 * 32 + 2 * 13 * 32) + 32 * 32)
    assert (flops["gflops_with_text_encoder"] - flops["gflops"]) * 1e9 == pytest.approx(expected, rel=1e-6)
    baseline = tiny("clip_fpn_rn50")
    f = count_flops(baseline, (64, 64))
    assert f["gflops"] == f["gflops_with_text_encoder"] > 0
    assert model.text_encoder.text_cache is None and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("arch", ["rn", "vit"])
def test_grad_checkpointing_gives_the_same_gradients(arch):
    name = "denseclip_fpn_vitb16" if arch == "vit" else "denseclip_fpn_rn50"
    model = tiny(name, arch).eval()  # eval: no dropout, BN on running statistics
    x, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))

    def grads():
        model.zero_grad()
        sum(model.losses(model(x), labels).values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.text_encoder.encoder.transformer.grad_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and "text_encoder.contexts" in ckpt
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def test_dropout_override():
    model = tiny("denseclip_fpn_rn50", dropout=0.0)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)}
    assert rates == {0.0}
    default = tiny("denseclip_fpn_rn50")
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)} == {0.1}


def test_flops_placeholder_classes_fit_the_prompt_context(caplog):
    """A config naming no classes is counted with placeholder names, which must not warn about truncation."""
    from clipdense.config import load_config
    from clipdense.evaluation.complexity import model_complexity

    cfg = load_config(None, ["model.name=denseclip_fpn_rn50", "model.overrides.clip_model=tiny-RN"])
    with caplog.at_level(logging.WARNING, logger="clipdense"):  # this module quiets it otherwise
        counts = model_complexity(cfg, size=64)
    assert counts.counts[0].gflops > 0 and "150 classes" in counts.format()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("name", ["denseclip_fpn_vitb16", "clip_fpn_vitb16", "ppl_fpn_vitb16"])
def test_paper_vit_configs_use_the_authors_class_embedding(name, monkeypatch):
    """DenseCLIP's CLIPVisionTransformer adds the class embedding twice; the paper ViT models do too."""
    from clipdense.models import registry

    seen = {}
    builder = {"denseclip": "build_denseclip", "clip": "build_clip_fpn", "ppl": "build_ppl"}[name.split("_")[0]]
    module = registry._MODELS[name].__module__
    monkeypatch.setattr(f"{module}.{builder}", lambda **kw: seen.update(kw))
    registry.create_model(name, num_classes=2, class_names=["a", "b"], pretrained=None)
    assert seen["class_embedding_twice"] is True and seen["clip_model"] == "ViT-B-16"
