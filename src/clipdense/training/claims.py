"""The papers' claims measured in ShapesWorld: what ``clipdense shapesworld report`` runs.

Every experiment uses the library's own ``train`` / ``eval`` code on the configs under ``configs/shapesworld/``,
the shipped ShapesWorld CLIP as the trunk and text encoder, and one generated dataset (the same scenes, crop,
iterations and seed for a method and its baseline). Trained comparisons whose gap is under ``close_gap`` points
are repeated with the budget's extra seeds and reported as mean and spread. Finished runs are kept under
``OUT/runs`` and reused, so an interrupted report resumes where it stopped.

Claims (paper: direction of the effect):

1. DenseCLIP vs CLIP+FPN, and DenseCLIP's Table 2 rows (prompt only, pre-model, post-model): DenseCLIP Table 1-2.
2. PPL vs DenseCLIP (PPL Table 1), and PPL's predictive entropy: higher on wrong pixels than on right ones.
3. MaskCLIP+ vs training-free MaskCLIP on unseen classes (zero-shot: seen / unseen / hIoU; with and without
   self-training) and annotation-free (MaskCLIP Tables 1 and 3).
4. Training-free modes (MaskCLIP, SCLIP, ClearCLIP, NACLIP, q-k) with and without key smoothing + prompt
   denoising.
5. DenseCLIP RetinaNet vs CLIP RetinaNet box AP (DenseCLIP Table 3).
6. MaskCLIP vs MaskCLIP+ under ImageNet-C corruptions (MaskCLIP Tables 4/5), if ``imagecorruptions`` is installed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipdense.clip.loading import load_clip
from clipdense.config import SegmenterConfig, load_config
from clipdense.data.datasets import build_dataset
from clipdense.data.shapesworld.export import generate_dataset
from clipdense.evaluation.robustness import CORRUPTIONS, robustness_sweep
from clipdense.evaluation.run import evaluate_run
from clipdense.evaluation.segmentation import evaluate_predictor
from clipdense.evaluation.zeroshot_split import seen_unseen_report
from clipdense.fileio import atomic_write_json, atomic_write_text
from clipdense.inference import OpenVocabPredictor, TrainedPredictor
from clipdense.runs import latest_checkpoint
from clipdense.training.engine import train

logger = logging.getLogger(__name__)

#: ``configs/shapesworld`` of a source checkout (the report's default config folder).
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "shapesworld"


@dataclass(frozen=True)
class ReportBudget:
    """How much the report computes; the defaults took 61 minutes on a quiet 2-core CPU machine (budget: 90).

    Attributes:
        train_scenes, val_scenes: Generated scenes (segmentation and COCO layouts of the same scenes).
        image_size: Scene side in pixels (the ShapesWorld CLIP's training size).
        seg_iters: Training iterations of each segmentation run (DenseCLIP variants, CLIP+FPN, PPL).
        mcp_iters: Training iterations of each MaskCLIP+ run.
        det_iters: Training iterations of each detector.
        batch_size: Batch of every trained run.
        seeds: Seeds of the trained comparisons; the first is always run, the others when a gap is close.
        close_gap: A trained comparison closer than this (mIoU / AP points) is repeated with every seed.
        quality_scenes: Held-out scenes for the training-free modes (claim 4); the first ``val_scenes`` of the
            validation split are used everywhere else.
        robustness_scenes: Validation scenes corrupted in claim 6.
        corruptions, severities: Claim 6's grid.
    """

    train_scenes: int = 1200
    val_scenes: int = 100
    image_size: int = 128
    seg_iters: int = 300
    mcp_iters: int = 300
    det_iters: int = 300
    batch_size: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    close_gap: float = 2.0
    quality_scenes: int = 150
    robustness_scenes: int = 40
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)


#: ``--quick``: the same experiments at a smoke-test size (about 10 minutes on 2 CPU cores); no extra seeds.
QUICK = ReportBudget(
    train_scenes=96,
    val_scenes=24,
    seg_iters=60,
    mcp_iters=60,
    det_iters=40,
    batch_size=4,
    seeds=(0,),
    quality_scenes=24,
    robustness_scenes=8,
    corruptions=("gaussian_noise", "jpeg_compression"),
    severities=(1, 3, 5),
)

#: Claim 4's refinement settings: MaskCLIP's thresholds (prompt denoising 0.5; key smoothing 1.0 as in MaskCLIP+'s
#: annotation-free configs), with the official key normalisation and the per-pixel cosine one.
REFINEMENTS: dict[str, dict[str, Any]] = {
    "": {},
    "prompt denoising": {"prompt_denoise": 0.5},
    "key smoothing": {"key_smoothing": 1.0},
    "key smoothing (cosine keys)": {"key_smoothing": 1.0, "key_norm": "cosine"},
    "both": {"key_smoothing": 1.0, "prompt_denoise": 0.5},
}

#: Each claim: its title and the direction the paper reports.
CLAIMS: dict[str, tuple[str, str]] = {
    "denseclip": (
        "DenseCLIP vs CLIP+FPN (DenseCLIP Tables 1-2)",
        "DenseCLIP > CLIP+FPN (RN50 ADE20K 43.5 vs 39.6); prompt only 42.1 < pre-model 42.9 < post-model 43.5",
    ),
    "ppl": (
        "PPL vs DenseCLIP, and PPL's uncertainty (PPL Table 1, Sec. 5.4)",
        "PPL > DenseCLIP (RN50 ADE20K 44.7 vs 43.5); high uncertainty goes with errors",
    ),
    "maskclip_plus": (
        "MaskCLIP+ vs MaskCLIP on unseen classes and annotation-free (MaskCLIP Tables 1, 3)",
        "MaskCLIP+ > MaskCLIP on unseen classes; self-training helps; annotation-free MaskCLIP+ > MaskCLIP",
    ),
    "training_free": (
        "Training-free dense modes, with and without key smoothing + prompt denoising",
        "SCLIP, ClearCLIP, NACLIP > MaskCLIP >> q-k attention; refinements help MaskCLIP",
    ),
    "detection": (
        "DenseCLIP RetinaNet vs CLIP RetinaNet (DenseCLIP Table 3)",
        "DenseCLIP > CLIP (RN50 COCO AP 37.8 vs 36.9)",
    ),
    "robustness": (
        "MaskCLIP vs MaskCLIP+ under ImageNet-C corruptions (MaskCLIP Tables 4/5)",
        "mIoU falls with severity for both; MaskCLIP+ stays above MaskCLIP",
    ),
}


@dataclass
class Result:
    """One measured number with everything needed to reproduce it."""

    claim: str
    name: str
    metric: str
    value: float | None
    seed: int | None = None
    steps: int | None = None
    wall_s: float | None = None
    config: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positive`` (ties count one half).

    Args:
        scores: N scores (higher = more likely positive).
        positive: N booleans.

    Returns:
        The AUROC in [0, 1]; NaN without both classes.
    """
    scores, positive = scores.flatten().double(), positive.flatten().bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank (0-based) of each distinct value's first occurrence
    mid_rank = first.double() + (counts.double() + 1) / 2  # 1-based average rank of the ties
    rank_sum = mid_rank[inverse][positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


class _Report:
    """Runs the experiments into ``out`` and collects their results."""

    def __init__(self, out: Path, budget: ReportBudget, configs: Path, device: str, progress: bool) -> None:
        self.out, self.budget, self.configs, self.device, self.progress = out, budget, configs, device, progress
        self.data = out / "data"
        self.results: list[Result] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ plumbing
    def dataset(self) -> None:
        b = self.budget
        meta = self.data / "report_budget.json"
        wanted = {"train": b.train_scenes, "val": b.val_scenes, "image_size": b.image_size}
        if meta.is_file() and json.loads(meta.read_text()) == wanted:
            return
        generate_dataset(
            self.data,
            b.train_scenes,
            b.val_scenes,
            seed=0,
            fmt="both",
            image_size=b.image_size,
            progress=self.progress,
            overwrite=True,
        )
        atomic_write_json(meta, wanted)

    def _run(
        self, config: str, seed: int, iters: int, extra: Sequence[str] = (), tag: str | None = None
    ) -> tuple[Path, float, str]:
        """Trains ``config`` with ``extra`` overrides (or reuses the finished run), in ``runs/<tag or config>_s<seed>``;
        returns the run folder, its training seconds and the config file."""
        b = self.budget
        path = self.configs / f"{config}.yaml"
        run_dir = self.out / "runs" / f"{tag or config}_s{seed}"
        detection = "retinanet" in config
        size = b.image_size
        overrides = [
            f"run_dir={run_dir}",
            f"data.root={self.data}",
            f"train.iters={iters}",
            "train.epochs=null",
            f"train.batch_size={b.batch_size}",
            f"train.seed={seed}",
            "train.eval_every=0",
            f"train.ckpt_every={iters}",
            "train.precision=fp32",
            "data.workers=0",
            f"train.device={self.device}",
            f"optim.warmup_iters={iters // 10}",
            *(
                [
                    f"data.scale=[{size * 3 // 2},{size}]",
                    f"model.overrides.input_resolution={size}",
                    f"model.overrides.min_size={size}",
                    f"model.overrides.max_size={size * 3 // 2}",
                    "optim.steps=[]",
                ]
                if detection
                else [f"data.crop_size={size}", f"data.scale=[{size * 4},{size}]"]
            ),
            *extra,
        ]
        if config.startswith(("clip_fpn", "denseclip_fpn", "ppl_fpn")):
            overrides.append(f"model.overrides.input_resolution={size}")
        if config.startswith("maskclip_plus"):
            overrides.append(f"model.overrides.total_iters={iters}")
        cfg = load_config(path, overrides)
        done = run_dir / "report_train.json"
        if done.is_file() and latest_checkpoint(run_dir) is not None:
            return run_dir, json.loads(done.read_text())["wall_s"], str(path)
        start = time.perf_counter()
        result = train(cfg, resume=latest_checkpoint(run_dir) is not None, progress=self.progress)
        if not result["finished"]:
            raise RuntimeError(f"training {config} stopped early at step {result['step']}; rerun the report to resume")
        wall = time.perf_counter() - start
        atomic_write_json(done, {"wall_s": wall, "steps": iters})
        return run_dir, wall, str(path)

    def _miou(self, run_dir: Path) -> float:
        evaluation = evaluate_run(run_dir, self.device, limit=self.budget.val_scenes, progress=self.progress)
        return evaluation.report.miou

    def _compare(
        self, claim: str, configs: Sequence[str], metric: str, measure: Callable[[Path], float], iters: int
    ) -> None:
        """Trains each config with the first seed; both sides of every paper direction (:data:`DIRECTIONS`) that
        ends closer than ``close_gap`` get the other seeds too."""
        first: dict[str, float] = {}

        def run(config: str, seed: int) -> float:
            run_dir, wall, path = self._run(config, seed, iters)
            value = measure(run_dir)
            self.results.append(Result(claim, config, metric, _finite(value), seed, iters, round(wall, 1), path))
            return value

        seeds = self.budget.seeds
        for config in configs:
            first[config] = run(config, seeds[0])
        close = set()
        for _, _, (high, _), low_side in DIRECTIONS:
            low = None if isinstance(low_side, float) else low_side[0]
            if high in first and low in first and abs(first[high] - first[low]) < self.budget.close_gap:
                close |= {high, low}
        for config in (c for c in configs if c in close):
            for seed in seeds[1:]:
                run(config, seed)

    # ------------------------------------------------------------------ claims
    def claim_denseclip(self) -> None:
        configs = [
            "clip_fpn_shapesworld",
            "denseclip_fpn_prompt_only_shapesworld",
            "denseclip_fpn_pre_shapesworld",
            "denseclip_fpn_shapesworld",
        ]
        self._compare("denseclip", configs, "mIoU", self._miou, self.budget.seg_iters)

    def claim_ppl(self) -> None:
        configs = ["denseclip_fpn_shapesworld", "ppl_fpn_shapesworld"]
        self._compare("ppl", configs, "mIoU", self._miou, self.budget.seg_iters)
        run_dir = self.out / "runs" / f"ppl_fpn_shapesworld_s{self.budget.seeds[0]}"
        predictor = TrainedPredictor.from_run(run_dir, self.device)
        dataset = build_dataset("shapesworld", str(self.data), "validation")
        entropy, wrong = [], []
        torch.manual_seed(self.budget.seeds[0])  # the Monte-Carlo samples of the uncertainty
        for i in range(min(self.budget.val_scenes, len(dataset))):
            sample = dataset[i]
            predictor.set_image(sample["image"])
            seg = predictor.predict(uncertainty=True)
            valid = sample["label"] != dataset.ignore_index
            entropy.append(seg.uncertainty[valid])
            wrong.append((seg.labels != sample["label"])[valid])
        entropy_all, wrong_all = torch.cat(entropy), torch.cat(wrong)
        config = str(self.configs / "ppl_fpn_shapesworld.yaml")
        seed, steps = self.budget.seeds[0], self.budget.seg_iters
        for name, mask in (("correct pixels", ~wrong_all), ("wrong pixels", wrong_all)):
            mean = entropy_all[mask].mean().item() if mask.any() else float("nan")
            self.results.append(
                Result(
                    "ppl",
                    f"PPL entropy, {name}",
                    "mean entropy (nats)",
                    _finite(mean),
                    seed,
                    steps,
                    None,
                    config,
                    {"pixels": int(mask.sum())},
                )
            )
        self.results.append(
            Result(
                "ppl",
                "PPL entropy as an error detector",
                "AUROC",
                _finite(auroc(entropy_all, wrong_all)),
                seed,
                steps,
                None,
                config,
            )
        )

    def _shapes_clip(self):
        return load_clip("ShapesCLIP-RN", "shapesworld", device=self.device)

    def _maskclip_predictor(self, clip, **settings) -> OpenVocabPredictor:
        size = self.budget.image_size
        config = SegmenterConfig(templates="single", short_side=size, window=None, **settings)
        return OpenVocabPredictor(clip, config)

    def claim_maskclip_plus(self) -> None:
        b = self.budget
        dataset = build_dataset("shapesworld", str(self.data), "validation")
        names = list(dataset.class_names)
        zeroshot = load_config(self.configs / "maskclip_plus_zeroshot_shapesworld.yaml")
        unseen = [names.index(n) for n in zeroshot.model.overrides["unseen_classes"]]  # the config's split
        start = time.perf_counter()
        report = evaluate_predictor(
            self._maskclip_predictor(self._shapes_clip()), dataset, b.val_scenes, progress=self.progress
        )
        wall = round(time.perf_counter() - start, 1)
        split = seen_unseen_report(report, unseen)
        for metric in ("miou_seen", "miou_unseen", "hiou"):
            self.results.append(
                Result(
                    "maskclip_plus",
                    "MaskCLIP (training-free)",
                    metric,
                    _finite(split[metric]),
                    None,
                    0,
                    wall,
                    "ShapesCLIP-RN, maskclip mode, single template, whole image",
                )
            )
        self.results.append(
            Result(
                "maskclip_plus",
                "MaskCLIP (training-free)",
                "mIoU (annotation-free)",
                _finite(report.miou),
                None,
                0,
                wall,
                "as above",
            )
        )
        runs = [
            ("maskclip_plus_zeroshot_shapesworld", "MaskCLIP+ (zero-shot, self-training)", ()),
            (
                "maskclip_plus_zeroshot_shapesworld",
                "MaskCLIP+ (zero-shot, no self-training)",
                ("model.overrides.self_train_from=null",),
            ),
            ("maskclip_plus_annotation_free_shapesworld", "MaskCLIP+ (annotation-free)", ()),
        ]
        for config, name, extra in runs:
            seed = b.seeds[0]
            tag = config if not extra else f"{config}_noself"
            run_dir, wall, path = self._run(config, seed, b.mcp_iters, extra, tag)
            evaluation = evaluate_run(run_dir, self.device, limit=b.val_scenes, progress=self.progress)
            if "zeroshot" in config:
                split = seen_unseen_report(evaluation.report, unseen)
                for metric in ("miou_seen", "miou_unseen", "hiou"):
                    self.results.append(
                        Result(
                            "maskclip_plus",
                            name,
                            metric,
                            _finite(split[metric]),
                            seed,
                            b.mcp_iters,
                            round(wall, 1),
                            path,
                            {"overrides": list(extra)},
                        )
                    )
            else:
                self.results.append(
                    Result(
                        "maskclip_plus",
                        name,
                        "mIoU (annotation-free)",
                        _finite(evaluation.report.miou),
                        seed,
                        b.mcp_iters,
                        round(wall, 1),
                        path,
                    )
                )

    def claim_training_free(self) -> None:
        clip = self._shapes_clip()
        dataset = build_dataset("shapesworld", str(self.data), "validation")
        for mode in ("maskclip", "sclip", "clearclip", "naclip", "vanilla"):
            for label, settings in REFINEMENTS.items():
                start = time.perf_counter()
                report = evaluate_predictor(
                    self._maskclip_predictor(clip, mode=mode, **settings),
                    dataset,
                    self.budget.quality_scenes,
                    progress=self.progress,
                )
                name = mode if not label else f"{mode} + {label}"
                wall = round(time.perf_counter() - start, 1)
                config = "ShapesCLIP-RN, single template, whole image"
                self.results.append(Result("training_free", name, "mIoU", _finite(report.miou), None, 0, wall, config))

    def claim_detection(self) -> None:
        def box_ap(run_dir: Path) -> float:
            evaluation = evaluate_run(run_dir, self.device, limit=self.budget.val_scenes, progress=self.progress)
            return evaluation.report.bbox["AP"]

        self._compare(
            "detection",
            ["clip_retinanet_shapesworld", "denseclip_retinanet_shapesworld"],
            "box AP",
            box_ap,
            self.budget.det_iters,
        )

    def claim_robustness(self) -> None:
        try:
            import imagecorruptions  # noqa: F401
        except ImportError:
            self.notes.append('robustness skipped: needs pip install "clipdense[robustness]"')
            return
        b = self.budget
        dataset = build_dataset("shapesworld", str(self.data), "validation")
        run_dir = self.out / "runs" / f"maskclip_plus_annotation_free_shapesworld_s{b.seeds[0]}"
        predictors = {
            "MaskCLIP (training-free)": self._maskclip_predictor(self._shapes_clip()),
            "MaskCLIP+ (annotation-free)": TrainedPredictor.from_run(run_dir, self.device),
        }
        for name, predictor in predictors.items():
            start = time.perf_counter()
            sweep = robustness_sweep(
                predictor, dataset, b.corruptions, b.severities, limit=b.robustness_scenes, progress=self.progress
            )
            wall = round(time.perf_counter() - start, 1)
            self.results.append(Result("robustness", name, "clean mIoU", _finite(sweep["clean"]), 0, None, wall))
            for corruption in b.corruptions:
                for severity in b.severities:
                    value = sweep["results"][corruption][str(severity)]
                    self.results.append(Result("robustness", name, f"{corruption} {severity}", _finite(value), 0))


def run_report(
    out: str | Path,
    budget: ReportBudget | None = None,
    configs: str | Path | None = None,
    device: str = "cpu",
    claims: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the claims' experiments and writes ``OUT/report.json`` and ``OUT/report.md``.

    Args:
        out: Output folder (dataset, runs and the report; finished runs are reused).
        budget: Sizes (default :class:`ReportBudget`; :data:`QUICK` for a smoke run).
        configs: The ``configs/shapesworld`` folder (default: the source checkout's).
        device: Where to train and evaluate.
        claims: Subset of :data:`CLAIMS` keys (default: all).
        progress: Show progress bars.

    Returns:
        The report as written to ``report.json``.
    """
    budget = budget or ReportBudget()
    configs = Path(configs) if configs is not None else CONFIGS
    if not (configs / "denseclip_fpn_shapesworld.yaml").is_file():
        raise FileNotFoundError(
            f"{configs} does not hold the ShapesWorld configs: pass the configs/shapesworld folder "
            "of a clipdense checkout"
        )
    unknown = set(claims or ()) - set(CLAIMS)
    if unknown:
        raise ValueError(f"unknown claims {sorted(unknown)}; choose from {list(CLAIMS)}")
    out = Path(out)
    report = _Report(out, budget, configs, device, progress)
    start = time.perf_counter()
    report.dataset()
    order = [c for c in CLAIMS if claims is None or c in claims]
    timings: dict[str, float] = {}

    def write(complete: bool) -> dict[str, Any]:
        results = [asdict(r) for r in report.results]
        payload = {
            "complete": complete,
            "budget": asdict(budget),
            "device": device,
            "torch": torch.__version__,
            "wall_s": round(time.perf_counter() - start, 1),
            "claim_wall_s": dict(timings),
            "claims": {k: {"title": t, "paper": p} for k, (t, p) in CLAIMS.items() if k in timings},
            "results": results,
            "verdicts": verdicts(summarise(results)),
            "notes": report.notes,
        }
        atomic_write_json(out / "report.json", payload, indent=2)
        atomic_write_text(out / "report.md", format_report(payload))
        return payload

    for claim in order:  # the report is rewritten after each claim: an interrupted one keeps what was measured
        t0 = time.perf_counter()
        getattr(report, f"claim_{claim}")()
        timings[claim] = round(time.perf_counter() - t0, 1)
        write(complete=False)
    return write(complete=True)


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of (claim, name, metric) with the mean and spread (max - min) over seeds, in first-seen order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["claim"], r["name"], r["metric"]), []).append(r)
    rows = []
    for (claim, name, metric), rs in groups.items():
        values = [r["value"] for r in rs if r["value"] is not None]
        mean = sum(values) / len(values) if values else None
        spread = max(values) - min(values) if len(values) > 1 else None
        seeds = [r["seed"] for r in rs if r["seed"] is not None]
        rows.append(
            {
                "claim": claim,
                "name": name,
                "metric": metric,
                "mean": mean,
                "spread": spread,
                "seeds": seeds,
                "steps": rs[0]["steps"],
                "wall_s": sum(r["wall_s"] or 0 for r in rs),
                "config": rs[0]["config"],
            }
        )
    return rows


#: The paper's direction of each effect as (claim, statement, (name, metric) expected higher, (name, metric) lower
#: or a fixed level such as chance).
DIRECTIONS: tuple[tuple[str, str, tuple[str, str], tuple[str, str] | float], ...] = (
    ("denseclip", "DenseCLIP (post-model) > CLIP+FPN",
     ("denseclip_fpn_shapesworld", "mIoU"), ("clip_fpn_shapesworld", "mIoU")),
    ("denseclip", "language prompts only > CLIP+FPN",
     ("denseclip_fpn_prompt_only_shapesworld", "mIoU"), ("clip_fpn_shapesworld", "mIoU")),
    ("denseclip", "pre-model prompting > prompts only",
     ("denseclip_fpn_pre_shapesworld", "mIoU"), ("denseclip_fpn_prompt_only_shapesworld", "mIoU")),
    ("denseclip", "post-model prompting > pre-model",
     ("denseclip_fpn_shapesworld", "mIoU"), ("denseclip_fpn_pre_shapesworld", "mIoU")),
    ("ppl", "PPL > DenseCLIP", ("ppl_fpn_shapesworld", "mIoU"), ("denseclip_fpn_shapesworld", "mIoU")),
    ("ppl", "PPL's entropy is higher on wrong pixels",
     ("PPL entropy, wrong pixels", "mean entropy (nats)"), ("PPL entropy, correct pixels", "mean entropy (nats)")),
    ("ppl", "PPL's entropy detects wrong pixels better than chance (AUROC > 0.5)",
     ("PPL entropy as an error detector", "AUROC"), 0.5),
    ("maskclip_plus", "MaskCLIP+ > MaskCLIP on unseen classes",
     ("MaskCLIP+ (zero-shot, self-training)", "miou_unseen"), ("MaskCLIP (training-free)", "miou_unseen")),
    ("maskclip_plus", "self-training helps on unseen classes",
     ("MaskCLIP+ (zero-shot, self-training)", "miou_unseen"),
     ("MaskCLIP+ (zero-shot, no self-training)", "miou_unseen")),
    ("maskclip_plus", "annotation-free MaskCLIP+ > MaskCLIP",
     ("MaskCLIP+ (annotation-free)", "mIoU (annotation-free)"), ("MaskCLIP (training-free)", "mIoU (annotation-free)")),
    ("training_free", "SCLIP > MaskCLIP", ("sclip", "mIoU"), ("maskclip", "mIoU")),
    ("training_free", "ClearCLIP > MaskCLIP", ("clearclip", "mIoU"), ("maskclip", "mIoU")),
    ("training_free", "NACLIP > MaskCLIP", ("naclip", "mIoU"), ("maskclip", "mIoU")),
    ("training_free", "MaskCLIP > q-k attention", ("maskclip", "mIoU"), ("vanilla", "mIoU")),
    ("training_free", "key smoothing + prompt denoising help MaskCLIP",
     ("maskclip + both", "mIoU"), ("maskclip", "mIoU")),
    ("detection", "DenseCLIP RetinaNet > CLIP RetinaNet",
     ("denseclip_retinanet_shapesworld", "box AP"), ("clip_retinanet_shapesworld", "box AP")),
    ("robustness", "MaskCLIP+ > MaskCLIP under corruption (mean over the grid)",
     ("MaskCLIP+ (annotation-free)", "corrupted mean"), ("MaskCLIP (training-free)", "corrupted mean")),
)  # fmt: skip


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each paper direction checked against the measured means (``holds`` None when a number is missing;
    ``within_spread`` when the gap is no larger than the seed spread of either side, so the seeds do not decide it).

    Args:
        rows: :func:`summarise`'s rows.
    """
    means = {(r["name"], r["metric"]): r["mean"] for r in rows}
    spreads = {(r["name"], r["metric"]): r["spread"] or 0.0 for r in rows}
    corrupted: dict[str, list[float]] = {}
    for r in rows:
        if r["claim"] == "robustness" and r["metric"] != "clean mIoU" and r["mean"] is not None:
            corrupted.setdefault(r["name"], []).append(r["mean"])
    for name, values in corrupted.items():
        means[name, "corrupted mean"] = sum(values) / len(values)
    out = []
    claims = {r["claim"] for r in rows}
    for claim, statement, high, low in DIRECTIONS:
        if claim not in claims:
            continue
        a, b = means.get(high), low if isinstance(low, float) else means.get(low)
        holds = None if a is None or b is None else a > b
        spread = max(spreads.get(high, 0.0), 0.0 if isinstance(low, float) else spreads.get(low, 0.0))
        within = holds is not None and spread > 0 and abs(a - b) <= spread
        out.append(
            {"claim": claim, "statement": statement, "higher": a, "lower": b, "holds": holds, "within_spread": within}
        )
    return out


def format_report(payload: dict[str, Any]) -> str:
    """``report.md``: one table per claim, with the paper's direction above it."""
    lines = [
        "# The papers' claims in ShapesWorld"
        + ("" if payload.get("complete", True) else " (partial: the claims run so far)"),
        "",
        f"Budget: {json.dumps(payload['budget'])}; device {payload['device']}; total {payload['wall_s']:.0f} s.",
        "",
    ]
    rows = summarise(payload["results"])
    lines += ["## Summary: the papers' directions", "", "| claim | expected | measured | holds |", "|---|---|---|---|"]
    for v in verdicts(rows):
        measured = "n/a" if v["holds"] is None else f"{v['higher']:.2f} vs {v['lower']:.2f}"
        holds = {None: "n/a", True: "yes", False: "**no**"}[v["holds"]]
        if v.get("within_spread"):
            holds += " (within the seed spread)"
        lines.append(f"| {v['claim']} | {v['statement']} | {measured} | {holds} |")
    lines.append("")
    for claim, info in payload["claims"].items():
        lines += [
            f"## {info['title']}",
            "",
            f"Paper: {info['paper']}",
            "",
            "| method | metric | value | seeds | steps | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["claim"] == claim):
            value = "n/a" if row["mean"] is None else f"{row['mean']:.2f}"
            if row["spread"] is not None:
                value += f" (spread {row['spread']:.2f})"
            seeds = ",".join(str(s) for s in row["seeds"]) or "-"
            lines.append(
                f"| {row['name']} | {row['metric']} | {value} | {seeds} | {row['steps'] or 0} | {row['wall_s']:.0f} |"
            )
        lines.append("")
    lines += [f"Note: {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"
