"""``clipdense train``, ``clipdense eval`` and ``clipdense flops``: models trained from a YAML config."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipdense.cli.common import add_device_arg, check_output, positive_float, positive_int, write_json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``flops``."""
    p = sub.add_parser("train", help="train a segmentation model or detector from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.iters=1000")
    p.add_argument("--resume", action="store_true", help="continue the run directory's latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run (mIoU; detectors: COCO box/mask AP)")
    p.add_argument("checkpoint", help="a `clipdense train` run directory, an exported folder or hf-hub:ORG/NAME")
    p.add_argument("--dataset", default=None, help="dataset name (default: the training config's)")
    p.add_argument("--root", default=None, help="dataset folder (default: the training config's)")
    p.add_argument("--split", default=None, help="split (default: the training config's data.val_split)")
    p.add_argument("--mode", choices=("slide", "whole"), default=None, help="inference (default: the config's)")
    p.add_argument("--scales", type=positive_float, nargs="+", default=None,
                   help="ratios of the short side (default: the config's)")  # fmt: skip
    p.add_argument("--flip", action="store_true", help="also average over the flipped image")
    p.add_argument("--aug", action="store_true", help="multi-scale (0.5..1.75) + flip, as the paper")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help="JSON report path (default: RUN/eval_<dataset>_<split>[_<variant>]"
                   ".json, the variant naming --mode/--aug/--scales/--flip/--limit)")  # fmt: skip
    add_device_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("flops", help="Params and GFLOPs of a config's model, counted as the paper does")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--size", type=positive_int, default=None, help="square input side (default: 1024; detectors "
                   "800x1344)")  # fmt: skip
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="when the config names no classes (default: 150; COCO 80)")  # fmt: skip
    p.set_defaults(func=cmd_flops)


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status 0 when the run finished, 3 when it stopped early (resumable)."""
    from clipdense.config import load_config
    from clipdense.training.engine import train

    cfg = load_config(args.config, args.overrides)
    check_output(cfg.resolved_run_dir(), folder=True, flag="run_dir")
    result = train(cfg, resume=args.resume)
    if result["finished"]:
        print(f"done: {result['step']} steps, run directory {result['run_dir']}")
    return 0 if result["finished"] else 3


def cmd_eval(args: argparse.Namespace) -> None:
    """Prints the report and writes it as JSON (``RUN/eval_<dataset>_<split>.json`` unless --out)."""
    from clipdense.evaluation.run import evaluate_run

    if args.out is not None:
        check_output(args.out, folder=False)
    hub_id = args.checkpoint.startswith("hf-hub:")
    result = evaluate_run(
        args.checkpoint,
        args.device,
        dataset=args.dataset,
        root=args.root,
        split=args.split,
        mode=args.mode,
        scales=args.scales,
        flip=args.flip,
        aug=args.aug,
        limit=args.limit,
        save_detections=not hub_id,
    )
    print(result.format())
    # an hf-hub: model's report goes to the working directory, not into the Hugging Face cache
    out = Path(args.out or (result.default_path.name if hub_id else result.default_path))
    write_json(out, result.to_dict(), default=list)
    detections = f" (detections in COCO results format: {result.detections_path})" if result.detections_path else ""
    print(f"saved {out}{detections}")


def cmd_flops(args: argparse.Namespace) -> None:
    """Prints Params and GFLOPs without and with the text encoder (PPL: Monte-Carlo and mean-only)."""
    from clipdense.config import load_config
    from clipdense.evaluation.complexity import model_complexity

    cfg = load_config(args.config, args.overrides)
    print(model_complexity(cfg, size=args.size, num_classes=args.num_classes).format())
