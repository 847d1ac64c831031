"""Can the ShapesCLIP-ViT image tower learn shape at all? A supervised probe on one-object ShapesWorld scenes.

Trains the ViT image tower of ``ShapesCLIP-ViT`` (patch 8 at 128 px, width 128, 6 layers; ``--stem conv``: a
3-layer stride-2 convolutional stem in place of the patch embedding) with a linear head on the 56 colour x shape
classes by cross-entropy (AdamW, one-cycle, batch 64, 8000 training / 1000 held-out scenes), and prints the
held-out accuracy of class, colour and shape every 50 steps. Seeded; takes ~15 min for 300 steps on 2 cores.

    python benchmarks/shapesclip_vit_probe.py --stem patch --steps 300
    python benchmarks/shapesclip_vit_probe.py --stem conv --steps 150
"""

from __future__ import annotations

import argparse
import time

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from clipdense.data.shapesworld import ShapesWorldConfig
from clipdense.data.shapesworld.scene import single_object_scene
from clipdense.data.shapesworld.streams import normalize_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stem", choices=("patch", "conv"), default="patch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = ShapesWorldConfig(image_size=128)
    scenes = [single_object_scene(10_000 + s, cfg, s % cfg.num_classes) for s in range(9000)]
    x = torch.stack([normalize_image(sc.image).half() for sc in scenes])
    y = torch.tensor([s % cfg.num_classes for s in range(9000)])
    x_train, y_train, x_test, y_test = x[:8000], y[:8000], x[8000:], y[8000:]
    model = VisionTransformer(image_size=128, patch_size=8, width=128, layers=6, heads=4, mlp_ratio=4.0,
                              output_dim=256)  # fmt: skip
    if args.stem == "conv":
        model.conv1 = nn.Sequential(
            *(
                m
                for i, o in ((3, 32), (32, 64), (64, 128))
                for m in (nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU())
            ),  # fmt: skip
            nn.Conv2d(128, 128, 1),
        )
    head = nn.Linear(256, cfg.num_classes)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    shapes = len(cfg.shapes)
    print("| stem | step | loss | class % | colour % | shape % (chance 14.3) | s |\n|---|---|---|---|---|---|---|")
    tic = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (64,), generator=g)
        loss = nn.functional.cross_entropy(head(model(x_train[idx].float())), y_train[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                pred = torch.cat([head(model(b.float())).argmax(1) for b in x_test.split(250)])
            model.train()
            acc = [100 * (f(pred) == f(y_test)).float().mean().item()
                   for f in (lambda t: t, lambda t: t // shapes, lambda t: t % shapes)]  # fmt: skip
            print(f"| {args.stem} | {step} | {loss.item():.3f} | " + " | ".join(f"{a:.1f}" for a in acc)
                  + f" | {time.perf_counter() - tic:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
