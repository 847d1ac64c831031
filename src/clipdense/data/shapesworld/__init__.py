"""ShapesWorld: procedurally generated scenes of coloured shapes for testing CLIP-based dense prediction.

No real CLIP weights or datasets are available offline, so ShapesWorld provides a small synthetic world
with everything a language-guided dense prediction pipeline needs:

* images (coloured shapes of three sizes on muted, textured backgrounds, with partial occlusion),
* exact semantic and instance labels (one class per (colour, shape) pair, e.g. ``"red circle"``),
* natural-language captions ("a small red circle left of a blue square on a striped background"),
  used to pre-train a small CLIP contrastively (see :mod:`clipdense.training.clip_pretrain`).

Every scene is a pure function of an integer seed (:func:`generate_scene`), so arbitrarily many scenes
can be streamed without touching the disk (:class:`ShapesWorldCaptions`) and exported datasets are
reproducible (:func:`export_semantic`, :func:`export_coco`, :func:`generate_dataset`).

Seed streams: exports and datasets add a per-purpose offset to the user seed so that, for seeds and
sizes below 100 million, the segmentation train/val scenes, the CLIP pre-training scenes and the
zero-shot evaluation scenes never share a seed (see ``*_SEED_OFFSET``).

Modules, bottom to top: :mod:`~clipdense.data.shapesworld.config` (vocabulary, :class:`ShapesWorldConfig`,
class names), :mod:`~clipdense.data.shapesworld.drawing` (shape outlines, anti-aliasing, background
textures), :mod:`~clipdense.data.shapesworld.objects` (object placement),
:mod:`~clipdense.data.shapesworld.captions`, :mod:`~clipdense.data.shapesworld.scene` (compositing and
labels: :func:`generate_scene`), :mod:`~clipdense.data.shapesworld.streams` (seed streams, CLIP training
stream and scene cache) and :mod:`~clipdense.data.shapesworld.export` (datasets on disk).
"""

from clipdense.data.shapesworld.config import BACKGROUNDS, COLOURS, SHAPES, SIZE_NAMES, ShapesWorldConfig, class_names
from clipdense.data.shapesworld.export import export_coco, export_semantic, generate_dataset, read_semantic_split
from clipdense.data.shapesworld.scene import Scene, generate_scene, single_object_scene
from clipdense.data.shapesworld.streams import (
    CLIP_SEED_OFFSET,
    EVAL_SEED_OFFSET,
    TRAIN_SEED_OFFSET,
    VAL_SEED_OFFSET,
    ShapesWorldCaptions,
    normalize_image,
    render_scene_cache,
    training_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CLIP_SEED_OFFSET",
    "COLOURS",
    "EVAL_SEED_OFFSET",
    "SHAPES",
    "SIZE_NAMES",
    "TRAIN_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "Scene",
    "ShapesWorldCaptions",
    "ShapesWorldConfig",
    "class_names",
    "export_coco",
    "export_semantic",
    "generate_dataset",
    "generate_scene",
    "normalize_image",
    "read_semantic_split",
    "render_scene_cache",
    "single_object_scene",
    "training_scene",
]
