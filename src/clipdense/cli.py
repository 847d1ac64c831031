"""The ``clipdense`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clipdense.fileio import atomic_write

DEFAULT_MODEL = "RN50"
DEFAULT_PRETRAINED = "openai"
#: The model of ``segment`` when no --model is given: the ShapesWorld CLIP that ships with the package,
#: so that the main job works on a fresh install with no network.
OFFLINE_MODEL, OFFLINE_PRETRAINED = "ShapesCLIP-RN", "shapesworld"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _add_model_args(p: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    from clipdense.clip.dense import MODES
    from clipdense.inference import SegmenterConfig

    d = SegmenterConfig()
    shipped = " (the shipped ShapesWorld CLIP)" if default_model == OFFLINE_MODEL else ""
    g = p.add_argument_group("model and inference")
    g.add_argument(
        "--model",
        default=None,
        help=f"open_clip architecture, hf-hub:org/repo or local-dir:PATH (default: {default_model}{shipped})",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (openai, laion2b_s34b_b88k, ...) or a checkpoint file (.pt, .bin, .safetensors) "
        f"(default: {OFFLINE_PRETRAINED} for {OFFLINE_MODEL}, {DEFAULT_PRETRAINED} otherwise)",
    )
    g.add_argument("--random-weights", action="store_true", help="use random weights (for smoke tests only)")
    g.add_argument("--quick-gelu", choices=("auto", "on", "off"), default="auto", help="QuickGELU activation")
    g.add_argument("--mode", choices=MODES, default=d.mode, help="training-free dense mode")
    # None below: the value the model's weights were made for (shipped weights), else the library default.
    g.add_argument("--templates", default=None, help=f"prompt templates: ensemble, imagenet, scene, single "
                   f"(default: {d.templates}; single for the ShapesWorld CLIP)")  # fmt: skip
    g.add_argument("--short-side", type=int, default=None, help=f"resize the short side to this, 0: keep "
                   f"(default: {d.short_side}; the ShapesWorld CLIP: its training size)")  # fmt: skip
    g.add_argument("--window", type=int, default=None, help=f"sliding-window crop size (default: {d.window})")
    g.add_argument("--stride", type=int, default=None, help=f"sliding-window stride (default: {d.stride})")
    g.add_argument("--whole", action="store_true", help="whole-image inference instead of sliding windows "
                   "(the ShapesWorld CLIP's default)")  # fmt: skip
    g.add_argument("--logit-scale", type=float, default=d.logit_scale, help="temperature before the softmax")
    g.add_argument("--background-threshold", type=float, default=None, help="top probability below this -> background")
    g.add_argument("--key-smoothing", type=float, default=None, help="MaskCLIP key smoothing threshold (e.g. 0.5)")
    g.add_argument("--prompt-denoise", type=float, default=None, help="MaskCLIP prompt denoising threshold (e.g. 0.5)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(default_model=default_model)


def _model_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model name, pretrained) from --model/--pretrained/--random-weights and the command's default model."""
    model = args.model or args.default_model
    if args.random_weights or model.startswith(("hf-hub:", "local-dir:")):
        return model, None
    if args.pretrained is not None:
        return model, args.pretrained
    return model, OFFLINE_PRETRAINED if model == OFFLINE_MODEL else DEFAULT_PRETRAINED


def _segmenter_config(args: argparse.Namespace, recommended: dict):
    """Inference settings: the flags given, then what the weights recommend, then the library defaults."""
    from clipdense.inference import SegmenterConfig

    chosen = {k: v for k, v in recommended.items() if k in ("templates", "short_side", "window", "stride")}
    for name in ("templates", "short_side", "window", "stride"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    if args.whole:
        chosen["window"] = None
    if chosen.get("short_side") == 0:
        chosen["short_side"] = None
    return SegmenterConfig(
        mode=args.mode,
        logit_scale=args.logit_scale,
        background_threshold=args.background_threshold,
        prompt_denoise=args.prompt_denoise,
        key_smoothing=args.key_smoothing,
        **chosen,
    )


def _build_predictor(args: argparse.Namespace):
    from clipdense.clip.loading import load_clip
    from clipdense.inference import OpenVocabPredictor

    model, pretrained = _model_source(args)
    quick_gelu = {"auto": None, "on": True, "off": False}[args.quick_gelu]
    clip = load_clip(model, pretrained, device=args.device, quick_gelu=quick_gelu)
    return OpenVocabPredictor(clip, _segmenter_config(args, dict(clip.inference)))


def _check_images(paths: Sequence[str]) -> list[Path]:
    """Fail before any work if an input is missing or not an image."""
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CLIError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:
            raise CLIError(f"cannot read image '{p}': not an image file or corrupt ({type(e).__name__})") from e
        out.append(p)
    stems = [p.stem for p in out]
    if len(set(stems)) != len(stems):
        raise CLIError("two input images share a file name; their outputs would overwrite each other")
    return out


def _save_png(array: np.ndarray) -> Callable[[Path], None]:
    return lambda tmp: Image.fromarray(array).save(tmp, format="PNG")


def cmd_segment(args: argparse.Namespace) -> None:
    from clipdense.data.classnames import parse_class_list, read_class_file
    from clipdense.inference import read_image
    from clipdense.visualize import heatmap, overlay

    if args.uncertainty and args.checkpoint is None:
        raise CLIError("--uncertainty needs a trained PPL model: add --checkpoint RUN_DIR")
    if args.checkpoint is not None:
        images = _check_images(args.images)
        from clipdense.inference import TrainedPredictor

        predictor = TrainedPredictor.from_run(args.checkpoint, args.device)
        names = predictor.class_names
        if args.classes is not None or args.classes_file is not None:  # open-vocabulary models (MaskCLIP+)
            classes = parse_class_list(args.classes) if args.classes is not None else read_class_file(args.classes_file)
            names = predictor.set_classes(classes)
    else:
        if (args.classes is None) == (args.classes_file is None):
            raise CLIError("give the classes either with --classes 'cat, grass, sky' or with --classes-file FILE")
        classes = parse_class_list(args.classes) if args.classes is not None else read_class_file(args.classes_file)
        images = _check_images(args.images)
        predictor = _build_predictor(args)
        names = predictor.set_classes(classes)
        clip = predictor.clip
        used = f"{clip.name} ({clip.pretrained or 'random weights'})"
        if clip.description:
            used += f": {clip.description}"
        if args.model is None:
            used += "; --model/--pretrained choose another CLIP"
        print(f"model: {used}")
    out_dir = Path(args.out)
    for path in tqdm(images, desc="segment", unit="img", disable=len(images) < 2):
        image = read_image(path)
        predictor.set_image(image)
        seg = predictor.predict(uncertainty=True) if args.uncertainty else predictor.predict()
        labels = seg.labels.numpy().astype(np.uint8 if len(names) <= 256 else np.uint16)
        picture = overlay(image, seg.labels, names)
        report = {
            "image": str(path),
            "size": list(seg.labels.shape),
            "classes": names,
            "areas": seg.areas(),
            "settings": predictor.describe(),
        }
        if seg.uncertainty is not None:
            report["uncertainty"] = {
                "image": float(seg.class_sigma.log().mean().exp()),  # geometric mean of the class sigmas
                "class_sigma": dict(zip(names, seg.class_sigma.tolist(), strict=True)),
                "pixel_mean_entropy": float(seg.uncertainty.mean()),
            }
            heat = heatmap(seg.uncertainty, vmax=float(np.log(len(names))))
            atomic_write(out_dir / f"{path.stem}_uncertainty.png", lambda tmp, im=heat: im.save(tmp, format="PNG"))
        atomic_write(out_dir / f"{path.stem}_overlay.png", lambda tmp, im=picture: im.save(tmp, format="PNG"))
        atomic_write(out_dir / f"{path.stem}_labels.png", _save_png(labels))
        atomic_write(out_dir / f"{path.stem}.json", lambda tmp, r=report: tmp.write_text(json.dumps(r, indent=2)))
        if len(images) == 1:
            present = {n: a["fraction"] for n, a in report["areas"].items() if a["pixels"]}
            print(f"{path}: " + ", ".join(f"{n} {100 * f:.1f}%" for n, f in present.items()))
    print(f"wrote {(4 if args.uncertainty else 3) * len(images)} files to {out_dir}")


def cmd_detect(args: argparse.Namespace) -> None:
    from clipdense.inference import DetectionPredictor, read_image
    from clipdense.visualize import draw_detections

    if not 0.0 <= args.score_threshold <= 1.0:
        raise CLIError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    images = _check_images(args.images)
    predictor = DetectionPredictor.from_run(args.checkpoint, args.device)
    out_dir = Path(args.out)
    for path in tqdm(images, desc="detect", unit="img", disable=len(images) < 2):
        image = read_image(path)
        predictor.set_image(image)
        found = predictor.predict(score_threshold=args.score_threshold)
        picture = draw_detections(image, found)
        report = {
            "image": str(path),
            "size": list(image.shape[1:]),
            "score_threshold": args.score_threshold,
            "detections": found.to_list(),
        }
        atomic_write(out_dir / f"{path.stem}_detections.png", lambda tmp, im=picture: im.save(tmp, format="PNG"))
        atomic_write(out_dir / f"{path.stem}.json", lambda tmp, r=report: tmp.write_text(json.dumps(r, indent=2)))
        if len(images) == 1:
            counts: dict[str, int] = {}
            for d in report["detections"]:
                counts[d["class"]] = counts.get(d["class"], 0) + 1
            listed = ", ".join(f"{n} x{c}" for n, c in counts.items()) or "nothing"
            print(f"{path}: {listed} (score >= {args.score_threshold})")
    print(f"wrote {2 * len(images)} files to {out_dir}")


def _corruption_from_args(args: argparse.Namespace) -> dict | None:
    """Validates eval-zeroshot's --corruption/--severity and checks the corruption package is installed."""
    if args.corruption is None:
        if args.severity is not None:
            raise CLIError("--severity needs --corruption NAME")
        return None
    if args.severity is None:
        raise CLIError(f"--corruption {args.corruption} needs --severity 1..5")
    _require_corruptions()
    return {"name": args.corruption, "severity": args.severity, "seed": args.corruption_seed}


def _require_corruptions() -> None:
    from clipdense.evaluation.robustness import check_available

    try:
        check_available()
    except ImportError as e:
        raise CLIError(str(e)) from e


def cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.metrics import SegmentationMetric

    corruption = _corruption_from_args(args)
    dataset = build_dataset(args.dataset, args.root, args.split)
    predictor = _build_predictor(args)
    names = predictor.set_classes(dataset.class_names)
    if len(names) != dataset.num_classes:
        raise CLIError(
            f"{args.dataset} has {dataset.num_classes} classes but the predictor has {len(names)}: "
            "--background-threshold needs a dataset whose class list starts with 'background'"
        )
    metric = SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index, class_names=names)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    for i in tqdm(range(count), desc=f"eval {args.dataset}", unit="img"):
        sample = dataset[i]
        image = sample["image"]
        if corruption is not None:
            from clipdense.evaluation.robustness import corrupt

            # Per-image seed = seed + index, as in `clipdense robustness`, so the two commands agree.
            seed = corruption["seed"] + i
            image = corrupt(image.permute(1, 2, 0).numpy(), corruption["name"], corruption["severity"], seed)
        predictor.set_image(image)
        metric.update(predictor.predict().labels, sample["label"])
    report = metric.compute()
    print(report.format_table())
    out = Path(args.out or f"eval_{args.dataset}_{args.mode}.json")
    payload = {"dataset": args.dataset, "images": count, "settings": predictor.describe(), "corruption": corruption}
    payload.update(report.to_dict())
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    print(f"saved {out}")


def cmd_robustness(args: argparse.Namespace) -> None:
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.robustness import format_table, robustness_sweep

    _require_corruptions()
    dataset = build_dataset(args.dataset, args.root, args.split)
    predictor = _build_predictor(args)
    results = robustness_sweep(
        predictor, dataset, args.corruptions, args.severities, seed=args.corruption_seed, limit=args.limit
    )
    print(format_table(results))
    out = Path(args.out or f"robustness_{args.dataset}_{args.mode}.json")
    payload = {"dataset": args.dataset, "split": args.split, "settings": predictor.describe(), **results}
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    print(f"saved {out}")


def cmd_train(args: argparse.Namespace) -> int:
    from clipdense.config import load_config
    from clipdense.training.engine import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result["finished"]:
        print(f"done: {result['step']} steps, run directory {result['run_dir']}")
    return 0 if result["finished"] else 3


def cmd_eval(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.segmentation import evaluate
    from clipdense.runs import build_from_run

    model, cfg = build_from_run(args.checkpoint, args.device)
    if getattr(model, "task", None) == "detection":
        return _eval_detection(args, model, cfg)
    dataset = build_dataset(
        args.dataset or cfg.data.dataset, args.root or cfg.data.root, args.split or cfg.data.val_split
    )
    if list(dataset.class_names) != list(cfg.model.class_names):
        raise CLIError(
            f"the model was trained on {len(cfg.model.class_names)} classes, the dataset has {dataset.num_classes}"
        )
    overrides = {k: v for k, v in {"mode": args.mode, "scales": tuple(args.scales) if args.scales else None,
                                   "limit": args.limit}.items() if v is not None}  # fmt: skip
    if args.flip:
        overrides["flip"] = True
    if args.aug:
        overrides.update(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    eval_cfg = replace(cfg.eval, **overrides)
    report = evaluate(model, dataset, eval_cfg, args.device)
    print(report.format_table())
    split = None
    if getattr(model, "unseen", None):  # zero-shot protocol: seen / unseen / harmonic mean
        from clipdense.evaluation.zeroshot_split import seen_unseen_report

        split = seen_unseen_report(report, model.unseen)
        print("  ".join(f"{k}: {v:.2f}" for k, v in split.items()))
    out = Path(args.out or Path(args.checkpoint) / f"eval_{dataset.name}_{args.split or cfg.data.val_split}.json")
    payload = {
        "checkpoint": str(args.checkpoint),
        "dataset": dataset.name,
        "settings": vars(eval_cfg),
        **report.to_dict(),
    }
    if split is not None:
        payload["zero_shot"] = split
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=list)))
    print(f"saved {out}")


def _eval_detection(args: argparse.Namespace, model, cfg) -> None:
    from clipdense.data.datasets import DETECTION_DATASET
    from clipdense.evaluation.detection import evaluate_detection
    from clipdense.training.engine import build_eval_dataset

    if args.dataset not in (None, DETECTION_DATASET):
        raise CLIError(f"a detector is evaluated on a COCO-layout dataset (--dataset coco), not {args.dataset}")
    ignored = [f for f, v in (("--mode", args.mode), ("--scales", args.scales), ("--flip", args.flip),
                              ("--aug", args.aug)) if v]  # fmt: skip
    if ignored:
        raise CLIError(f"{', '.join(ignored)} apply to segmentation; detectors are evaluated at their own scale")
    split = args.split or cfg.data.val_split
    dataset = build_eval_dataset(cfg, root=args.root, split=split)
    if list(dataset.class_names) != list(cfg.model.class_names):
        raise CLIError(
            f"the model was trained on {len(cfg.model.class_names)} classes, the dataset has {len(dataset.class_names)}"
        )
    run = Path(args.checkpoint)
    results = run / f"results_coco_{split}.json"
    report = evaluate_detection(model, dataset, args.device, limit=args.limit, results_path=results)
    print(report.format())
    out = Path(args.out or run / f"eval_coco_{split}.json")
    payload = {
        "checkpoint": str(run),
        "dataset": DETECTION_DATASET,
        "root": str(dataset.root),
        "split": split,
        **report.to_dict(),
    }
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    print(f"saved {out} (detections in COCO results format: {results})")


def cmd_flops(args: argparse.Namespace) -> None:
    from clipdense.config import load_config
    from clipdense.models.registry import count_flops, count_parameters, create_model
    from clipdense.training.engine import is_detection

    cfg = load_config(args.config, args.overrides)
    num_classes = args.num_classes or (80 if is_detection(cfg) else 150)
    names = cfg.model.class_names or [f"class {i}" for i in range(num_classes)]
    loading_logger = logging.getLogger("clipdense.clip.loading")
    loading_logger.setLevel(logging.ERROR)  # weights do not change the counts: build with random ones
    model = create_model(cfg.model.name, class_names=names, pretrained=None, **cfg.model.overrides).eval()
    detector = getattr(model, "task", None) == "detection"
    if args.size is not None:
        size = (args.size, args.size)
    else:  # detectors: a COCO image resized to 800 x 1333 and padded to a multiple of 32 (mmdet counts 1280 x 800)
        size = (800, 1344) if detector else (1024, 1024)
    what = "dense part: backbone, FPN, heads on 1000/100 RoIs" if detector else "GFLOPs as multiply-adds"
    print(f"{cfg.model.name} ({len(names)} classes), input {size[0]}x{size[1]}, {what}")
    variants = [("", model)]
    if getattr(model, "mc_inference", None) is not None:  # PPL: Monte-Carlo inference and its mean-only mode
        variants = [(f"Monte-Carlo, N={model.n_samples}: ", model), ("mean-only: ", model)]
    for label, m in variants:
        if label.startswith("mean-only"):
            m.mc_inference = False
        flops = count_flops(m, size)
        for text, key in ((False, "gflops"), (True, "gflops_with_text_encoder")):
            which = "included" if text else "excluded (as the paper counts)"
            params = count_parameters(m, include_text_encoder=text) / 1e6
            print(f"  {label}text encoder {which:<31} Params {params:7.1f}M   GFLOPs {flops[key]:8.1f}")


def _check_detection_dataset(args: argparse.Namespace) -> int:
    from clipdense.data.checks import BAD_SAMPLE_ERRORS
    from clipdense.data.detection import FATAL_KINDS, build_detection_dataset

    dataset = build_detection_dataset(
        args.root, args.split, with_masks=True, skip_bad_annotations=True, filter_empty=False
    )
    print(dataset.describe_problems())
    bad = []
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    for i in tqdm(range(count), desc="check images", unit="img"):
        try:
            dataset[i]
        except BAD_SAMPLE_ERRORS as error:
            bad.append(f"{dataset.samples[i][0]}: {error}")
    print(f"{count} images read, {len(bad)} unreadable or not matching their annotation")
    for line in bad:
        print(f"  {line}")
    problems = sum(dataset.annotation_report[k] for k in FATAL_KINDS)
    return 1 if bad or problems else 0


def cmd_check_dataset(args: argparse.Namespace) -> int:
    from clipdense.data.checks import check_dataset
    from clipdense.data.datasets import DETECTION_DATASET, build_dataset

    if args.dataset == DETECTION_DATASET:
        return _check_detection_dataset(args)

    dataset = build_dataset(args.dataset, args.root, args.split)
    report = check_dataset(dataset, limit=args.limit)
    print(report.format())
    return 1 if report.problems else 0


def _load_shapes_clip(args: argparse.Namespace):
    """The ShapesWorld CLIP: shipped weights, a weights file, or a `shapesworld train` run folder."""
    from clipdense.clip.loading import load_clip

    if args.random_weights:
        return load_clip(OFFLINE_MODEL, None, device=args.device)
    if Path(args.pretrained, "open_clip_config.json").is_file():  # a run folder: its own architecture
        return load_clip(f"local-dir:{args.pretrained}", None, device=args.device)
    return load_clip(OFFLINE_MODEL, args.pretrained, device=args.device)


def cmd_demo(args: argparse.Namespace) -> None:
    from clipdense.data.shapesworld import ShapesWorldConfig, class_names, generate_scene
    from clipdense.evaluation.metrics import SegmentationMetric
    from clipdense.evaluation.shapesworld import BACKGROUND_ENTRY
    from clipdense.inference import OpenVocabPredictor, SegmenterConfig
    from clipdense.visualize import overlay

    clip = _load_shapes_clip(args)
    scene = generate_scene(args.seed, ShapesWorldConfig(image_size=clip.image_size))  # the size it was trained at
    names = ["background", *class_names()]
    predictor = OpenVocabPredictor(
        clip, SegmenterConfig(mode=args.mode, templates="single", short_side=None, window=None)
    )
    predictor.set_image(scene.image)
    predictor.set_classes([BACKGROUND_ENTRY, *names[1:]])
    seg = predictor.predict()
    truth = torch.from_numpy(scene.semantic.astype(np.int64))
    metric = SegmentationMetric(len(names), class_names=names)
    metric.update(seg.labels, truth)
    present = sorted(set(truth.unique().tolist()) | set(seg.labels.unique().tolist()))
    ious = {names[c]: metric.compute().per_class_iou[c] for c in present}
    image = torch.from_numpy(scene.image).permute(2, 0, 1)
    out = Path(args.out)
    atomic_write(out / "scene.png", _save_png(scene.image))
    atomic_write(out / "prediction.png", lambda tmp: overlay(image, seg.labels, names).save(tmp, format="PNG"))
    atomic_write(out / "truth.png", lambda tmp: overlay(image, truth, names).save(tmp, format="PNG"))
    report = {"seed": args.seed, "caption": scene.caption, "iou": ious, "settings": predictor.describe()}
    atomic_write(out / "demo.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(f"scene {args.seed}: {scene.caption}")
    print("IoU: " + ", ".join(f"{n} {v:.1f}%" for n, v in ious.items()))
    print(f"wrote scene.png, prediction.png, truth.png, demo.json to {out}")


def cmd_shapesworld_generate(args: argparse.Namespace) -> None:
    from clipdense.data.shapesworld import generate_dataset

    root = generate_dataset(args.out, args.train, args.val, args.seed, args.format, args.image_size)
    print(f"wrote {args.train} train + {args.val} val scenes to {root}")


def cmd_shapesworld_train(args: argparse.Namespace) -> int:
    from clipdense.training.clip_pretrain import main as pretrain_main

    return pretrain_main(args.args)


def cmd_shapesworld_evaluate(args: argparse.Namespace) -> None:
    from clipdense.data.shapesworld import ShapesWorldConfig
    from clipdense.evaluation.shapesworld import dense_quality, format_quality, zero_shot_accuracy

    clip = _load_shapes_clip(args)
    cfg = ShapesWorldConfig(image_size=args.image_size or clip.image_size)
    accuracy = zero_shot_accuracy(clip.model, clip.tokenizer, cfg, num_images=args.images)
    results = dense_quality(clip, cfg, num_scenes=args.scenes, modes=args.modes)
    print(f"{clip.name} ({clip.pretrained or 'random weights'}), scenes of {cfg.image_size} px "
          f"(trained at {clip.image_size} px)")  # fmt: skip
    print(format_quality(results, accuracy))
    payload = {
        "model": clip.name,
        "pretrained": clip.pretrained,
        "image_size": cfg.image_size,
        "zero_shot_accuracy": accuracy,
        "dense": [vars(r) for r in results],
    }
    if args.out:
        atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))


def _add_shapes_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pretrained",
        default="shapesworld",
        help="'shapesworld' (shipped weights), a weights file or a `shapesworld train` run folder",
    )
    p.add_argument("--random-weights", action="store_true", help="use random weights (for smoke tests only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdense", description="Language-guided dense prediction with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment images into classes named in words (no training)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--classes", help="comma-separated classes ('cat, grass, sky'); ';' separates classes with synonyms")
    p.add_argument("--classes-file", help="text file, one class per line (comma-separated synonyms)")
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--checkpoint", default=None, help="a `clipdense train` run directory (trained model)")
    p.add_argument("--uncertainty", action="store_true", help="PPL checkpoints: also write <name>_uncertainty.png")
    _add_model_args(p, default_model=OFFLINE_MODEL)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("detect", help="detect objects with a trained detector: boxes (and masks) with class names")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="a `clipdense train` detection run directory")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections scoring at least this")
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_detect)

    from clipdense.data.datasets import DETECTION_DATASET, list_datasets

    p = sub.add_parser("eval-zeroshot", help="training-free evaluation on a segmentation dataset")
    p.add_argument("--dataset", required=True, choices=list_datasets())
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help="JSON report path")
    from clipdense.evaluation.robustness import CORRUPTIONS, SEVERITIES

    g = p.add_argument_group("corruption (needs clipdense[robustness])")
    g.add_argument("--corruption", choices=CORRUPTIONS, default=None, help="corrupt each image (ImageNet-C)")
    g.add_argument("--severity", type=int, choices=SEVERITIES, default=None, help="corruption severity 1..5")
    g.add_argument("--corruption-seed", type=int, default=0, help="image i is corrupted with seed N + i")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval_zeroshot)

    p = sub.add_parser("robustness", help="mIoU under ImageNet-C corruptions x severities (MaskCLIP Tables 4/5)")
    p.add_argument("--dataset", required=True, choices=list_datasets())
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="val")
    p.add_argument("--corruptions", nargs="+", choices=CORRUPTIONS, default=list(CORRUPTIONS), metavar="NAME",
                   help=f"corruptions (default: all of {', '.join(CORRUPTIONS)})")  # fmt: skip
    p.add_argument("--severities", nargs="+", type=int, choices=SEVERITIES, default=list(SEVERITIES))
    p.add_argument("--corruption-seed", type=int, default=0, help="image i is corrupted with seed N + i")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help="JSON report path (the whole table)")
    _add_model_args(p)
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("train", help="train a segmentation model or detector from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.iters=1000")
    p.add_argument("--resume", action="store_true", help="continue the run directory's latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run (mIoU; detectors: COCO box/mask AP)")
    p.add_argument("checkpoint", help="run directory written by `clipdense train`")
    p.add_argument("--dataset", default=None, help="default: the training config's dataset")
    p.add_argument("--root", default=None)
    p.add_argument("--split", default=None)
    p.add_argument("--mode", choices=("slide", "whole"), default=None)
    p.add_argument("--scales", type=float, nargs="+", default=None, help="ratios of the short side")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--aug", action="store_true", help="multi-scale (0.5..1.75) + flip, as the paper")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON report path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("flops", help="Params and GFLOPs of a config's model, counted as the paper does")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--size", type=int, default=None, help="square input side (default 1024; detectors 800x1344)")
    p.add_argument("--num-classes", type=int, default=None, help="when the config names no classes (150; COCO 80)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("check-dataset", help="label histogram and problems (unreadable, wrong size, bad labels)")
    p.add_argument(
        "--dataset", required=True, choices=[*list_datasets(), DETECTION_DATASET], help="coco: instances JSON layout"
    )
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_check_dataset)

    from clipdense.clip.dense import MODES

    p = sub.add_parser("demo", help="segment a rendered ShapesWorld scene with the ShapesWorld CLIP")
    p.add_argument("--seed", type=int, default=7, help="scene seed")
    p.add_argument("--mode", choices=MODES, default="maskclip")
    p.add_argument("--out", default="outputs/demo")
    _add_shapes_model_args(p)
    p.set_defaults(func=cmd_demo)

    sw = sub.add_parser("shapesworld", help="the ShapesWorld synthetic world").add_subparsers(
        dest="shapesworld_command", required=True
    )
    p = sw.add_parser("generate", help="write a ShapesWorld dataset (ADE20K-like and/or COCO layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=1000, help="training scenes")
    p.add_argument("--val", type=int, default=200, help="validation scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("semantic", "coco", "both"), default="both")
    p.add_argument("--image-size", type=int, default=160)
    p.set_defaults(func=cmd_shapesworld_generate)
    p = sw.add_parser("train", help="contrastive CLIP training on ShapesWorld (see its --help)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_shapesworld_train)
    p = sw.add_parser("evaluate", help="zero-shot accuracy and training-free mIoU of each dense mode")
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--images", type=int, default=560, help="single-object images for zero-shot accuracy")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--image-size", type=int, default=None, help="scene size in pixels (default: the model's own)")
    p.add_argument("--out", default=None, help="JSON report path")
    _add_shapes_model_args(p)
    p.set_defaults(func=cmd_shapesworld_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from clipdense.clip.loading import CLIPLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["shapesworld", "train"]:  # its own parser, options and --help included
        from clipdense.training.clip_pretrain import main as pretrain_main

        return pretrain_main(argv[2:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args)
    except (CLIError, CLIPLoadError, ValueError, FileNotFoundError) as e:
        print(f"clipdense: error: {e}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
