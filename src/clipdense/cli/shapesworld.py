"""``clipdense demo`` and ``clipdense shapesworld generate | train | evaluate``: the ShapesWorld synthetic world.

Both ``demo`` and ``shapesworld evaluate`` use the ShapesWorld CLIP: the shipped weights, a weights file or a
``shapesworld train`` run folder (``--pretrained``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipdense.cli.common import OFFLINE_MODEL, SHAPES_MODELS, CLIError, add_device_arg, write_json, write_png


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and the ``shapesworld`` group (``generate``, ``train``, ``report``, ``evaluate``)."""
    from clipdense.config import MODES

    p = sub.add_parser("demo", help="segment a rendered ShapesWorld scene with the ShapesWorld CLIP")
    p.add_argument("--seed", type=int, default=7, help="scene seed")
    p.add_argument("--mode", choices=MODES, default="maskclip", help="training-free dense mode")
    p.add_argument("--out", default="outputs/demo", help="folder for demo.png and the prediction files")
    _add_shapes_model_args(p)
    p.set_defaults(func=cmd_demo)

    sw = sub.add_parser("shapesworld", help="the ShapesWorld synthetic world").add_subparsers(
        dest="shapesworld_command", required=True
    )
    p = sw.add_parser("generate", help="write a ShapesWorld dataset (ADE20K-like and/or COCO layout)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--train", type=int, default=1000, help="training scenes")
    p.add_argument("--val", type=int, default=200, help="validation scenes")
    p.add_argument("--seed", type=int, default=0, help="base seed: each scene is drawn with this plus its index")
    p.add_argument("--format", choices=("semantic", "coco", "both"), default="both",
                   help="semantic: ADE20K-like label maps; coco: COCO instances JSON; both")  # fmt: skip
    p.add_argument("--image-size", type=int, default=160, help="scene side in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.set_defaults(func=cmd_shapesworld_generate)
    # Only for `clipdense --help`: main() hands `shapesworld train ...` to the pre-training script's own parser.
    p = sw.add_parser("train", help="contrastive CLIP training on ShapesWorld (see its --help)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the pre-training options (see its --help)")
    p.set_defaults(func=cmd_shapesworld_train)
    p = sw.add_parser("report", help="measure the papers' claims in ShapesWorld (about 90 min on 2 CPU cores)")
    p.add_argument("--out", default="report", help="output folder: data, runs, report.md and report.json (default: "
                   "%(default)s; finished runs in it are reused, so an interrupted report resumes)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke-test size (about 10 minutes), one seed")
    p.add_argument("--claims", nargs="+", default=None, metavar="NAME",
                   help="run only these: denseclip ppl maskclip_plus training_free detection robustness")  # fmt: skip
    p.add_argument("--configs", default=None, help="the configs/shapesworld folder (default: the checkout's)")
    add_device_arg(p)
    p.set_defaults(func=cmd_shapesworld_report)
    p = sw.add_parser("evaluate", help="zero-shot accuracy and training-free mIoU of each dense mode, per model")
    p.add_argument("--root", default=None, help="score the scenes of a `shapesworld generate` folder instead of the "
                   "held-out seed range (default: none)")  # fmt: skip
    p.add_argument("--split", choices=("training", "validation"), default="validation",
                   help="--root split to score (default: %(default)s)")  # fmt: skip
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes; with --root at most this many of the "
                   "folder's, 0: all (default: %(default)s)")  # fmt: skip
    p.add_argument("--images", type=int, default=560, help="single-object images for zero-shot accuracy, 0: skip "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="dense modes (default: all)")
    p.add_argument("--image-size", type=int, default=None,
                   help="held-out scene size in pixels (default: the model's own)")  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(SHAPES_MODELS), metavar="NAME",
                   help=f"shipped models to compare side by side with --pretrained shapesworld "
                   f"(default: {' '.join(SHAPES_MODELS)})")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON report path (default: print only)")
    _add_shapes_model_args(p)
    p.set_defaults(func=cmd_shapesworld_evaluate)


def _add_shapes_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=OFFLINE_MODEL, choices=SHAPES_MODELS,
                   help="ShapesWorld CLIP architecture (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--pretrained",
        default="shapesworld",
        help="'shapesworld' (shipped weights), a weights file or a `shapesworld train` run folder (default: "
        "%(default)s)",
    )
    p.add_argument("--random-weights", action="store_true", help="use random weights (for smoke tests only)")
    add_device_arg(p)


def _load_shapes_clip(args: argparse.Namespace, model: str | None = None):
    """The ShapesWorld CLIP: shipped weights, a weights file, or a `shapesworld train` run folder."""
    from clipdense.clip.loading import load_clip

    model = model or args.model
    if args.random_weights:
        return load_clip(model, None, device=args.device)
    if Path(args.pretrained, "open_clip_config.json").is_file():  # a run folder: its own architecture
        return load_clip(f"local-dir:{args.pretrained}", None, device=args.device)
    return load_clip(model, args.pretrained, device=args.device)


def cmd_demo(args: argparse.Namespace) -> None:
    """Writes ``scene.png``, ``prediction.png``, ``truth.png`` and ``demo.json`` (per-class IoU)."""
    import torch

    from clipdense.evaluation.shapesworld import segment_scene
    from clipdense.visualize import overlay, side_by_side

    clip = _load_shapes_clip(args)
    result = segment_scene(clip, args.seed, args.mode)
    scene, names = result.scene, result.class_names
    image = torch.from_numpy(scene.image).permute(2, 0, 1)
    out = Path(args.out)
    write_png(out / "scene.png", scene.image)
    write_png(out / "prediction.png", overlay(image, result.prediction, names))
    write_png(out / "truth.png", overlay(image, result.truth, names))
    title = f"{clip.name} ({clip.pretrained or 'random weights'}), {args.mode}, scene {args.seed}"
    write_png(out / "demo.png", side_by_side(image, result.prediction, result.truth, names, result.iou, title))
    write_json(out / "demo.json", result.to_dict())
    print(f"scene {args.seed}: {scene.caption}")
    print("IoU: " + ", ".join(f"{n} {v:.1f}%" for n, v in result.iou.items()))
    print(f"wrote demo.png (scene | prediction | truth), scene.png, prediction.png, truth.png, demo.json to {out}")


def cmd_shapesworld_generate(args: argparse.Namespace) -> None:
    """Writes the dataset folder(s) under --out."""
    from clipdense.data.shapesworld import generate_dataset

    root = generate_dataset(
        args.out, args.train, args.val, args.seed, args.format, args.image_size, overwrite=args.overwrite
    )
    print(f"wrote {args.train} train + {args.val} val scenes to {root}")


def cmd_shapesworld_train(args: argparse.Namespace) -> int:
    """Runs :func:`clipdense.training.clip_pretrain.main` on the remaining arguments."""
    from clipdense.training.clip_pretrain import main as pretrain_main

    return pretrain_main(args.args)


def cmd_shapesworld_evaluate(args: argparse.Namespace) -> None:
    """Prints, per model side by side, zero-shot accuracy, each dense mode's mIoU and the grid's oracle;
    --out also writes them as JSON."""
    from dataclasses import asdict

    from clipdense.data.shapesworld import ShapesWorldConfig, read_semantic_split
    from clipdense.evaluation.shapesworld import (
        dense_quality,
        format_comparison,
        held_out_scenes,
        oracle_cell,
        oracle_quality,
        quality_settings,
        zero_shot_accuracy,
    )

    unknown = sorted(set(args.models) - set(SHAPES_MODELS))
    if unknown:
        raise CLIError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES_MODELS)}")
    if args.scenes < 0 or args.images < 0:
        raise CLIError("--scenes and --images must be >= 0")
    shipped = args.pretrained == "shapesworld" and not args.random_weights
    clips = [_load_shapes_clip(args, m) for m in (args.models if shipped else [args.model])]
    if args.root is not None:
        try:
            scenes = read_semantic_split(args.root, args.split, limit=args.scenes or None)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from e
        source = f"{len(scenes)} {args.split} scenes of {args.root}"
    else:
        source = None
    table, payload = {}, {"scenes": source, "models": []}
    for clip in clips:
        cfg = ShapesWorldConfig(image_size=args.image_size or clip.image_size)
        clip_scenes = scenes if args.root is not None else held_out_scenes(args.scenes, cfg=cfg)
        size = clip_scenes[0][1].shape[0] if clip_scenes else cfg.image_size
        accuracy = zero_shot_accuracy(clip.model, clip.tokenizer, cfg, num_images=args.images) if args.images else None
        rows, cell = dense_quality(clip, modes=args.modes, scenes=clip_scenes), oracle_cell(clip, size)
        rows.append(oracle_quality(clip_scenes, cell))
        label = clip.name if clip.pretrained in (None, "shapesworld") else f"{clip.name} ({clip.pretrained})"
        table[label] = (rows, accuracy)
        settings = {k: v for k, v in asdict(quality_settings(clip, "maskclip")).items() if k != "mode"}
        payload["models"].append({
            "model": clip.name, "pretrained": clip.pretrained, "image_size": size, "settings": settings,
            "oracle_cell_px": cell, "zero_shot_accuracy": accuracy,
            "dense": [vars(r) for r in rows],
        })  # fmt: skip
    print(source or f"{args.scenes} held-out scenes", "| the oracle pastes the true majority class over every "
          "feature-grid cell")  # fmt: skip
    print(format_comparison(table))
    if args.out:
        write_json(Path(args.out), payload)


def cmd_shapesworld_report(args: argparse.Namespace) -> None:
    """Runs the claims' experiments; prints report.md and where the report was written."""
    from clipdense.training.claims import CLAIMS, QUICK, ReportBudget, run_report

    unknown = sorted(set(args.claims or ()) - set(CLAIMS))
    if unknown:
        raise CLIError(f"--claims: unknown {', '.join(unknown)}; choose from {', '.join(CLAIMS)}")
    out = Path(args.out)
    payload = run_report(out, QUICK if args.quick else ReportBudget(), args.configs, args.device, args.claims)
    print((out / "report.md").read_text(), end="")
    print(f"saved {out / 'report.md'} and {out / 'report.json'} ({payload['wall_s']:.0f} s)")
