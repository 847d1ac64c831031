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
