"""``clipdense fewshot train | eval | grid`` and ``clipdense classify``: few-shot prompt learning (CoOp, CoCoOp, PLOT)
and cache adapters (Tip-Adapter, Tip-Adapter-F, PLOT-Adapter).

``fewshot train`` follows ``clipdense train``: a run directory with the resolved config and atomic checkpoints,
``--resume``, a progress bar, Ctrl-C stopping at a step boundary with exit status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from clipdense.cli.common import CLIError, add_device_arg, check_output, positive_int, write_json, write_png


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``fewshot`` group (``train``, ``eval``, ``grid``) and ``classify``."""
    fs = sub.add_parser(
        "fewshot",
        help="few-shot classification: prompt learning (CoOp, CoCoOp, PLOT), adapters (Tip-Adapter, PLOT-Adapter)",
    ).add_subparsers(dest="fewshot_command", required=True)
    p = fs.add_parser(
        "train",
        help="learn prompts (or build an adapter's cache) on a k-shot split from a YAML config (configs/fewshot/)",
    )
    p.add_argument("config", help="YAML config (see configs/fewshot/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.shots=4 train.seed=2")
    p.add_argument("--resume", action="store_true", help="continue the run directory's latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = fs.add_parser("eval", help="top-1 and per-class accuracy of a trained run on its dataset's test split")
    p.add_argument("run", help="run directory written by `clipdense fewshot train`")
    p.add_argument("--split", choices=("test", "val"), default="test", help="test split, or the run's k-shot val")
    p.add_argument("--root", default=None, help="$DATA (default: the run's data.root)")
    p.add_argument(
        "--classes",
        choices=("all", "base", "new"),
        default=None,
        help="class subset (default: the run's data.subsample_classes); `new` on a run trained on `base` is "
        "CoCoOp's base-to-new",
    )
    p.add_argument("--out", default=None, help="JSON report (default: RUN/eval_<split>[_<classes>].json)")
    add_device_arg(p)
    p.set_defaults(func=cmd_eval)

    p = fs.add_parser("grid", help="zero-shot vs each config at several shots and seeds: a markdown table")
    p.add_argument("configs", nargs="+", help="method configs on one dataset (e.g. configs/fewshot/shapesworld_*)")
    p.add_argument("--shots", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16], help="k-shot settings")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (the k-shot draw and training)")
    p.add_argument("--no-zeroshot", action="store_true", help="leave out the zero-shot CLIP column")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every config")
    p.add_argument("--out", default="runs/fewshot_grid", help="runs and table.md/table.json go here; finished "
                   "runs in it are reused")  # fmt: skip
    add_device_arg(p)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("classify", help="classify images with a trained few-shot run (CoOp, PLOT, an adapter)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="run directory written by `clipdense fewshot train`")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--out", default=None, help="also write the results as JSON (with --explain: the folder for the "
                   "pictures and classify.json)")  # fmt: skip
    p.add_argument("--explain", action="store_true", help="PLOT runs: write each prompt set's transport plan over the "
                   "image for the top classes (one PNG per prompt set, and one grid per image) to --out")  # fmt: skip
    p.add_argument("--explain-top", type=positive_int, default=3, help="classes explained per image (default: 3)")
    add_device_arg(p)
    p.set_defaults(func=cmd_classify)


def _load_config(path: str, overrides: list[str]):
    from clipdense.inference.fewshot import load_fewshot_config

    if not Path(path).is_file():
        raise CLIError(f"config file not found: {path}")
    return load_fewshot_config(path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status 0 when the run finished, 3 when it stopped early (resumable)."""
    from clipdense.training.fewshot import train_fewshot

    cfg = _load_config(args.config, args.overrides)
    check_output(cfg.resolved_run_dir(), folder=True, flag="run_dir")
    result = train_fewshot(cfg, resume=args.resume)
    if result["finished"]:
        print(f"done: {result['step']} steps, run directory {result['run_dir']}")
    return 0 if result["finished"] else 3


def _check_run(run: str) -> Path:
    path = Path(run)
    if not (path / "config.yaml").is_file():
        raise CLIError(
            f"{run} is not a run directory (no config.yaml): pass the folder `clipdense fewshot train` wrote"
        )
    return path


def cmd_eval(args: argparse.Namespace) -> None:
    """Prints the report and writes it as JSON."""
    from clipdense.evaluation.fewshot import evaluate_fewshot_run

    run = _check_run(args.run)
    default = f"eval_{args.split}_{args.classes}.json" if args.classes else f"eval_{args.split}.json"
    out = check_output(args.out, folder=False) if args.out else run / default
    report = evaluate_fewshot_run(run, args.device, split=args.split, root=args.root, classes=args.classes)
    print(report.format())
    write_json(out, report.to_dict())
    print(f"saved {out}")


def cmd_classify(args: argparse.Namespace) -> None:
    """Prints the top-k classes of every image."""
    from PIL import Image

    from clipdense.inference.fewshot import Classification, classify, explain, load_fewshot_run

    run = _check_run(args.checkpoint)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise CLIError(f"image not found: {missing[0]}")
    if args.explain and not args.out:
        raise CLIError("--explain writes pictures: give the folder with --out DIR")
    if args.out:
        check_output(args.out, folder=args.explain)
    model, _ = load_fewshot_run(run, args.device)
    if args.explain and not hasattr(model, "explain"):
        raise CLIError(f"{run} is a {type(model).__name__} run: only PLOT runs have transport plans to explain")
    images = []
    for p in args.images:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise OSError(f"cannot read image {p}: {e}") from e
    if args.explain:  # one pass serves both: the plans of the top classes and the top-k list
        explanations = explain(model, images, top_k=max(args.top_k, args.explain_top))
        results = [Classification(e.top.labels[: args.top_k], e.top.names[: args.top_k], e.top.probs[: args.top_k])
                   for e in explanations]  # fmt: skip
    else:
        results = classify(model, images, top_k=args.top_k)
    for path, r in zip(args.images, results, strict=True):
        print(f"{path}: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in zip(r.names, r.probs, strict=True)))
    if args.out:
        rows = [{"image": p, "labels": r.labels, "classes": r.names, "probs": r.probs}
                for p, r in zip(args.images, results, strict=True)]  # fmt: skip
        if args.explain:
            for row, written in zip(rows, _write_explanations(explanations, args.images, args), strict=True):
                row["explained"] = written
            write_json(Path(args.out) / "classify.json", rows)
            print(f"saved the transport plans and classify.json to {args.out}")
        else:
            write_json(Path(args.out), rows)


def _write_explanations(explanations, paths: list[str], args: argparse.Namespace) -> list[list[dict]]:
    """Write one PNG per (image, top class, prompt set) and a grid per image for the ``--explain-top`` classes;
    returns what each image got."""
    import re

    from clipdense.inference.fewshot import Classification
    from clipdense.visualize import plan_grid, plan_heatmap

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    stems = [Path(p).stem for p in paths]
    for i, (stem, ex) in enumerate(zip(stems, explanations, strict=True)):
        stem = f"{stem}_{i}" if stems.count(stem) > 1 else stem
        k = min(args.explain_top, len(ex.top.names))
        top = Classification(ex.top.labels[:k], ex.top.names[:k], ex.top.probs[:k])
        ex = dataclasses.replace(ex, top=top, plans=ex.plans[:k], shares=ex.shares[:k])
        vmax = float(ex.plans.max())  # one scale for every map of the image: they compare
        n = ex.plans.shape[1]
        rows, entries = [], []
        for k, name in enumerate(ex.top.names):
            row = []
            for j in range(n):
                mass, share = float(ex.plans[k, j].sum()), float(ex.shares[k, j])
                caption = f"prompt {j + 1}/{n}: mass {100 * mass:.0f}%, score {100 * share:.1f}%"
                panel = plan_heatmap(ex.view, ex.plans[k, j], caption, vmax=vmax)
                file = out / f"{stem}_top{k + 1}_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}_prompt{j + 1}.png"
                write_png(file, panel)
                row.append(panel)
                entries.append({"class": name, "rank": k + 1, "prompt": j + 1, "mass": mass, "score_share": share,
                                "png": file.name})  # fmt: skip
            rows.append(row)
        pairs = zip(ex.top.names, ex.top.probs, strict=True)
        titles = [f"{k + 1}. {name}  p={prob:.3f}" for k, (name, prob) in enumerate(pairs)]
        write_png(out / f"{stem}_plans.png", plan_grid(rows, titles))
        entries.append({"grid": f"{stem}_plans.png"})
        written.append(entries)
    return written


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def cmd_grid(args: argparse.Namespace) -> None:
    """Train and evaluate every (config, shots, seed); prints and writes a markdown table of mean ± std top-1."""
    import json

    from clipdense.evaluation.fewshot import evaluate_fewshot_run, evaluate_zeroshot
    from clipdense.training.fewshot import prepare_splits, train_fewshot

    out = check_output(args.out, folder=True)
    device = "cpu" if args.device is None else args.device
    cfgs = [_load_config(c, [*args.set, f"train.device={device}"]) for c in args.configs]
    if len({(c.data.dataset, c.data.root) for c in cfgs}) != 1:
        raise CLIError("the configs of a grid must name one dataset (data.dataset and data.root)")
    results: dict[str, dict[int, list[float]]] = {}
    if not args.no_zeroshot:
        prepare_splits(cfgs[0])
        top1 = evaluate_zeroshot(cfgs[0], device, progress=False).top1
        results["zero-shot CLIP"] = {k: [top1] for k in args.shots}
        print(f"zero-shot: {top1:.2f}")
    plot_runs: dict[tuple[int, int], Path] = {}  # PLOT-Adapter uses the grid's PLOT run of its shots and seed
    for path, base in zip(args.configs, cfgs, strict=True):
        row = results.setdefault(base.name, {})
        needs_plot = base.model.name.startswith("plot_adapter") and not base.adapter.plot_run
        if needs_plot and not plot_runs:
            raise CLIError(f"{path} needs a PLOT run: list a PLOT config (e.g. shapesworld_plot.yaml) before it")
        for k in args.shots:
            for seed in args.seeds:
                run = out / base.name / f"{k}shot_seed{seed}"
                if base.model.name.startswith("plot_") and not base.model.name.startswith("plot_adapter"):
                    plot_runs[(k, seed)] = run
                report_path = run / "eval_test.json"
                if not report_path.is_file():
                    sets = [
                        *args.set,
                        f"data.shots={k}",
                        f"train.seed={seed}",
                        f"run_dir={run}",
                        f"train.device={device}",
                        *([f"adapter.plot_run={plot_runs[(k, seed)]}"] if needs_plot else []),
                    ]
                    cfg = _load_config(path, sets)
                    result = train_fewshot(cfg, resume=(run / "checkpoints").is_dir(), progress=False)
                    if not result["finished"]:
                        raise KeyboardInterrupt
                    write_json(report_path, evaluate_fewshot_run(run, device, progress=False).to_dict())
                top1 = json.loads(report_path.read_text())["top1"]
                row.setdefault(k, []).append(top1)
                print(f"{base.name} {k}-shot seed {seed}: {top1:.2f}")
    header = "| method | " + " | ".join(f"{k}-shot" for k in args.shots) + " |"
    lines = [header, "|" + "---|" * (len(args.shots) + 1)]
    lines += [
        f"| {name} | " + " | ".join(_mean_std(row[k]) for k in args.shots) + " |" for name, row in results.items()
    ]
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    write_json(out / "table.json", {name: {str(k): v for k, v in row.items()} for name, row in results.items()})
