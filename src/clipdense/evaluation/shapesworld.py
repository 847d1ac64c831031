"""Training-free segmentation quality in ShapesWorld, where the papers' claims can be measured.

Held-out multi-object scenes (seeds from ``EVAL_SEED_OFFSET``) are segmented by every dense mode
into the ShapesWorld class names, and scored two ways:

* ``objects``: mIoU over the object classes on object pixels only (background pixels ignored,
  background not a class) — MaskCLIP's "does the local feature name the right object" question;
* ``with_background``: a ``background`` class (with the texture names as synonyms) competes with
  the objects and every pixel counts.

MaskCLIP's central claim is that the value path (``maskclip``) beats the q-k attention path
(``vanilla``, the attention pool's own output at every position) by a wide margin.

:func:`segment_scene` segments and scores a single scene (``clipdense demo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def dense_quality(
    clip: LoadedCLIP,
    cfg: ShapesWorldConfig | None = None,
    num_scenes: int = 200,
    seed: int = 0,
    modes: Sequence[str] = QUALITY_MODES,
    templates: str = "single",
    progress: bool = True,
) -> list[DenseQuality]:
    """Segment held-out scenes with each training-free mode and score them.

    Args:
        clip: A CLIP model trained on ShapesWorld (or any CLIP, for comparison).
        cfg: World configuration; scenes are rendered at ``cfg.image_size`` and segmented whole.
        num_scenes: Number of held-out scenes.
        seed: Offset into the held-out seed range.
        modes: Dense modes to compare.
        templates: Prompt templates for the class names.
        progress: Show a progress bar.

    Returns:
        One entry per mode.
    """
    cfg = cfg or ShapesWorldConfig()
    names = class_names(cfg)
    scenes = [generate_scene(EVAL_SEED_OFFSET + seed + i, cfg) for i in range(num_scenes)]
    results = []
    text = None
    for mode in modes:
        predictor = OpenVocabPredictor(
            clip, SegmenterConfig(mode=mode, templates=templates, short_side=None, window=None), text=text
        )
        text = predictor.text  # share the embedding cache across modes
        objects = SegmentationMetric(len(names), ignore_index=255)
        with_bg = SegmentationMetric(len(names) + 1, ignore_index=255)
        for scene in tqdm(scenes, desc=f"ShapesWorld {mode}", disable=not progress, leave=False):
            gt = torch.from_numpy(scene.semantic.astype("int64"))
            predictor.set_image(scene.image)
            predictor.set_classes(names)
            objects.update(predictor.predict().labels, torch.where(gt == 0, 255, gt - 1))
            predictor.set_classes([BACKGROUND_ENTRY, *names])
            with_bg.update(predictor.predict().labels, gt)
        results.append(DenseQuality(mode, objects.compute().miou, with_bg.compute().miou))
    return results


def format_quality(results: Sequence[DenseQuality], zero_shot_accuracy: float | None = None) -> str:
    """A Markdown table of the results, with the value-path / q-k-path ratio."""
    lines = ["| mode | mIoU objects (%) | mIoU with background (%) |", "|---|---|---|"]
    lines += [f"| {r.mode} | {r.miou_objects:.1f} | {r.miou_with_background:.1f} |" for r in results]
    by_mode = {r.mode: r for r in results}
    if "maskclip" in by_mode and "vanilla" in by_mode and by_mode["vanilla"].miou_objects > 0:
        ratio = by_mode["maskclip"].miou_objects / by_mode["vanilla"].miou_objects
        lines.append(f"\nvalue path (maskclip) / q-k path (vanilla), objects mIoU: {ratio:.2f}x")
    if zero_shot_accuracy is not None:
        lines.append(f"zero-shot single-object classification top-1: {100 * zero_shot_accuracy:.1f}%")
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
    the whole image is segmented with the single prompt template the ShapesWorld CLIP was trained with.

    Args:
        clip: A CLIP trained on ShapesWorld (or any CLIP, for comparison).
        seed: Scene seed.
        mode: Training-free dense mode (one of :data:`~clipdense.clip.dense.MODES`).

    Returns:
        The scene, the predicted and true labels and the IoU of each class present.
    """
    scene = generate_scene(seed, ShapesWorldConfig(image_size=clip.image_size))  # the size it was trained at
    names = ["background", *class_names()]
    predictor = OpenVocabPredictor(clip, SegmenterConfig(mode=mode, templates="single", short_side=None, window=None))
    predictor.set_image(scene.image)
    predictor.set_classes([BACKGROUND_ENTRY, *names[1:]])
    seg = predictor.predict()
    truth = torch.from_numpy(scene.semantic.astype("int64"))
    metric = SegmentationMetric(len(names), class_names=names)
    metric.update(seg.labels, truth)
    present = sorted(set(truth.unique().tolist()) | set(seg.labels.unique().tolist()))
    ious = {names[c]: metric.compute().per_class_iou[c] for c in present}
    return SceneSegmentation(seed, scene, names, seg.labels, truth, ious, predictor.describe())
