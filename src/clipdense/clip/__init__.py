"""CLIP access: loading through open_clip, text embeddings, dense image features."""

from clipdense.clip.dense import MODES, DenseFeatures, dense_clip_encoder
from clipdense.clip.loading import CLIPLoadError, LoadedCLIP, load_clip, read_state_dict
from clipdense.clip.text import TEMPLATE_SETS, ClassEmbeddings, TextEmbedder, resolve_templates

__all__ = [
    "CLIPLoadError",
    "ClassEmbeddings",
    "DenseFeatures",
    "LoadedCLIP",
    "MODES",
    "TEMPLATE_SETS",
    "TextEmbedder",
    "dense_clip_encoder",
    "load_clip",
    "read_state_dict",
    "resolve_templates",
]
