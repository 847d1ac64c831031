"""Training-step cost of DenseCLIP vs the plain CLIP trunk + Semantic FPN, measured in one run.

Each row times full optimiser steps (forward, losses, backward, AdamW) of a model from the
registry on random images/labels, with the same crop, batch and precision, and reports images/s
and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: not measured). Weights are random:
speed does not depend on them.

    python benchmarks/train_speed.py --crop 512 --batch 16 --precision bf16            # on a GPU
    python benchmarks/train_speed.py --crop 256 --batch 2 --precision fp32 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from clipdense.config import OptimConfig
from clipdense.models.registry import create_model
from clipdense.training.engine import param_groups


def step_time(name: str, args, device: torch.device) -> tuple[float, float | None]:
    """Median seconds per step and peak memory (GiB) of one model."""
    names = [f"class {i}" for i in range(args.classes)]
    torch.manual_seed(0)
    model = create_model(name, class_names=names, pretrained=None, clip_model=args.clip_model).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, OptimConfig()), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    labels = torch.randint(0, args.classes, (args.batch, args.crop, args.crop), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(model.losses(model(images), labels).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, optimizer
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["clip_fpn_rn50", "denseclip_fpn_rn50", "ppl_fpn_rn50"])
    parser.add_argument("--clip-model", default="RN50")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.getLogger("clipdense.clip.loading").setLevel(logging.ERROR)  # random weights on purpose
    device = torch.device(args.device)

    print(f"# training step, {args.crop}x{args.crop}, batch {args.batch}, {args.precision}, {args.classes} classes, "
          f"on {device} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")  # fmt: skip
    print("| model | s/step | images/s | peak memory (GiB) | time vs first | memory vs first |")
    print("|---|---|---|---|---|---|")
    first = None
    for name in args.models:
        sec, peak = step_time(name, args, device)
        first = first or (sec, peak)
        mem = f"{peak:.2f}" if peak is not None else "n/a"
        mem_ratio = f"{peak / first[1]:.2f}x" if peak is not None and first[1] else "n/a"
        print(f"| {name} | {sec:.3f} | {args.batch / sec:.1f} | {mem} | {sec / first[0]:.2f}x | {mem_ratio} |")


if __name__ == "__main__":
    main()
