"""Dense CLIP encoders against open_clip's own forward and against each mode's formula."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipdense.clip.dense import (
    MODES,
    DenseResNetCLIP,
    DenseViTCLIP,
    dense_clip_encoder,
    gaussian_neighbourhood_bias,
    resize_grid_embedding,
)

NATIVE = {"tiny-RN": 64, "tiny-ViT": 32}


@pytest.fixture(scope="module")
def models(tiny_configs):
    out = {}
    for name in NATIVE:
        torch.manual_seed(0)
        out[name] = open_clip.create_model(name).eval()
    return out


@pytest.mark.parametrize("name", sorted(NATIVE))
@pytest.mark.parametrize("mode", MODES)
def test_global_embedding_equals_open_clip(models, name, mode):
    model = models[name]
    x = torch.randn(2, 3, NATIVE[name], NATIVE[name])
    with torch.no_grad():
        ref = model.encode_image(x)
        out = dense_clip_encoder(model.visual, mode)(x)
    torch.testing.assert_close(out.global_embed, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_positional_interpolation_is_identity_at_native_size(mode):
    pos = torch.randn(7 * 7 + 1, 16)
    assert resize_grid_embedding(pos, (7, 7), mode) is pos
    # The shortcut is exact: interpolating to the same grid returns the input.
    grid = pos[1:].reshape(1, 7, 7, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(F.interpolate(grid, size=(7, 7), mode=mode, align_corners=False), grid)
    resized = resize_grid_embedding(pos, (5, 9), mode)
    assert resized.shape == (5 * 9 + 1, 16) and torch.equal(resized[0], pos[0])


def test_any_input_size_is_padded_to_the_stride(models):
    for name, stride in (("tiny-RN", 32), ("tiny-ViT", 8)):
        out = dense_clip_encoder(models[name].visual, "maskclip")(torch.randn(1, 3, 45, 70))
        assert out.padded_size == (math.ceil(45 / stride) * stride, math.ceil(70 / stride) * stride)
        assert out.dense.shape[-2:] == (math.ceil(45 / stride), math.ceil(70 / stride))
        assert out.keys.shape[-2:] == out.dense.shape[-2:]


def _resnet_c5(visual, x):
    x = visual.stem(x)
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def test_resnet_maskclip_is_value_path(models):
    visual = models["tiny-RN"].visual
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        out = DenseResNetCLIP(visual, "maskclip")(x)
        c5 = _resnet_c5(visual, x)
        pool = visual.attnpool
        for i, j in [(0, 0), (2, 1), (1, 1)]:
            expected = pool.c_proj(pool.v_proj(c5[0, :, i, j]))
            torch.testing.assert_close(out.dense[0, :, i, j], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.keys[0, :, i, j], pool.k_proj(c5[0, :, i, j]), atol=1e-5, rtol=0)


def test_resnet_vanilla_is_attention_pool_with_all_queries(models):
    """DenseCLIP's z: open_clip's pool computation, keeping every token's output instead of token 0."""
    visual = models["tiny-RN"].visual
    pool = visual.attnpool
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = DenseResNetCLIP(visual, "vanilla")(x)
        c5 = _resnet_c5(visual, x)
        t = c5.flatten(2).permute(2, 0, 1)
        t = torch.cat([t.mean(0, keepdim=True), t]) + pool.positional_embedding[:, None]
        in_bias = torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias])
        ref, _ = F.multi_head_attention_forward(
            t, t, t, t.shape[-1], pool.num_heads, None, in_bias, None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, use_separate_proj_weight=True,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            training=False, need_weights=False,
        )  # fmt: skip
    dense_ref = ref[1:].permute(1, 2, 0).reshape(2, -1, 2, 2)
    torch.testing.assert_close(out.dense, dense_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.global_embed, ref[0], atol=1e-5, rtol=0)


def _heads(t, n):
    b, length, c = t.shape
    return t.view(b, length, n, c // n).transpose(1, 2)


def _vit_reference(visual, x, mode):
    """Each mode's last block written out from its formula, on open_clip's own first blocks."""
    captured = {}
    last = visual.transformer.resblocks[-1]
    hook = last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    visual(x)
    hook.remove()
    tokens = captured["x"]
    attn = last.attn
    y = last.ln_1(tokens)
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    n = attn.num_heads
    q, k, v = _heads(y @ wq.T + bq, n), _heads(y @ wk.T + bk, n), _heads(y @ wv.T + bv, n)
    d = q.shape[-1]
    soft = lambda a, b_, bias=0: torch.softmax(a @ b_.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)  # noqa: E731
    g = int(math.sqrt(tokens.shape[1] - 1))
    if mode == "maskclip":
        heads_out = v
    elif mode == "sclip":
        heads_out = (soft(q, q) + soft(k, k)) @ v
    elif mode == "clearclip":
        heads_out = soft(q, q) @ v
    elif mode == "naclip":
        pos = torch.tensor([(i, j) for i in range(g) for j in range(g)], dtype=torch.float32)
        gauss = torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * 5.0**2))
        bias = torch.zeros(g * g + 1, g * g + 1)
        bias[1:, 1:] = gauss
        heads_out = soft(k, k, bias) @ v
    else:  # vanilla, clearclip_qk
        heads_out = soft(q, k) @ v
    out = attn.out_proj(heads_out.transpose(1, 2).reshape(tokens.shape))
    if mode in ("clearclip", "clearclip_qk", "naclip"):
        z = out
    else:
        z = tokens + out
        z = z + last.mlp(last.ln_2(z))
    z = visual.ln_post(z) @ visual.proj
    return z[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, g, g)


@pytest.mark.parametrize("mode", MODES)
def test_vit_modes_match_their_formulas(models, mode):
    visual = models["tiny-ViT"].visual
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = DenseViTCLIP(visual, mode)(x)
        ref = _vit_reference(visual, x, mode)
    torch.testing.assert_close(out.dense, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["maskclip", "sclip"])
def test_vit_keys_are_maskclips_projected_keys(models, mode):
    """MaskCLIP's ViT backbone (mmseg/models/backbones/vit.py, return_qkv) passes q, k and v of the last block
    through the attention's out_proj; its head smooths with those keys."""
    visual = models["tiny-ViT"].visual
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    last = visual.transformer.resblocks[-1]
    hook = last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        visual(x)
        hook.remove()
        out = DenseViTCLIP(visual, mode)(x)
        y = last.ln_1(captured["x"])
        _, wk, _ = last.attn.in_proj_weight.chunk(3)
        _, bk, _ = last.attn.in_proj_bias.chunk(3)
        k = (y @ wk.T + bk) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    torch.testing.assert_close(out.keys, k[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip"])
def test_resnet_attention_modes(models, mode):
    """On the ResNet pool, the modes change only the attention (the pool has no residual or MLP)."""
    visual = models["tiny-RN"].visual
    pool = visual.attnpool
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = DenseResNetCLIP(visual, mode)(x)
        c5 = _resnet_c5(visual, x)
        t = c5.flatten(2).transpose(1, 2)
        t = torch.cat([t.mean(1, keepdim=True), t], 1) + pool.positional_embedding
        n = pool.num_heads
        q, k, v = (_heads(p(t), n) for p in (pool.q_proj, pool.k_proj, pool.v_proj))
        d = q.shape[-1]
        soft = lambda a, b_, bias=0: torch.softmax(a @ b_.transpose(-1, -2) / math.sqrt(d) + bias, -1)  # noqa: E731
        bias = gaussian_neighbourhood_bias((2, 2), 5.0)
        a = {"sclip": soft(q, q) + soft(k, k), "clearclip": soft(q, q), "naclip": soft(k, k, bias)}[mode]
        ref = pool.c_proj((a @ v).transpose(1, 2).reshape(t.shape[0], t.shape[1], -1))[:, 1:]
    torch.testing.assert_close(out.dense.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=0)


def test_gaussian_bias_values():
    bias = gaussian_neighbourhood_bias((3, 4), std=2.0)
    assert bias.shape == (13, 13)
    assert torch.all(bias[0] == 0) and torch.all(bias[:, 0] == 0)
    # patch (0,0) -> index 1, patch (1,2) -> index 1 + 4 + 2
    assert bias[1, 1] == 1.0
    assert math.isclose(bias[1, 7].item(), math.exp(-(1 + 4) / 8), rel_tol=1e-6)


def test_vit_stage_maps_are_block_outputs(models):
    visual = models["tiny-ViT"].visual
    enc = DenseViTCLIP(visual, "vanilla", out_indices=(0, 1))
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        out = enc(x)
    assert [s.shape for s in out.stages] == [torch.Size([1, 64, 5, 6])] * 2


def test_unknown_mode_is_rejected(models):
    with pytest.raises(ValueError, match="unknown dense mode"):
        dense_clip_encoder(models["tiny-RN"].visual, "bogus")


def test_scale_rule_reproduces_dinos_interpolate_pos_encoding():
    """SCLIP/ClearCLIP/NACLIP: interpolate with scale_factor (w0 + 0.1) / sqrt(N), not to an exact size."""
    torch.manual_seed(0)
    pos = torch.randn(14 * 14 + 1, 8)
    h0, w0 = 320 // 16, 448 // 16  # a 320 x 448 input, ViT-B/16
    # the official code, written out: (1, C, 14, 14) -> bicubic with the +0.1 scale factors
    grid = pos[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    official = F.interpolate(grid, scale_factor=((h0 + 0.1) / 14, (w0 + 0.1) / 14), mode="bicubic")
    assert official.shape[-2:] == (h0, w0)
    official = torch.cat([pos[:1], official.permute(0, 2, 3, 1).reshape(h0 * w0, 8)])
    torch.testing.assert_close(resize_grid_embedding(pos, (h0, w0), "bicubic", "scale"), official)
    by_size = resize_grid_embedding(pos, (h0, w0), "bicubic", "size")
    assert (by_size - official).norm() / official.norm() > 0.05  # the rules differ visibly
    with pytest.raises(ValueError, match="unknown resize rule"):
        resize_grid_embedding(pos, (h0, w0), "bicubic", "round")


def test_each_vit_mode_resizes_as_its_official_code(models):
    visual = models["tiny-ViT"].visual
    expected = {
        "maskclip": "size",
        "vanilla": "size",
        "sclip": "scale",
        "clearclip": "scale",
        "naclip": "scale",
        "clearclip_qk": "scale",
    }
    for mode, rule in expected.items():
        assert dense_clip_encoder(visual, mode).pos_resize == rule
    assert dense_clip_encoder(visual, "sclip", pos_resize="size").pos_resize == "size"
    x = torch.randn(1, 3, 40, 72)  # not the native grid
    a = dense_clip_encoder(visual, "sclip")(x).dense
    b = dense_clip_encoder(visual, "sclip", pos_resize="size")(x).dense
    assert not torch.allclose(a, b)
