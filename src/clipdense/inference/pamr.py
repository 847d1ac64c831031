"""PAMR, Pixel-Adaptive Mask Refinement (Araslanov & Roth, CVPR 2020).

PAMR, from "Single-Stage Semantic Segmentation from Image Labels", sharpens coarse class maps along image edges:
each pixel's affinity to its 8 neighbours at a few dilations is computed from the image colours, and the masks
are averaged over those neighbours, weighted by affinity, ``num_iter`` times. It has no learned parameters.

Training-free open-vocabulary segmenters use it as a post-processing step; NACLIP (Hajimiri et al., WACV 2025,
``naclip.py``, which ships the authors' ``pamr.py`` unchanged) calls it with 10 iterations and dilations (8, 16):
the sliding-window cosine-similarity logits (K queries, before the logit scale and softmax) are bilinearly
upsampled to the original image size, the normalised network input is bilinearly resized to that same size
(``align_corners=False``), and ``PAMR(image, logits)`` runs there, before ``softmax(40 * logits)``::

    logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    image = F.interpolate(image, size=(H, W), mode="bilinear", align_corners=False)
    logits = PAMR(num_iter=10, dilations=(8, 16))(image, logits)

The affinity is unchanged by a per-channel affine change of the image (``a * x + b``, ``a != 0``; up to the
official ``1e-8``), so the image may be given raw (0..255) or normalised with any mean and std, RGB or BGR.

The computation reproduces ``models/mods/pamr.py`` of github.com/visinf/1-stage-wseg. One deliberate difference:
the official ``forward`` first resizes the masks to the image size (``bilinear, align_corners=True``); both of
its callers (1-stage-wseg and NACLIP) already pass equal sizes, so here different sizes are an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_UNIT_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(
    padded: torch.Tensor, pad: int, offsets: list[tuple[int, int]], size: tuple[int, int]
) -> list[torch.Tensor]:
    """Views of a replicate-padded map shifted by each offset.

    Args:
        padded: ... x (H + 2 * pad) x (W + 2 * pad), padded by ``pad`` on every side with ``mode="replicate"``.
        pad: The padding; every offset must be at most ``pad`` in absolute value.
        offsets: (dy, dx) pairs.
        size: (H, W).

    Returns:
        One ... x H x W view per offset: entry (i, j) of view (dy, dx) is pixel (i + dy, j + dx) of the unpadded
        map, coordinates clamped to the image (what replicate padding does).
    """
    h, w = size
    return [padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets]


class PAMR(nn.Module):
    """Pixel-Adaptive Mask Refinement: affinity-weighted averaging of masks over image-dependent neighbourhoods.

    For each pixel i and its P = 8 * len(dilations) neighbours j (the 8 pixels at distance d in rows/columns
    for each dilation d, coordinates clamped at the border), per image channel c::

        k_c(i, j) = -|x_c(i) - x_c(j)| / (1e-8 + 0.1 * std_c(i))
        a(i, :) = softmax_j(mean_c k_c(i, j))
        m(i) <- sum_j a(i, j) * m(j)          (num_iter times; i itself is not among its neighbours)

    where ``std_c(i)`` is the unbiased standard deviation of the 9 * len(dilations) values made of the
    3 x 3 window at each dilation (pixel i counted once per dilation), as in the official code.

    Args:
        num_iter: Propagation steps; 0 returns the masks unchanged. NACLIP's value is the default (the official
            module defaults to 1; 1-stage-wseg's config uses 10).
        dilations: Neighbourhood distances in pixels. NACLIP's value is the default (1-stage-wseg uses
            1, 2, 4, 8, 12, 24).
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError(f"num_iter must be >= 0, got {num_iter}")
        if not dilations or any(int(d) != d or d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {dilations!r}")
        self.num_iter = num_iter
        self.dilations = tuple(int(d) for d in dilations)
        self._offsets = [(dy * d, dx * d) for d in self.dilations for dy, dx in _UNIT_OFFSETS]

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised affinity of every pixel to its neighbours.

        Args:
            image: B x C x H x W floating-point image.

        Returns:
            B x P x H x W, P = 8 * len(dilations), non-negative and summing to 1 over P. Neighbour p is at offset
            ``(dy * d, dx * d)`` for dilation ``d = dilations[p // 8]`` and ``(dy, dx)`` the p % 8-th of
            (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1): the official order.
        """
        pad = max(self.dilations)
        padded = F.pad(image, [pad] * 4, mode="replicate")
        neighbours = torch.stack(_shifted(padded, pad, self._offsets, image.shape[-2:]), dim=2)  # B x C x P x H x W
        centre = image.unsqueeze(2)
        windows = torch.cat([centre.expand(-1, -1, len(self.dilations), -1, -1), neighbours], dim=2)
        std = windows.std(dim=2, keepdim=True)
        kernel = -(centre - neighbours).abs() / (1e-8 + 0.1 * std)
        return kernel.mean(dim=1).softmax(dim=1)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Refines masks along the image's edges.

        Args:
            image: B x C x H x W image (any scale or normalisation, see the module docstring); integer images
                are converted to ``masks.dtype``.
            masks: B x K x H x W floating-point class scores (NACLIP passes logits) or probabilities.

        Returns:
            B x K x H x W refined masks, each pixel a convex combination of its neighbours' previous values
            (so probabilities stay probabilities).
        """
        if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(
                f"expected image B x C x H x W and masks B x K x H x W, got {tuple(image.shape)} and "
                f"{tuple(masks.shape)}"
            )
        if image.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"image is {tuple(image.shape[-2:])} but masks are {tuple(masks.shape[-2:])}: resize one "
                "to the other first (NACLIP resizes both to the original image size)"
            )
        if not image.is_floating_point():
            image = image.to(masks.dtype)
        if self.num_iter == 0:
            return masks

        aff = self.affinity(image).to(masks.dtype)
        pad, size = max(self.dilations), masks.shape[-2:]
        # accumulate one neighbour at a time: peak memory is a few K x H x W maps, never K x P x H x W
        for _ in range(self.num_iter):
            neighbours = _shifted(F.pad(masks, [pad] * 4, mode="replicate"), pad, self._offsets, size)
            refined = torch.zeros_like(masks)
            for p, neighbour in enumerate(neighbours):
                refined.addcmul_(neighbour, aff[:, p : p + 1])
            masks = refined
        return masks

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"
