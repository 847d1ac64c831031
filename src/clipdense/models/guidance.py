"""DenseCLIP's (Rao et al., CVPR 2022) language guidance, shared by its segmentors and detectors.

CLIP's image backbone gives pyramid features and the attention pool's global z_bar and dense z;
learned text contexts give class embeddings t, updated by context-aware prompting; the pixel-text
score map s = <l2norm(z), l2norm(t)> is concatenated to one pyramid level, which the task's neck
(Semantic FPN, or a detector's FPN) then reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.models.text import ContextDecoder, ContextTextEncoder, PreModelPrompter

PROMPTING: tuple[str, ...] = ("post", "pre", "none")


def pixel_text_scores(dense_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel embedding with every class embedding.

    Args:
        dense_embed: B x D x h x w pixel embeddings z.
        text_embed: B x K x D class embeddings t.

    Returns:
        B x K x h x w score map s.
    """
    return torch.einsum("bdhw,bkd->bkhw", F.normalize(dense_embed, dim=1), F.normalize(text_embed, dim=2))


class LanguageGuidance(nn.Module):
    """Language-guided pyramid features (DenseCLIP's ``extract_feat``).

    Post-model prompting (default): t <- t + gamma * ContextDecoder(t, [z_bar; z]) with gamma a
    per-channel D vector initialised to 1e-4. Pre-model: a :class:`PreModelPrompter` turns
    [z_bar; z] into the contexts and the text encoder runs per image. ``"none"``: language prompt
    only (learned contexts, no vision-to-language context).

    Attribute contract (used by the training code): ``backbone``, ``text_encoder`` (frozen encoder under
    ``text_encoder.encoder``, learnable ``text_encoder.contexts``), ``context_decoder``, ``gamma``,
    ``class_names``, ``num_classes``, ``prompting``. Absent parts are None.

    Args:
        backbone: Image backbone returning ``features`` (four maps), ``global_embed`` (B x D) and
            ``dense_embed`` (B x D x h x w).
        text_encoder: :class:`ContextTextEncoder` over the K classes.
        class_names: K class names (display names, in label order).
        prompting: ``"post"``, ``"pre"`` or ``"none"``.
        context_decoder: :class:`ContextDecoder` for ``"post"``, :class:`PreModelPrompter` for ``"pre"``,
            None for ``"none"``.
        score_concat_index: Pyramid level that gets the score map (3 = C5 for ResNets, 2 for ViT-B/16).
        concat_scale: Factor on the score map before concatenation: 1 for segmentation (raw cosine, the
            authors' segmentor), 1 / tau for detection (the authors' detectors concatenate s / tau).
        gamma_init: Initial value of gamma.
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_encoder: ContextTextEncoder,
        class_names: Sequence[str],
        prompting: str = "post",
        context_decoder: nn.Module | None = None,
        score_concat_index: int = 3,
        concat_scale: float = 1.0,
        gamma_init: float = 1e-4,
    ) -> None:
        super().__init__()
        if prompting not in PROMPTING:
            raise ValueError(f"unknown prompting '{prompting}'; choose one of {PROMPTING}")
        expected = {"post": ContextDecoder, "pre": PreModelPrompter, "none": type(None)}[prompting]
        if not isinstance(context_decoder, expected):
            raise TypeError(
                f"prompting='{prompting}' needs context_decoder of type {expected.__name__}, "
                f"got {type(context_decoder).__name__}"
            )
        if len(class_names) != text_encoder.num_classes:
            raise ValueError(f"{len(class_names)} class names but the text encoder has {text_encoder.num_classes}")
        if (prompting == "pre") != (text_encoder.contexts is None):
            raise ValueError("the text encoder must own learned contexts exactly when prompting is not 'pre'")
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.context_decoder = context_decoder
        if prompting == "post":
            self.gamma = nn.Parameter(torch.full((text_encoder.embed_dim,), gamma_init))
        else:
            self.register_parameter("gamma", None)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.prompting = prompting
        self.score_concat_index = score_concat_index
        self.concat_scale = concat_scale

    def text_embeddings(self, global_embed: torch.Tensor, dense_embed: torch.Tensor) -> torch.Tensor:
        """Class embeddings t for each image.

        Args:
            global_embed: B x D z_bar.
            dense_embed: B x D x h x w z.

        Returns:
            B x K x D text embeddings (after context-aware prompting; not normalised).
        """
        b = global_embed.shape[0]
        visual = torch.cat([global_embed[:, None], dense_embed.flatten(2).transpose(1, 2)], dim=1)  # B x (1+hw) x D
        if self.prompting == "pre":
            return self.text_encoder(self.context_decoder(visual))
        t = self.text_encoder().to(visual.dtype).expand(b, -1, -1)
        if self.prompting == "post":
            t = t + self.gamma * self.context_decoder(t, visual)
        return t

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``features``: the backbone's four maps, level ``score_concat_index`` with the K channels of
            ``concat_scale * score_map`` appended; ``score_map``: B x K x h x w cosine similarities of z
            and t (h = H/32 for ResNets, H/16 for ViT-B/16); ``text_embeddings``: B x K x D.
        """
        out = self.backbone(images)
        features = list(out["features"])
        t = self.text_embeddings(out["global_embed"], out["dense_embed"])
        score_map = pixel_text_scores(out["dense_embed"], t)
        i = self.score_concat_index
        features[i] = torch.cat([features[i], (score_map * self.concat_scale).to(features[i].dtype)], dim=1)
        return {"features": features, "score_map": score_map, "text_embeddings": t}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute backbone stages/blocks and the (frozen) text transformer's
        blocks in the backward pass."""
        self.backbone.set_grad_checkpointing(enable)
        self.text_encoder.encoder.transformer.grad_checkpointing = enable

    def cache_text_embeddings(self) -> torch.Tensor:
        """Cache the K x D class embeddings of the learned contexts (post-model and prompt-only) so that
        inference runs no text encoder; the context decoder still runs per image."""
        return self.text_encoder.cache_text_embeddings()


__all__ = ["PROMPTING", "LanguageGuidance", "pixel_text_scores"]
