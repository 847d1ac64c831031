"""Semantic FPN neck/head and UPerNet head: mmseg semantics, output strides and sizes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipdense.models import FPN, FPNHead, UperNetHead

SIZES = [(16, 24), (8, 12), (4, 6), (2, 3)]  # strides 4..32 of a 64 x 96 image


def pyramid(channels, batch=2):
    torch.manual_seed(0)
    return [torch.randn(batch, c, *s) for c, s in zip(channels, SIZES, strict=True)]


def test_fpn_equals_lateral_nearest_topdown_output_convs():
    fpn = FPN([8, 16, 32, 40], 12).eval()
    feats = pyramid([8, 16, 32, 40])
    with torch.no_grad():
        out = fpn(feats)
        laterals = [blk[0](x) for blk, x in zip(fpn.inner_blocks, feats, strict=True)]
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        ref = [blk[0](x) for blk, x in zip(fpn.layer_blocks, laterals, strict=True)]
    assert [tuple(o.shape) for o in out] == [(2, 12, *s) for s in SIZES]
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r)
    # mmseg's FPN: 1x1 laterals and 3x3 outputs, both with bias, no norm.
    assert all(blk[0].kernel_size == (1, 1) and blk[0].bias is not None for blk in fpn.inner_blocks)
    assert all(blk[0].kernel_size == (3, 3) and blk[0].bias is not None for blk in fpn.layer_blocks)
    with pytest.raises(ValueError, match="4 levels"):
        fpn(feats[:3])


def test_fpn_head_structure_and_stride_4():
    head = FPNHead(256, num_classes=150, channels=256)
    convs = [[m for m in h.modules() if isinstance(m, nn.Conv2d)] for h in head.scale_heads]
    assert [len(c) for c in convs] == [1, 1, 2, 3]
    assert all(c.kernel_size == (3, 3) and c.bias is None for cs in convs for c in cs)
    ups = [[m for m in h if isinstance(m, nn.Upsample)] for h in head.scale_heads]
    assert [len(u) for u in ups] == [0, 1, 2, 3] and all(
        u.scale_factor == 2 and u.mode == "bilinear" for us in ups for u in us
    )
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.conv_seg.kernel_size == (1, 1) and head.conv_seg.out_channels == 150
    # 7 conv3x3 (no bias) + 7 BN + classifier.
    assert sum(p.numel() for p in head.parameters()) == 7 * (9 * 256 * 256 + 2 * 256) + 256 * 150 + 150
    small = FPNHead(16, num_classes=5, channels=8).eval()
    with torch.no_grad():
        logits = small(pyramid([16] * 4))
    assert logits.shape == (2, 5, 16, 24)  # stride 4


def test_fpn_head_sums_scale_heads():
    head = FPNHead([4, 4, 4, 4], num_classes=3, channels=6).eval()
    feats = pyramid([4] * 4)
    with torch.no_grad():
        total = head.scale_heads[0](feats[0])
        for h, x in zip(head.scale_heads[1:], feats[1:], strict=True):
            total = total + F.interpolate(h(x), size=(16, 24), mode="bilinear", align_corners=False)
        torch.testing.assert_close(head(feats), head.conv_seg(total))


def test_upernet_head_shapes_and_structure():
    head = UperNetHead([8, 16, 32, 40], num_classes=5, channels=12).eval()
    assert [m[0].output_size for m in head.psp_modules] == [1, 2, 3, 6]
    assert head.bottleneck[0].in_channels == 40 + 4 * 12
    assert head.fpn_bottleneck[0].in_channels == 4 * 12
    assert len(head.lateral_convs) == len(head.fpn_convs) == 3
    with torch.no_grad():
        ppm = head.psp_modules(torch.randn(2, 40, 2, 3))
        logits = head(pyramid([8, 16, 32, 40]))
    assert [tuple(p.shape) for p in ppm] == [(2, 12, 2, 3)] * 4
    assert logits.shape == (2, 5, 16, 24)
    assert UperNetHead([256, 512, 1024, 2048], num_classes=150).conv_seg.in_channels == 512
