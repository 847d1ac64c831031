"""Throughput of ShapesCLIP pre-training, one lever at a time: what the CPU recipe was built from.

Each row runs the real command (``clipdense shapesworld train``) in a fresh process for a few steps
and reports the image-caption pairs per second of the steady state (the median over logged intervals
after the first), the wall time of the whole command per step, and the process's peak resident
memory. Rows change one thing at a time, from the earlier GPU recipe to the CPU recipe. Scene-cache
rendering is timed separately (it is paid once per run, before the first step).

    python benchmarks/shapesclip_pretrain_speed.py                 # the lever table (about 15 min on 2 cores)
    python benchmarks/shapesclip_pretrain_speed.py --steps 4 --rows 2  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GPU_MODEL = ["--model-overrides", json.dumps({"vision_cfg": {"width": 32}, "text_cfg": {"width": 256, "heads": 4}})]
WIDE_TEXT = ["--model-overrides", json.dumps({"text_cfg": {"width": 256, "heads": 4}})]
FULL_SCENES = ["--single-object-warmup-frac", "0", "--locked-image-frac", "0"]  # time one kind of step
OLD = ["--image-size", "160", "--batch-size", "128", *FULL_SCENES]

#: (lever, trainer options). Each row changes one thing of the row above it, from the earlier GPU recipe's
#: model and data path (at a CPU-sized batch) to the CPU recipe; the last rows vary one thing of the CPU recipe.
LEVERS: list[tuple[str, list[str]]] = [
    ("GPU recipe model, 160 px, batch 128, render on the fly (2 workers)",
     [*OLD, *GPU_MODEL, "--no-cache", "--workers", "2", "--no-channels-last"]),
    ("+ channels_last", [*OLD, *GPU_MODEL, "--no-cache", "--workers", "2"]),
    ("+ scene cache, 0 workers", [*OLD, *GPU_MODEL]),
    ("+ image tower width 32 -> 16", [*OLD, *WIDE_TEXT]),
    ("+ text width 256 -> 128", OLD),
    ("+ 128 px", ["--batch-size", "128", *FULL_SCENES]),
    ("+ batch 64: the CPU recipe (full-scene steps)", FULL_SCENES),
    ("  CPU recipe, render on the fly, 1 worker", [*FULL_SCENES, "--no-cache", "--workers", "1"]),
    ("  CPU recipe, render on the fly, 0 workers", [*FULL_SCENES, "--no-cache"]),
    ("  CPU recipe, scene cache, 1 worker", [*FULL_SCENES, "--workers", "1"]),
    ("  CPU recipe, 1 thread", [*FULL_SCENES, "--threads", "1"]),
    ("  CPU recipe, one-object warm-up steps", ["--single-object-warmup-frac", "1", "--locked-image-frac", "0"]),
    ("  CPU recipe, locked-image (LiT) steps", ["--single-object-warmup-frac", "0", "--locked-image-frac", "1"]),
]  # fmt: skip


def run_row(options: list[str], steps: int, log_every: int) -> dict:
    """Runs the trainer for ``steps`` steps in a subprocess; returns pairs/s, s/step and peak RSS (GiB)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "clipdense.cli", "shapesworld", "train", "--out", out, "--steps", str(steps)]
        cmd += ["--log-every", str(log_every), "--eval-images", "0", "--eval-scenes", "0", "--device", "cpu"]
        cmd += ["--num-scenes", str(max(steps * 128, 256)), "--ckpt-every", str(10 * steps), *options]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    return {
        "pairs_s": statistics.median(rates) if rates else float("nan"),
        "s_per_step": wall / steps,
        "peak_gib": usage.ru_maxrss / 2**20,  # kilobytes on Linux
    }


def cache_rate(image_size: int, scenes: int) -> float:
    """Scenes per second of scene-cache rendering (one process per core)."""
    from clipdense.data.shapesworld import ShapesWorldConfig, render_scene_cache

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        render_scene_cache(root, scenes, cfg=ShapesWorldConfig(image_size=image_size), workers=os.cpu_count() or 1,
                           progress=False)  # fmt: skip
        return scenes / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="steps per row (the first logged interval is dropped)")
    p.add_argument("--rows", type=int, default=len(LEVERS), help="run only the first N rows")
    p.add_argument("--cache-scenes", type=int, default=4000, help="scenes for the cache-rendering rate (0: skip)")
    args = p.parse_args()
    log_every = max(args.steps // 4, 1)
    print(f"# ShapesCLIP pre-training throughput on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{args.steps} steps per row")  # fmt: skip
    print("| lever | pairs/s | s/step (whole command) | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for name, options in LEVERS[: args.rows]:
        row = run_row(options, args.steps, log_every)
        print(f"| {name} | {row['pairs_s']:.1f} | {row['s_per_step']:.2f} | {row['peak_gib']:.2f} |", flush=True)
    if args.cache_scenes:
        for size in (128, 160):
            print(f"\nscene-cache rendering at {size} px: {cache_rate(size, args.cache_scenes):.0f} scenes/s")


if __name__ == "__main__":
    main()
