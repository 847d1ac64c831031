"""Where users wait: end-to-end wall time and peak memory of ``clipdense segment``, cold and warm.

Each row runs ``clipdense segment --model RN50`` in a fresh process (start-up, imports and model loading included)
on one JPEG, twice: cold (an empty cache folder, ``CLIPDENSE_CACHE``) and warm (the same folder again, so the class
embeddings come from the disk cache). Peak RSS is that process's own (``os.wait4``). RN50 weights cannot be
downloaded here: random RN50 weights are saved once to a ``.safetensors`` file and passed as ``--pretrained FILE``
(speed does not depend on the weights, and a file gives the stable fingerprint the disk cache needs).

Two more rows time what else users wait for: a folder of 50 photos (``images/s`` as the CLI reports it, next to
the single-image figure) and a MaskCLIP+ run (RN50 guide, DeepLabv2 on ResNet-101, random weights saved as
``clipdense train`` saves a run) segmenting one photo with ``--checkpoint``, in fp32 and bf16.

    python benchmarks/segment_latency.py                       # every row (~10 min on 2 cores)
    python benchmarks/segment_latency.py --rows 3-ensemble     # a quick run
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = (
    "person, car, tree, sky, road, building, grass, dog, cat, bicycle, "
    "bus, chair, table, window, door, water, mountain, boat, bird, horse"
).split(", ")


@dataclass(frozen=True)
class Row:
    classes: int
    templates: str
    size: tuple[int, int]  # width, height
    targets: dict[str, float]  # "cold s", "warm s", "peak GB" -> upper bound on this CPU
    images: int = 1  # > 1: a folder of that many copies
    checkpoint: str | None = None  # a MaskCLIP+ run (--checkpoint) at this --precision
    shapes_model: str | None = None  # a shipped ShapesWorld CLIP on a ShapesWorld scene of `size`, its defaults


ROWS = {
    "3-ensemble": Row(3, "ensemble", (640, 480), {"warm s": 3.5}),
    "20-ensemble": Row(20, "ensemble", (640, 480), {"cold s": 15.0, "warm s": 4.0}),
    "20-single": Row(20, "single", (640, 480), {}),
    "27mp-20-ensemble": Row(20, "ensemble", (6000, 4500), {"peak GB": 2.0}),
    "folder50-20-ensemble": Row(20, "ensemble", (640, 480), {}, images=50),
    "maskclip+-fp32": Row(20, "", (500, 375), {"warm s": 10.0}, checkpoint="fp32"),
    "maskclip+-bf16": Row(20, "", (500, 375), {"warm s": 10.0}, checkpoint="bf16"),
    # the shipped model on one 128 px scene with the 56 classes and background (the `segment` a new user runs)
    "shapes-rn-128": Row(57, "", (128, 128), {}, shapes_model="ShapesCLIP-RN"),
}


def random_weights(path: Path) -> Path:
    """Random RN50 weights as a .safetensors file (written once, then reused: its fingerprint stays the same)."""
    if not path.is_file():
        import open_clip
        from safetensors.torch import save_file

        from clipdense.fileio import atomic_write

        logging.disable(logging.WARNING)  # open_clip warns that the model is random: that is the point here
        state = open_clip.create_model("RN50").state_dict()
        logging.disable(logging.NOTSET)
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
    return path


def maskclip_plus_run(path: Path) -> Path:
    """A MaskCLIP+ run folder (the zero-shot VOC config, random weights), as ``clipdense train`` writes one."""
    if not (path / "config.yaml").is_file():
        import torch

        from clipdense.config import load_config, save_config
        from clipdense.data.classnames import load_classnames
        from clipdense.data.datasets import DATASETS
        from clipdense.models import create_model
        from clipdense.runs import save_checkpoint

        cfg = load_config(Path(__file__).parents[1] / "configs/maskclip_plus/maskclip_plus_zeroshot_voc.yaml")
        cfg.run_dir = str(path)
        cfg.model.class_names = load_classnames(DATASETS[cfg.data.dataset].class_list)
        torch.manual_seed(0)
        logging.disable(logging.WARNING)  # random weights on purpose
        model = create_model(cfg.model.name, class_names=cfg.model.class_names, pretrained=None, **cfg.model.overrides)
        logging.disable(logging.NOTSET)
        path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path / "config.yaml")
        save_checkpoint(path, model, {"step": 1}, 1)
    return path


def test_image(path: Path, size: tuple[int, int]) -> Path:
    """A smooth random-colour JPEG of ``size`` (width, height)."""
    if not path.is_file():
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (size[1] // 32 + 1, size[0] // 32 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
    return path


def shapes_scene(path: Path, size: int) -> Path:
    """A held-out ShapesWorld scene of ``size`` px."""
    from clipdense.data.shapesworld import EVAL_SEED_OFFSET, ShapesWorldConfig, generate_scene

    if not path.is_file():
        Image.fromarray(generate_scene(EVAL_SEED_OFFSET + 7, ShapesWorldConfig(image_size=size)).image).save(path)
    return path


def shapes_classes() -> str:
    """``background`` (the textures as synonyms) and the 56 ShapesWorld classes, as --classes takes them."""
    from clipdense.data.shapesworld import BACKGROUNDS, class_names

    return "; ".join([", ".join(["background"] + [f"{b} background" for b in BACKGROUNDS]), *class_names()])


def run_segment(args: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (GB), exit code and stdout of one ``clipdense segment`` process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with ThreadPoolExecutor(2) as pool:  # drain both pipes so the child never blocks on a full one
        stdout, stderr = pool.submit(proc.stdout.read), pool.submit(proc.stderr.read)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
        stdout, stderr = stdout.result(), stderr.result()
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(stderr.decode(errors="replace")[-2000:], file=sys.stderr)
    return seconds, usage.ru_maxrss * 1024 / 1e9, proc.returncode, stdout.decode(errors="replace")  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "clipdense_segment_latency",
                        help="folder for the weights file and images (kept between runs)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    weights = random_weights(args.work / "RN50_random.safetensors")
    exe = Path(sys.executable).with_name("clipdense")
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "clipdense.cli"]

    header = f"{'row':<22}{'run':<6}{'wall s':>8}{'peak GB':>9}{'images/s':>10}  {'target':<14}{'ok':<4}"
    print(header, "-" * len(header), sep="\n", flush=True)
    for name in args.rows:
        row = ROWS[name]
        image = test_image(args.work / f"image_{row.size[0]}x{row.size[1]}.jpg", row.size)
        if row.shapes_model:
            image = shapes_scene(args.work / f"scene_{row.size[0]}.png", row.size[0])
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "CLIPDENSE_CACHE": cache}
            env.pop("CLIPDENSE_NO_CACHE", None)
            inputs = [str(image)]
            if row.images > 1:
                folder = Path(out) / "in"
                folder.mkdir()
                for i in range(row.images):
                    os.link(image, folder / f"photo_{i:03d}.jpg")
                inputs = [str(folder)]
            cli = [*command, "segment", *inputs, "--out", str(Path(out) / "out"), "--device", args.device,
                   "--max-pixels", "0"]  # fmt: skip
            if row.shapes_model:
                cli += ["--model", row.shapes_model, "--classes", shapes_classes()]
            elif row.checkpoint:
                run_dir = maskclip_plus_run(args.work / "maskclip_plus_run")
                cli += ["--checkpoint", str(run_dir), "--precision", row.checkpoint]
            else:
                classes = ", ".join(CLASSES[: row.classes])
                cli += [
                    "--model",
                    "RN50",
                    "--pretrained",
                    str(weights),
                    "--classes",
                    classes,
                    "--templates",
                    row.templates,
                ]
            for run in ("cold", "warm"):
                seconds, peak, code, stdout = run_segment(cli, env)
                rate = re.search(r"\(([0-9.]+) images/s\)", stdout)
                checks = {"cold s": seconds if run == "cold" else None, "warm s": seconds if run == "warm" else None,
                          "peak GB": peak}  # fmt: skip
                target = [(k, v) for k, v in row.targets.items() if checks[k] is not None]
                text = ", ".join(f"{k} <= {v:g}" for k, v in target)
                ok = "fail" if code else ("yes" if all(checks[k] <= v for k, v in target) else "NO") if target else ""
                shown = rate.group(1) if rate else f"{row.images / seconds:.2f}"
                print(f"{name:<22}{run:<6}{seconds:>8.2f}{peak:>9.2f}{shown:>10}  {text:<14}{ok:<4}", flush=True)


if __name__ == "__main__":
    main()
