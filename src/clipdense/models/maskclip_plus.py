"""MaskCLIP+ (Zhou, Loy, Dai, ECCV 2022): a DeepLab target network trained on online MaskCLIP pseudo-labels.

The target network is a dilated ResNet trunk (output stride 8) with a DeepLabv2 ASPP head (dilations
6/12/18/24, summed 3x3 convs) or a DeepLabv3+ head, projecting to D (the CLIP embedding width) features; its
classifier is the FROZEN, l2-normalised CLIP text embeddings of the class names, so that the vocabulary can
be swapped at inference (:meth:`MaskCLIPPlus.set_classes`). Logits are ``scale * cos(feature, text)``.

During training a frozen, training-free MaskCLIP guide (CLIP image tower with the value-path dense features,
optional key smoothing and prompt denoising) labels the SAME augmented crop the target sees:

* ``zeroshot`` (transductive): pixels whose ground truth is a seen class keep it; pixels whose ground truth
  is an unseen class take the guide's argmax over the unseen classes only; after ``self_train_from`` of the
  schedule they take the target network's own argmax over the unseen classes (self-training).
* ``annotation_free``: every pixel takes the guide's argmax over all classes (no self-training); only the
  ignore pixels (255, e.g. augmentation padding) stay ignored.

Because the engine calls ``forward(images)`` and then ``losses(outputs, labels)``, forward stores the guide
scores (and the step) in its outputs and :meth:`MaskCLIPPlus.losses` turns them into pseudo-labels.

The builder :func:`build_maskclip_plus` and the registered names ``maskclip_plus_*`` (see
:func:`clipdense.models.registry.create_model`) live here too.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP

from clipdense.checkpoints import load_trunk_checkpoint
from clipdense.clip.dense import dense_clip_encoder
from clipdense.clip.loading import load_clip
from clipdense.clip.refine import key_smoothing, prompt_denoise
from clipdense.clip.text import class_text_embeddings, text_embedding_width
from clipdense.models._build import DEFAULT_PRETRAINED, check_classes, with_defaults
from clipdense.models.registry import register_model
from clipdense.models.segmentors import segmentation_cross_entropy

logger = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = ("zeroshot", "annotation_free")
HEADS: tuple[str, ...] = ("deeplabv2", "deeplabv3plus")
GUIDE_SCALE = 100.0  # MaskCLIP's softmax temperature for its cosine scores (refinements, confidence).


def _to_probs(scores: torch.Tensor, scale: float | None) -> torch.Tensor:
    return scores if scale is None else F.softmax(scale * scores, dim=1)


def pseudo_labels(
    scores: torch.Tensor,
    labels: torch.Tensor | None,
    unseen: Sequence[int] | set[int],
    mode: str = "zeroshot",
    confidence_threshold: float = 0.0,
    scale: float | None = GUIDE_SCALE,
    ignore_index: int = 255,
) -> torch.Tensor:
    """MaskCLIP+ pseudo-labels from class scores (the guide's cosines or the model's own logits).

    Args:
        scores: B x C x h x w class scores; upsampled bilinearly to the label size when it differs.
        labels: B x H x W ground truth (``ignore_index`` where unlabelled); in ``annotation_free`` mode only
            its ignore pixels are used (may be None there, then H x W = h x w).
        unseen: Indices of the unseen classes (``zeroshot``).
        mode: ``"zeroshot"`` or ``"annotation_free"``.
        confidence_threshold: Pseudo-labelled pixels whose max of softmax(scale * scores) (over the
            candidate classes: unseen ones in ``zeroshot``, all in ``annotation_free``) is below it become
            ``ignore_index``. 0 disables (as every official config does).
        scale: Softmax temperature for the confidence (100 for MaskCLIP cosines, 1 for logits); None: the scores
            are already probabilities (the guide's key-smoothed output) and their max is the confidence, as in
            the official ``conf_thresh``.
        ignore_index: The ignore label.

    Returns:
        B x H x W long targets.
    """
    if mode not in PROTOCOLS:
        raise ValueError(f"unknown pseudo-label mode '{mode}'; choose one of {PROTOCOLS}")
    size = labels.shape[-2:] if labels is not None else scores.shape[-2:]
    if scores.shape[-2:] != size:
        scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    scores = scores.float()
    if mode == "annotation_free":
        conf, target = _to_probs(scores, scale).max(dim=1)
        pseudo = torch.ones_like(target, dtype=torch.bool) if labels is None else labels != ignore_index
        target = torch.where(pseudo, target, torch.full_like(target, ignore_index))
    else:
        if labels is None:
            raise ValueError("zero-shot pseudo-labels need the ground truth: pass labels")
        target = labels.long().clone()
        unseen_idx = torch.as_tensor(sorted(unseen), dtype=torch.long, device=scores.device)
        if unseen_idx.numel() == 0:
            return target
        conf, arg = _to_probs(scores.index_select(1, unseen_idx), scale).max(dim=1)
        pseudo = torch.isin(target, unseen_idx)
        target = torch.where(pseudo, unseen_idx[arg], target)
    if confidence_threshold > 0:
        target = target.masked_fill(pseudo & (conf < confidence_threshold), ignore_index)
    return target


class DilatedResNetTrunk(nn.Module):
    """A ResNet with the last two strides replaced by dilation (output stride 8).

    Args:
        resnet: A torchvision ``ResNet`` built with ``replace_stride_with_dilation=[False, True, True]``, or any
            module whose ``layer1`` .. ``layer4`` are already dilated (see :func:`dilated_clip_trunk`).
        stem: The layers before ``layer1`` (default: torchvision's conv1, bn1, relu, maxpool of ``resnet``).

    Attributes:
        out_channels: Channels of (layer1, layer4).
    """

    def __init__(self, resnet: nn.Module, stem: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem if stem is not None else nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = (_last_channels(self.layer1), _last_channels(self.layer4))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            images: B x 3 x H x W.

        Returns:
            (B x C1 x H/4 x W/4 low-level features, B x C4 x H/8 x W/8 high-level features).
        """
        low = self.layer1(self.stem(images))
        return low, self.layer4(self.layer3(self.layer2(low)))


def dilated_clip_trunk(visual: nn.Module) -> DilatedResNetTrunk:
    """A CLIP ModifiedResNet image tower (its weights, without the attention pool) made output-stride 8 the way
    DeepLab dilates a ResNet: layer3 and layer4 lose their 2x2 average-pool downsampling and their 3x3 convolutions
    dilate by 2 and 4 (the first block of each keeps the previous rate, as torchvision's
    ``replace_stride_with_dilation``). The trained weights stay valid; only the sampling grid changes.

    Args:
        visual: An ``open_clip`` ``ModifiedResNet`` (copied, so the guide's tower stays untouched).
    """
    visual = copy.deepcopy(visual)
    for layer, rate in ((visual.layer3, 2), (visual.layer4, 4)):
        for i, block in enumerate(layer):
            block.avgpool = nn.Identity()
            if block.downsample is not None:  # open_clip's shortcut starts with its pool (named "-1")
                block.downsample = nn.Sequential(*(m for m in block.downsample if not isinstance(m, nn.AvgPool2d)))
            d = rate // 2 if i == 0 else rate
            block.conv2.dilation, block.conv2.padding = (d, d), (d, d)
    stem = nn.Sequential(
        visual.conv1, visual.bn1, visual.act1, visual.conv2, visual.bn2, visual.act2,
        visual.conv3, visual.bn3, visual.act3, visual.avgpool,
    )  # fmt: skip
    return DilatedResNetTrunk(visual, stem)


def _last_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


class _NarrowBottleneck(Bottleneck):
    expansion = 1


def build_trunk(name: str) -> DilatedResNetTrunk:
    """A dilated (output stride 8) ResNet trunk with random weights; load weights with
    :func:`clipdense.checkpoints.load_trunk_checkpoint`.

    Args:
        name: ``"resnet101"``, ``"resnet50"`` or ``"tiny"`` (one narrow bottleneck per stage; for tests).
    """
    from torchvision.models import resnet50, resnet101

    dilate = [False, True, True]
    if name == "resnet101":
        return DilatedResNetTrunk(resnet101(weights=None, replace_stride_with_dilation=dilate))
    if name == "resnet50":
        return DilatedResNetTrunk(resnet50(weights=None, replace_stride_with_dilation=dilate))
    if name == "tiny":
        return DilatedResNetTrunk(
            ResNet(_NarrowBottleneck, [1, 1, 1, 1], width_per_group=16, replace_stride_with_dilation=dilate)
        )
    raise ValueError(f"unknown trunk '{name}'; choose resnet101, resnet50 or tiny")


class ASPPv2(nn.Module):
    """DeepLabv2 ASPP: the sum of parallel 3x3 convs with dilations 6/12/18/24 (each with a bias).

    Args:
        in_channels: Trunk channels.
        out_channels: Output channels (D, the embedding width).
        dilations: Dilation rates.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d) for d in dilations)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """B x C x h x w high-level features -> B x D x h x w (``low`` unused)."""
        return sum(conv(high) for conv in self.convs)


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+ decoder: torchvision's ASPP (rates 12/24/36 for output stride 8) on the high-level map,
    upsampled and fused with 48 reduced low-level channels, two 3x3 convs, then a 1x1 projection to D.

    Args:
        low_channels: Low-level (stride 4) channels.
        high_channels: High-level (stride 8) channels.
        out_channels: D.
        channels: Width of the ASPP and the fusion convs (256).
        rates: Atrous rates of the ASPP.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int,
        channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
    ) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, list(rates), channels)
        self.reduce = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + 48, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.project = nn.Conv2d(channels, out_channels, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """B x C1 x H/4 x W/4 and B x C4 x H/8 x W/8 -> B x D x H/4 x W/4."""
        x = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(self.fuse(torch.cat([x, self.reduce(low)], dim=1)))


class MaskCLIPGuide(nn.Module):
    """Frozen training-free MaskCLIP, the pseudo-label source: dense CLIP features against text embeddings.

    Args:
        encoder: A dense CLIP encoder (``dense_clip_encoder(visual, "maskclip")``) returning DenseFeatures.
        key_smoothing: Threshold of MaskCLIP key smoothing (0 disables; the official annotation-free configs
            use 1.0).
        prompt_denoise: Threshold of MaskCLIP prompt denoising (0 disables; official: 0.5).
        key_norm: Key normalisation of key smoothing (see :func:`~clipdense.clip.refine.key_smoothing`).
    """

    def __init__(
        self, encoder: nn.Module, key_smoothing: float = 0.0, prompt_denoise: float = 0.0, key_norm: str = "official"
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.key_smoothing = key_smoothing
        self.prompt_denoise = prompt_denoise
        self.key_norm = key_norm
        self.requires_grad_(False)
        self.eval()

    @property
    def returns_probs(self) -> bool:
        """Whether :meth:`forward` returns probabilities (key smoothing on) rather than cosine scores."""
        return self.key_smoothing > 0

    def train(self, mode: bool = True) -> MaskCLIPGuide:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Args:
            images: B x 3 x H x W normalised images.
            text: C x D l2-normalised class embeddings.

        Returns:
            B x C x h x w refined outputs, h = H / the encoder stride: cosine scores (-100 for classes prompt
            denoising drops), or with key smoothing the (smoothed) probabilities, as the official head returns.
        """
        feats = self.encoder(images)
        scores = torch.einsum("bdhw,cd->bchw", F.normalize(feats.dense.float(), dim=1), text.float())
        if self.prompt_denoise > 0:
            scores = prompt_denoise(scores, self.prompt_denoise)
        if self.key_smoothing > 0:
            scores = key_smoothing(scores, feats.keys.float(), self.key_smoothing, self.key_norm)
        return scores


class MaskCLIPPlus(nn.Module):
    """MaskCLIP+: DeepLab target network with a frozen text classifier, trained on MaskCLIP pseudo-labels.

    Args:
        backbone: Trainable dilated trunk returning (low, high) feature maps (see :class:`DilatedResNetTrunk`).
        head: Maps (low, high) to B x D x h x w features (:class:`ASPPv2` or :class:`DeepLabV3PlusHead`).
        guide: Frozen :class:`MaskCLIPGuide` (None: no pseudo-labels; plain supervised training on the GT).
        class_names: C class names in label order.
        text_embeddings: C x D CLIP text embeddings of the classes (l2-normalised here).
        unseen: Indices of the unseen classes (``zeroshot``).
        protocol: ``"zeroshot"`` or ``"annotation_free"``.
        confidence_threshold: See :func:`pseudo_labels` (0 disables).
        self_train_from: Fraction of ``total_iters`` after which unseen pixels take the model's own argmax
            (``zeroshot`` only; None or >= 1 disables).
        total_iters: Length of the schedule in training forwards.
        tau: Temperature: logits = cos / tau (0.07, fixed unless ``learn_tau``).
        learn_tau: Learn log(1 / tau) as a parameter.
        ignore_index: Unlabelled pixel value.

    Attributes:
        text_embeddings: C x D buffer, the frozen classifier.
        step: Persistent buffer counting training forwards (restored on resume).
        seen, unseen: Sorted class index lists.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        guide: MaskCLIPGuide | None,
        class_names: Sequence[str],
        text_embeddings: torch.Tensor,
        unseen: Sequence[int] = (),
        protocol: str = "zeroshot",
        confidence_threshold: float = 0.0,
        self_train_from: float | None = 0.1,
        total_iters: int = 20000,
        tau: float = 0.07,
        learn_tau: bool = False,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{protocol}'; choose one of {PROTOCOLS}")
        self.backbone = backbone
        self.head = head
        self.guide = guide
        self.protocol = protocol
        self.confidence_threshold = confidence_threshold
        self.self_train_from = self_train_from
        self.total_iters = total_iters
        self.ignore_index = ignore_index
        log_scale = torch.tensor(1.0 / tau).log()
        if learn_tau:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        # Persistent: a run rebuilt with random CLIP weights (build_from_run) gets its classifier back.
        self.register_buffer("text_embeddings", torch.empty(0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.set_classes(class_names, text_embeddings, unseen)

    # ------------------------------------------------------------------ vocabulary
    def set_classes(
        self, class_names: Sequence[str], text_embeddings: torch.Tensor, unseen: Sequence[int] | None = None
    ) -> None:
        """Swap the vocabulary (open vocabulary at inference).

        Args:
            class_names: C names.
            text_embeddings: C x D CLIP text embeddings (l2-normalised here).
            unseen: Unseen class indices in the new vocabulary (default: none).
        """
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] != len(class_names):
            raise ValueError(f"expected {len(class_names)} x D text embeddings, got {tuple(text_embeddings.shape)}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        device = self.step.device
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1).to(device)
        unseen = sorted(set(int(i) for i in (unseen or ())))
        if any(i < 0 or i >= self.num_classes for i in unseen):
            raise ValueError(f"unseen indices {unseen} out of range for {self.num_classes} classes")
        self.unseen = unseen
        self.seen = [i for i in range(self.num_classes) if i not in set(unseen)]

    @property
    def self_train_step(self) -> int | None:
        """The training forward from which zero-shot unseen pixels use self-training (None: never)."""
        if self.protocol != "zeroshot" or self.self_train_from is None or self.self_train_from >= 1:
            return None
        return int(round(self.self_train_from * self.total_iters))

    def train(self, mode: bool = True) -> MaskCLIPPlus:
        """Set train/eval mode; the guide stays in eval mode."""
        super().train(mode)
        if self.guide is not None:
            self.guide.eval()
        return self

    # ------------------------------------------------------------------ forward
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x D x h x w target-network features (h = H/8, DeepLabv3+: H/4)."""
        low, high = self.backbone(images)
        return self.head(low, high)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            images: B x 3 x H x W normalised images (the augmented crop).

        Returns:
            ``logits``: B x C x H/8 x W/8 (DeepLabv3+: H/4) = scale * cosine to the text embeddings. In train
            mode also ``guide_scores`` (B x C x h' x w' MaskCLIP cosines; absent when self-training replaces
            the guide) and ``step`` (the training forward index, 0-d).
        """
        feats = F.normalize(self.features(images), dim=1)
        logits = self.log_scale.exp() * torch.einsum("bdhw,cd->bchw", feats, self.text_embeddings.to(feats.dtype))
        out = {"logits": logits}
        if self.training:
            step = self.step.clone()
            out["step"] = step
            if self.guide is not None and not self._self_training(int(step)):
                out["guide_scores"] = self.guide(images, self.text_embeddings)
            self.step += 1
        return out

    def _self_training(self, step: int) -> bool:
        start = self.self_train_step
        return start is not None and step >= start

    def make_targets(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels for a training batch.

        Args:
            outputs: The dict returned by :meth:`forward` in train mode.
            labels: B x H x W ground truth (255 ignored).

        Returns:
            B x H x W targets at the label resolution.
        """
        if self.guide is None:
            return labels.long()
        if self.protocol == "zeroshot" and self._self_training(int(outputs["step"])):
            scores, scale = outputs["logits"].detach(), 1.0
        else:
            scores, scale = outputs["guide_scores"], None if self.guide.returns_probs else GUIDE_SCALE
        return pseudo_labels(
            scores, labels, self.unseen, self.protocol, self.confidence_threshold, scale, self.ignore_index
        )

    def losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            outputs: The dict returned by :meth:`forward` (train mode).
            labels: B x H x W class indices (255 where unlabelled).

        Returns:
            ``decode``: CE of the logits, upsampled to the label size, against the pseudo-labels (255 ignored).
        """
        targets = self.make_targets(outputs, labels)
        return {"decode": segmentation_cross_entropy(outputs["logits"], targets, self.ignore_index)}


# --- Builder and registered models ---------------------------------------------------------------------------

_FROM_CHECKPOINT = {"from_checkpoint": True}  # what build_architecture passes: see build_maskclip_plus


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
    key_norm: str = "official",
    templates: str | Sequence[str] = "ensemble",
    tau: float = 0.07,
    learn_tau: bool = False,
    head_channels: int = 256,
    from_checkpoint: bool = False,
) -> MaskCLIPPlus:
    """Build MaskCLIP+ (see :func:`~clipdense.models.registry.create_model` for the common arguments).

    Args:
        clip_model: CLIP architecture of the guide and the text embeddings (RN50 in the paper's zero-shot runs).
        head: ``"deeplabv2"`` (ASPP 6/12/18/24) or ``"deeplabv3plus"``.
        trunk: ``"resnet101"``, ``"resnet50"``, ``"tiny"`` (tests), or ``"clip"``: a trainable copy of the guide
            CLIP's image tower (a ModifiedResNet, with its ``pretrained`` weights; see
            :func:`dilated_clip_trunk`), for worlds without ImageNet weights such as ShapesWorld. Dilated,
            output stride 8.
        trunk_checkpoint: Local torchvision ResNet weights (None: random trunk; never downloaded).
        guide: ``"maskclip"`` or None (no pseudo-labels: supervised on the GT).
        unseen_classes: Unseen class names, or a shipped split name (``"voc"``, ``"context"``, ``"cocostuff"``).
        protocol: ``"zeroshot"`` or ``"annotation_free"``.
        confidence_threshold, self_train_from, total_iters, tau, learn_tau: See :class:`MaskCLIPPlus`.
        key_smoothing, prompt_denoise: MaskCLIP refinement thresholds of the guide (0 disables). The official
            annotation-free configs use neither with RN50 and key smoothing 1.0 / prompt denoising 0.5 with ViT-B/16.
        key_norm: Key normalisation of the guide's key smoothing (``official`` or ``cosine``).
        templates: Prompt templates of the text embeddings.
        head_channels: Width of the DeepLabv3+ decoder.
        from_checkpoint: Every weight, the ``text_embeddings`` classifier included, is loaded right after the
            build (a trained run, :func:`clipdense.runs.build_from_run`): the classifier starts as a C x D zero
            buffer instead of encoding C x len(templates) prompts with a CLIP whose weights are then discarded,
            and neither a random trunk nor a zero-shot config without unseen classes is warned about (they
            concern training).
    """
    from clipdense.data.splits import AVAILABLE_SPLITS, class_indices, load_unseen_split

    class_names = check_classes(class_names, num_classes, need_names=True)
    if head not in HEADS:
        raise ValueError(f"unknown head '{head}'; choose one of {HEADS}")
    if guide not in ("maskclip", None):
        raise ValueError(f"unknown guide '{guide}'; MaskCLIP+ supports 'maskclip' (or None)")
    if isinstance(unseen_classes, str):
        if unseen_classes not in AVAILABLE_SPLITS:
            raise ValueError(f"unseen_classes '{unseen_classes}': pass a list of names or one of {AVAILABLE_SPLITS}")
        unseen_classes = load_unseen_split(unseen_classes)
    unseen = class_indices(unseen_classes, class_names) if unseen_classes else []
    if protocol == "zeroshot" and guide is not None and not unseen and not from_checkpoint:
        logger.warning("MaskCLIP+ zero-shot without unseen classes: plain supervised training on the GT")
    loaded = load_clip(clip_model, pretrained)
    if from_checkpoint:
        text = torch.zeros(len(class_names), text_embedding_width(loaded.model))
    else:
        text = class_text_embeddings(loaded, class_names, templates)
    if trunk == "clip":
        if not hasattr(loaded.model.visual, "attnpool"):
            raise ValueError(f"trunk='clip' needs a CLIP ResNet image tower; {clip_model} has none")
        body = dilated_clip_trunk(loaded.model.visual)
    else:
        body = build_trunk(trunk)
    if trunk_checkpoint is not None:
        load_trunk_checkpoint(body, trunk_checkpoint)
    elif trunk not in ("tiny", "clip") and not from_checkpoint:
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
        maskclip = MaskCLIPGuide(encoder, key_smoothing, prompt_denoise, key_norm)
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


@register_model(checkpoint_options=_FROM_CHECKPOINT)
def maskclip_plus_deeplabv2_r101(**kw) -> MaskCLIPPlus:
    """MaskCLIP+ DeepLabv2 on dilated ResNet-101, RN50 CLIP guide (zero-shot VOC 86.1 / COCO-Stuff 54.7 unseen mIoU)."""
    return build_maskclip_plus(**with_defaults(dict(clip_model="RN50", head="deeplabv2", trunk="resnet101"), kw))


@register_model(checkpoint_options=_FROM_CHECKPOINT)
def maskclip_plus_deeplabv3plus_r101(**kw) -> MaskCLIPPlus:
    """MaskCLIP+ DeepLabv3+ on dilated ResNet-101, RN50 CLIP guide (zero-shot Context: 66.7 unseen mIoU)."""
    return build_maskclip_plus(**with_defaults(dict(clip_model="RN50", head="deeplabv3plus", trunk="resnet101"), kw))


__all__ = [
    "GUIDE_SCALE",
    "HEADS",
    "PROTOCOLS",
    "ASPPv2",
    "DeepLabV3PlusHead",
    "DilatedResNetTrunk",
    "MaskCLIPGuide",
    "MaskCLIPPlus",
    "build_maskclip_plus",
    "build_trunk",
    "dilated_clip_trunk",
    "pseudo_labels",
]
