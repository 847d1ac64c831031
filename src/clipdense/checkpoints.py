"""Checking that a state dict fits a model before loading it, so a mismatch is one clear error."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


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
