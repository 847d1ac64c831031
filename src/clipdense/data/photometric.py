"""mmseg's ``PhotoMetricDistortion`` colour arithmetic on uint8 tensors, without OpenCV.

mmseg (the DenseCLIP, PPL and MaskCLIP+ training pipelines) scales contrast as ``a * img`` and saturation and hue
in OpenCV's 8-bit HSV (hue 0-179, saturation and value 0-255), truncating to uint8 after each step. The 8-bit
HSV conversions here are OpenCV's integer ``RGB2HSV_b`` (division tables with a 12-bit shift: equal to
``cv2.cvtColor``) and the vector loop of its float ``HSV2RGB_b`` (sector formula, truncated to uint8: within one
level of ``cv2.cvtColor``, whose scalar tail rounds and which may dispatch to IPP; a few values in a thousand
differ). ``tests/data/test_transforms.py`` checks both, and the whole distortion, against mmseg's steps on OpenCV.
"""

from __future__ import annotations

import torch

_SHIFT = 12


def _division_table(numerator: float) -> torch.Tensor:
    """OpenCV's ``saturate_cast<int>(numerator / i)`` for i in 0..255 (0 at 0; no exact halves occur here)."""
    i = torch.arange(256, dtype=torch.float64).clamp(min=1)
    table = torch.floor(numerator / i + 0.5).long()
    table[0] = 0
    return table


_SDIV = _division_table(255 << _SHIFT)  # saturation: (255 << 12) / v
_HDIV = _division_table((180 << _SHIFT) / 6)  # hue: (180 << 12) / (6 diff)


def rgb_to_hsv8(image: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``COLOR_RGB2HSV`` on uint8: 3 x H x W RGB -> 3 x H x W (hue 0-179, saturation, value) uint8."""
    r, g, b = image.long().unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_SHIFT - 1)
    s = (diff * _SDIV.to(image.device)[v] + half) >> _SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.div(h * _HDIV.to(image.device)[diff] + half, 1 << _SHIFT, rounding_mode="floor")
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).to(torch.uint8)


def hsv8_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``COLOR_HSV2RGB`` on uint8 (hue 0-179): its vectorised float32 sector formula, truncated to uint8.

    (OpenCV's scalar loop, which handles the last few pixels of a call, rounds instead: one level apart at most.)
    """
    h = hsv[0].float() * torch.tensor(6.0 / 180.0, dtype=torch.float32)
    s = hsv[1].float() * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    v = hsv[2].float() * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    h = torch.where(h >= 6, h - 6, h)
    sector = torch.floor(h).long().clamp(0, 5)
    f = h - sector
    tab = torch.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))])  # 4 x H x W
    # OpenCV's sector_data gives (b, g, r) indices into tab per sector; here (r, g, b)
    order = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=hsv.device)
    idx = order[sector].permute(2, 0, 1)  # 3 x H x W
    return (torch.gather(tab, 0, idx) * 255).clamp_(0, 255).to(torch.uint8)  # truncated, as the SIMD path


def scale_uint8(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """mmseg's ``convert``: ``clip(float32(values) * alpha, 0, 255)`` truncated to uint8."""
    return (values.float() * alpha).clamp_(0, 255).to(torch.uint8)


def mmseg_contrast(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """3 x H x W uint8 -> ``a * img`` (mmseg scales; it does not blend with the mean grey)."""
    return scale_uint8(image, alpha)


def mmseg_saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """3 x H x W uint8 RGB -> the S channel of OpenCV's 8-bit HSV scaled by ``alpha``."""
    hsv = rgb_to_hsv8(image)
    hsv[1] = scale_uint8(hsv[1], alpha)
    return hsv8_to_rgb(hsv)


def mmseg_hue(image: torch.Tensor, delta: int) -> torch.Tensor:
    """3 x H x W uint8 RGB -> OpenCV's 8-bit hue shifted by the integer ``delta``, modulo 180."""
    hsv = rgb_to_hsv8(image)
    hsv[0] = ((hsv[0].long() + int(delta)) % 180).to(torch.uint8)
    return hsv8_to_rgb(hsv)
