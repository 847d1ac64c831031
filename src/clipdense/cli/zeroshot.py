"""``clipdense eval-zeroshot`` and ``clipdense robustness``: training-free evaluation on a segmentation dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipdense.cli.common import CLIError, add_model_args, build_predictor, write_json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``eval-zeroshot`` and ``robustness``."""
    from clipdense.data.datasets import list_datasets
    from clipdense.evaluation.robustness import CORRUPTIONS, SEVERITIES

    p = sub.add_parser("eval-zeroshot", help="training-free evaluation on a segmentation dataset")
    p.add_argument("--dataset", required=True, choices=list_datasets())
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help="JSON report path")
    g = p.add_argument_group("corruption (needs clipdense[robustness])")
    g.add_argument("--corruption", choices=CORRUPTIONS, default=None, help="corrupt each image (ImageNet-C)")
    g.add_argument("--severity", type=int, choices=SEVERITIES, default=None, help="corruption severity 1..5")
    g.add_argument("--corruption-seed", type=int, default=0, help="image i is corrupted with seed N + i")
    add_model_args(p)
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
    add_model_args(p)
    p.set_defaults(func=cmd_robustness)


def _require_corruptions() -> None:
    """Fail before any work if the ImageNet-C corruption package is not installed."""
    from clipdense.evaluation.robustness import check_available

    try:
        check_available()
    except ImportError as e:
        raise CLIError(str(e)) from e


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


def cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    """Prints the per-class table and writes the JSON report (``eval_<dataset>_<mode>.json`` unless --out)."""
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.segmentation import evaluate_predictor

    corruption = _corruption_from_args(args)
    dataset = build_dataset(args.dataset, args.root, args.split)
    predictor = build_predictor(args)
    report = evaluate_predictor(
        predictor, dataset, args.limit, corruption=args.corruption, severity=args.severity, seed=args.corruption_seed
    )
    print(report.format_table())
    out = Path(args.out or f"eval_{args.dataset}_{args.mode}.json")
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    payload = {"dataset": args.dataset, "images": count, "settings": predictor.describe(), "corruption": corruption}
    payload.update(report.to_dict())
    write_json(out, payload)
    print(f"saved {out}")


def cmd_robustness(args: argparse.Namespace) -> None:
    """Prints MaskCLIP's robustness table and writes it as JSON (``robustness_<dataset>_<mode>.json`` unless --out)."""
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.robustness import format_table, robustness_sweep

    _require_corruptions()
    dataset = build_dataset(args.dataset, args.root, args.split)
    predictor = build_predictor(args)
    results = robustness_sweep(
        predictor, dataset, args.corruptions, args.severities, seed=args.corruption_seed, limit=args.limit
    )
    print(format_table(results))
    out = Path(args.out or f"robustness_{args.dataset}_{args.mode}.json")
    payload = {"dataset": args.dataset, "split": args.split, "settings": predictor.describe(), **results}
    write_json(out, payload)
    print(f"saved {out}")
