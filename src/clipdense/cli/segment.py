"""``clipdense segment`` and ``clipdense detect``: label images, training-free or with a trained run."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from clipdense.cli.common import (
    OFFLINE_MODEL,
    CLIError,
    add_device_arg,
    add_max_pixels_arg,
    add_model_args,
    build_predictor,
    check_images,
    check_output,
    downscale_notice,
    fraction,
    trained_eval_overrides,
    write_json,
    write_png,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``detect``."""
    p = sub.add_parser("segment", help="segment images into classes named in words (no training)")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--classes", help="comma-separated classes ('cat, grass, sky'); ';' separates classes with synonyms")
    p.add_argument("--classes-file", help="text file, one class per line (comma-separated synonyms)")
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--checkpoint", default=None, help="a trained model: a `clipdense train` run directory, an exported "
                   "folder or hf-hub:ORG/NAME")  # fmt: skip
    p.add_argument("--uncertainty", action="store_true", help="PPL checkpoints: also write <name>_uncertainty.png")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="--checkpoint runs: autocast precision of inference (default: the run's eval.precision, fp32; "
                   "bf16 is faster on CPUs and GPUs that have it)")  # fmt: skip
    add_max_pixels_arg(p)
    add_model_args(p, default_model=OFFLINE_MODEL)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("detect", help="detect objects with a trained detector: boxes (and masks) with class names")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--checkpoint", required=True, help="a detection run directory, an exported folder or "
                   "hf-hub:ORG/NAME")  # fmt: skip
    p.add_argument("--score-threshold", type=fraction, default=0.3, help="keep detections scoring at least this")
    p.add_argument("--out", default="outputs", help="output folder")
    add_max_pixels_arg(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_detect)


def cmd_segment(args: argparse.Namespace) -> None:
    """Per image: ``<name>_overlay.png``, ``<name>_labels.png``, ``<name>.json`` (and ``<name>_uncertainty.png``)."""
    from tqdm import tqdm

    from clipdense.data.classnames import parse_class_list, read_class_file
    from clipdense.inference import TrainedPredictor

    if args.precision is not None and args.checkpoint is None:
        raise CLIError("--precision applies to trained runs (--checkpoint)")
    if args.uncertainty and args.checkpoint is None:
        raise CLIError("--uncertainty needs a trained PPL model: add --checkpoint RUN_DIR")
    if args.classes is not None and args.classes_file is not None:
        raise CLIError("give the classes with --classes or with --classes-file, not both")
    if args.checkpoint is None and args.classes is None and args.classes_file is None:
        raise CLIError("give the classes either with --classes 'cat, grass, sky' or with --classes-file FILE")
    classes = None
    try:
        if args.classes is not None:
            classes = parse_class_list(args.classes)
        elif args.classes_file is not None:
            classes = read_class_file(args.classes_file)
    except ValueError as e:
        raise CLIError(str(e)) from e
    eval_overrides = trained_eval_overrides(args) if args.checkpoint is not None else {}
    out_dir = check_output(args.out, folder=True)
    images = check_images(args.images, args.max_pixels)
    if args.checkpoint is not None:
        predictor = TrainedPredictor.from_run(args.checkpoint, args.device, **eval_overrides)
        names = predictor.set_classes(classes) if classes is not None else predictor.class_names  # MaskCLIP+: any
    else:
        predictor = build_predictor(args)
        names = predictor.set_classes(classes)
        clip = predictor.clip
        used = f"{clip.name} ({clip.pretrained or 'random weights'}, QuickGELU {'on' if clip.quick_gelu else 'off'})"
        if clip.description:
            used += f": {clip.description}"
        if args.model is None:
            used += "; --model/--pretrained choose another CLIP"
        print(f"model: {used}")
    settings = predictor.describe()  # the same for every image
    start = time.perf_counter()
    with (
        ThreadPoolExecutor(1) as writer,
        tqdm(total=len(images), desc="segment", unit="img", disable=len(images) < 2) as bar,
    ):
        writes: list[Future] = []  # in flight: overlay and PNG encoding of the previous images
        for path, image, seg in _segmentations(predictor, images, args):
            seg.confidence = None  # unused by the outputs: its H x W floats (108 MB at 27 MP) go now
            writes.append(
                writer.submit(_write_segmentation, out_dir, path, image, seg, names, settings, len(images) == 1)
            )
            while len(writes) > 2 or (writes and writes[0].done()):  # at most two images wait for the writer
                writes.pop(0).result()
                bar.update()
        for done in writes:
            done.result()
            bar.update()
    seconds = time.perf_counter() - start
    if len(images) > 1:
        print(f"segmented {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} images/s)")
    print(f"wrote {(4 if args.uncertainty else 3) * len(images)} files to {out_dir}")


class _ImageFiles:
    """The input images, decoded in a DataLoader worker while the model runs."""

    def __init__(self, paths: list[Path], max_pixels: int) -> None:
        self.paths, self.max_pixels = paths, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        from clipdense.inference import read_image

        return index, read_image(self.paths[index], self.max_pixels)


def _segmentations(predictor, images: list[Path], args: argparse.Namespace) -> Iterator[tuple[Path, torch.Tensor, Any]]:
    """(path, image, Segmentation) for every input, in order; training-free predictors batch windows across images."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(_ImageFiles(images, args.max_pixels), batch_size=None, num_workers=min(1, len(images) - 1))
    read: list[tuple[Path, torch.Tensor]] = []

    def decoded() -> Iterator[torch.Tensor]:
        for index, image in loader:
            path = images[index]
            if notice := downscale_notice(path, image.shape[1:], args.max_pixels):
                tqdm.write(notice)
            read.append((path, image))
            yield image

    if args.checkpoint is None:
        for seg in predictor.segment_many(decoded()):
            yield *read.pop(0), seg
        return
    for image in decoded():
        predictor.set_image(image)
        yield *read.pop(0), predictor.predict(uncertainty=args.uncertainty)


def _write_segmentation(
    out_dir: Path, path: Path, image: torch.Tensor, seg, names: list[str], settings: dict, summary: bool
) -> None:
    """``<name>_overlay.png``, ``<name>_labels.png``, ``<name>.json`` (and ``<name>_uncertainty.png``); with
    ``summary``, a line of the class areas."""
    import numpy as np

    from clipdense.visualize import heatmap, overlay

    report = {
        "image": str(path),
        "size": list(seg.labels.shape),
        "classes": names,
        "areas": seg.areas(),
        "settings": settings,
    }
    if seg.uncertainty is not None:
        report["uncertainty"] = {
            "image": float(seg.class_sigma.log().mean().exp()),  # geometric mean of the class sigmas
            "class_sigma": dict(zip(names, seg.class_sigma.tolist(), strict=True)),
            "pixel_mean_entropy": float(seg.uncertainty.mean()),
        }
        write_png(out_dir / f"{path.stem}_uncertainty.png", heatmap(seg.uncertainty, vmax=float(np.log(len(names)))))
    write_png(out_dir / f"{path.stem}_overlay.png", overlay(image, seg.labels, names))
    write_png(
        out_dir / f"{path.stem}_labels.png", seg.labels.numpy().astype(np.uint8 if len(names) <= 256 else np.uint16)
    )
    write_json(out_dir / f"{path.stem}.json", report)
    if summary:
        present = {n: a["fraction"] for n, a in report["areas"].items() if a["pixels"]}
        print(f"{path}: " + ", ".join(f"{n} {100 * f:.1f}%" for n, f in present.items()))


def cmd_detect(args: argparse.Namespace) -> None:
    """Per image: ``<name>_detections.png`` and ``<name>.json`` (class, score, box, mask area)."""
    from tqdm import tqdm

    from clipdense.inference import DetectionPredictor, read_image
    from clipdense.visualize import draw_detections

    out_dir = check_output(args.out, folder=True)
    images = check_images(args.images, args.max_pixels)
    predictor = DetectionPredictor.from_run(args.checkpoint, args.device)
    for path in tqdm(images, desc="detect", unit="img", disable=len(images) < 2):
        image = read_image(path, args.max_pixels)
        if notice := downscale_notice(path, image.shape[1:], args.max_pixels):
            tqdm.write(notice)
        predictor.set_image(image)
        found = predictor.predict(score_threshold=args.score_threshold)
        report = {
            "image": str(path),
            "size": list(image.shape[1:]),
            "score_threshold": args.score_threshold,
            "detections": found.to_list(),
        }
        write_png(out_dir / f"{path.stem}_detections.png", draw_detections(image, found))
        write_json(out_dir / f"{path.stem}.json", report)
        if len(images) == 1:
            counts: dict[str, int] = {}
            for d in report["detections"]:
                counts[d["class"]] = counts.get(d["class"], 0) + 1
            listed = ", ".join(f"{n} x{c}" for n, c in counts.items()) or "nothing"
            print(f"{path}: {listed} (score >= {args.score_threshold})")
    print(f"wrote {2 * len(images)} files to {out_dir}")
