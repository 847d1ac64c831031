"""clipdense: language-guided dense prediction with CLIP.

The top-level names are imported lazily so that ``clipdense --help`` and the data modules do
not pay for importing open_clip.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPLoadError": "clipdense.clip.loading",
    "LoadedCLIP": "clipdense.clip.loading",
    "load_clip": "clipdense.clip.loading",
    "create_model": "clipdense.models.registry",
    "list_models": "clipdense.models.registry",
    "OpenVocabPredictor": "clipdense.inference",
    "SegmenterConfig": "clipdense.inference",
    "Segmentation": "clipdense.inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipdense' has no attribute {name!r}")
