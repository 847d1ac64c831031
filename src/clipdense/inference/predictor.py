"""Training-free open-vocabulary segmentation with CLIP (MaskCLIP and its successors).

``OpenVocabPredictor`` follows segment-anything's pattern: ``set_image`` once (the image
features are computed and kept), ``set_classes`` with any words, ``predict`` as often as needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from clipdense.clip.dense import dense_clip_encoder
from clipdense.clip.loading import LoadedCLIP, load_clip
from clipdense.clip.refine import key_smoothing, prompt_denoise
from clipdense.clip.text import ClassEmbeddings, TextEmbedder, class_text_embeddings
from clipdense.config import EvalConfig, SegmenterConfig
from clipdense.data.classnames import display_name
from clipdense.data.datasets import fit_pixels, read_image_rgb
from clipdense.data.transforms import rescale_size
from clipdense.inference.bands import Reduced, reduce_in_bands, upsample_rows
from clipdense.inference.pamr import PAMR
from clipdense.inference.sliding import predict_dense, predict_uncertainty, prepare_model, window_starts


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
        probs: C x H x W class probabilities, when ``predict(probs=True)`` asked for them (C full-size
            maps: 2 GB for 20 classes on a 27-megapixel photo); else None.
        class_names: C display names.
        confidence: H x W probability of the predicted class.
        entropy: H x W entropy of the class probabilities (nats), when ``predict(entropy=True)`` asked for it.
        uncertainty: H x W per-pixel predictive entropy across Monte-Carlo samples (PPL models only).
        class_sigma: C text-side standard deviations (PPL models only); their geometric mean is the
            image-level uncertainty of the PPL paper (Sec. 5.4).
    """

    labels: torch.Tensor
    probs: torch.Tensor | None
    class_names: list[str]
    confidence: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None
    class_sigma: torch.Tensor | None = None

    def areas(self) -> dict[str, dict[str, float]]:
        """Pixel count and fraction of the image for every class."""
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.class_names)).tolist()
        total = self.labels.numel()
        return {n: {"pixels": int(c), "fraction": c / total} for n, c in zip(self.class_names, counts, strict=True)}


@dataclass
class _ImageWindows:
    """An image cut into windows for :class:`OpenVocabPredictor`: sizes, window boxes, crops, then features."""

    size: tuple[int, int]  # the image's H, W
    resized: tuple[int, int]  # after ``short_side``
    boxes: list[tuple[int, int, int, int]]  # y, x, h, w of each window in the resized image
    crops: list[torch.Tensor]  # 3 x h x w normalised windows, until encoded
    features: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = field(default_factory=list)
    normalised: torch.Tensor | None = None  # 3 x h x w resized normalised image, kept for PAMR


def resized_size(height: int, width: int, config: SegmenterConfig) -> tuple[int, int]:
    """The (H, W) an image is resized to before inference (see ``SegmenterConfig.resize``)."""
    if config.short_side is None:
        return height, width
    if config.resize == "mmcv":
        return rescale_size(height, width, (config.long_max, config.short_side))
    # torchvision's resize to a short side: the long side is truncated
    if height <= width:
        return config.short_side, int(config.short_side * width / height)
    return int(config.short_side * height / width), config.short_side


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
        resize = {} if self.config.pos_resize is None else {"pos_resize": self.config.pos_resize}
        if resize and hasattr(clip.model.visual, "attnpool"):
            raise ValueError("pos_resize applies to ViT CLIPs (a ResNet's attention pool resizes its grid by size)")
        self.encoder = dense_clip_encoder(clip.model.visual, self.config.mode, **resize).eval()
        self.text = text or TextEmbedder(clip, self.config.templates)
        self.device = next(clip.model.parameters()).device
        mean, std = (clip.mean, clip.std) if self.config.normalize == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        self._mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(3, 1, 1)
        self._image: _ImageWindows | None = None
        self._classes: ClassEmbeddings | None = None
        self._background_index: int | None = None

    def _windows(self, image: str | Path | Image.Image | np.ndarray | torch.Tensor) -> _ImageWindows:
        """Reads, resizes and normalises an image and cuts its windows (features not yet computed)."""
        cfg = self.config
        img = read_image(image).to(self.device)
        size = resized_size(img.shape[1], img.shape[2], cfg)
        if cfg.resize == "mmcv":  # cv2's bilinear resize of the uint8 image, as mmcv.imrescale does
            x = TF.resize(img, list(size), antialias=False).float().div_(255)
        else:
            x = img.float().div_(255)
            if size != x.shape[-2:]:
                x = TF.resize(x, list(size), antialias=True)
        x = (x - self._mean) / self._std
        hr, wr = x.shape[-2:]
        if cfg.window is None:
            boxes = [(0, 0, hr, wr)]
        else:
            boxes = [
                (y, x0, min(cfg.window, hr), min(cfg.window, wr))
                for y in window_starts(hr, cfg.window, cfg.stride)
                for x0 in window_starts(wr, cfg.window, cfg.stride)
            ]
        if cfg.patch_fit == "truncate":  # the patch convolution drops what does not fill a patch
            p = self.encoder.stride
            crops = [x[:, y : y + h // p * p, x0 : x0 + w // p * p] for y, x0, h, w in boxes]
        else:
            crops = [x[:, y : y + h, x0 : x0 + w] for y, x0, h, w in boxes]
        kept = x if cfg.pamr_steps > 0 else None
        return _ImageWindows((img.shape[1], img.shape[2]), (hr, wr), boxes, crops, normalised=kept)

    def _encode(self, images: list[_ImageWindows]) -> None:
        """Fills in the features of the windows of ``images``, ``window_batch`` windows of one size per pass."""
        by_size: dict[tuple[int, int], list[tuple[_ImageWindows, int]]] = {}
        for item in images:
            item.features = [None] * len(item.crops)
            for j, crop in enumerate(item.crops):
                by_size.setdefault(tuple(crop.shape[-2:]), []).append((item, j))
        batch = self.config.window_batch
        for group in by_size.values():
            for i in range(0, len(group), batch):
                part = group[i : i + batch]
                out = self.encoder(torch.stack([item.crops[j] for item, j in part]))
                for k, (item, j) in enumerate(part):
                    item.features[j] = (out.dense[k], out.keys[k], out.padded_size)
        for item in images:
            item.crops = []  # the features replace them

    @torch.inference_mode()
    def set_image(self, image: str | Path | Image.Image | np.ndarray | torch.Tensor) -> None:
        """Compute and keep the dense features of an image (any size).

        Args:
            image: Path, PIL image, H x W x 3 uint8 array or 3 x H x W uint8 tensor.
        """
        item = self._windows(image)
        self._encode([item])
        self._image = item

    @torch.inference_mode()
    def segment_many(
        self, images: Iterable[str | Path | Image.Image | np.ndarray | torch.Tensor], **outputs: bool
    ) -> Iterator[Segmentation]:
        """Segment images into the current classes, encoding windows of several images in one pass.

        Images are gathered until they hold ``window_batch`` windows, so small images fill the batches a
        single image would leave part empty; results come in input order and equal :meth:`predict`'s.

        Args:
            images: The images (any kind :meth:`set_image` takes), e.g. from a DataLoader.
            outputs: :meth:`predict`'s flags.

        Yields:
            One :class:`Segmentation` per image.
        """
        pending: list[_ImageWindows] = []

        def flush() -> Iterator[Segmentation]:
            self._encode(pending)
            for item in pending:
                self._image = item
                yield self.predict(**outputs)
            pending.clear()

        for image in images:
            pending.append(self._windows(image))
            if sum(len(item.crops) for item in pending) >= self.config.window_batch:
                yield from flush()
        yield from flush()

    def set_classes(self, classes: Sequence[str], background_index: int | None = None) -> list[str]:
        """Set the vocabulary. Entries may hold comma-separated synonyms (``"person, people"``).

        Args:
            classes: C class entries. With ``background_threshold`` set and no background entry,
                ``"background"`` is prepended.
            background_index: The background entry, whatever its name (the official VOC lists spell it as
                26 stuff words); default: the entry whose display name is ``background``, if any.

        Returns:
            The display names of the classes, in label order.
        """
        classes = list(classes)
        if not classes:
            raise ValueError("the class list is empty: name at least one class")
        if background_index is not None and not 0 <= background_index < len(classes):
            raise ValueError(f"background_index {background_index} is not an index of the {len(classes)} classes")
        names = [display_name(c).lower() for c in classes]
        if background_index is None and "background" in names:
            background_index = names.index("background")
        if self.config.background_threshold is not None and background_index is None:
            classes = ["background", *classes]
            background_index = 0
        self._background_index = background_index
        self._classes = self.text.encode_classes(classes)
        return self._classes.class_names

    def _window_scores(self, dense: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """1 x K x h x w refined scores of one window: K = classes, or synonyms under ``synonyms="max_prob"``."""
        cfg = self.config
        features = dense.unsqueeze(0).float()
        if cfg.synonyms == "max_prob":
            scores = self._classes.similarities(features)
        else:
            scores = self._classes.scores(features)
        if cfg.prompt_denoise is not None:
            scores = prompt_denoise(scores, cfg.prompt_denoise)
        if cfg.key_smoothing is not None:
            scores = key_smoothing(scores, keys.unsqueeze(0).float(), cfg.key_smoothing, cfg.key_norm)
        return scores

    def _area_filter(self, labels: torch.Tensor) -> torch.Tensor | None:
        """SCLIP's area threshold: C keep-weights (0 for removed classes), or None if every class stays."""
        counts = torch.bincount(labels.flatten(), minlength=self._classes.num_classes).float()
        keep = torch.ones_like(counts)
        foreground = torch.ones_like(counts, dtype=torch.bool)
        if self._background_index is not None:
            foreground[self._background_index] = False
        total = counts[foreground].sum()
        keep[foreground] = (counts[foreground] > self.config.area_threshold * total).float()
        return None if bool(keep.all()) else keep.to(self.device)

    @torch.inference_mode()
    def predict(self, probs: bool = False, entropy: bool = False) -> Segmentation:
        """Segment the current image into the current classes.

        The window scores are averaged, upsampled to the image and reduced a band of rows at a time
        (:func:`~clipdense.inference.bands.reduce_in_bands`), so memory does not grow with classes x pixels
        (except with PAMR, which refines the full-resolution scores).

        Args:
            probs: Also return the C x H x W probabilities.
            entropy: Also return the per-pixel entropy.

        Returns:
            Labels and top probabilities (and what was asked for) at the original image resolution.
        """
        image = self._image
        if image is None:
            raise RuntimeError("call set_image() before predict()")
        if self._classes is None:
            raise RuntimeError("call set_classes() before predict()")
        cfg = self.config
        classes = self._classes
        hr, wr = image.resized
        total = count = None
        for (y, x0, h, w), (dense, keys, padded) in zip(image.boxes, image.features, strict=True):
            scores = self._window_scores(dense, keys)
            if cfg.patch_fit == "pad":
                scores = F.interpolate(scores, size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
            else:  # the scores' grid stretched over the window
                scores = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
            if total is None:
                total = torch.zeros(1, scores.shape[1], hr, wr, device=self.device)
                count = torch.zeros(1, 1, hr, wr, device=self.device)
            total[..., y : y + h, x0 : x0 + w] += scores
            count[..., y : y + h, x0 : x0 + w] += 1
        scores = total / count
        # key-smoothed outputs are probabilities: mmseg takes their softmax unscaled
        scale = 1.0 if cfg.key_smoothing is not None else cfg.logit_scale
        if cfg.pamr_steps > 0:
            full = F.interpolate(scores, size=image.size, mode="bilinear", align_corners=False)
            guide = F.interpolate(image.normalised[None], size=image.size, mode="bilinear", align_corners=False)
            full = PAMR(cfg.pamr_steps, cfg.pamr_dilations)(guide, full)[0]
            rows = lambda start, stop: full[:, start:stop]  # noqa: E731
        else:
            rows = lambda start, stop: upsample_rows(scores, image.size, start, stop)[0]  # noqa: E731
        keep = None

        def band_probs(start: int, stop: int) -> torch.Tensor:
            p = F.softmax(rows(start, stop) * scale, dim=0)
            if p.shape[0] != classes.num_classes:  # synonyms: softmax over all of them, then the max per class
                p = classes.reduce_synonyms(p[None])[0]
            return p if keep is None else p * keep[:, None, None]

        def reduce() -> Reduced:
            return reduce_in_bands(
                band_probs, image.size, classes.num_classes, entropy=entropy, keep_probs=probs, device="cpu"
            )

        out = reduce()
        if cfg.area_threshold is not None:
            keep = self._area_filter(out.labels)
            if keep is not None:
                out = reduce()
        if cfg.background_threshold is not None:
            out.labels[out.confidence < cfg.background_threshold] = self._background_index
        return Segmentation(out.labels, out.probs, list(classes.class_names), out.confidence, out.entropy)

    def __call__(self, image, classes: Sequence[str] | None = None, **outputs: bool) -> Segmentation:
        """Shortcut: set the image (and classes, if given) and predict (``outputs``: :meth:`predict`'s flags)."""
        if classes is not None:
            self.set_classes(classes)
        self.set_image(image)
        return self.predict(**outputs)

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
        self.config = config or EvalConfig()
        self.model = prepare_model(model, self.config)
        self.class_names = list(class_names)
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

    def predict(self, uncertainty: bool = False, probs: bool = False, entropy: bool = False) -> Segmentation:
        """Segment the current image.

        Args:
            uncertainty: Also compute PPL's per-pixel and per-class uncertainty (one extra pass).
            probs: Also return the K x H x W probabilities.
            entropy: Also return the per-pixel entropy of the class probabilities.
        """
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        out = predict_dense(self.model, self._image, self.config, keep_probs=probs, entropy=entropy, device="cpu")
        seg = Segmentation(out.labels, out.probs, self.class_names, out.confidence, out.entropy)
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
