"""PLOT vs CoOp (and CoCoOp): training-step and inference time on the same batch and device (target: PLOT <= 1.10x
CoOp).

Usage:
    python benchmarks/fewshot_speed.py [--classes 10 100] [--batch 8] [--methods coop plot cocoop] [--device cpu]
        [--repeats 5]

RN50-sized random weights (open_clip ``RN50``, ``pretrained=None``: timing does not depend on the weights), 224 px.
A training step is forward + cross-entropy + backward + SGD step (CoOp: C prompts through the text encoder; PLOT:
4 x C prompts, the dense attention pool and the Sinkhorn plans; CoCoOp: B x C prompts, one set per image); the
shared [SOT] + contexts prefix runs once per prompt set. Inference runs with the text features cached (CoOp's and
PLOT's text side is constant after training; CoCoOp's depends on the image, so it runs the text encoder). The
methods are timed alternately in one process, so that load on the machine hits them alike; peak memory is measured
in a separate process per method (peak resident memory on CPU, peak allocated memory on CUDA) over one training
step and one inference. Times are medians; ratios are to CoOp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _setup(method: str, classes: int, batch: int, device: str):
    import torch
    import torch.nn.functional as F

    from clipdense.models import create_model

    torch.manual_seed(0)
    names = [f"class number {i}" for i in range(classes)]
    model = create_model(f"{method}_rn50", class_names=names, pretrained=None, clip_model="RN50").to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]  # the contexts (and CoCoOp's meta-net)
    opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)

    def train_step():
        model.train()
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def inference():
        model.eval()
        if model.text_cache is None:
            model.cache_text_features()
        with torch.no_grad():
            model(images)

    return train_step, inference


def _timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t)


def measure(methods: list[str], classes: int, batch: int, device: str, repeats: int) -> list[dict]:
    """The methods timed alternately in one process, so that load changes on the machine hit them alike.

    All inference rounds run before the training rounds: ``train()`` drops the text-feature cache, which the first
    (untimed, warm-up) inference round builds."""
    fns = {m: _setup(m, classes, batch, device) for m in methods}
    times = {(m, k): [] for m in fns for k in ("train", "infer")}
    for kind, pos in (("infer", 1), ("train", 0)):
        for i in range(repeats + 1):  # the first round warms up
            for m in fns:
                ms = _timed(fns[m][pos], device)
                if i:
                    times[(m, kind)].append(ms)
    med = statistics.median
    return [
        {"method": m, "classes": classes, "train_ms": med(times[(m, "train")]), "infer_ms": med(times[(m, "infer")])}
        for m in fns
    ]


def peak_memory(method: str, classes: int, batch: int, device: str) -> float:
    """MiB: peak allocated CUDA memory, or this process's peak resident memory, over one train step + inference."""
    import resource

    import torch

    train_step, inference = _setup(method, classes, batch, device)
    train_step()
    inference()
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", nargs="+", choices=("coop", "plot", "cocoop"), default=["coop", "plot", "cocoop"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory", nargs=2, metavar=("METHOD", "CLASSES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(peak_memory(args.memory[0], int(args.memory[1]), args.batch, args.device)))
        return
    methods = ["coop", *(m for m in args.methods if m != "coop")]
    # Memory first: a child's peak resident memory starts from its parent's at the fork (Linux keeps the high-water
    # mark across exec), so the parent must not hold the timing runs' models yet.
    peaks = {}
    for classes in args.classes:
        for method in methods:
            cmd = [sys.executable, __file__, "--memory", method, str(classes), "--batch", str(args.batch),
                   "--device", args.device]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            peaks[(method, classes)] = json.loads(out.strip().splitlines()[-1])
    rows = [
        {**row, "peak_mib": peaks[(row["method"], classes)]}
        for classes in args.classes
        for row in measure(methods, classes, args.batch, args.device, args.repeats)
    ]
    print(f"RN50 (random weights), 224 px, batch {args.batch}, device {args.device}, median of {args.repeats}")
    print("| method | classes | train step ms | inference ms | train ratio | inference ratio | peak memory MiB |")
    print("|---|---|---|---|---|---|---|")
    base = {r["classes"]: r for r in rows if r["method"] == "coop"}
    for r in rows:
        b = base[r["classes"]]
        ratios = f"{r['train_ms'] / b['train_ms']:.2f}x | {r['infer_ms'] / b['infer_ms']:.2f}x"
        times = f"{r['train_ms']:.0f} | {r['infer_ms']:.0f}"
        print(f"| {r['method']} | {r['classes']} | {times} | {ratios} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
