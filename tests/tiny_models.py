"""Tiny CLIP architectures for fast CPU tests, and an OpenAI-style TorchScript holder."""

import json

import open_clip
import torch

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "tiny-RN": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": TINY_TEXT,
    },
    "tiny-ViT": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": TINY_TEXT,
    },
}


def register_tiny_configs(directory) -> None:
    for name, cfg in TINY_CONFIGS.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


class StateHolder(torch.nn.Module):
    """A TorchScript archive holding a CLIP state dict the way OpenAI's .pt files do."""

    def __init__(self, state):
        super().__init__()
        for key, value in state.items():
            parent = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_buffer(leaf, value.clone())
        self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
