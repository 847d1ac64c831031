"""The model registry (timm style): ``create_model(name, class_names=..., pretrained=...)`` builds any
registered DenseCLIP (Rao et al., CVPR 2022), PPL, MaskCLIP+ or detector model; ``list_models()`` gives the names.

Each family builds and registers itself in its own module (``segmentors.py``: DenseCLIP and CLIP + FPN,
``ppl.py``, ``maskclip_plus.py``, ``detectors.py``) with :func:`register_model`; importing
:mod:`clipdense.models` imports them all, so every name is registered before this module is used.
``pretrained`` goes to :func:`clipdense.clip.loading.load_clip` (a tag such as ``"openai"``, a local
file, or None for random weights, which must be asked for explicitly). The ``clip_model`` override
picks another CLIP architecture (e.g. the tiny test towers).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from clipdense.config import ConfigError
from clipdense.models._build import DEFAULT_PRETRAINED

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_CHECKPOINT_OPTIONS: dict[str, dict[str, Any]] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, checkpoint_options: Mapping[str, Any] | None = None
) -> Callable[..., nn.Module]:
    """Register a builder under its function name (timm style): ``@register_model`` or
    ``@register_model(checkpoint_options=...)``.

    Args:
        fn: The builder.
        checkpoint_options: Builder options for a model whose every weight is loaded right after it is built
            (see :func:`checkpoint_options`), e.g. ``{"from_checkpoint": True}`` to skip work a checkpoint
            overwrites. Only builders that take them declare them: others would refuse an unknown option.
    """

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[fn.__name__] = fn
        if checkpoint_options:
            _CHECKPOINT_OPTIONS[fn.__name__] = dict(checkpoint_options)
        return fn

    return register if fn is None else register(fn)


def checkpoint_options(name: str) -> dict[str, Any]:
    """The builder options of a registered model for a build whose weights all come from a checkpoint next
    (:func:`clipdense.runs.build_architecture`); empty for models that declared none."""
    return dict(_CHECKPOINT_OPTIONS.get(name, {}))


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
        ValueError: Unknown name or missing class names; :class:`clipdense.config.ConfigError` (a
            ValueError) for an unknown option.
        clipdense.clip.CLIPLoadError: CLIP weights cannot be loaded.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    try:
        return _MODELS[name](class_names=class_names, num_classes=num_classes, pretrained=pretrained, **overrides)
    except TypeError as e:  # a misspelt option: "build_x() got an unexpected keyword argument 'clip_modle'"
        unknown = [k for k in overrides if f"unexpected keyword argument '{k}'" in str(e)]
        if not unknown:
            raise
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
        raise ConfigError(
            f"model {name} has no option '{unknown[0]}' (in model.overrides / create_model keywords); "
            f"its options are the arguments of {module}.{str(e).split('(')[0]}"
        ) from e


__all__ = ["checkpoint_options", "create_model", "list_models", "register_model"]
