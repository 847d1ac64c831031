"""Full-resolution outputs from low-resolution class scores, one band of rows at a time.

Upsampling C class maps to a 27-megapixel photo and taking the softmax there needs C x H x W floats
several times over (7.7 GB for 20 classes). The per-pixel outputs users keep (label, top probability,
entropy) are H x W, so :func:`reduce_in_bands` upsamples and reduces a band of rows at a time: peak
memory is the low-resolution scores, the H x W outputs and one C x band x W block. The result equals the
untiled computation (:func:`upsample_rows` reproduces ``F.interpolate(..., mode="bilinear",
align_corners=False)`` row by row), up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BAND_ELEMENTS = 1 << 22
"""Floats in one C x band x W block (16 MB): bands hold ``max(1, BAND_ELEMENTS // (C * W))`` rows."""


def upsample_rows(x: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``F.interpolate(x, size, mode="bilinear", align_corners=False)``, computing no others.

    Args:
        x: N x C x h x w maps.
        size: The full output size (H, W).
        start, stop: The output rows wanted, ``0 <= start < stop <= H``.

    Returns:
        N x C x (stop - start) x W.
    """
    h = x.shape[-2]
    # PyTorch's source row of output row i: (i + 0.5) * h / H - 0.5, clamped at 0; then linear between rows
    src = ((torch.arange(start, stop, device=x.device, dtype=torch.float32) + 0.5) * (h / size[0]) - 0.5).clamp_min(0)
    top = src.floor().long().clamp_max(h - 1)
    weight = (src - top).view(-1, 1)
    rows = torch.lerp(x[..., top, :], x[..., (top + 1).clamp_max(h - 1), :], weight.to(x.dtype))
    # the rows are at their final positions: the height "interpolation" below copies them exactly
    return F.interpolate(rows, size=(stop - start, size[1]), mode="bilinear", align_corners=False)


@dataclass
class Reduced:
    """Per-pixel outputs of :func:`reduce_in_bands`.

    Attributes:
        labels: H x W int64 most probable class.
        confidence: H x W float probability of that class.
        entropy: H x W float entropy of the class distribution (nats), if asked for.
        probs: C x H x W float probabilities, if asked for.
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor | None = None
    probs: torch.Tensor | None = None


def reduce_in_bands(
    band_probs: Callable[[int, int], torch.Tensor],
    size: tuple[int, int],
    num_classes: int,
    *,
    entropy: bool = False,
    keep_probs: bool = False,
    device: torch.device | str = "cpu",
    band_elements: int | None = None,
) -> Reduced:
    """Labels, top probability (and entropy, probabilities) of a full-size image, band by band.

    Args:
        band_probs: ``band_probs(start, stop)`` gives the C x (stop - start) x W class probabilities of
            those rows (see :func:`upsample_rows`).
        size: The image size (H, W).
        num_classes: C.
        entropy: Also compute the per-pixel entropy.
        keep_probs: Also keep the C x H x W probabilities (the memory this function otherwise saves).
        device: Where the outputs are kept.
        band_elements: Floats per C x band x W block (default :data:`BAND_ELEMENTS`).

    Returns:
        The outputs on ``device``.
    """
    height, width = size
    rows = max(1, (band_elements or BAND_ELEMENTS) // max(1, num_classes * width))
    out = Reduced(
        labels=torch.empty(size, dtype=torch.long, device=device),
        confidence=torch.empty(size, device=device),
        entropy=torch.empty(size, device=device) if entropy else None,
        probs=torch.empty(num_classes, *size, device=device) if keep_probs else None,
    )
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        probs = band_probs(start, stop)
        top, labels = probs.max(dim=0)
        out.labels[start:stop], out.confidence[start:stop] = labels, top
        if out.entropy is not None:
            out.entropy[start:stop] = -torch.special.xlogy(probs, probs).sum(0)
        if out.probs is not None:
            out.probs[:, start:stop] = probs
    return out
