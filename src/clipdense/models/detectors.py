"""DenseCLIP (Rao et al., CVPR 2022) and PPL (Kwon et al., CVPR 2023) for detection and instance segmentation.

torchvision's RetinaNet and Mask R-CNN (heads, anchors, box coding, RoIAlign, NMS, resizing and
normalisation all theirs) read a :class:`GuidedFPN`: a body (CLIP's image trunk, optionally with
DenseCLIP's :class:`~clipdense.models.guidance.LanguageGuidance` or PPL's
:class:`~clipdense.models.ppl.PPLGuidance`, which append the score map s / tau to C5) and torchvision's
FeaturePyramidNetwork. :class:`CLIPDetector` adds the auxiliary box-target loss on the score map.

Labels are contiguous class indices 0..K-1 in and out (R-CNN's background class 0 is handled here).
Shapes: B images, K classes, N boxes; images are float 3 x H x W in [0, 1] (not normalised: the
torchvision transform normalises with CLIP's mean and std).

The builder :func:`build_clip_detector` and the registered names ``denseclip_retinanet_*``,
``clip_retinanet_*``, ``denseclip_maskrcnn_*``, ``clip_maskrcnn_*`` and ``ppl_maskrcnn_*`` (see
:func:`clipdense.models.registry.create_model`) live here too.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from clipdense.clip.loading import load_clip
from clipdense.clip.text import tokenize_class_names
from clipdense.models._build import DEFAULT_PRETRAINED, check_classes, with_defaults
from clipdense.models.backbones import CLIPResNetBackbone
from clipdense.models.guidance import LanguageGuidance
from clipdense.models.ppl import PPLGuidance, ppl_text_side, uncertainty_weighted
from clipdense.models.registry import register_model
from clipdense.models.text import ContextDecoder, ContextTextEncoder

EXTRA_BLOCKS: tuple[str, ...] = ("p6p7", "maxpool")
DETECTORS: tuple[str, ...] = ("retinanet", "maskrcnn")
GUIDANCE: tuple[str | None, ...] = ("denseclip", "ppl", None)


def box_targets(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    num_classes: int,
    size: tuple[int, int],
    stride: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-shaped pixel targets of DenseCLIP's auxiliary detection loss, on the stride-``stride`` grid.

    As the authors' ``build_seg_target``: box coordinates are divided by the stride and floored, then
    clamped to [0, w - 1] x [0, h - 1]; rows y0 <= y < y1 and columns x0 <= x < x1 are set.

    Args:
        boxes: Per image, N_b x 4 XYXY boxes in input-tensor pixels.
        labels: Per image, N_b class indices in 0..K-1.
        num_classes: K.
        size: (h, w) of the grid (the padded input size // stride).
        stride: Grid stride (4).

    Returns:
        ``target``: B x K x h x w, 1 inside each box of class k; ``mask``: B x 1 x h x w, 1 inside the
        union of the image's boxes (where the loss is taken).
    """
    h, w = size
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    target = torch.zeros(len(boxes), num_classes, h, w, device=device)
    mask = torch.zeros(len(boxes), 1, h, w, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        cells = torch.div(b, stride, rounding_mode="floor").long()
        cells[:, 0::2] = cells[:, 0::2].clamp(0, w - 1)
        cells[:, 1::2] = cells[:, 1::2].clamp(0, h - 1)
        for (x0, y0, x1, y1), k in zip(cells.tolist(), lab.tolist(), strict=True):
            target[i, k, y0:y1, x0:x1] = 1
            mask[i, :, y0:y1, x0:x1] = 1
    return target, mask


def box_target_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE of sigmoid(logits) against box targets inside the union of boxes: sum(BCE * mask) / sum(mask).

    The mask is broadcast over the K classes, so the denominator is K x (pixels in the union).

    Args:
        logits: B x K x h x w (the score map / tau upsampled to the target grid).
        target: B x K x h x w box targets from :func:`box_targets`.
        mask: B x 1 x h x w union-of-boxes mask.

    Returns:
        Scalar loss; 0 (with gradient) when no image has a box.
    """
    mask = mask.expand_as(target)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def mc_box_nll(score_maps: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """PPL's Monte-Carlo pixel-text loss (eq. 10) with DenseCLIP's box targets, per image.

    Choice (PPL gives no detection formula): each class is a Bernoulli per pixel (boxes overlap, so
    classes are not exclusive) and eq. 10 becomes -log (1/N) sum_n p(target | s^n / tau), with
    p = prod over classes of sigmoid(+-s^n / tau), averaged over the (pixel, class) pairs inside the
    union of boxes.

    Args:
        score_maps: B x N x K x h' x w' cosine maps of the N samples (stride 32).
        target: B x K x h x w box targets (stride 4).
        mask: B x 1 x h x w union-of-boxes mask.
        tau: Temperature (0.07).

    Returns:
        B losses (0 for an image without boxes).
    """
    n = score_maps.shape[1]
    log_p = []
    for i in range(n):
        logits = F.interpolate(score_maps[:, i].float() / tau, size=target.shape[-2:], mode="bilinear")
        log_p.append(-F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
    nll = -(torch.logsumexp(torch.stack(log_p), dim=0) - math.log(n))  # B x K x h x w
    mask = mask.expand_as(target)
    return (nll * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


class GuidedFPN(nn.Module):
    """A torchvision detection backbone: a feature body and torchvision's FeaturePyramidNetwork.

    Args:
        body: Returns a dict with ``features`` (four maps C2..C5, the score map already appended to
            one of them for language-guided bodies).
        in_channels: Channels of the body's four maps (incl. appended score maps).
        levels: Indices of the maps the FPN reads: (1, 2, 3) for RetinaNet (P3-P5, then P6/P7),
            (0, 1, 2, 3) for Mask R-CNN (P2-P5, then P6 by max-pooling).
        extra: ``"p6p7"`` (mmdet's ``add_extra_convs='on_input'``: two stride-2 convs from the last
            input map) or ``"maxpool"`` (P6 = max-pool of P5).
        out_channels: FPN width (256).
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels: Sequence[int],
        levels: Sequence[int],
        extra: str = "p6p7",
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        if extra not in EXTRA_BLOCKS:
            raise ValueError(f"unknown extra FPN block '{extra}'; choose one of {EXTRA_BLOCKS}")
        self.body = body
        self.levels = tuple(levels)
        inputs = [in_channels[i] for i in self.levels]
        blocks = LastLevelP6P7(inputs[-1], out_channels) if extra == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(inputs, out_channels, extra_blocks=blocks)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Args:
            images: B x 3 x H x W normalised, padded images.

        Returns:
            FPN maps by name (``"0"``, ``"1"``, ... and ``"p6"``/``"p7"`` or ``"pool"``), 256 channels each.
        """
        features = self.body(images)["features"]
        return self.fpn(OrderedDict((str(j), features[i]) for j, i in enumerate(self.levels)))


@contextmanager
def _capture(**modules: nn.Module) -> Iterator[dict[str, Any]]:
    """Record the outputs of the named modules during the block (for losses on intermediate outputs)."""
    seen: dict[str, Any] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, key=key: seen.__setitem__(key, out)) for key, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class CLIPDetector(nn.Module):
    """A torchvision RetinaNet or Mask R-CNN on a :class:`GuidedFPN`, with DenseCLIP's auxiliary loss.

    The auxiliary loss is computed on the score map of the language-guided body against box targets
    (:func:`box_targets`) built from the boxes *after* the detector's own resizing (captured from its
    transform), on the stride-4 grid of the padded input: DenseCLIP's BCE(s / tau) for
    :class:`LanguageGuidance` bodies, PPL's eq. 11 on :func:`mc_box_nll` plus L_div and L_KL for
    :class:`PPLGuidance` bodies. Bodies without a score map (the CLIP baselines) add nothing.

    Attribute contract (training code): ``body`` (the feature body), ``text_encoder``,
    ``context_decoder``, ``gamma``, ``prompting`` (None where absent), ``class_names``, ``num_classes``,
    ``with_masks``; ``backbone_prefix`` / ``context_decoder_prefix`` name the parameters that get the
    backbone learning-rate multiplier / no weight decay on 1-d parameters.

    Args:
        detector: ``torchvision.models.detection.RetinaNet`` (K classes) or ``MaskRCNN`` (K + 1 classes,
            0 = background) whose ``backbone`` is a :class:`GuidedFPN`.
        class_names: K class names, in label order.
        aux_weight: Weight of the auxiliary loss (1.0); 0 disables it.
        tau: Temperature (0.07).
        aux_stride: Stride of the auxiliary target grid (4).
    """

    task = "detection"
    context_decoder_prefix = "detector.backbone.body.context_decoder."

    def __init__(
        self,
        detector: RetinaNet | MaskRCNN,
        class_names: Sequence[str],
        aux_weight: float = 1.0,
        tau: float = 0.07,
        aux_stride: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(detector.backbone, GuidedFPN):
            raise TypeError(f"the detector's backbone must be a GuidedFPN, got {type(detector.backbone).__name__}")
        self.detector = detector
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.label_offset = 0 if isinstance(detector, RetinaNet) else 1
        self.with_masks = isinstance(detector, MaskRCNN)
        self.aux_weight = aux_weight
        self.tau = tau
        self.aux_stride = aux_stride

    @property
    def body(self) -> nn.Module:
        return self.detector.backbone.body

    @property
    def backbone_prefix(self) -> str:
        """Parameter-name prefix of the CLIP image trunk (inside a guidance body, or the body itself)."""
        return "detector.backbone.body.backbone." if hasattr(self.body, "text_encoder") else "detector.backbone.body."

    @property
    def text_encoder(self) -> nn.Module | None:
        return getattr(self.body, "text_encoder", None)

    @property
    def context_decoder(self) -> nn.Module | None:
        return getattr(self.body, "context_decoder", None)

    @property
    def gamma(self) -> nn.Parameter | None:
        return getattr(self.body, "gamma", None)

    @property
    def prompting(self) -> str | None:
        return getattr(self.body, "prompting", None)

    def forward(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Args:
            images: B float 3 x H_b x W_b images in [0, 1] (any sizes: the detector resizes and pads).
            targets: Training only: per image ``boxes`` (N x 4 XYXY pixels), ``labels`` (N, 0..K-1) and,
                for Mask R-CNN, ``masks`` (N x H_b x W_b uint8).

        Returns:
            Training: the losses by name (torchvision's, plus ``aux_box`` or PPL's ``prob``, ``div``,
            ``kl``). Eval: per image ``boxes`` (M x 4 XYXY in that image's pixels), ``scores`` (M),
            ``labels`` (M, 0..K-1) and for Mask R-CNN ``masks`` (M x 1 x H_b x W_b probabilities).
        """
        if not self.training:
            detections = self.detector(list(images))
            for d in detections:
                d["labels"] = d["labels"] - self.label_offset
            return detections
        if targets is None:
            raise ValueError("training needs targets (boxes and labels per image)")
        shifted = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        with _capture(transform=self.detector.transform, body=self.body) as seen:
            losses = dict(self.detector(list(images), shifted))
        if self.aux_weight and "score_map" in seen["body"]:
            image_list, resized = seen["transform"]
            h, w = image_list.tensors.shape[-2:]
            target, mask = box_targets(
                [t["boxes"] for t in resized],
                [t["labels"] - self.label_offset for t in resized],
                self.num_classes,
                (h // self.aux_stride, w // self.aux_stride),
                self.aux_stride,
            )
            losses.update(self._aux_losses(seen["body"], target, mask))
        return losses

    def _aux_losses(self, out: dict[str, Any], target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.body, PPLGuidance):
            nll = mc_box_nll(out["score_maps"], target, mask, self.tau)
            return {"prob": self.aux_weight * uncertainty_weighted(nll, out["log_var"]), **self.body.regularisers(out)}
        logits = F.interpolate(out["score_map"] / self.tau, size=target.shape[-2:], mode="bilinear")
        return {"aux_box": self.aux_weight * box_target_bce(logits, target, mask)}

    @torch.no_grad()
    def forward_dummy(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The dense part of inference for FLOP counting (mmdet's ``forward_dummy``): backbone, FPN and
        dense heads on a padded batch; for Mask R-CNN also the box head on 1000 and the mask head on 100
        RoI features (RoIAlign, NMS and box decoding are not counted).

        Args:
            images: B x 3 x H x W normalised images, H and W multiples of 128.

        Returns:
            The head outputs (their values are meaningless: only the operations count).
        """
        features = list(self.detector.backbone(images).values())
        if isinstance(self.detector, RetinaNet):
            return list(self.detector.head(features).values())
        objectness, deltas = self.detector.rpn.head(features)
        heads = self.detector.roi_heads
        width = self.detector.backbone.out_channels
        box_size = heads.box_roi_pool.output_size
        mask_size = heads.mask_roi_pool.output_size
        boxes = heads.box_predictor(heads.box_head(images.new_empty(1000, width, *box_size)))
        masks = heads.mask_predictor(heads.mask_head(images.new_empty(100, width, *mask_size)))
        return [*objectness, *deltas, *boxes, masks]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone stages (and the frozen text transformer's blocks) in the backward pass."""
        self.body.set_grad_checkpointing(enable)

    def cache_text_embeddings(self) -> torch.Tensor:
        """Cache the class embeddings of the learned prompts: inference then runs no text encoder."""
        return self.body.cache_text_embeddings()


# --- Builder and registered models ---------------------------------------------------------------------------


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
    """Build a detector on CLIP's ResNet (see :func:`~clipdense.models.registry.create_model` for the common arguments).

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
            log_var_init, prob_decoder_layers: PPL options (see :func:`~clipdense.models.ppl.build_ppl`).
        detector_kwargs: Extra arguments of torchvision's ``RetinaNet`` / ``MaskRCNN`` (e.g. score_thresh,
            anchor sizes via ``anchor_generator``). Mask R-CNN defaults to mmdet's 1000 RPN proposals
            per image in training (torchvision: 2000).
    """
    from clipdense.data.transforms import CLIP_MEAN, CLIP_STD

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector '{detector}'; choose one of {DETECTORS}")
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance '{guidance}'; choose one of {GUIDANCE}")
    class_names = check_classes(class_names, num_classes, need_names=guidance is not None)
    k = len(class_names) if class_names is not None else num_classes
    class_names = class_names or [f"class_{i}" for i in range(k)]
    loaded = load_clip(clip_model, pretrained)
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
            text_encoder, prob_decoder, _ = ppl_text_side(
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
    return build_clip_detector(**with_defaults(dict(clip_model="RN50", detector="retinanet", guidance="denseclip"), kw))


@register_model
def denseclip_retinanet_rn101(**kw) -> CLIPDetector:
    """DenseCLIP RetinaNet, CLIP RN101 (DenseCLIP Table 3)."""
    return build_clip_detector(
        **with_defaults(dict(clip_model="RN101", detector="retinanet", guidance="denseclip"), kw)
    )


@register_model
def clip_retinanet_rn50(**kw) -> CLIPDetector:
    """CLIP RN50 RetinaNet baseline without language guidance (DenseCLIP Table 3)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN50", detector="retinanet", guidance=None), kw))


@register_model
def clip_retinanet_rn101(**kw) -> CLIPDetector:
    """CLIP RN101 RetinaNet baseline without language guidance (DenseCLIP Table 3)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN101", detector="retinanet", guidance=None), kw))


@register_model
def denseclip_maskrcnn_rn50(**kw) -> CLIPDetector:
    """DenseCLIP Mask R-CNN, CLIP RN50 (COCO: 40.2 box / 37.6 mask AP, DenseCLIP Table 4)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN50", detector="maskrcnn", guidance="denseclip"), kw))


@register_model
def denseclip_maskrcnn_rn101(**kw) -> CLIPDetector:
    """DenseCLIP Mask R-CNN, CLIP RN101 (COCO: 42.6 box / 39.6 mask AP, PPL Table 3)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN101", detector="maskrcnn", guidance="denseclip"), kw))


@register_model
def clip_maskrcnn_rn50(**kw) -> CLIPDetector:
    """CLIP RN50 Mask R-CNN baseline without language guidance (DenseCLIP Table 4)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN50", detector="maskrcnn", guidance=None), kw))


@register_model
def clip_maskrcnn_rn101(**kw) -> CLIPDetector:
    """CLIP RN101 Mask R-CNN baseline without language guidance (DenseCLIP Table 4)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN101", detector="maskrcnn", guidance=None), kw))


@register_model
def ppl_maskrcnn_rn50(**kw) -> CLIPDetector:
    """PPL Mask R-CNN, CLIP RN50 (COCO: 41.0 box / 38.3 mask AP, PPL Table 3)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN50", detector="maskrcnn", guidance="ppl"), kw))


@register_model
def ppl_maskrcnn_rn101(**kw) -> CLIPDetector:
    """PPL Mask R-CNN, CLIP RN101 (COCO: 43.2 box / 40.4 mask AP, PPL Table 3)."""
    return build_clip_detector(**with_defaults(dict(clip_model="RN101", detector="maskrcnn", guidance="ppl"), kw))


__all__ = [
    "DETECTORS",
    "EXTRA_BLOCKS",
    "GUIDANCE",
    "CLIPDetector",
    "GuidedFPN",
    "box_target_bce",
    "box_targets",
    "build_clip_detector",
    "mc_box_nll",
]
