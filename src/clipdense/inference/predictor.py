"""Training-free open-vocabulary segmentation with CLIP (MaskCLIP and its successors).

``OpenVocabPredictor`` follows segment-anything's pattern: ``set_image`` once (the image
features are computed and kept), ``set_classes`` with any words, ``predict`` as often as needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from clipdense.clip.dense import dense_clip_encoder
from clipdense.clip.loading import LoadedCLIP, load_clip
from clipdense.clip.refine import key_smoothing, prompt_denoise
from clipdense.clip.text import ClassEmbeddings, TextEmbedder, class_text_embeddings
from clipdense.config import EvalConfig, SegmenterConfig
from clipdense.data.classnames import display_name
from clipdense.data.datasets import fit_pixels, read_image_rgb
from clipdense.inference.sliding import predict_probs, predict_uncertainty, window_starts


def read_image(
    image: str | Path | Image.Image | np.ndarray | torch.Tensor, max_pixels: int | None = None
) -> torch.Tensor:
    """Read an image into a 3 x H x W uint8 RGB tensor.

    Args:
        image: A file path, a PIL image, an H x W x 3 uint8 array or a 3 x H x W uint8 tensor.
        max_pixels: Downscale any of them with more pixels than this, keeping the aspect ratio (files are
            decoded smaller where the format allows, see :func:`~clipdense.data.datasets.read_image_rgb`);
            None or 0: full size.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The file is not an image or too large to decode, or the array/tensor has the wrong
            shape or dtype.
    """
    if isinstance(image, (str, Path)):
        return read_image_rgb(image, apply_exif_orientation=True, max_pixels=max_pixels)  # as viewers show it
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {image.shape} {image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a 3 x H x W uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    width, height = fit_pixels(image.shape[2], image.shape[1], max_pixels)
    if (height, width) != image.shape[1:]:
        image = TF.resize(image, [height, width], antialias=True)
    return image


@dataclass
class Segmentation:
    """A segmentation at the input image's resolution.

    Attributes:
        labels: H x W int64 class indices into ``class_names``.
        probs: C x H x W class probabilities (softmax of ``logit_scale`` x scores).
        class_names: C display names.
        uncertainty: H x W per-pixel predictive entropy across Monte-Carlo samples (PPL models only).
        class_sigma: C text-side standard deviations (PPL models only); their geometric mean is the
            image-level uncertainty of the PPL paper (Sec. 5.4).
    """

    labels: torch.Tensor
    probs: torch.Tensor
    class_names: list[str]
    uncertainty: torch.Tensor | None = None
    class_sigma: torch.Tensor | None = None

    def areas(self) -> dict[str, dict[str, float]]:
        """Pixel count and fraction of the image for every class."""
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.class_names)).tolist()
        total = self.labels.numel()
        return {n: {"pixels": int(c), "fraction": c / total} for n, c in zip(self.class_names, counts, strict=True)}


class OpenVocabPredictor:
    """Segment an image into classes named in words, with no training.

    Args:
        clip: A loaded CLIP model (see :func:`clipdense.clip.load_clip`).
        config: Inference settings.
        text: A text embedder to share between predictors (its cache); built if None.
    """

    def __init__(self, clip: LoadedCLIP, config: SegmenterConfig | None = None, text: TextEmbedder | None = None):
        self.clip = clip
        self.config = config or SegmenterConfig()
        self.encoder = dense_clip_encoder(clip.model.visual, self.config.mode).eval()
        self.text = text or TextEmbedder(clip, self.config.templates)
        self.device = next(clip.model.parameters()).device
        self._mean = torch.tensor(clip.mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(clip.std, device=self.device).view(3, 1, 1)
        self._image_size: tuple[int, int] | None = None
        self._windows: list[tuple[int, int, int, int]] = []
        self._features: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = []
        self._classes: ClassEmbeddings | None = None
        self._background_index: int | None = None

    @torch.inference_mode()
    def set_image(self, image: str | Path | Image.Image | np.ndarray | torch.Tensor) -> None:
        """Compute and keep the dense features of an image (any size).

        Args:
            image: Path, PIL image, H x W x 3 uint8 array or 3 x H x W uint8 tensor.
        """
        cfg = self.config
        img = read_image(image).to(self.device)
        self._image_size = (img.shape[1], img.shape[2])
        x = img.float().div_(255)
        if cfg.short_side is not None:
            x = TF.resize(x, [cfg.short_side], antialias=True)
        x = ((x - self._mean) / self._std).unsqueeze(0)
        hr, wr = x.shape[-2:]
        if cfg.window is None:
            self._windows = [(0, 0, hr, wr)]
        else:
            self._windows = [
                (y, x0, min(cfg.window, hr), min(cfg.window, wr))
                for y in window_starts(hr, cfg.window, cfg.stride)
                for x0 in window_starts(wr, cfg.window, cfg.stride)
            ]
        self._resized = (hr, wr)
        self._features = []
        for i in range(0, len(self._windows), cfg.window_batch):
            group = self._windows[i : i + cfg.window_batch]
            sizes = {(h, w) for _, _, h, w in group}
            crops = [x[0, :, y : y + h, x0 : x0 + w] for y, x0, h, w in group]
            if len(sizes) == 1:
                out = self.encoder(torch.stack(crops))
                self._features += [(out.dense[j], out.keys[j], out.padded_size) for j in range(len(group))]
            else:
                for crop in crops:
                    out = self.encoder(crop.unsqueeze(0))
                    self._features.append((out.dense[0], out.keys[0], out.padded_size))

    def set_classes(self, classes: Sequence[str]) -> list[str]:
        """Set the vocabulary. Entries may hold comma-separated synonyms (``"person, people"``).

        Args:
            classes: C class entries. With ``background_threshold`` set and no ``background``
                entry, ``"background"`` is prepended.

        Returns:
            The display names of the classes, in label order.
        """
        classes = list(classes)
        if not classes:
            raise ValueError("the class list is empty: name at least one class")
        names = [display_name(c).lower() for c in classes]
        if self.config.background_threshold is not None and "background" not in names:
            classes = ["background", *classes]
            names = ["background", *names]
        self._background_index = names.index("background") if "background" in names else None
        self._classes = self.text.encode_classes(classes)
        return self._classes.class_names

    def _window_scores(self, dense: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        scores = self._classes.scores(dense.unsqueeze(0).float())
        if cfg.prompt_denoise is not None:
            scores = prompt_denoise(scores, cfg.prompt_denoise)
        if cfg.key_smoothing is not None:
            scores = key_smoothing(scores, keys.unsqueeze(0).float(), cfg.key_smoothing)
        return scores

    @torch.inference_mode()
    def predict(self) -> Segmentation:
        """Segment the current image into the current classes.

        Returns:
            Labels and probabilities at the original image resolution.
        """
        if self._image_size is None:
            raise RuntimeError("call set_image() before predict()")
        if self._classes is None:
            raise RuntimeError("call set_classes() before predict()")
        hr, wr = self._resized
        total = torch.zeros(1, self._classes.num_classes, hr, wr, device=self.device)
        count = torch.zeros(1, 1, hr, wr, device=self.device)
        for (y, x0, h, w), (dense, keys, padded) in zip(self._windows, self._features, strict=True):
            scores = self._window_scores(dense, keys)
            scores = F.interpolate(scores, size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
            total[..., y : y + h, x0 : x0 + w] += scores
            count[..., y : y + h, x0 : x0 + w] += 1
        scores = F.interpolate(total / count, size=self._image_size, mode="bilinear", align_corners=False)
        probs = F.softmax(scores[0] * self.config.logit_scale, dim=0)
        top, labels = probs.max(dim=0)
        if self.config.background_threshold is not None:
            labels[top < self.config.background_threshold] = self._background_index
        return Segmentation(labels.cpu(), probs.cpu(), list(self._classes.class_names))

    def __call__(self, image, classes: Sequence[str] | None = None) -> Segmentation:
        """Shortcut: set the image (and classes, if given) and predict."""
        if classes is not None:
            self.set_classes(classes)
        self.set_image(image)
        return self.predict()

    def describe(self) -> dict:
        """The model and settings, for reports."""
        clip = self.clip
        return {"model": clip.name, "pretrained": clip.pretrained, "quick_gelu": clip.quick_gelu, **asdict(self.config)}


class TrainedPredictor:
    """Inference with a trained segmentation model (DenseCLIP, CLIP+FPN, ...) from a run directory.

    Same pattern as :class:`OpenVocabPredictor`: ``set_image`` once, ``predict``. The classes are
    the ones the model was trained on.

    Args:
        model: Segmentation model returning ``{"logits": B x K x h x w}``.
        class_names: K class names.
        config: Inference settings (:class:`clipdense.config.EvalConfig`).
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], config=None, clip_source=None) -> None:
        self.model = model.eval()
        self.class_names = list(class_names)
        self.config = config or EvalConfig()
        self.device = next(model.parameters()).device
        self.clip_source = clip_source  # (CLIP name, pretrained) to embed new class names (open-vocabulary models)
        self._image: torch.Tensor | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", **eval_overrides) -> TrainedPredictor:
        """Load the latest checkpoint of a ``clipdense train`` run directory."""
        from clipdense.runs import build_from_run  # here, not above: it imports every model family

        model, cfg = build_from_run(run_dir, device)
        if getattr(model, "task", None) == "detection":
            raise ValueError(f"{run_dir} holds a detector: use `clipdense detect` (DetectionPredictor)")
        clip_source = (cfg.model.overrides.get("clip_model", "RN50"), cfg.model.pretrained)
        return cls(model, cfg.model.class_names, replace(cfg.eval, **eval_overrides), clip_source)

    def set_image(self, image: str | Path | Image.Image | np.ndarray | torch.Tensor) -> None:
        self._image = read_image(image).to(self.device)

    def set_classes(self, classes: Sequence[str]) -> list[str]:
        """Change the vocabulary: open-vocabulary models (MaskCLIP+) take any class names, embedded with
        the CLIP text encoder they were trained with; closed-set models accept only their own classes."""
        if [c.lower() for c in classes] == [c.lower() for c in self.class_names]:
            return self.class_names
        if not hasattr(self.model, "set_classes") or self.clip_source is None:
            raise ValueError(
                f"this model was trained on {len(self.class_names)} fixed classes ({', '.join(self.class_names[:5])}, "
                "...); it cannot take a new vocabulary"
            )
        clip = load_clip(*self.clip_source, device=self.device)
        self.model.set_classes([display_name(c) for c in classes], class_text_embeddings(clip, classes).to(self.device))
        self.class_names = list(self.model.class_names)
        return self.class_names

    def predict(self, uncertainty: bool = False) -> Segmentation:
        """Segment the current image.

        Args:
            uncertainty: Also compute PPL's per-pixel and per-class uncertainty (one extra pass).
        """
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        probs = predict_probs(self.model, self._image, self.config)
        seg = Segmentation(probs.argmax(0).cpu(), probs.cpu(), self.class_names)
        if uncertainty:
            extra = predict_uncertainty(self.model, self._image, self.config)
            if extra is None:
                raise ValueError("this model has no uncertainty outputs: --uncertainty needs a PPL checkpoint")
            seg.uncertainty, seg.class_sigma = extra["pixel"].cpu(), extra["sigma"].cpu()
        return seg

    def describe(self) -> dict:
        return {"model": type(self.model).__name__, **asdict(self.config)}


@dataclass
class Detections:
    """Objects found in one image.

    Attributes:
        boxes: M x 4 float XYXY boxes in image pixels.
        scores: M confidences.
        labels: M class indices.
        class_names: K class names (``labels`` index into them).
        masks: M x H x W bool instance masks (Mask R-CNN), else None.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    masks: torch.Tensor | None = None

    def to_list(self) -> list[dict]:
        """One JSON-ready dict per object: class, score, box [x0, y0, x1, y1] and mask area in pixels."""
        out = []
        for i in range(len(self.scores)):
            entry = {
                "class": self.class_names[int(self.labels[i])],
                "score": round(float(self.scores[i]), 4),
                "box": [round(float(v), 1) for v in self.boxes[i]],
            }
            if self.masks is not None:
                entry["mask_pixels"] = int(self.masks[i].sum())
            out.append(entry)
        return out


class DetectionPredictor:
    """Inference with a trained detector (DenseCLIP / PPL / CLIP RetinaNet or Mask R-CNN).

    Same pattern as :class:`OpenVocabPredictor`: ``set_image`` once, ``predict``.

    Args:
        model: A :class:`~clipdense.models.detectors.CLIPDetector` (eval mode is set here).
        class_names: K class names.
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str]) -> None:
        self.model = model.eval()
        self.class_names = list(class_names)
        self.device = next(model.parameters()).device
        self._image: torch.Tensor | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> DetectionPredictor:
        """Load the latest checkpoint of a ``clipdense train`` detection run directory."""
        from clipdense.runs import build_from_run

        model, cfg = build_from_run(run_dir, device)
        if getattr(model, "task", None) != "detection":
            raise ValueError(f"{run_dir} holds a {type(model).__name__}, not a detector: use `clipdense segment`")
        return cls(model, cfg.model.class_names)

    def set_image(self, image: str | Path | Image.Image | np.ndarray | torch.Tensor) -> None:
        self._image = read_image(image)

    @torch.no_grad()
    def predict(self, score_threshold: float = 0.3, mask_threshold: float = 0.5) -> Detections:
        """Detect objects in the current image.

        Args:
            score_threshold: Keep detections scoring at least this.
            mask_threshold: Binarise Mask R-CNN's mask probabilities at this value.
        """
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        image = self._image.to(self.device).float() / 255
        out = self.model([image])[0]
        keep = out["scores"] >= score_threshold
        masks = out.get("masks")
        return Detections(
            boxes=out["boxes"][keep].cpu(),
            scores=out["scores"][keep].cpu(),
            labels=out["labels"][keep].cpu(),
            class_names=self.class_names,
            masks=None if masks is None else (masks[keep, 0] >= mask_threshold).cpu(),
        )
