"""MaskCLIP's refinements of dense CLIP scores (Zhou et al., ECCV 2022, Sec. 3.2): prompt denoising
and key smoothing, with the arithmetic of the authors' ``MaskClipHead.refine_output``.

They sit in the CLIP layer, beside the dense features they refine, because both the predictors
(inference) and the MaskCLIP+ guide (a model) apply them.

The official head returns cosine scores when only prompt denoising is on, and *probabilities* (``softmax(100 *
scores)``, then smoothed) when key smoothing is on; whatever it returns is what gets upsampled and averaged over
windows, and mmseg's final softmax is applied to that. :func:`key_smoothing` therefore returns probabilities.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

# Temperature MaskCLIP uses inside its refinements (prompt denoising, key smoothing).
REFINE_SCALE = 100.0

#: How keys are l2-normalised before their affinities are taken (see :func:`key_smoothing`).
KEY_NORMS: tuple[str, ...] = ("official", "cosine")


def prompt_denoise(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP prompt denoising: drop classes that are confident nowhere in the image.

    Args:
        scores: B x C x h x w cosine scores.
        threshold: A class whose max over pixels of softmax(100 * scores) is below it gets -100.

    Returns:
        B x C x h x w scores, -100 for the dropped classes.
    """
    conf = F.softmax(scores * REFINE_SCALE, dim=1).flatten(2).amax(dim=2)  # B x C
    return scores.masked_fill((conf < threshold)[:, :, None, None], -100.0)


def key_smoothing(
    scores: torch.Tensor, keys: torch.Tensor, threshold: float, key_norm: Literal["official", "cosine"] = "official"
) -> torch.Tensor:
    """MaskCLIP key smoothing: low-confidence pixels take the key-affinity-weighted class probabilities
    of all pixels, P_i <- sum_j w_ij P_j with P = softmax(100 * scores) and w_ij = k_i . k_j.

    Args:
        scores: B x C x h x w cosine scores (after prompt denoising, if any).
        keys: B x Ck x h x w keys of the last attention.
        threshold: Pixels whose max of P is below it are smoothed (1.0: every pixel that is not one-hot).
        key_norm: ``official``: each key *channel* is l2-normalised over the h*w positions, as the authors' code
            does (``F.normalize(k, p=2)`` on an N x HW x C tensor normalises dim 1); ``cosine``: each pixel's key is
            l2-normalised, so w_ij is the cosine similarity the paper's formula names.

    Returns:
        B x C x h x w probabilities P, the smoothed pixels replaced by sum_j w_ij P_j as computed (neither clamped
        nor renormalised: with ``official`` weights they need not sum to 1 or stay non-negative).
    """
    if key_norm not in KEY_NORMS:
        raise ValueError(f"unknown key_norm {key_norm!r}; choose one of {KEY_NORMS}")
    b, c, h, w = scores.shape
    probs = F.softmax(scores * REFINE_SCALE, dim=1).flatten(2)  # B x C x N
    k = F.normalize(keys.flatten(2), dim=2 if key_norm == "official" else 1)  # B x Ck x N
    smoothed = probs @ (k.transpose(1, 2) @ k)  # sum_j P_j w_ji, w symmetric
    low = probs.amax(dim=1, keepdim=True) < threshold
    return torch.where(low, smoothed, probs).view(b, c, h, w)
