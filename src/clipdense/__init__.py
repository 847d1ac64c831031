"""clipdense: language-guided dense prediction with CLIP.

The top-level names are the README's and are imported lazily, so that ``clipdense --help`` and the
data modules do not pay for importing open_clip. ARCHITECTURE.md shows the layers below.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {  # what the README uses; everything else is imported from its layer's package
    "load_clip": "clipdense.clip.loading",
    "create_model": "clipdense.models.registry",
    "list_models": "clipdense.models.registry",
    "OpenVocabPredictor": "clipdense.inference.predictor",
    "SegmenterConfig": "clipdense.config",
    "TrainedPredictor": "clipdense.inference.predictor",
    "DetectionPredictor": "clipdense.inference.predictor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipdense' has no attribute {name!r}")
