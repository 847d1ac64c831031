"""Shared fixtures of the inference tests: a tiny random-weight CLIP and a 75 x 110 image."""

import pytest
import torch

from clipdense.clip import load_clip


@pytest.fixture(scope="module")
def clip(tiny_configs):
    torch.manual_seed(0)
    return load_clip("tiny-RN", None)


@pytest.fixture
def image():
    torch.manual_seed(1)
    return (torch.rand(3, 75, 110) * 255).to(torch.uint8)
