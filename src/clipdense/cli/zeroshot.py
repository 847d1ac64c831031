"""``clipdense eval-zeroshot`` and ``clipdense robustness``: training-free evaluation on a segmentation dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipdense.cli.common import (
    CLIError,
    LazyChoices,
    add_model_args,
    build_predictor,
    check_output,
    positive_int,
    write_json,
)

#: Where reports go unless --out says otherwise.
REPORTS = Path("outputs")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``eval-zeroshot`` and ``robustness``."""
    datasets = LazyChoices("clipdense.data.datasets", "list_datasets")
    presets = LazyChoices("clipdense.config", "PRESETS")
    corruptions = LazyChoices("clipdense.evaluation.robustness", "CORRUPTIONS")
    severities = LazyChoices("clipdense.evaluation.robustness", "SEVERITIES")

    p = sub.add_parser("eval-zeroshot", help="training-free evaluation on a segmentation dataset")
    p.add_argument("--dataset", required=True, choices=datasets, metavar="NAME",
                   help="%(choices)s (shapesworld: the shipped ShapesWorld CLIP unless --model is given)")  # fmt: skip
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="val", help="the dataset's split to evaluate")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help=f"JSON report path (default: {REPORTS}/eval_<dataset>_<mode>"
                   "[_<corruption><severity>][_limit<N>].json)")  # fmt: skip
    p.add_argument("--preset", choices=presets, default=None, metavar="NAME",
                   help="an official evaluation protocol: %(choices)s. Sets the mode, templates, class-name file, "
                   "resize, windows, logit scale, thresholds and PAMR of that method's config for --dataset, "
                   "and ViT-B-16/openai unless --model is given; other flags given override it")  # fmt: skip
    p.add_argument("--class-list", default=None, metavar="NAME",
                   help="a shipped class list to segment with, e.g. voc21 (ours) or sclip_voc21 (official) "
                   "(default: the preset's, else the dataset's)")  # fmt: skip
    g = p.add_argument_group("corruption (needs clipdense[robustness])")
    g.add_argument("--corruption", choices=corruptions, default=None, metavar="NAME",
                   help="corrupt each image (ImageNet-C): %(choices)s")  # fmt: skip
    g.add_argument("--severity", type=int, choices=severities, default=None, metavar="N", help="severity 1..5")
    g.add_argument("--corruption-seed", type=int, default=0, help="image i is corrupted with seed N + i")
    add_model_args(p)
    p.set_defaults(func=cmd_eval_zeroshot)

    p = sub.add_parser("robustness", help="mIoU under ImageNet-C corruptions x severities (MaskCLIP Tables 4/5)")
    p.add_argument("--dataset", required=True, choices=datasets, metavar="NAME", help="%(choices)s")
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="val", help="the dataset's split to evaluate")
    p.add_argument("--corruptions", nargs="+", choices=corruptions, default=None, metavar="NAME",
                   help="corruptions: %(choices)s (default: all eight of MaskCLIP's study)")  # fmt: skip
    p.add_argument("--severities", nargs="+", type=int, choices=severities, default=None, metavar="N",
                   help="severities 1..5 (default: all)")  # fmt: skip
    p.add_argument("--corruption-seed", type=int, default=0, help="image i is corrupted with seed N + i")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, help=f"JSON report path, the whole table (default: {REPORTS}/"
                   "robustness_<dataset>_<mode>[_limit<N>].json)")  # fmt: skip
    add_model_args(p)
    p.set_defaults(func=cmd_robustness)


def _require_corruptions() -> None:
    """Fail before any work if the ImageNet-C corruption package is not installed."""
    from clipdense.evaluation.robustness import check_available

    check_available()  # ModuleNotFoundError naming the install command: exit status 1


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


def _shapesworld_default(args: argparse.Namespace) -> None:
    """ShapesWorld's scenes default to the shipped ShapesWorld CLIP (offline), as ``segment`` and ``demo`` do."""
    from clipdense.cli.common import OFFLINE_MODEL

    if args.dataset == "shapesworld" and getattr(args, "preset", None) is None:
        args.default_model = OFFLINE_MODEL


def _mode(args: argparse.Namespace) -> str:
    from clipdense.inference import SegmenterConfig

    return args.mode or SegmenterConfig().mode


def _limit_suffix(args: argparse.Namespace) -> str:
    """``_limit<N>`` for a partial evaluation, so that it never overwrites the full report."""
    return "" if args.limit is None else f"_limit{args.limit}"


def _preset(args: argparse.Namespace):
    """The --preset's protocol for --dataset (None without --preset), its mirrors printed."""
    if args.preset is None:
        return None
    from clipdense.inference.presets import DATASETS, get_preset

    if args.dataset not in DATASETS:
        raise CLIError(f"--preset covers the datasets {', '.join(DATASETS)}; got --dataset {args.dataset}")
    preset = get_preset(args.preset, args.dataset)
    print(f"preset {preset.name} on {preset.dataset}: mirrors {preset.mirrors}; classes: {preset.class_list}")
    return preset


def _class_entries(args: argparse.Namespace, preset) -> tuple[list[str] | None, int | None]:
    """The class entries (None: the dataset's) and their background entry."""
    from clipdense.data.classnames import load_classnames

    name = args.class_list or (preset.class_list if preset is not None else None)
    if name is None:
        return None, None
    try:
        entries = load_classnames(name)
    except ValueError as e:
        raise CLIError(f"--class-list: {e}") from None
    background = None if preset is None else preset.background_index
    return entries, background


def cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    """Prints the per-class table and writes the JSON report (``outputs/eval_<dataset>_<mode>...json`` unless --out)."""
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.segmentation import evaluate_predictor

    _shapesworld_default(args)
    corruption = _corruption_from_args(args)
    preset = _preset(args)
    name = f"eval_{args.dataset}_{args.preset or _mode(args)}"
    if corruption is not None:
        name += f"_{args.corruption}{args.severity}"
    out = check_output(args.out or REPORTS / f"{name}{_limit_suffix(args)}.json", folder=False)
    dataset = build_dataset(args.dataset, args.root, args.split)
    classes, background = _class_entries(args, preset)
    if classes is not None and len(classes) != dataset.num_classes:
        raise CLIError(f"--class-list has {len(classes)} classes; {args.dataset} has {dataset.num_classes}")
    predictor = build_predictor(args, preset)
    report = evaluate_predictor(
        predictor, dataset, args.limit, corruption=args.corruption, severity=args.severity,
        seed=args.corruption_seed, classes=classes, background_index=background,
    )  # fmt: skip
    print(report.format_table())
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    payload = {"dataset": args.dataset, "images": count, "settings": predictor.describe(), "corruption": corruption}
    if preset is not None:
        payload["preset"] = {"name": preset.name, "mirrors": preset.mirrors, "class_list": args.class_list
                             or preset.class_list, "reported_miou": preset.reported_miou}  # fmt: skip
    payload.update(report.to_dict())
    write_json(out, payload)
    print(f"saved {out}")


def cmd_robustness(args: argparse.Namespace) -> None:
    """Prints MaskCLIP's robustness table and writes it as JSON (``outputs/robustness_...json`` unless --out)."""
    from clipdense.data.datasets import build_dataset
    from clipdense.evaluation.robustness import CORRUPTIONS, SEVERITIES, format_table, robustness_sweep

    _require_corruptions()
    _shapesworld_default(args)
    name = f"robustness_{args.dataset}_{_mode(args)}{_limit_suffix(args)}.json"
    out = check_output(args.out or REPORTS / name, folder=False)
    dataset = build_dataset(args.dataset, args.root, args.split)
    predictor = build_predictor(args)
    results = robustness_sweep(
        predictor,
        dataset,
        args.corruptions or CORRUPTIONS,
        args.severities or SEVERITIES,
        seed=args.corruption_seed,
        limit=args.limit,
    )
    print(format_table(results))
    payload = {"dataset": args.dataset, "split": args.split, "settings": predictor.describe(), **results}
    write_json(out, payload)
    print(f"saved {out}")
