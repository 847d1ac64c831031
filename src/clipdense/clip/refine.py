"""MaskCLIP's refinements of dense CLIP scores (Zhou et al., ECCV 2022, Sec. 3.2): prompt denoising
and key smoothing.

They sit in the CLIP layer, beside the dense features they refine, because both the predictors
(inference) and the MaskCLIP+ teacher (a model) apply them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Temperature MaskCLIP uses inside its refinements (prompt denoising, key smoothing).
REFINE_SCALE = 100.0


def prompt_denoise(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP prompt denoising: drop classes that are confident nowhere in the image.

    Args:
        scores: B x C x h x w cosine scores.
        threshold: A class whose max over pixels of softmax(100 * scores) is below it gets -100.
    """
    conf = F.softmax(scores * REFINE_SCALE, dim=1).flatten(2).amax(dim=2)  # B x C
    return scores.masked_fill((conf < threshold)[:, :, None, None], -100.0)


def key_smoothing(scores: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP key smoothing: low-confidence pixels take the key-affinity-weighted class
    probabilities of all pixels, P_i <- sum_j (k_i . k_j) P_j with l2-normalised keys.

    Args:
        scores: B x C x h x w cosine scores.
        keys: B x Ck x h x w keys of the last attention.
        threshold: Pixels whose max of softmax(100 * scores) is below it are smoothed.

    Returns:
        B x C x h x w scores s' with softmax(100 * s') equal to the smoothed (renormalised)
        probabilities; unsmoothed pixels keep their probabilities exactly.
    """
    b, c, h, w = scores.shape
    probs = F.softmax(scores * REFINE_SCALE, dim=1).flatten(2)  # B x C x N
    k = F.normalize(keys.flatten(2), dim=1)  # B x Ck x N
    smoothed = probs @ (k.transpose(1, 2) @ k)  # sum_j P_j W_ji
    low = probs.amax(dim=1, keepdim=True) < threshold
    probs = torch.where(low, smoothed, probs).clamp_min(1e-12)
    probs = probs / probs.sum(dim=1, keepdim=True)
    return (probs.log() / REFINE_SCALE).view(b, c, h, w)
