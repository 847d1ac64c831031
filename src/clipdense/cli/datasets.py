"""``clipdense check-dataset``: label histogram and problems of a dataset folder, before training on it."""

from __future__ import annotations

import argparse

from clipdense.cli.common import LazyChoices, positive_int


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``check-dataset``."""
    p = sub.add_parser("check-dataset", help="label histogram and problems (unreadable, wrong size, bad labels)")
    names = LazyChoices("clipdense.data.datasets", "list_datasets", ["coco"])
    p.add_argument("--dataset", required=True, choices=names, metavar="NAME",
                   help="a segmentation layout, or coco (instances JSON): %(choices)s")  # fmt: skip
    p.add_argument("--root", required=True, help="dataset folder in its standard layout")
    p.add_argument("--split", default="train", help="split")
    p.add_argument("--limit", type=positive_int, default=None, help="check only the first N samples")
    p.set_defaults(func=cmd_check_dataset)


def cmd_check_dataset(args: argparse.Namespace) -> int:
    """Exit status 1 when a problem was found."""
    from clipdense.data.checks import check_dataset
    from clipdense.data.datasets import DETECTION_DATASET, build_dataset

    if args.dataset == DETECTION_DATASET:
        return _check_detection_dataset(args)

    dataset = build_dataset(args.dataset, args.root, args.split)
    report = check_dataset(dataset, limit=args.limit)
    print(report.format())
    return 1 if report.problems else 0


def _check_detection_dataset(args: argparse.Namespace) -> int:
    """COCO instances: the annotation problems, then every image read against its annotation."""
    from tqdm import tqdm

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
