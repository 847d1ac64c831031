"""Parameter and FLOP counts of DenseCLIP (Rao et al., CVPR 2022), PPL and baselines, as the papers' tables do.

The frozen CLIP text encoder is left out by default (its output is cached after training); learned
contexts, context decoders and gamma are counted. FLOPs are multiply-adds (fvcore's convention).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _frozen_text_parameters(model: nn.Module) -> set[int]:
    text = getattr(model, "text_encoder", None)
    encoder = getattr(text, "encoder", None)
    return {id(p) for p in encoder.parameters()} if encoder is not None else set()


def count_parameters(model: nn.Module, include_text_encoder: bool = False) -> int:
    """Parameters of a model as the paper counts them.

    Args:
        model: A segmentor.
        include_text_encoder: Count the frozen CLIP text encoder too. The paper does not (its output
            is cached after training); learned contexts, context decoder and gamma are counted.

    Returns:
        Number of parameters (shared parameters once).
    """
    frozen = set() if include_text_encoder else _frozen_text_parameters(model)
    return sum(p.numel() for p in model.parameters() if id(p) not in frozen)


def count_flops(model: nn.Module, size: tuple[int, int] = (1024, 1024)) -> dict[str, float]:
    """GFLOPs of one forward pass, as multiply-adds (fvcore's convention, used by the paper).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls, attention) on a
    meta-device copy of the model, so nothing is computed; its count (2 per multiply-add) is halved.

    Args:
        model: A segmentor, or a detector (then its ``forward_dummy``: backbone, FPN and heads).
        size: Input (H, W).

    Returns:
        ``gflops``: without the text encoder (cached text embeddings; for pre-model prompting, which
        runs the encoder per image, the encoder's share is subtracted) and
        ``gflops_with_text_encoder``.
    """
    meta = copy.deepcopy(model).eval().to("meta").requires_grad_(False)
    text = getattr(meta, "text_encoder", None)
    if text is not None:
        text.clear_text_cache()
    images = torch.empty(1, 3, *size, device="meta")
    forward = getattr(meta, "forward_dummy", meta)  # detectors: the dense part (NMS etc. need real data)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(images)
    total = counter.get_total_flops()
    text_flops = 0
    if text is not None:
        suffix = ".text_encoder"
        for name, ops in counter.get_flop_counts().items():
            if name.endswith(suffix):
                text_flops = sum(ops.values())
    return {"gflops": (total - text_flops) / 2e9, "gflops_with_text_encoder": total / 2e9}


__all__ = ["count_flops", "count_parameters"]
