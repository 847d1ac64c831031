"""Helpers the DenseCLIP (Rao et al., CVPR 2022) family builders share: class checks, CLIP backbones, decoders.

The builders and their ``@register_model`` names live in the family modules (``segmentors.py``,
``ppl.py``, ``maskclip_plus.py``, ``detectors.py``); this module holds only what several of them use.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from clipdense.models.backbones import CLIPResNetBackbone, CLIPViTBackbone
from clipdense.models.decoders import FPN, FPNHead, UperNetHead

# The tag used when create_model is called without ``pretrained``.
DEFAULT_PRETRAINED = "openai"


def with_defaults(defaults: dict, overrides: dict) -> dict:
    """A registered model's defaults, updated with the caller's overrides."""
    return {**defaults, **overrides}


def check_classes(class_names: Sequence[str] | None, num_classes: int | None, need_names: bool) -> list[str] | None:
    """Check that the class names and/or count agree.

    Args:
        class_names: K class names, or None.
        num_classes: K, or None.
        need_names: The model embeds the names with its text encoder, so they are required.

    Returns:
        The class names as a list, or None when only ``num_classes`` was given.

    Raises:
        ValueError: Names missing where needed, neither given, or the two disagree.
    """
    if class_names is None:
        if need_names:
            raise ValueError("DenseCLIP embeds the class names with its text encoder: pass class_names")
        if num_classes is None:
            raise ValueError("pass class_names or num_classes")
        return None
    class_names = list(class_names)
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names")
    return class_names


def clip_backbone(
    visual: nn.Module, with_embeddings: bool, input_resolution, drop_path, out_indices, twice, pos_interpolation
) -> CLIPResNetBackbone | CLIPViTBackbone:
    """The backbone over an open_clip image tower: :class:`CLIPResNetBackbone` for a ResNet (one with an
    attention pool), :class:`CLIPViTBackbone` otherwise (the ViT-only options are ignored for ResNets)."""
    if hasattr(visual, "attnpool"):
        return CLIPResNetBackbone(visual, with_embeddings=with_embeddings, input_resolution=input_resolution)
    return CLIPViTBackbone(
        visual,
        out_indices=out_indices,
        drop_path=drop_path,
        with_embeddings=with_embeddings,
        input_resolution=input_resolution,
        class_embedding_twice=twice,
        pos_interpolation=pos_interpolation,
    )


def build_decoder(
    kind: str, in_channels: list[int], k: int, fpn_channels: int, head_channels: int | None, dropout: float
) -> tuple[nn.Module, nn.Module]:
    """Neck and head of a segmentor: ``"fpn"`` (Semantic FPN) or ``"upernet"`` (identity neck, UPerNet head).

    Args:
        kind: ``"fpn"`` or ``"upernet"``.
        in_channels: Channels of the four pyramid levels the neck reads.
        k: Number of classes.
        fpn_channels: FPN width.
        head_channels: Head width (default: ``fpn_channels`` for FPN, 512 for UPerNet).
        dropout: Dropout before the classifier.
    """
    if kind == "fpn":
        head = FPNHead(fpn_channels, k, channels=head_channels or fpn_channels, dropout=dropout)
        return FPN(in_channels, fpn_channels), head
    if kind == "upernet":
        return nn.Identity(), UperNetHead(in_channels, k, channels=head_channels or 512, dropout=dropout)
    raise ValueError(f"unknown decoder '{kind}'; choose 'fpn' or 'upernet'")
