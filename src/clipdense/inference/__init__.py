"""Inference: dense prediction with CLIP-based models on images of any size.

The Predictors follow segment-anything's pattern (``set_image`` once, ``predict`` many times):
:class:`OpenVocabPredictor` for training-free open-vocabulary segmentation,
:class:`TrainedPredictor` and :class:`DetectionPredictor` for models trained with ``clipdense train``.
The papers' evaluation protocols are presets (:func:`get_preset`, :func:`preset_predictor`).
"""

from clipdense.inference.bands import Reduced, reduce_in_bands, upsample_rows
from clipdense.inference.pamr import PAMR
from clipdense.inference.predictor import (
    DetectionPredictor,
    Detections,
    OpenVocabPredictor,
    Segmentation,
    SegmenterConfig,
    TrainedPredictor,
    read_image,
)
from clipdense.inference.presets import PRESETS, Preset, get_preset, preset_predictor
from clipdense.inference.sliding import predict_dense, predict_probs, predict_uncertainty, window_starts

__all__ = [
    "DetectionPredictor",
    "Detections",
    "OpenVocabPredictor",
    "PAMR",
    "PRESETS",
    "Preset",
    "Reduced",
    "SegmenterConfig",
    "Segmentation",
    "TrainedPredictor",
    "get_preset",
    "predict_dense",
    "predict_probs",
    "predict_uncertainty",
    "preset_predictor",
    "read_image",
    "reduce_in_bands",
    "upsample_rows",
    "window_starts",
]
