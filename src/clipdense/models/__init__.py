"""Pure ``nn.Module``s: no file or network I/O here."""

from clipdense.models.dense_clip_features import (
    MODES,
    DenseFeatures,
    DenseResNetCLIP,
    DenseViTCLIP,
    dense_clip_encoder,
)

__all__ = ["MODES", "DenseFeatures", "DenseResNetCLIP", "DenseViTCLIP", "dense_clip_encoder"]
