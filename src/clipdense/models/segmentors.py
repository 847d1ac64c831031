"""DenseCLIP (Rao et al., CVPR 2022) semantic segmentors and the paper's CLIP + Semantic FPN baseline.

Both map B x 3 x H x W images to a dict with ``logits`` (B x K x H/4 x W/4) and compute their
training losses with :meth:`losses`. DenseCLIP also returns the pixel-text score map
s = <l2norm(z), l2norm(t)> (B x K x h x w, raw cosine), concatenated to one pyramid level before the
neck and supervised by the auxiliary identity loss CE(s / tau).

Attribute contract (used by the training code): ``backbone``, ``text_encoder`` (frozen encoder under
``text_encoder.encoder``, learnable ``text_encoder.contexts``), ``context_decoder``, ``gamma``,
``neck``, ``decode_head``, ``class_names``, ``num_classes``. Absent parts are None.

The builders :func:`build_denseclip` and :func:`build_clip_fpn` and the registered names
``denseclip_fpn_*``, ``denseclip_upernet_rn50`` and ``clip_fpn_*`` (see
:func:`clipdense.models.registry.create_model`) live here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.clip.loading import load_clip
from clipdense.clip.text import tokenize_class_names
from clipdense.models._build import DEFAULT_PRETRAINED, build_decoder, check_classes, clip_backbone, with_defaults
from clipdense.models.backbones import TimmBackbone, dense_level_index
from clipdense.models.guidance import PROMPTING, LanguageGuidance
from clipdense.models.registry import register_model
from clipdense.models.text import ContextDecoder, ContextTextEncoder, PreModelPrompter


def segmentation_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, avg_non_ignore: bool = True
) -> torch.Tensor:
    """Cross-entropy of logits upsampled bilinearly (align_corners False) to the label size.

    Args:
        logits: B x K x h x w.
        labels: B x H x W class indices, ``ignore_index`` where unlabelled.
        ignore_index: Label to ignore.
        avg_non_ignore: Average over labelled pixels (PyTorch's convention); False averages over all
            pixels, as mmsegmentation < 0.24 (the authors' version) did.

    Returns:
        Scalar loss; 0 (with gradient) when every pixel is ignored.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    denom = (labels != ignore_index).sum() if avg_non_ignore else torch.tensor(labels.numel(), device=labels.device)
    return loss.sum() / denom.clamp_min(1)


class DenseCLIPSegmentor(LanguageGuidance):
    """DenseCLIP: language-guided semantic segmentation with context-aware prompting.

    :class:`LanguageGuidance` (backbone, learned contexts, context-aware prompting, score map s
    concatenated raw to one pyramid level), then a neck and a decode head.

    Args:
        backbone: Image backbone returning ``features`` (four maps), ``global_embed`` (B x D) and
            ``dense_embed`` (B x D x h x w).
        text_encoder: :class:`ContextTextEncoder` over the K classes.
        neck: Maps the four levels (one of them with K extra channels) to the head's input.
        decode_head: Returns B x K x H/4 x W/4 logits.
        class_names: K class names (display names, in label order).
        prompting: ``"post"``, ``"pre"`` or ``"none"``.
        context_decoder: :class:`ContextDecoder` for ``"post"``, :class:`PreModelPrompter` for ``"pre"``,
            None for ``"none"``.
        tau: Temperature of the auxiliary loss (0.07).
        aux_weight: Weight of the auxiliary identity loss (0.4); 0 disables it.
        score_concat_index: Pyramid level that gets the score map (3 = C5 for ResNets, 2 for ViT-B/16).
        ignore_index: Unlabelled pixel value.
        avg_non_ignore: See :func:`segmentation_cross_entropy`. False (default) averages over all
            pixels, ignored ones included, as the authors' mmseg 0.x did.
        gamma_init: Initial value of gamma.
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_encoder: ContextTextEncoder,
        neck: nn.Module,
        decode_head: nn.Module,
        class_names: Sequence[str],
        prompting: str = "post",
        context_decoder: nn.Module | None = None,
        tau: float = 0.07,
        aux_weight: float = 0.4,
        score_concat_index: int = 3,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        gamma_init: float = 1e-4,
    ) -> None:
        super().__init__(
            backbone,
            text_encoder,
            class_names,
            prompting=prompting,
            context_decoder=context_decoder,
            score_concat_index=score_concat_index,
            gamma_init=gamma_init,
        )
        self.neck = neck
        self.decode_head = decode_head
        self.tau = tau
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``logits``: B x K x H/4 x W/4; ``score_map``: B x K x h x w cosine similarities of z and t
            (h = H/32 for ResNets, H/16 for ViT-B/16); ``text_embeddings``: B x K x D.
        """
        out = super().forward(images)
        logits = self.decode_head(self.neck(out["features"]))
        return {"logits": logits, "score_map": out["score_map"], "text_embeddings": out["text_embeddings"]}

    def losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            outputs: The dict returned by :meth:`forward`.
            labels: B x H x W class indices (``ignore_index`` where unlabelled).

        Returns:
            ``decode``: CE of the logits; ``aux_identity``: aux_weight * CE(score_map / tau) (absent
            when aux_weight is 0). Both upsample bilinearly to the label size.
        """
        losses = {
            "decode": segmentation_cross_entropy(outputs["logits"], labels, self.ignore_index, self.avg_non_ignore)
        }
        if self.aux_weight:
            aux = segmentation_cross_entropy(
                outputs["score_map"] / self.tau, labels, self.ignore_index, self.avg_non_ignore
            )
            losses["aux_identity"] = self.aux_weight * aux
        return losses


class CLIPFPNSegmentor(nn.Module):
    """The paper's "CLIP + Semantic FPN" baseline: CLIP image trunk C2..C5 -> FPN -> FPN head, no language.

    Args:
        backbone: Image backbone returning ``features`` (four maps).
        neck: Multi-level neck.
        decode_head: Returns B x K x H/4 x W/4 logits.
        num_classes: K; default ``len(class_names)``.
        class_names: Optional class names (default: ``class_0``, ...).
        ignore_index: Unlabelled pixel value.
        avg_non_ignore: See :func:`segmentation_cross_entropy`. False (default) averages over all
            pixels, ignored ones included, as the authors' mmseg 0.x did.
    """

    text_encoder = None
    context_decoder = None
    gamma = None

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        decode_head: nn.Module,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__()
        if num_classes is None and class_names is None:
            raise ValueError("pass num_classes or class_names")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names")
        self.num_classes = num_classes if num_classes is not None else len(class_names)
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        )
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``logits``: B x K x H/4 x W/4.
        """
        features = list(self.backbone(images)["features"])
        return {"logits": self.decode_head(self.neck(features))}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone stages/blocks in the backward pass."""
        self.backbone.set_grad_checkpointing(enable)

    def losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            outputs: The dict returned by :meth:`forward`.
            labels: B x H x W class indices.

        Returns:
            ``decode``: CE of the logits upsampled to the label size.
        """
        return {"decode": segmentation_cross_entropy(outputs["logits"], labels, self.ignore_index, self.avg_non_ignore)}


# --- Builders and registered models --------------------------------------------------------------------------


def build_denseclip(
    *,
    class_names: Sequence[str] | None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    decoder: str = "fpn",
    prompting: str = "post",
    input_resolution: int | None = 512,
    n_ctx: int = 8,
    class_context_length: int = 5,
    ctx_init_std: float = 1.0,
    tau: float = 0.07,
    aux_weight: float = 0.4,
    context_decoder_width: int = 256,
    context_decoder_heads: int = 4,
    context_decoder_layers: int = 3,
    context_decoder_dropout: float | None = None,
    dropout: float = 0.1,
    drop_path: float = 0.1,
    out_indices: Sequence[int] | None = None,
    class_embedding_twice: bool = False,
    pos_interpolation: str = "bilinear",
    fpn_channels: int = 256,
    head_channels: int | None = None,
    timm_model: str | None = None,
    backbone_pretrained: bool | str | os.PathLike | None = None,
    timm_kwargs: dict | None = None,
    avg_non_ignore: bool = False,
) -> DenseCLIPSegmentor:
    """Build a DenseCLIP segmentor (see :func:`~clipdense.models.registry.create_model` for the common arguments).

    Args:
        clip_model: CLIP architecture; its text tower is the (frozen) text encoder and, unless
            ``timm_model`` is given, its image tower the backbone.
        decoder: ``"fpn"`` (Semantic FPN) or ``"upernet"``.
        prompting: ``"post"`` (default), ``"pre"`` or ``"none"`` (language prompt only).
        input_resolution: Training crop the stored positional grid is resized to once (512 for
            ResNets, 640 for ViT-B/16); None keeps CLIP's grid.
        n_ctx: Learnable context vectors (8).
        class_context_length: Tokens of the class-name part incl. SOT/EOT (5).
        ctx_init_std: Std of the truncated-normal context init (1.0: the authors' code calls
            ``nn.init.trunc_normal_`` with its defaults, cut at +-2).
        pos_interpolation: ViT positional-grid resizing, ``"bilinear"`` (the authors' code, default)
            or ``"bicubic"``.
        dropout: Dropout before the classifier and, unless ``context_decoder_dropout`` is given, in
            the context decoder (0.1; 0 makes the model deterministic apart from ``drop_path``).
        drop_path: Stochastic depth of ViT backbones (0.1).
        timm_model: Use this timm backbone with a random attention pool instead of CLIP's image tower.
        backbone_pretrained: timm weights: False, True (timm's), or a local checkpoint path; None
            follows ``pretrained`` (random when it is None, timm's weights otherwise).
        timm_kwargs: Extra ``timm.create_model`` arguments.
        avg_non_ignore: Average the losses over labelled pixels only (False, the authors' mmseg 0.x: over all
            pixels, which scales the gradient by the labelled share; see :func:`segmentation_cross_entropy`).
    """
    class_names = check_classes(class_names, num_classes, need_names=True)
    loaded = load_clip(clip_model, pretrained)
    k = len(class_names)
    text_encoder = ContextTextEncoder(
        loaded.model,
        tokenize_class_names(loaded.tokenizer, class_names, class_context_length),
        n_ctx=n_ctx,
        learn_contexts=prompting != "pre",
        ctx_init_std=ctx_init_std,
    )
    d = text_encoder.embed_dim
    if timm_model is None:
        backbone = clip_backbone(
            loaded.model.visual,
            True,
            input_resolution,
            drop_path,
            out_indices,
            class_embedding_twice,
            pos_interpolation,
        )
    else:
        if backbone_pretrained is None:
            backbone_pretrained = pretrained is not None
        if isinstance(backbone_pretrained, (str, os.PathLike)):
            backbone_pretrained = str(Path(backbone_pretrained).expanduser())
        backbone = TimmBackbone(timm_model, backbone_pretrained, output_dim=d, timm_kwargs=timm_kwargs)
    if backbone.embed_dim != d:
        raise ValueError(f"image embedding width {backbone.embed_dim} != text embedding width {d}")
    cd_dropout = dropout if context_decoder_dropout is None else context_decoder_dropout
    dec_args = (context_decoder_width, context_decoder_heads, context_decoder_layers, cd_dropout)
    context_decoder = {
        "post": lambda: ContextDecoder(d, *dec_args),
        "pre": lambda: PreModelPrompter(d, text_encoder.width, n_ctx, *dec_args),
        "none": lambda: None,
    }[prompting]()
    index = dense_level_index(backbone)
    in_channels = list(backbone.out_channels)
    in_channels[index] += k
    neck, head = build_decoder(decoder, in_channels, k, fpn_channels, head_channels, dropout)
    return DenseCLIPSegmentor(
        backbone,
        text_encoder,
        neck,
        head,
        class_names,
        prompting=prompting,
        context_decoder=context_decoder,
        tau=tau,
        aux_weight=aux_weight,
        score_concat_index=index,
        avg_non_ignore=avg_non_ignore,
    )


def build_clip_fpn(
    *,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    decoder: str = "fpn",
    input_resolution: int | None = None,
    dropout: float = 0.1,
    drop_path: float = 0.1,
    out_indices: Sequence[int] | None = None,
    class_embedding_twice: bool = False,
    pos_interpolation: str = "bilinear",
    fpn_channels: int = 256,
    head_channels: int | None = None,
    avg_non_ignore: bool = False,
) -> CLIPFPNSegmentor:
    """Build the CLIP + Semantic FPN baseline: CLIP's image trunk without its pool or projection.

    Options as :func:`build_denseclip` (``dropout`` is the head's).
    """
    class_names = check_classes(class_names, num_classes, need_names=False)
    k = len(class_names) if class_names is not None else num_classes
    visual = load_clip(clip_model, pretrained).model.visual
    backbone = clip_backbone(
        visual, False, input_resolution, drop_path, out_indices, class_embedding_twice, pos_interpolation
    )
    neck, head = build_decoder(decoder, list(backbone.out_channels), k, fpn_channels, head_channels, dropout)
    return CLIPFPNSegmentor(backbone, neck, head, num_classes=k, class_names=class_names, avg_non_ignore=avg_non_ignore)


@register_model
def denseclip_fpn_rn50(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + Semantic FPN, CLIP RN50 (ADE20K: 43.5 mIoU)."""
    return build_denseclip(**with_defaults(dict(clip_model="RN50", input_resolution=512), kw))


@register_model
def denseclip_fpn_rn101(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + Semantic FPN, CLIP RN101 (ADE20K: 45.1 mIoU)."""
    return build_denseclip(**with_defaults(dict(clip_model="RN101", input_resolution=512), kw))


#: The ViT-B/16 settings of the DenseCLIP/PPL papers' configs (640 crops, drop path 0.1, the authors' forward).
VIT_B16_PAPER = dict(clip_model="ViT-B-16", input_resolution=640, drop_path=0.1, class_embedding_twice=True)


@register_model
def denseclip_fpn_vitb16(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + Semantic FPN, CLIP ViT-B/16, 640 crops, drop path 0.1 (ADE20K: 50.6 mIoU).

    As the authors' ``CLIPVisionTransformer``, the class embedding is added to the class position a second
    time (``class_embedding_twice=True``; False gives CLIP's own forward).
    """
    return build_denseclip(**with_defaults(VIT_B16_PAPER, kw))


@register_model
def denseclip_upernet_rn50(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + UPerNet (channels 512), CLIP RN50."""
    return build_denseclip(**with_defaults(dict(clip_model="RN50", input_resolution=512, decoder="upernet"), kw))


@register_model
def denseclip_fpn_rn50_prompt_only(**kw) -> DenseCLIPSegmentor:
    """Ablation: learned language prompt only, no vision-to-language context (ADE20K: 42.1 mIoU)."""
    return build_denseclip(**with_defaults(dict(clip_model="RN50", input_resolution=512, prompting="none"), kw))


@register_model
def denseclip_fpn_rn50_pre(**kw) -> DenseCLIPSegmentor:
    """Ablation: pre-model prompting (ADE20K: 42.9 mIoU)."""
    return build_denseclip(**with_defaults(dict(clip_model="RN50", input_resolution=512, prompting="pre"), kw))


@register_model
def denseclip_fpn_timm(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP with any timm backbone (pass ``timm_model``) and a random attention pool; CLIP RN50 text."""
    if kw.get("timm_model") is None:
        raise ValueError("denseclip_fpn_timm needs timm_model='<timm name>'")
    return build_denseclip(**with_defaults(dict(clip_model="RN50"), kw))


@register_model
def denseclip_fpn_timm_resnet50(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP with an ImageNet ResNet-50 (timm) and a random attention pool; CLIP RN50 text."""
    return build_denseclip(**with_defaults(dict(clip_model="RN50", timm_model="resnet50"), kw))


@register_model
def denseclip_fpn_timm_swin_t(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP with Swin-T (timm, any input size) and a random attention pool; CLIP RN50 text."""
    kw = with_defaults(dict(clip_model="RN50", timm_model="swin_tiny_patch4_window7_224"), kw)
    kw["timm_kwargs"] = with_defaults(dict(img_size=512, strict_img_size=False), kw.get("timm_kwargs") or {})
    return build_denseclip(**kw)


@register_model
def clip_fpn_rn50(**kw) -> CLIPFPNSegmentor:
    """CLIP RN50 + Semantic FPN baseline (ADE20K: 39.6 mIoU)."""
    return build_clip_fpn(**with_defaults(dict(clip_model="RN50"), kw))


@register_model
def clip_fpn_rn101(**kw) -> CLIPFPNSegmentor:
    """CLIP RN101 + Semantic FPN baseline (ADE20K: 42.7 mIoU)."""
    return build_clip_fpn(**with_defaults(dict(clip_model="RN101"), kw))


@register_model
def clip_fpn_vitb16(**kw) -> CLIPFPNSegmentor:
    """CLIP ViT-B/16 + Semantic FPN baseline, 640 crops (ADE20K: 49.4 mIoU); the authors' backbone forward,
    as :func:`denseclip_fpn_vitb16`."""
    return build_clip_fpn(**with_defaults(VIT_B16_PAPER, kw))


__all__ = [
    "PROMPTING",
    "CLIPFPNSegmentor",
    "DenseCLIPSegmentor",
    "build_clip_fpn",
    "build_denseclip",
    "segmentation_cross_entropy",
]
