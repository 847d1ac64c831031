"""State-dict utilities: checking that a state dict fits a model before loading it, so a mismatch is one
clear error, and reading torchvision-layout ResNet checkpoints (the MaskCLIP+ trunk) from local files."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


@contextmanager
def skip_init() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers do nothing inside (as Hugging Face's ``no_init_weights``):
    for a model whose every parameter and persistent buffer is loaded next (strictly), so that random
    initialisation is not computed only to be overwritten. Parameters are left uninitialised."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Keys of ``model`` missing from ``state``, keys of ``state`` the model lacks, and shared keys whose
    shapes differ (each sorted)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return missing, unexpected, mismatched


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``model`` only if it fits exactly, else one ValueError naming what does not fit.

    Args:
        model: The module to load into.
        state: Its state dict (same keys and shapes).
        source: Where ``state`` came from (a path), for the message.
        hint: What to do about a mismatch, appended to the message.
    """
    missing, unexpected, mismatched = state_dict_mismatch(model, state)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches {mismatched[:3]}" + (f"; {hint}" if hint else "")
        )
    model.load_state_dict(state)


def load_trunk_checkpoint(trunk: nn.Module, path: str | os.PathLike) -> None:
    """Load torchvision-layout ResNet weights (``conv1``, ``bn1``, ``layer1..4``; ``fc`` dropped; ``module.``
    prefixes and ``state_dict`` wrappers accepted) from a local .pth/.pt or .safetensors file into a trunk.

    Args:
        trunk: A module with the torchvision ResNet layout, its stem as ``stem.0`` (conv) and ``stem.1``
            (batch norm), e.g. MaskCLIP+'s dilated trunk.
        path: The local checkpoint file (never downloaded).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: The weights do not fit the trunk.
    """
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
    load_state_dict_strict(trunk, renamed, str(path), "pass a torchvision ResNet checkpoint of the same depth")
