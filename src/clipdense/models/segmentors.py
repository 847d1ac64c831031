"""DenseCLIP (Rao et al., CVPR 2022) semantic segmentors and the paper's CLIP + Semantic FPN baseline.

Both map B x 3 x H x W images to a dict with ``logits`` (B x K x H/4 x W/4) and compute their
training losses with :meth:`losses`. DenseCLIP also returns the pixel-text score map
s = <l2norm(z), l2norm(t)> (B x K x h x w, raw cosine), concatenated to one pyramid level before the
neck and supervised by the auxiliary identity loss CE(s / tau).

Attribute contract (used by the training code): ``backbone``, ``text_encoder`` (frozen encoder under
``text_encoder.encoder``, learnable ``text_encoder.contexts``), ``context_decoder``, ``gamma``,
``neck``, ``decode_head``, ``class_names``, ``num_classes``. Absent parts are None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.models.guidance import PROMPTING, LanguageGuidance
from clipdense.models.text import ContextTextEncoder


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


__all__ = ["PROMPTING", "CLIPFPNSegmentor", "DenseCLIPSegmentor", "segmentation_cross_entropy"]
