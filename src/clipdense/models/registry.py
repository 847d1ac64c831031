"""Builders for DenseCLIP (Rao et al., CVPR 2022) segmentors and their baselines, with parameter and FLOP
counting as the paper's tables do.

One way in: ``create_model(name, class_names=..., pretrained=...)``; ``list_models()`` gives the names.
``pretrained`` goes to :func:`clipdense.clip.loading.load_clip` (a tag such as ``"openai"``, a local
file, or None for random weights, which must be asked for explicitly). The ``clip_model`` override
picks another CLIP architecture (e.g. the tiny test towers).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clipdense.data.classnames import display_name
from clipdense.models.backbones import CLIPResNetBackbone, CLIPViTBackbone, TimmBackbone, dense_level_index
from clipdense.models.decoders import FPN, FPNHead, UperNetHead
from clipdense.models.segmentors import CLIPFPNSegmentor, DenseCLIPSegmentor
from clipdense.models.text import ContextDecoder, ContextTextEncoder, PreModelPrompter

logger = logging.getLogger(__name__)

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# The tag used when create_model is called without ``pretrained``.
DEFAULT_PRETRAINED = "openai"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name (timm style)."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by a shell pattern (``"denseclip_*"``)."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(
    name: str,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    **overrides,
) -> nn.Module:
    """Build a registered segmentor.

    Args:
        name: One of :func:`list_models`, e.g. ``"denseclip_fpn_rn50"``.
        class_names: K class names in label order (entries with synonyms, ``"person, people"``, are
            prompted with their first name). Required for DenseCLIP models.
        num_classes: K; enough for the CLIP + FPN baselines.
        pretrained: CLIP weights: a tag of the CLIP architecture, a local checkpoint file, or None for
            random weights.
        **overrides: Builder options, e.g. ``clip_model="RN50"``, ``input_resolution=None``,
            ``n_ctx=8``, ``tau=0.07``, ``aux_weight=0.4``, ``drop_path=0.1``; timm models also
            ``timm_model``, ``backbone_pretrained``, ``timm_kwargs``.

    Returns:
        The model (train mode, as built by PyTorch).

    Raises:
        ValueError: Unknown name or missing class names.
        clipdense.CLIPLoadError: CLIP weights cannot be loaded.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    return _MODELS[name](class_names=class_names, num_classes=num_classes, pretrained=pretrained, **overrides)


def _load(clip_model: str, pretrained):
    from clipdense.clip.loading import load_clip

    return load_clip(clip_model, pretrained)


def _check_classes(class_names: Sequence[str] | None, num_classes: int | None, need_names: bool) -> list[str] | None:
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


def tokenize_class_names(tokenizer: Callable, class_names: Sequence[str], context_length: int = 5) -> torch.Tensor:
    """Tokenize display names with SOT/EOT in ``context_length`` tokens (DenseCLIP: 5).

    Returns:
        K x context_length token ids. Names that do not fit are truncated (EOT kept) with a warning.
    """
    names = [display_name(c) for c in class_names]
    full = tokenizer(names)
    too_long = [n for n, row in zip(names, full, strict=True) if int((row != 0).sum()) > context_length]
    if too_long:
        logger.warning(
            "%d class names exceed %d tokens with SOT/EOT and are truncated: %s",
            len(too_long),
            context_length,
            too_long[:5],
        )
    return tokenizer(names, context_length=context_length)


def _clip_backbone(
    visual: nn.Module, with_embeddings: bool, input_resolution, drop_path, out_indices, twice, pos_interpolation
):
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


def _decoder(kind: str, in_channels: list[int], k: int, fpn_channels: int, head_channels: int | None, dropout: float):
    if kind == "fpn":
        head = FPNHead(fpn_channels, k, channels=head_channels or fpn_channels, dropout=dropout)
        return FPN(in_channels, fpn_channels), head
    if kind == "upernet":
        return nn.Identity(), UperNetHead(in_channels, k, channels=head_channels or 512, dropout=dropout)
    raise ValueError(f"unknown decoder '{kind}'; choose 'fpn' or 'upernet'")


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
) -> DenseCLIPSegmentor:
    """Build a DenseCLIP segmentor (see :func:`create_model` for the common arguments).

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
    """
    class_names = _check_classes(class_names, num_classes, need_names=True)
    loaded = _load(clip_model, pretrained)
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
        backbone = _clip_backbone(
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
    neck, head = _decoder(decoder, in_channels, k, fpn_channels, head_channels, dropout)
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
) -> CLIPFPNSegmentor:
    """Build the CLIP + Semantic FPN baseline: CLIP's image trunk without its pool or projection.

    Options as :func:`build_denseclip` (``dropout`` is the head's).
    """
    class_names = _check_classes(class_names, num_classes, need_names=False)
    k = len(class_names) if class_names is not None else num_classes
    visual = _load(clip_model, pretrained).model.visual
    backbone = _clip_backbone(
        visual, False, input_resolution, drop_path, out_indices, class_embedding_twice, pos_interpolation
    )
    neck, head = _decoder(decoder, list(backbone.out_channels), k, fpn_channels, head_channels, dropout)
    return CLIPFPNSegmentor(backbone, neck, head, num_classes=k, class_names=class_names)


def _with(defaults: dict, overrides: dict) -> dict:
    return {**defaults, **overrides}


@register_model
def denseclip_fpn_rn50(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + Semantic FPN, CLIP RN50 (ADE20K: 43.5 mIoU)."""
    return build_denseclip(**_with(dict(clip_model="RN50", input_resolution=512), kw))


@register_model
def denseclip_fpn_rn101(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + Semantic FPN, CLIP RN101 (ADE20K: 45.1 mIoU)."""
    return build_denseclip(**_with(dict(clip_model="RN101", input_resolution=512), kw))


@register_model
def denseclip_fpn_vitb16(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + Semantic FPN, CLIP ViT-B/16, 640 crops, drop path 0.1 (ADE20K: 50.6 mIoU)."""
    return build_denseclip(**_with(dict(clip_model="ViT-B-16", input_resolution=640, drop_path=0.1), kw))


@register_model
def denseclip_upernet_rn50(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP + UPerNet (channels 512), CLIP RN50."""
    return build_denseclip(**_with(dict(clip_model="RN50", input_resolution=512, decoder="upernet"), kw))


@register_model
def denseclip_fpn_rn50_prompt_only(**kw) -> DenseCLIPSegmentor:
    """Ablation: learned language prompt only, no vision-to-language context (ADE20K: 42.1 mIoU)."""
    return build_denseclip(**_with(dict(clip_model="RN50", input_resolution=512, prompting="none"), kw))


@register_model
def denseclip_fpn_rn50_pre(**kw) -> DenseCLIPSegmentor:
    """Ablation: pre-model prompting (ADE20K: 42.9 mIoU)."""
    return build_denseclip(**_with(dict(clip_model="RN50", input_resolution=512, prompting="pre"), kw))


@register_model
def denseclip_fpn_timm(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP with any timm backbone (pass ``timm_model``) and a random attention pool; CLIP RN50 text."""
    if kw.get("timm_model") is None:
        raise ValueError("denseclip_fpn_timm needs timm_model='<timm name>'")
    return build_denseclip(**_with(dict(clip_model="RN50"), kw))


@register_model
def denseclip_fpn_timm_resnet50(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP with an ImageNet ResNet-50 (timm) and a random attention pool; CLIP RN50 text."""
    return build_denseclip(**_with(dict(clip_model="RN50", timm_model="resnet50"), kw))


@register_model
def denseclip_fpn_timm_swin_t(**kw) -> DenseCLIPSegmentor:
    """DenseCLIP with Swin-T (timm, any input size) and a random attention pool; CLIP RN50 text."""
    kw = _with(dict(clip_model="RN50", timm_model="swin_tiny_patch4_window7_224"), kw)
    kw["timm_kwargs"] = _with(dict(img_size=512, strict_img_size=False), kw.get("timm_kwargs") or {})
    return build_denseclip(**kw)


@register_model
def clip_fpn_rn50(**kw) -> CLIPFPNSegmentor:
    """CLIP RN50 + Semantic FPN baseline (ADE20K: 39.6 mIoU)."""
    return build_clip_fpn(**_with(dict(clip_model="RN50"), kw))


@register_model
def clip_fpn_rn101(**kw) -> CLIPFPNSegmentor:
    """CLIP RN101 + Semantic FPN baseline (ADE20K: 42.7 mIoU)."""
    return build_clip_fpn(**_with(dict(clip_model="RN101"), kw))


@register_model
def clip_fpn_vitb16(**kw) -> CLIPFPNSegmentor:
    """CLIP ViT-B/16 + Semantic FPN baseline, 640 crops (ADE20K: 49.4 mIoU)."""
    return build_clip_fpn(**_with(dict(clip_model="ViT-B-16", input_resolution=640, drop_path=0.1), kw))


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
        suffix = ".text_encoder.encoder"
        for name, ops in counter.get_flop_counts().items():
            if name.endswith(suffix):
                text_flops = sum(ops.values())
    return {"gflops": (total - text_flops) / 2e9, "gflops_with_text_encoder": total / 2e9}


__all__ = [
    "DEFAULT_PRETRAINED",
    "build_clip_fpn",
    "build_denseclip",
    "count_flops",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
    "tokenize_class_names",
]


# --- PPL (Kwon et al., CVPR 2023): probabilistic attribute prompts on DenseCLIP ---------------------------------

from clipdense.models.ppl import AttributePromptEncoder, PPLSegmentor, ProbabilisticDecoder  # noqa: E402


def _ppl_text_side(
    loaded,
    class_names: Sequence[str],
    image_embed_dim: int,
    *,
    num_attributes: int,
    n_ctx: int,
    class_context_length: int,
    ctx_init_std: float,
    sigma_type: str,
    positivity: str,
    log_var_init: float,
    log_var_range: tuple[float, float],
    prob_decoder_width: int,
    prob_decoder_heads: int,
    prob_decoder_layers: int,
    post_model_context: bool,
    context_decoder_layers: int,
    dropout: float,
) -> tuple[AttributePromptEncoder, ProbabilisticDecoder, ContextDecoder | None]:
    """PPL's attribute prompts, probabilistic decoder and optional context decoder (see :func:`build_ppl`)."""
    text_encoder = AttributePromptEncoder(
        loaded.model,
        tokenize_class_names(loaded.tokenizer, class_names, class_context_length),
        num_attributes=num_attributes,
        n_ctx=n_ctx,
        ctx_init_std=ctx_init_std,
    )
    d = text_encoder.embed_dim
    if image_embed_dim != d:
        raise ValueError(f"image embedding width {image_embed_dim} != text embedding width {d}")
    prob_decoder = ProbabilisticDecoder(
        d,
        width=prob_decoder_width,
        heads=prob_decoder_heads,
        layers=prob_decoder_layers,
        dropout=dropout,
        sigma_type=sigma_type,
        positivity=positivity,
        log_var_init=log_var_init,
        log_var_range=log_var_range,
    )
    context_decoder = None
    if post_model_context:
        context_decoder = ContextDecoder(d, prob_decoder_width, prob_decoder_heads, context_decoder_layers, dropout)
    return text_encoder, prob_decoder, context_decoder


def build_ppl(
    *,
    class_names: Sequence[str] | None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    decoder: str = "fpn",
    input_resolution: int | None = 512,
    num_attributes: int = 3,
    n_ctx: int = 8,
    class_context_length: int = 5,
    ctx_init_std: float = 0.02,
    n_samples: int = 15,
    tau: float = 0.07,
    alpha: float = 1.0,
    beta: float = 1e-5,
    pixel_weight: float = 1.0,
    use_pixel_loss: bool = True,
    use_prob_loss: bool = True,
    use_div_loss: bool = True,
    use_kl_loss: bool = True,
    normalize_div: bool = True,
    sigma_type: str = "isotropic",
    positivity: str = "exp",
    log_var_init: float = -5.0,
    log_var_range: tuple[float, float] = (-10.0, 5.0),
    prob_decoder_width: int = 256,
    prob_decoder_heads: int = 4,
    prob_decoder_layers: int = 5,
    post_model_context: bool = False,
    context_decoder_layers: int = 3,
    decoder_dropout: float | None = None,
    mc_inference: bool = True,
    eval_seed: int | None = None,
    dropout: float = 0.1,
    drop_path: float = 0.1,
    out_indices: Sequence[int] | None = None,
    class_embedding_twice: bool = False,
    pos_interpolation: str = "bilinear",
    fpn_channels: int = 256,
    head_channels: int | None = None,
) -> PPLSegmentor:
    """Build a PPL segmentor (see :func:`create_model` and :func:`build_denseclip` for the common arguments).

    Args:
        num_attributes: K attribute prompts (3).
        ctx_init_std: Std of the Gaussian prompt init (0.02, CoOp's).
        n_samples: N samples per class (15; a multiple of K).
        alpha, beta: Weights of L_div (1.0) and L_KL (1e-5).
        use_pixel_loss, use_prob_loss, use_div_loss, use_kl_loss: Loss switches (paper Table 4).
        sigma_type: ``"isotropic"`` or ``"diagonal"``; positivity: ``"exp"`` or ``"softplus"``;
            log_var_init, log_var_range: see :class:`ProbabilisticDecoder`.
        prob_decoder_width, prob_decoder_heads, prob_decoder_layers: Probabilistic decoder size (256, 4, 5).
        post_model_context: Also apply DenseCLIP's post-model context update to the means (default
            False: mu = w, as the paper's eq. 6).
        context_decoder_layers: Layers of that context decoder (3).
        decoder_dropout: Dropout of the probabilistic/context decoders; default ``dropout``.
        mc_inference, eval_seed: See :class:`PPLSegmentor`.
    """
    class_names = _check_classes(class_names, num_classes, need_names=True)
    loaded = _load(clip_model, pretrained)
    k = len(class_names)
    backbone = _clip_backbone(
        loaded.model.visual, True, input_resolution, drop_path, out_indices, class_embedding_twice, pos_interpolation
    )
    text_encoder, prob_decoder, context_decoder = _ppl_text_side(
        loaded,
        class_names,
        backbone.embed_dim,
        num_attributes=num_attributes,
        n_ctx=n_ctx,
        class_context_length=class_context_length,
        ctx_init_std=ctx_init_std,
        sigma_type=sigma_type,
        positivity=positivity,
        log_var_init=log_var_init,
        log_var_range=log_var_range,
        prob_decoder_width=prob_decoder_width,
        prob_decoder_heads=prob_decoder_heads,
        prob_decoder_layers=prob_decoder_layers,
        post_model_context=post_model_context,
        context_decoder_layers=context_decoder_layers,
        dropout=dropout if decoder_dropout is None else decoder_dropout,
    )
    index = dense_level_index(backbone)
    in_channels = list(backbone.out_channels)
    in_channels[index] += k
    neck, head = _decoder(decoder, in_channels, k, fpn_channels, head_channels, dropout)
    return PPLSegmentor(
        backbone,
        text_encoder,
        prob_decoder,
        neck,
        head,
        class_names,
        context_decoder=context_decoder,
        n_samples=n_samples,
        tau=tau,
        alpha=alpha,
        beta=beta,
        pixel_weight=pixel_weight,
        use_pixel_loss=use_pixel_loss,
        use_prob_loss=use_prob_loss,
        use_div_loss=use_div_loss,
        use_kl_loss=use_kl_loss,
        normalize_div=normalize_div,
        mc_inference=mc_inference,
        eval_seed=eval_seed,
        score_concat_index=index,
    )


@register_model
def ppl_fpn_rn50(**kw) -> PPLSegmentor:
    """PPL + Semantic FPN, CLIP RN50 (ADE20K: 44.7 mIoU; paper: 51.8M params, 421.4 GFLOPs)."""
    return build_ppl(**_with(dict(clip_model="RN50", input_resolution=512), kw))


@register_model
def ppl_fpn_rn101(**kw) -> PPLSegmentor:
    """PPL + Semantic FPN, CLIP RN101 (ADE20K: 46.4 mIoU)."""
    return build_ppl(**_with(dict(clip_model="RN101", input_resolution=512), kw))


@register_model
def ppl_fpn_vitb16(**kw) -> PPLSegmentor:
    """PPL + Semantic FPN, CLIP ViT-B/16, 640 crops, drop path 0.1 (ADE20K: 51.6 mIoU)."""
    return build_ppl(**_with(dict(clip_model="ViT-B-16", input_resolution=640, drop_path=0.1), kw))


__all__ += ["build_ppl"]


# --- MaskCLIP+ (Zhou et al., ECCV 2022): DeepLab trained on online MaskCLIP pseudo-labels ------------------------

from clipdense.models.maskclip_plus import HEADS as MASKCLIP_PLUS_HEADS  # noqa: E402
from clipdense.models.maskclip_plus import (  # noqa: E402
    ASPPv2,
    DeepLabV3PlusHead,
    MaskCLIPGuide,
    MaskCLIPPlus,
    build_trunk,
)


def load_trunk_checkpoint(trunk: nn.Module, path: str | os.PathLike) -> None:
    """Load torchvision-layout ResNet weights (``conv1``, ``bn1``, ``layer1..4``; ``fc`` dropped; ``module.``
    prefixes and ``state_dict`` wrappers accepted) from a local .pth/.pt or .safetensors file into a trunk."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trunk checkpoint {path} not found: pass a local torchvision ResNet state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    renamed = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith("fc."):
            continue
        k = k.replace("conv1.", "stem.0.", 1) if k.startswith("conv1.") else k
        k = k.replace("bn1.", "stem.1.", 1) if k.startswith("bn1.") else k
        renamed[k] = v
    from clipdense.checkpoints import load_state_dict_strict

    load_state_dict_strict(trunk, renamed, str(path), "pass a torchvision ResNet checkpoint of the same depth")


def build_maskclip_plus(
    *,
    class_names: Sequence[str] | None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    head: str = "deeplabv2",
    trunk: str = "resnet101",
    trunk_checkpoint: str | os.PathLike | None = None,
    guide: str | None = "maskclip",
    unseen_classes: Sequence[str] | str | None = None,
    protocol: str = "zeroshot",
    confidence_threshold: float = 0.0,
    self_train_from: float | None = 0.1,
    total_iters: int = 20000,
    key_smoothing: float = 0.0,
    prompt_denoise: float = 0.0,
    templates: str | Sequence[str] = "ensemble",
    tau: float = 0.07,
    learn_tau: bool = False,
    head_channels: int = 256,
) -> MaskCLIPPlus:
    """Build MaskCLIP+ (see :func:`create_model` for the common arguments).

    Args:
        clip_model: CLIP architecture of the guide and the text embeddings (RN50 in the paper's zero-shot runs).
        head: ``"deeplabv2"`` (ASPP 6/12/18/24) or ``"deeplabv3plus"``.
        trunk: ``"resnet101"``, ``"resnet50"`` or ``"tiny"`` (tests); dilated, output stride 8.
        trunk_checkpoint: Local torchvision ResNet weights (None: random trunk; never downloaded).
        guide: ``"maskclip"`` or None (no pseudo-labels: supervised on the GT).
        unseen_classes: Unseen class names, or a shipped split name (``"voc"``, ``"context"``, ``"cocostuff"``).
        protocol: ``"zeroshot"`` or ``"annotation_free"``.
        confidence_threshold, self_train_from, total_iters, tau, learn_tau: See :class:`MaskCLIPPlus`.
        key_smoothing, prompt_denoise: MaskCLIP refinement thresholds of the guide (0 disables).
        templates: Prompt templates of the text embeddings.
        head_channels: Width of the DeepLabv3+ decoder.
    """
    from clipdense.clip.dense import dense_clip_encoder
    from clipdense.data.splits import AVAILABLE_SPLITS, class_indices, load_unseen_split

    class_names = _check_classes(class_names, num_classes, need_names=True)
    if head not in MASKCLIP_PLUS_HEADS:
        raise ValueError(f"unknown head '{head}'; choose one of {MASKCLIP_PLUS_HEADS}")
    if guide not in ("maskclip", None):
        raise ValueError(f"unknown guide '{guide}'; MaskCLIP+ supports 'maskclip' (or None)")
    if isinstance(unseen_classes, str):
        if unseen_classes not in AVAILABLE_SPLITS:
            raise ValueError(f"unseen_classes '{unseen_classes}': pass a list of names or one of {AVAILABLE_SPLITS}")
        unseen_classes = load_unseen_split(unseen_classes)
    unseen = class_indices(unseen_classes, class_names) if unseen_classes else []
    if protocol == "zeroshot" and guide is not None and not unseen:
        logger.warning("MaskCLIP+ zero-shot without unseen classes: plain supervised training on the GT")
    loaded = _load(clip_model, pretrained)
    from clipdense.clip.text import class_text_embeddings

    text = class_text_embeddings(loaded, class_names, templates)
    body = build_trunk(trunk)
    if trunk_checkpoint is not None:
        load_trunk_checkpoint(body, trunk_checkpoint)
    elif trunk != "tiny":
        logger.warning(
            "MaskCLIP+ target trunk %s starts from random weights: pass trunk_checkpoint=PATH (a torchvision "
            "ImageNet state dict) to start from ImageNet weights as the paper does",
            trunk,
        )
    low_ch, high_ch = body.out_channels
    d = text.shape[1]
    decoder = ASPPv2(high_ch, d) if head == "deeplabv2" else DeepLabV3PlusHead(low_ch, high_ch, d, head_channels)
    maskclip = None
    if guide == "maskclip":
        encoder = dense_clip_encoder(loaded.model.visual, "maskclip")
        maskclip = MaskCLIPGuide(encoder, key_smoothing=key_smoothing, prompt_denoise=prompt_denoise)
    return MaskCLIPPlus(
        body,
        decoder,
        maskclip,
        class_names,
        text,
        unseen=unseen,
        protocol=protocol,
        confidence_threshold=confidence_threshold,
        self_train_from=self_train_from if protocol == "zeroshot" else None,
        total_iters=total_iters,
        tau=tau,
        learn_tau=learn_tau,
    )


@register_model
def maskclip_plus_deeplabv2_r101(**kw) -> MaskCLIPPlus:
    """MaskCLIP+ DeepLabv2 on dilated ResNet-101, RN50 CLIP guide (zero-shot VOC 86.1 / COCO-Stuff 54.7 unseen mIoU)."""
    return build_maskclip_plus(**_with(dict(clip_model="RN50", head="deeplabv2", trunk="resnet101"), kw))


@register_model
def maskclip_plus_deeplabv3plus_r101(**kw) -> MaskCLIPPlus:
    """MaskCLIP+ DeepLabv3+ on dilated ResNet-101, RN50 CLIP guide (zero-shot Context: 66.7 unseen mIoU)."""
    return build_maskclip_plus(**_with(dict(clip_model="RN50", head="deeplabv3plus", trunk="resnet101"), kw))


__all__ += ["build_maskclip_plus", "load_trunk_checkpoint"]


# --- Detection and instance segmentation (DenseCLIP Tables 3-4, PPL Table 3) on torchvision's detectors ----------

from torchvision.models.detection import MaskRCNN, RetinaNet  # noqa: E402

from clipdense.models.detectors import CLIPDetector, GuidedFPN  # noqa: E402
from clipdense.models.guidance import LanguageGuidance  # noqa: E402
from clipdense.models.ppl import PPLGuidance  # noqa: E402

DETECTORS: tuple[str, ...] = ("retinanet", "maskrcnn")
GUIDANCE: tuple[str | None, ...] = ("denseclip", "ppl", None)


def build_clip_detector(
    *,
    class_names: Sequence[str] | None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    detector: str = "retinanet",
    guidance: str | None = "denseclip",
    input_resolution: int | None = 1344,
    min_size: int = 800,
    max_size: int = 1333,
    n_ctx: int = 8,
    class_context_length: int = 5,
    ctx_init_std: float | None = None,
    tau: float = 0.07,
    aux_weight: float = 1.0,
    context_decoder_width: int = 256,
    context_decoder_heads: int = 4,
    context_decoder_layers: int = 3,
    dropout: float = 0.1,
    fpn_channels: int = 256,
    num_attributes: int = 3,
    n_samples: int = 15,
    alpha: float = 1.0,
    beta: float = 1e-5,
    use_div_loss: bool = True,
    use_kl_loss: bool = True,
    sigma_type: str = "isotropic",
    positivity: str = "exp",
    log_var_init: float = -5.0,
    prob_decoder_layers: int = 5,
    detector_kwargs: dict | None = None,
) -> CLIPDetector:
    """Build a detector on CLIP's ResNet (see :func:`create_model` for the common arguments).

    Args:
        clip_model: CLIP ResNet (RN50, RN101; the papers detect with ResNets only).
        detector: ``"retinanet"`` (FPN P3-P7, P6/P7 from C5 as mmdet's ``on_input``) or ``"maskrcnn"``
            (FPN P2-P6).
        guidance: ``"denseclip"`` (learned contexts, post-model prompting, s / tau appended to C5, box
            BCE auxiliary loss), ``"ppl"`` (probabilistic attribute prompts, PPL's losses on box targets)
            or None (the CLIP baseline: the trunk without its attention pool, no language).
        input_resolution: Resize the attention pool's positional grid once to this input size / 32 (1344,
            the authors' detection setting); it is resized to the actual C5 size at run time anyway.
        min_size, max_size: The torchvision transform's resize (short side 800, long side <= 1333).
        ctx_init_std: Std of the context init; default 1.0 for DenseCLIP (trunc-normal), 0.02 for PPL.
        tau, aux_weight: Temperature (0.07) and weight of the auxiliary loss (1.0).
        num_attributes, n_samples, alpha, beta, use_div_loss, use_kl_loss, sigma_type, positivity,
            log_var_init, prob_decoder_layers: PPL options (see :func:`build_ppl`).
        detector_kwargs: Extra arguments of torchvision's ``RetinaNet`` / ``MaskRCNN`` (e.g. score_thresh,
            anchor sizes via ``anchor_generator``). Mask R-CNN defaults to mmdet's 1000 RPN proposals
            per image in training (torchvision: 2000).
    """
    from clipdense.data.transforms import CLIP_MEAN, CLIP_STD

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector '{detector}'; choose one of {DETECTORS}")
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance '{guidance}'; choose one of {GUIDANCE}")
    class_names = _check_classes(class_names, num_classes, need_names=guidance is not None)
    k = len(class_names) if class_names is not None else num_classes
    class_names = class_names or [f"class_{i}" for i in range(k)]
    loaded = _load(clip_model, pretrained)
    if not hasattr(loaded.model.visual, "attnpool"):
        raise ValueError(f"detectors are built on CLIP ResNets (RN50, RN101), not {clip_model}")
    backbone = CLIPResNetBackbone(
        loaded.model.visual, with_embeddings=guidance is not None, input_resolution=input_resolution
    )
    in_channels = list(backbone.out_channels)
    if guidance is None:
        body: nn.Module = backbone
    else:
        in_channels[3] += k
        if guidance == "denseclip":
            text_encoder = ContextTextEncoder(
                loaded.model,
                tokenize_class_names(loaded.tokenizer, class_names, class_context_length),
                n_ctx=n_ctx,
                ctx_init_std=1.0 if ctx_init_std is None else ctx_init_std,
            )
            if backbone.embed_dim != text_encoder.embed_dim:
                raise ValueError(f"image embedding width {backbone.embed_dim} != text width {text_encoder.embed_dim}")
            decoder = ContextDecoder(
                text_encoder.embed_dim, context_decoder_width, context_decoder_heads, context_decoder_layers, dropout
            )
            body = LanguageGuidance(backbone, text_encoder, class_names, "post", decoder, concat_scale=1 / tau)
        else:
            text_encoder, prob_decoder, _ = _ppl_text_side(
                loaded,
                class_names,
                backbone.embed_dim,
                num_attributes=num_attributes,
                n_ctx=n_ctx,
                class_context_length=class_context_length,
                ctx_init_std=0.02 if ctx_init_std is None else ctx_init_std,
                sigma_type=sigma_type,
                positivity=positivity,
                log_var_init=log_var_init,
                log_var_range=(-10.0, 5.0),
                prob_decoder_width=context_decoder_width,
                prob_decoder_heads=context_decoder_heads,
                prob_decoder_layers=prob_decoder_layers,
                post_model_context=False,
                context_decoder_layers=context_decoder_layers,
                dropout=dropout,
            )
            body = PPLGuidance(
                backbone,
                text_encoder,
                prob_decoder,
                class_names,
                n_samples=n_samples,
                tau=tau,
                alpha=alpha,
                beta=beta,
                use_div_loss=use_div_loss,
                use_kl_loss=use_kl_loss,
                concat_scale=1 / tau,
            )
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    if detector == "retinanet":
        fpn = GuidedFPN(body, in_channels, levels=(1, 2, 3), extra="p6p7", out_channels=fpn_channels)
        model = RetinaNet(fpn, num_classes=k, **common, **(detector_kwargs or {}))
    else:
        fpn = GuidedFPN(body, in_channels, levels=(0, 1, 2, 3), extra="maxpool", out_channels=fpn_channels)
        kwargs = {"rpn_post_nms_top_n_train": 1000, **(detector_kwargs or {})}
        model = MaskRCNN(fpn, num_classes=k + 1, **common, **kwargs)
    return CLIPDetector(model, class_names, aux_weight=aux_weight, tau=tau)


@register_model
def denseclip_retinanet_rn50(**kw) -> CLIPDetector:
    """DenseCLIP RetinaNet, CLIP RN50 (COCO: 37.8 AP, DenseCLIP Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN50", detector="retinanet", guidance="denseclip"), kw))


@register_model
def denseclip_retinanet_rn101(**kw) -> CLIPDetector:
    """DenseCLIP RetinaNet, CLIP RN101 (DenseCLIP Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN101", detector="retinanet", guidance="denseclip"), kw))


@register_model
def clip_retinanet_rn50(**kw) -> CLIPDetector:
    """CLIP RN50 RetinaNet baseline without language guidance (DenseCLIP Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN50", detector="retinanet", guidance=None), kw))


@register_model
def clip_retinanet_rn101(**kw) -> CLIPDetector:
    """CLIP RN101 RetinaNet baseline without language guidance (DenseCLIP Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN101", detector="retinanet", guidance=None), kw))


@register_model
def denseclip_maskrcnn_rn50(**kw) -> CLIPDetector:
    """DenseCLIP Mask R-CNN, CLIP RN50 (COCO: 40.2 box / 37.6 mask AP, DenseCLIP Table 4)."""
    return build_clip_detector(**_with(dict(clip_model="RN50", detector="maskrcnn", guidance="denseclip"), kw))


@register_model
def denseclip_maskrcnn_rn101(**kw) -> CLIPDetector:
    """DenseCLIP Mask R-CNN, CLIP RN101 (COCO: 42.6 box / 39.6 mask AP, PPL Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN101", detector="maskrcnn", guidance="denseclip"), kw))


@register_model
def clip_maskrcnn_rn50(**kw) -> CLIPDetector:
    """CLIP RN50 Mask R-CNN baseline without language guidance (DenseCLIP Table 4)."""
    return build_clip_detector(**_with(dict(clip_model="RN50", detector="maskrcnn", guidance=None), kw))


@register_model
def clip_maskrcnn_rn101(**kw) -> CLIPDetector:
    """CLIP RN101 Mask R-CNN baseline without language guidance (DenseCLIP Table 4)."""
    return build_clip_detector(**_with(dict(clip_model="RN101", detector="maskrcnn", guidance=None), kw))


@register_model
def ppl_maskrcnn_rn50(**kw) -> CLIPDetector:
    """PPL Mask R-CNN, CLIP RN50 (COCO: 41.0 box / 38.3 mask AP, PPL Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN50", detector="maskrcnn", guidance="ppl"), kw))


@register_model
def ppl_maskrcnn_rn101(**kw) -> CLIPDetector:
    """PPL Mask R-CNN, CLIP RN101 (COCO: 43.2 box / 40.4 mask AP, PPL Table 3)."""
    return build_clip_detector(**_with(dict(clip_model="RN101", detector="maskrcnn", guidance="ppl"), kw))


__all__ += ["DETECTORS", "GUIDANCE", "build_clip_detector"]
