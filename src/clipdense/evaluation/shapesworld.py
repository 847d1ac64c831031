"""Training-free segmentation quality in ShapesWorld, where the papers' claims can be measured.

Held-out multi-object scenes (seeds from ``EVAL_SEED_OFFSET``) are segmented by every dense mode
into the ShapesWorld class names, and scored two ways:

* ``objects``: mIoU over the object classes on object pixels only (background pixels ignored,
  background not a class) — MaskCLIP's "does the local feature name the right object" question;
* ``with_background``: a ``background`` class (with the texture names as synonyms) competes with
  the objects and every pixel counts;
* ``oracle`` (:func:`oracle_quality`): the true majority class pasted over every cell of the model's
  feature grid, scored the same two ways: what a perfect classifier of the grid's cells would reach.

Scenes are the held-out seed range by default, or any folder written by ``clipdense shapesworld generate``
(:func:`~clipdense.data.shapesworld.read_semantic_split`). The inference settings are the weights' own
(:attr:`~clipdense.clip.loading.LoadedCLIP.inference`, e.g. the shipped models' short side and prompt), at
whole-image inference.

MaskCLIP's central claim is that the value path (``maskclip``) beats the q-k attention path
(``vanilla``, the attention pool's own output at every position) by a wide margin.

:func:`segment_scene` segments and scores a single scene (``clipdense demo``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdense.clip.dense import MODES, dense_clip_encoder
from clipdense.clip.loading import LoadedCLIP
from clipdense.data.shapesworld import (
    BACKGROUNDS,
    EVAL_SEED_OFFSET,
    Scene,
    ShapesWorldConfig,
    class_names,
    generate_scene,
    normalize_image,
    single_object_scene,
)
from clipdense.evaluation.metrics import SegmentationMetric
from clipdense.inference import OpenVocabPredictor, SegmenterConfig

#: The modes :func:`dense_quality` compares by default (``clearclip_qk`` equals ``vanilla`` on a ResNet pool).
QUALITY_MODES: tuple[str, ...] = tuple(m for m in MODES if m != "clearclip_qk")
BACKGROUND_ENTRY = ", ".join(["background"] + [f"{b} background" for b in BACKGROUNDS])


def _image_embeddings(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B x D l2-normalised image embeddings; off the native size the positional grid is resized."""
    native = getattr(getattr(model, "visual", None), "image_size", None)
    native = tuple(native) if isinstance(native, (tuple, list)) else (native, native)
    if native[0] is None or tuple(images.shape[-2:]) == native:
        return model.encode_image(images, normalize=True)
    return F.normalize(dense_clip_encoder(model.visual, "vanilla")(images).global_embed, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    tokenizer,
    cfg: ShapesWorldConfig | None = None,
    num_images: int = 560,
    seed: int = 0,
    batch_size: int = 128,
) -> float:
    """Zero-shot classification accuracy on single-object ShapesWorld scenes.

    Image j shows one object of class ``j % C`` (balanced classes) and is
    ``single_object_scene(EVAL_SEED_OFFSET + seed + j, cfg, j % C)``; it is classified among all C class
    names with the prompt "a photo of a {}" by cosine similarity.

    Args:
        model: open_clip CLIP model (its device is used; bf16 autocast on CUDA).
        tokenizer: Matching tokenizer (callable on a list of strings).
        cfg: World configuration. Scenes are rendered at ``cfg.image_size``; at a size other than the
            model's own, the attention pool's positional grid is resized (ResNet CLIPs).
        num_images: Number of images.
        seed: Evaluation seed.
        batch_size: Images per forward pass.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    cfg = cfg or ShapesWorldConfig()
    names = class_names(cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            text = model.encode_text(tokenizer([f"a photo of a {name}" for name in names]).to(device), normalize=True)
        correct = 0
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            targets = torch.tensor([j % len(names) for j in indices], device=device)
            images = torch.stack(
                [
                    normalize_image(single_object_scene(EVAL_SEED_OFFSET + seed + j, cfg, j % len(names)).image)
                    for j in indices
                ]
            ).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                features = _image_embeddings(model, images)
            predictions = (features.float() @ text.float().T).argmax(dim=1)
            correct += int((predictions == targets).sum())
    finally:
        model.train(was_training)
    return correct / num_images


@dataclass
class DenseQuality:
    """mIoU (percent) of one dense mode on held-out ShapesWorld scenes."""

    mode: str
    miou_objects: float
    miou_with_background: float


#: A scene to score: H x W x 3 uint8 RGB image and H x W uint8 labels (0 = background, i + 1 = class i).
LabelledImage = tuple[np.ndarray, np.ndarray]


def held_out_scenes(num_scenes: int, seed: int = 0, cfg: ShapesWorldConfig | None = None) -> list[LabelledImage]:
    """The held-out scenes ``generate_scene(EVAL_SEED_OFFSET + seed + i)``, i < ``num_scenes``."""
    cfg = cfg or ShapesWorldConfig()
    return [
        (s.image, s.semantic) for s in (generate_scene(EVAL_SEED_OFFSET + seed + i, cfg) for i in range(num_scenes))
    ]


def quality_settings(clip: LoadedCLIP, mode: str, overrides: Mapping[str, object] | None = None) -> SegmenterConfig:
    """The settings :func:`dense_quality` segments with: whole image, the weights' own inference settings
    (short side, prompts, background threshold, ...), then ``overrides``, for ``mode``."""
    base = {"templates": "single", "short_side": None, "window": None}
    return SegmenterConfig(**{**base, **dict(clip.inference), **dict(overrides or {}), "mode": mode})


def dense_quality(
    clip: LoadedCLIP,
    cfg: ShapesWorldConfig | None = None,
    num_scenes: int = 200,
    seed: int = 0,
    modes: Sequence[str] = QUALITY_MODES,
    progress: bool = True,
    scenes: Sequence[LabelledImage] | None = None,
    settings: Mapping[str, object] | None = None,
) -> list[DenseQuality]:
    """Segment ShapesWorld scenes with each training-free mode and score them.

    Args:
        clip: A CLIP model trained on ShapesWorld (or any CLIP, for comparison).
        cfg: World configuration of the held-out scenes (rendered at ``cfg.image_size``).
        num_scenes: Number of held-out scenes (ignored when ``scenes`` is given).
        seed: Offset into the held-out seed range.
        modes: Dense modes to compare.
        progress: Show a progress bar.
        scenes: The scenes to score instead of the held-out ones (e.g. a ``shapesworld generate`` folder).
        settings: ``SegmenterConfig`` fields over :func:`quality_settings`' defaults (e.g. ``templates``).

    Returns:
        One entry per mode.
    """
    names = class_names(cfg)
    scenes = held_out_scenes(num_scenes, seed, cfg) if scenes is None else scenes
    results = []
    text = None
    for mode in modes:
        config = quality_settings(clip, mode, settings)
        predictor = OpenVocabPredictor(clip, config, text=text)
        text = predictor.text  # share the embedding cache across modes
        # objects only: background is not a class, so no pixel may fall back to it
        object_predictor = predictor
        if config.background_threshold is not None:
            object_predictor = OpenVocabPredictor(clip, replace(config, background_threshold=None), text=text)
        objects = SegmentationMetric(len(names), ignore_index=255)
        with_bg = SegmentationMetric(len(names) + 1, ignore_index=255)
        for image, semantic in tqdm(scenes, desc=f"ShapesWorld {mode}", disable=not progress, leave=False):
            gt = torch.from_numpy(semantic.astype("int64"))
            object_predictor.set_image(image)
            object_predictor.set_classes(names)
            objects.update(object_predictor.predict().labels, torch.where(gt == 0, 255, gt - 1))
            predictor.set_image(image)
            predictor.set_classes([BACKGROUND_ENTRY, *names])
            with_bg.update(predictor.predict().labels, gt)
        results.append(DenseQuality(mode, objects.compute().miou, with_bg.compute().miou))
    return results


def feature_stride(clip: LoadedCLIP) -> int:
    """Input pixels per cell of the tower's dense feature grid: the ViT patch size, 32 for a ResNet."""
    if clip.is_resnet:
        return 32
    patch = clip.model.visual.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def grid_oracle(semantic: np.ndarray, cell: int, ignore_background: bool = False) -> np.ndarray:
    """Pastes the majority true label of every ``cell`` x ``cell`` block (from the top-left) over the block.

    Args:
        semantic: H x W labels (0 = background).
        cell: Block side in pixels (a partial block at the bottom/right edge counts its own pixels).
        ignore_background: Take the majority among the block's object pixels only (the ``objects`` score,
            where background pixels are not scored and background is not a class); blocks without any
            object pixel keep label 0.

    Returns:
        H x W labels (same dtype): the oracle's prediction.
    """
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}.")
    out = np.zeros_like(semantic)
    h, w = semantic.shape
    for y in range(0, h, cell):
        for x in range(0, w, cell):
            block = semantic[y : y + cell, x : x + cell].ravel()
            if ignore_background:
                block = block[block != 0]
            if block.size:
                out[y : y + cell, x : x + cell] = np.bincount(block).argmax()  # ties: the lower label
    return out


def oracle_quality(scenes: Sequence[LabelledImage], cell: int, num_classes: int | None = None) -> DenseQuality:
    """The ``oracle`` row: :func:`grid_oracle` scored as :func:`dense_quality` scores a mode.

    Args:
        scenes: The scenes.
        cell: Grid cell in scene pixels: the feature stride times scene size / inference size.
        num_classes: Object classes (default: the ShapesWorld vocabulary's).
    """
    num_classes = num_classes or len(class_names())
    objects = SegmentationMetric(num_classes, ignore_index=255)
    with_bg = SegmentationMetric(num_classes + 1, ignore_index=255)
    for _, semantic in scenes:
        gt = torch.from_numpy(semantic.astype("int64"))
        objects_pred = torch.from_numpy(grid_oracle(semantic, cell, ignore_background=True).astype("int64"))
        objects.update((objects_pred - 1).clamp(min=0), torch.where(gt == 0, 255, gt - 1))
        with_bg.update(torch.from_numpy(grid_oracle(semantic, cell).astype("int64")), gt)
    return DenseQuality("oracle", objects.compute().miou, with_bg.compute().miou)


def oracle_cell(clip: LoadedCLIP, scene_size: int, settings: Mapping[str, object] | None = None) -> int:
    """The feature-grid cell in pixels of a ``scene_size`` scene under :func:`quality_settings`."""
    short = quality_settings(clip, "maskclip", settings).short_side
    return max(1, round(feature_stride(clip) * scene_size / (short or scene_size)))


def format_quality(results: Sequence[DenseQuality], zero_shot_accuracy: float | None = None) -> str:
    """A Markdown table of one model's results, with the value-path / q-k-path ratio."""
    return format_comparison({"": (list(results), zero_shot_accuracy)})


def format_comparison(models: Mapping[str, tuple[Sequence[DenseQuality], float | None]]) -> str:
    """A Markdown table with two columns (objects, with background) per model, side by side.

    Args:
        models: Model label -> (its rows, as :func:`dense_quality` and :func:`oracle_quality` give them;
            its zero-shot top-1 in [0, 1] or None).
    """
    labels = list(models)
    modes = list(dict.fromkeys(r.mode for rows, _ in models.values() for r in rows))
    head = [f"{label} objects" if label else "mIoU objects (%)" for label in labels]
    head = [x for label, h in zip(labels, head, strict=True) for x in (h, f"{label} with bg." if label else
            "mIoU with background (%)")]  # fmt: skip
    lines = ["| mode | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
    for mode in modes:
        cells = []
        for rows, _ in models.values():
            row = next((r for r in rows if r.mode == mode), None)
            cells += ["" if row is None else f"{row.miou_objects:.1f}", "" if row is None else
                      f"{row.miou_with_background:.1f}"]  # fmt: skip
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if any(acc is not None for _, acc in models.values()):
        accs = [f"{100 * acc:.1f}%" if acc is not None else "" for _, acc in models.values()]
        lines.append("| zero-shot top-1 | " + " | ".join(x for a in accs for x in (a, "")) + " |")
    for label, (rows, _) in models.items():
        by_mode = {r.mode: r for r in rows}
        if "maskclip" in by_mode and "vanilla" in by_mode and by_mode["vanilla"].miou_objects > 0:
            ratio = by_mode["maskclip"].miou_objects / by_mode["vanilla"].miou_objects
            lines.append(f"\n{label + ': ' if label else ''}value path (maskclip) / q-k path (vanilla), objects mIoU: "
                         f"{ratio:.2f}x")  # fmt: skip
    return "\n".join(lines)


@dataclass
class SceneSegmentation:
    """One ShapesWorld scene segmented by a CLIP and scored against its labels (what ``clipdense demo`` shows).

    Attributes:
        seed: The scene's seed.
        scene: The rendered scene (``image``, ``semantic``, ``caption``, ...).
        class_names: Label names: ``"background"``, then the ShapesWorld classes.
        prediction: H x W predicted labels (int64).
        truth: H x W ground-truth labels (int64).
        iou: IoU (percent) of each class present in the truth or the prediction, in label order.
        settings: The predictor's model and settings.
    """

    seed: int
    scene: Scene
    class_names: list[str]
    prediction: torch.Tensor
    truth: torch.Tensor
    iou: dict[str, float]
    settings: dict

    def to_dict(self) -> dict:
        """A JSON-ready summary: seed, caption, per-class IoU and settings."""
        return {"seed": self.seed, "caption": self.scene.caption, "iou": self.iou, "settings": self.settings}


def segment_scene(clip: LoadedCLIP, seed: int = 7, mode: str = "maskclip") -> SceneSegmentation:
    """Render a ShapesWorld scene at the CLIP's own size, segment it training-free and score it.

    The classes are the ShapesWorld class names plus a ``background`` entry (with the textures as synonyms);
    the whole image is segmented with the weights' own settings (:func:`quality_settings`).

    Args:
        clip: A CLIP trained on ShapesWorld (or any CLIP, for comparison).
        seed: Scene seed.
        mode: Training-free dense mode (one of :data:`~clipdense.clip.dense.MODES`).

    Returns:
        The scene, the predicted and true labels and the IoU of each class present.
    """
    scene = generate_scene(seed, ShapesWorldConfig(image_size=clip.image_size))  # the size it was trained at
    names = ["background", *class_names()]
    predictor = OpenVocabPredictor(clip, quality_settings(clip, mode))
    predictor.set_image(scene.image)
    predictor.set_classes([BACKGROUND_ENTRY, *names[1:]])
    seg = predictor.predict()
    truth = torch.from_numpy(scene.semantic.astype("int64"))
    metric = SegmentationMetric(len(names), class_names=names)
    metric.update(seg.labels, truth)
    present = sorted(set(truth.unique().tolist()) | set(seg.labels.unique().tolist()))
    ious = {names[c]: metric.compute().per_class_iou[c] for c in present}
    return SceneSegmentation(seed, scene, names, seg.labels, truth, ious, predictor.describe())
