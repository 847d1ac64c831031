"""Segmentation necks and heads used by DenseCLIP (Rao et al., CVPR 2022): Semantic FPN (Kirillov et
al., CVPR 2019) and UPerNet (Xiao et al., ECCV 2018), with mmsegmentation's semantics.

Convolution blocks are conv (no bias) -> BatchNorm -> ReLU; every head ends with Dropout2d(0.1)
and a 1x1 classifier.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> Conv2dNormActivation:
    """mmseg's ConvModule with BN and ReLU: conv (bias off) -> BatchNorm2d -> ReLU."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=nn.BatchNorm2d)


class FPN(FeaturePyramidNetwork):
    """Feature pyramid neck: lateral 1x1 convs, nearest-neighbour top-down sum, 3x3 output convs.

    torchvision's FeaturePyramidNetwork matches mmseg's ``FPN(in_channels, out_channels, num_outs=4)``
    (convs with bias, no norm, nearest upsampling to the lower level's size); this class only takes
    and returns lists.

    Args:
        in_channels: Channels of the input levels, finest first (DenseCLIP RN50: 256, 512, 1024, 2048 + K).
        out_channels: Channels of every output level (256).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__(list(in_channels), out_channels)
        self.in_channels = list(in_channels)
        self.out_channels = out_channels

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        """Args:
            features: Maps B x in_channels[i] x H_i x W_i, finest first.

        Returns:
            Maps B x out_channels x H_i x W_i, same sizes.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} levels, got {len(features)}")
        return list(super().forward(OrderedDict((str(i), f) for i, f in enumerate(features))).values())


class FPNHead(nn.Module):
    """Semantic FPN head: per-level scale heads upsampled to the finest level, summed, classified.

    Level i (stride 2^i times the finest) gets max(1, i) conv3x3-BN-ReLU blocks, each followed by x2
    bilinear upsampling for the coarser levels (1/1/2/3 blocks for strides 4/8/16/32).

    Args:
        in_channels: Channels of each input level (an int for all).
        channels: Width of the scale heads (256).
        num_classes: Output classes K.
        feature_strides: Strides of the input levels (4, 8, 16, 32).
        dropout: Dropout2d before the classifier (0.1).
        align_corners: For the bilinear resizes (False, as mmseg's configs).
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_classes: int,
        channels: int = 256,
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        strides = list(feature_strides)
        if isinstance(in_channels, int):
            in_channels = [in_channels] * len(strides)
        if len(in_channels) != len(strides):
            raise ValueError("in_channels and feature_strides must have the same length")
        self.feature_strides = strides
        self.align_corners = align_corners
        self.scale_heads = nn.ModuleList()
        for i, stride in enumerate(strides):
            length = max(1, int(math.log2(stride) - math.log2(strides[0])))
            blocks: list[nn.Module] = []
            for k in range(length):
                blocks.append(conv_bn_relu(in_channels[i] if k == 0 else channels, channels))
                if stride != strides[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args:
            features: Maps B x C_i x H/s_i x W/s_i, finest first.

        Returns:
            B x K x H/s_0 x W/s_0 logits (stride 4 for the default strides).
        """
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:], strict=True):
            out = out + F.interpolate(head(x), size=out.shape[2:], mode="bilinear", align_corners=self.align_corners)
        return self.conv_seg(self.dropout(out))


class PPM(nn.ModuleList):
    """Pyramid pooling: adaptive average pools at ``pool_scales``, each followed by conv1x1-BN-ReLU."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: B x C x h x w -> one B x channels x h x w map per pool scale."""
        size = x.shape[2:]
        return [F.interpolate(m(x), size=size, mode="bilinear", align_corners=self.align_corners) for m in self]


class UperNetHead(nn.Module):
    """UPerNet head with mmseg's ``UPerHead`` semantics.

    PPM on the coarsest level (pool scales 1/2/3/6) + bottleneck conv3x3 form the top lateral; the
    other levels get conv1x1 laterals; bilinear top-down sum; conv3x3 on each but the top; all levels
    resized to the finest and concatenated; conv3x3 fuse; dropout; 1x1 classifier.

    Args:
        in_channels: Channels of each input level, finest first.
        num_classes: Output classes K.
        channels: Width (512).
        pool_scales: PPM scales.
        dropout: Dropout2d before the classifier (0.1).
        align_corners: For the bilinear resizes.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, align_corners)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def _resize(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args:
            features: Maps B x C_i x H_i x W_i, finest first.

        Returns:
            B x K x H_0 x W_0 logits.
        """
        top = features[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [self._resize(x, size) for x in outs[1:]], dim=1))
        return self.conv_seg(self.dropout(fused))


__all__ = ["FPN", "FPNHead", "PPM", "UperNetHead", "conv_bn_relu"]
