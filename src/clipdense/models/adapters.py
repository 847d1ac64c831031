"""Cache adapters for few-shot CLIP classification: Tip-Adapter / Tip-Adapter-F (Zhang et al., ECCV 2022) and
PLOT-Adapter (Chen et al., ICLR 2023, ``CHENGY12/PLOT`` ``plot-adapter``).

Tip-Adapter keeps a key-value cache of the few-shot training set: the keys are the NK l2-normalised CLIP image
features of the training images (averaged over augmented passes), the values their one-hot labels. An image with
feature f is classified by

    logits = 100 f W^T + alpha * exp(-beta (1 - f K^T)) V,

CLIP's zero-shot logits (W: the C x D text classifier of the dataset's templates) plus the cache's. Tip-Adapter-F
makes the keys K a trainable linear layer, initialised from the cache.

PLOT-Adapter puts a trained PLOT (its prompts fixed) in front and matches CLIP's M *local* features to two key sets,
the global keys and the mean over positions of the local feature maps of the training images, by optimal transport
(``tip_plot`` of ``plot-adapter/utils.py``): for local feature m and key set n the class score is
s_mn = normalise_NK(exp(-beta (1 - f_m K_n^T))) V, cost 1 - s, Sinkhorn (eps 0.3) with uniform marginals, and

    logits = 100 f W^T + alpha * 100 sum_mn T_mn s_mn + 0.5 * PLOT's logits,

PLOT's logits being 0.5 (OT + global) as the adapter's ``CustomCLIP``; the PLOT term is left out in training (as the
official loop). Everything here is a pure ``nn.Module``; the alpha/beta search and the training are
:mod:`clipdense.training.adapters`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.clip.loading import LoadedCLIP, load_clip
from clipdense.clip.text import class_text_embeddings
from clipdense.models._build import DEFAULT_PRETRAINED, check_classes
from clipdense.models.fewshot import PLOT, prompt_classifier_from_clip, similarity_plans
from clipdense.models.registry import register_model

#: Tip-Adapter's fixed scale of the zero-shot logits (``100. * features @ clip_weights``).
CLIP_SCALE = 100.0

#: The template of a dataset's zero-shot classifier when none is given.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def search_grid(scale: float, steps: int) -> list[float]:
    """The official hyper-parameter grid: ``[i * (scale - 0.1) / steps + 0.1 for i in range(steps)]`` (0.1 up to,
    not including, ``scale``)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


class AdapterCache(nn.Module):
    """The learned state of a cache adapter: keys, values, CLIP's text classifier and the fusion weights.

    Args:
        dim: Feature width D.
        cache_size: Training images NK.
        num_classes: C.
        key_sets: Key sets S (Tip-Adapter 1; PLOT-Adapter 2: global keys and mean local keys).

    Attributes:
        keys: Linear D -> S * NK without bias, weight (S * NK) x D, key set-major (trainable in the -F variants).
        values: NK x C one-hot labels.
        clip_weights: C x D l2-normalised zero-shot class embeddings.
        alpha, beta: The fusion weight and the affinity sharpness (set by the search on the validation split).
    """

    def __init__(self, dim: int, cache_size: int, num_classes: int, key_sets: int = 1) -> None:
        super().__init__()
        if cache_size < 1 or num_classes < 1:
            raise ValueError(f"the cache needs images and classes, got cache_size={cache_size}, C={num_classes}")
        self.keys = nn.Linear(dim, key_sets * cache_size, bias=False)
        nn.init.zeros_(self.keys.weight)
        self.register_buffer("values", torch.zeros(cache_size, num_classes))
        self.register_buffer("clip_weights", torch.zeros(num_classes, dim))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("beta", torch.tensor(1.0))
        self.cache_size, self.key_sets = cache_size, key_sets

    @torch.no_grad()
    def fill(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the keys (``(S * NK) x D``) and the values from the NK labels."""
        if keys.shape != self.keys.weight.shape or labels.shape != (self.cache_size,):
            raise ValueError(f"the cache holds {tuple(self.keys.weight.shape)} keys and {self.cache_size} labels, "
                             f"got {tuple(keys.shape)} and {tuple(labels.shape)}")  # fmt: skip
        self.keys.weight.copy_(keys)
        self.values.copy_(F.one_hot(labels.long(), self.values.shape[1]).to(self.values.dtype))


def cache_affinity_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Tip-Adapter's cache logits ``exp(-beta (1 - affinity)) @ values`` (... x NK -> ... x C)."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


class _CacheAdapter(nn.Module):
    """What the adapters share: the cache, CLIP's zero-shot logits, the text classifier, CLIP kept frozen."""

    def __init__(self, loaded: LoadedCLIP, class_names: Sequence[str], cache: AdapterCache) -> None:
        super().__init__()
        self.cache = cache
        self.class_names = list(class_names)
        self.register_buffer("logit_scale", loaded.model.logit_scale.detach().clone().reshape(()))
        self._clip = loaded  # not a submodule: the text tower is only needed to (re)compute the classifier
        self.image_size, self.image_mean, self.image_std = loaded.image_size, tuple(loaded.mean), tuple(loaded.std)

    @property
    def num_classes(self) -> int:
        return self.cache.values.shape[1]

    def frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> _CacheAdapter:
        super().train(mode)
        for m in self.frozen_modules():
            m.train(False)
        return self

    @torch.no_grad()
    def set_text_classifier(self, templates: Sequence[str]) -> None:
        """Compute CLIP's zero-shot classifier of the class names with these templates ("{}" is the name)."""
        names = [n.replace("_", " ") for n in self.class_names]
        emb = class_text_embeddings(self._clip, names, list(templates))
        self.cache.clip_weights.copy_(emb.to(self.cache.clip_weights))

    def cache_text_features(self) -> None:
        """Nothing to cache (the text classifier is a buffer)."""
        return None

    def clip_logits(self, global_feat: torch.Tensor) -> torch.Tensor:
        """B x D normalised global features -> B x C zero-shot logits ``100 f W^T``."""
        return CLIP_SCALE * global_feat @ self.cache.clip_weights.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised images -> B x C logits (with the searched alpha and beta)."""
        feats = self.features(images)
        return self.base_logits(feats) + self.cache.alpha * self.cache_logits(feats, self.cache.beta)


class TipAdapter(_CacheAdapter):
    """Tip-Adapter / Tip-Adapter-F over CLIP's global image feature.

    Args:
        loaded: The CLIP (frozen).
        class_names: C names.
        cache_size: NK training images.
    """

    def __init__(self, loaded: LoadedCLIP, class_names: Sequence[str], cache_size: int) -> None:
        super().__init__(
            loaded, class_names, AdapterCache(loaded.model.visual.output_dim, cache_size, len(class_names))
        )
        self.visual = loaded.model.visual
        self.visual.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.visual]

    @torch.no_grad()
    def cache_features(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """What the cache averages over augmented passes: (B x D unnormalised ``encode_image`` features,)."""
        return (self.visual(images.to(self.logit_scale.dtype)).float(),)

    @staticmethod
    def keys_from_cache_features(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """NK x D keys from the pass-averaged cache features: normalised after averaging (Tip-Adapter)."""
        return F.normalize(feats[0], dim=-1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """(B x D l2-normalised global features,)."""
        return (F.normalize(self.cache_features(images)[0], dim=-1),)

    def train_features(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """The features of a fine-tuning step (:meth:`features`)."""
        return self.features(images)

    def base_logits(self, feats: Sequence[torch.Tensor], training: bool = False) -> torch.Tensor:
        """The logits that do not depend on alpha and beta: CLIP's zero-shot logits."""
        return self.clip_logits(feats[0])

    def cache_logits(self, feats: Sequence[torch.Tensor], beta: float | torch.Tensor) -> torch.Tensor:
        """B x C cache logits ``exp(-beta (1 - f K^T)) V``."""
        return cache_affinity_logits(self.cache.keys(feats[0]), self.cache.values, beta)


class PLOTAdapter(_CacheAdapter):
    """PLOT-Adapter: a trained PLOT's local features matched to the cache's two key sets by optimal transport.

    Args:
        loaded: The CLIP (frozen; shared with ``plot``).
        class_names: C names.
        cache_size: NK training images.
        plot: The PLOT over the same CLIP (its prompts come from a trained PLOT run).
        eps: Entropic regularisation of the cache's Sinkhorn (the adapter's ``thre``: 0.3).
        max_iter, thresh: Sinkhorn iterations at most (100) and stopping threshold (1e-2).
        plot_weight: Weight of PLOT's logits at inference (0.5).
    """

    def __init__(
        self,
        loaded: LoadedCLIP,
        class_names: Sequence[str],
        cache_size: int,
        plot: PLOT,
        eps: float = 0.3,
        max_iter: int = 100,
        thresh: float = 1e-2,
        plot_weight: float = 0.5,
    ) -> None:
        dim = loaded.model.visual.output_dim
        super().__init__(loaded, class_names, AdapterCache(dim, cache_size, len(class_names), key_sets=2))
        self.plot = plot
        self.plot.requires_grad_(False)
        self.eps, self.max_iter, self.thresh, self.plot_weight = eps, max_iter, thresh, plot_weight

    def frozen_modules(self) -> list[nn.Module]:
        return [self.plot]

    def cache_text_features(self) -> None:
        """Keep PLOT's prompt features (constant once its prompts are loaded)."""
        self.plot.cache_text_features()

    @torch.no_grad()
    def cache_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache averages over augmented passes: (B x D global, B x M x D local) l2-normalised features
        (the adapter's ``CustomCLIP`` normalises them before they are averaged)."""
        global_feat, local = self.plot.image_features(images)
        return global_feat.float(), local.float()

    @staticmethod
    def keys_from_cache_features(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """(2 NK) x D keys: the normalised global keys, then the mean over the M positions of the normalised
        local keys (``cat([cache_keys.t(), cache_keymaps.mean(dim=1).t()])``)."""
        return torch.cat([F.normalize(feats[0], dim=-1), F.normalize(feats[1], dim=-1).mean(dim=1)])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B x D global, B x M x D local l2-normalised features, B x C PLOT logits)."""
        global_feat, local = self.cache_features(images)
        return global_feat, local, self.plot_logits(global_feat, local)

    def train_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of a fine-tuning step: (global, local), no PLOT logits (the loss leaves them out)."""
        return self.cache_features(images)

    @torch.no_grad()
    def plot_logits(self, global_feat: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """PLOT's logits as the adapter's ``CustomCLIP`` computes them: 0.5 (OT logits + global logits), the global
        ones against the normalised mean of the N raw prompt features."""
        plot = self.plot
        text = plot.raw_text_features()
        feats = (global_feat.to(text.dtype), local.to(text.dtype))
        return (0.5 * plot.logits_from_features(*feats, text, global_logits=True)).float()

    def base_logits(self, feats: Sequence[torch.Tensor], training: bool = False) -> torch.Tensor:
        """CLIP's zero-shot logits, plus ``plot_weight`` x PLOT's logits outside training."""
        logits = self.clip_logits(feats[0])
        return logits if training else logits + self.plot_weight * feats[2]

    def cache_logits(self, feats: Sequence[torch.Tensor], beta: float | torch.Tensor) -> torch.Tensor:
        """B x C transported cache logits (``tip_plot``)."""
        local = feats[1]
        b, m, _ = local.shape
        affinity = self.cache.keys(local).view(b, m, 2, self.cache.cache_size)  # B x M x 2 x NK
        weights = F.normalize(torch.exp(-beta * (1.0 - affinity)), dim=-1)
        sim = (weights @ self.cache.values).permute(0, 3, 1, 2)  # B x C x M x 2
        plan = similarity_plans(sim, self.eps, self.max_iter, self.thresh)
        return CLIP_SCALE * (plan * sim).sum(dim=(2, 3))


# ------------------------------------------------------------------------------------------- builders


def build_tip_adapter(
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    cache_size: int = 1,
    templates: Sequence[str] | None = DEFAULT_TEMPLATES,
) -> TipAdapter:
    """Tip-Adapter over a CLIP, its cache empty (``cache_size`` slots) until trained or loaded.

    Args:
        class_names: C class names.
        num_classes: C, checked against the names.
        pretrained: CLIP weights (see :func:`clipdense.clip.loading.load_clip`).
        clip_model: CLIP architecture.
        cache_size: NK training images.
        templates: Templates of the zero-shot classifier; None leaves it empty (a checkpoint fills it).
    """
    names = check_classes(class_names, num_classes, need_names=True)
    model = TipAdapter(load_clip(clip_model, pretrained), names, cache_size)
    if templates is not None:
        model.set_text_classifier(templates)
    return model.train(False)


def build_plot_adapter(
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    cache_size: int = 1,
    templates: Sequence[str] | None = DEFAULT_TEMPLATES,
    plot_options: dict | None = None,
    eps: float = 0.3,
    max_iter: int = 100,
    thresh: float = 1e-2,
    plot_weight: float = 0.5,
) -> PLOTAdapter:
    """PLOT-Adapter over a CLIP: a PLOT (``plot_options``: its builder options, e.g. ``n_prompts``) and an empty
    cache. See :func:`build_tip_adapter` and :class:`PLOTAdapter` for the other arguments."""
    names = check_classes(class_names, num_classes, need_names=True)
    loaded = load_clip(clip_model, pretrained)
    plot = prompt_classifier_from_clip("plot", loaded, names, **(plot_options or {}))
    model = PLOTAdapter(loaded, names, cache_size, plot, eps, max_iter, thresh, plot_weight)
    if templates is not None:
        model.set_text_classifier(templates)
    return model.train(False)


_FROM_CHECKPOINT = {"templates": None}  # the checkpoint holds the text classifier


@register_model(checkpoint_options=_FROM_CHECKPOINT)
def tip_adapter_rn50(**kw) -> TipAdapter:
    """Tip-Adapter over CLIP RN50 (training-free: cache, then the alpha/beta search)."""
    return build_tip_adapter(**{"clip_model": "RN50", **kw})


@register_model(checkpoint_options=_FROM_CHECKPOINT)
def tip_adapter_f_rn50(**kw) -> TipAdapter:
    """Tip-Adapter-F over CLIP RN50 (the cache keys fine-tuned)."""
    return build_tip_adapter(**{"clip_model": "RN50", **kw})


@register_model(checkpoint_options=_FROM_CHECKPOINT)
def plot_adapter_rn50(**kw) -> PLOTAdapter:
    """PLOT-Adapter over CLIP RN50 (a trained PLOT N = 4, two key sets through Sinkhorn eps 0.3, keys fine-tuned)."""
    return build_plot_adapter(**{"clip_model": "RN50", **kw})


__all__ = [
    "CLIP_SCALE",
    "DEFAULT_TEMPLATES",
    "AdapterCache",
    "PLOTAdapter",
    "TipAdapter",
    "build_plot_adapter",
    "build_tip_adapter",
    "cache_affinity_logits",
    "search_grid",
]
