"""PLOT vs CoOp (and CoCoOp, Tip-Adapter-F, PLOT-Adapter): training and inference time per image on one device
(targets: PLOT <= 1.15x CoOp per training image at 100 classes, <= 1.10x in inference).

Usage:
    python benchmarks/fewshot_speed.py [--classes 10 100] [--batch 8 | --batch recipe]
        [--methods coop plot cocoop tip_adapter_f plot_adapter] [--device cpu] [--repeats 5]

``--batch recipe`` runs each method at its recipe's batch (:data:`RECIPE_BATCH`: CoOp 32, PLOT 128 as the authors'
config, CoCoOp 1, the adapters 256), so the per-image columns compare what one epoch of each costs.

RN50-sized random weights (open_clip ``RN50``, ``pretrained=None``: timing does not depend on the weights), 224 px.
A training step is forward + cross-entropy + backward + SGD step (CoOp: C prompts through the text encoder; PLOT:
4 x C prompts, the dense attention pool and the Sinkhorn plans; CoCoOp: B x C prompts, one set per image); the
shared [SOT] + contexts prefix runs once per prompt set. Inference runs with the text features cached (CoOp's and
PLOT's text side is constant after training; CoCoOp's depends on the image, so it runs the text encoder). The
methods are timed alternately in one process, so that load on the machine hits them alike; peak memory is measured
in a separate process per method (peak resident memory on CPU, peak allocated memory on CUDA) over one training
step and one inference. Times are medians; ratios are to CoOp's time per image. The adapters' caches hold 16 random
keys per class; a step of theirs is CLIP's image features (no gradient) and the cache's (PLOT-Adapter: transported)
logits, backward into the keys, AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

#: Each method's batch in its recipe (CoOp's configs, PLOT's ``plot-coop/train.py``, CoCoOp's, Tip-Adapter's main.py).
RECIPE_BATCH = {"coop": 32, "plot": 128, "cocoop": 1, "tip_adapter_f": 256, "plot_adapter": 256}
ADAPTERS = ("tip_adapter_f", "plot_adapter")


def _setup_adapter(method: str, names: list[str], images, labels, device: str):
    import torch
    import torch.nn.functional as F

    from clipdense.models import create_model

    size = 16 * len(names)
    model = create_model(f"{method}_rn50", class_names=names, pretrained=None, clip_model="RN50", cache_size=size,
                         templates=None).to(device)  # fmt: skip
    dim = model.cache.keys.weight.shape[1]
    keys = F.normalize(torch.randn(model.cache.keys.weight.shape[0], dim), dim=-1)
    model.cache.fill(keys.to(device), torch.arange(size, device=device) % len(names))
    model.cache_text_features()
    opt = torch.optim.AdamW(model.cache.keys.parameters(), lr=1e-3, eps=1e-4)

    def train_step():
        feats = model.train_features(images)
        logits = model.base_logits(feats, training=True) + 1.0 * model.cache_logits(feats, 1.0)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def inference():
        with torch.no_grad():
            model(images)

    return train_step, inference


def _setup(method: str, classes: int, batch: int, device: str):
    import torch
    import torch.nn.functional as F

    from clipdense.models import create_model

    torch.manual_seed(0)
    names = [f"class number {i}" for i in range(classes)]
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    if method in ADAPTERS:
        return _setup_adapter(method, names, images, labels, device)
    model = create_model(f"{method}_rn50", class_names=names, pretrained=None, clip_model="RN50").to(device)
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


def measure(methods: list[str], classes: int, batches: dict[str, int], device: str, repeats: int) -> list[dict]:
    """The methods timed alternately in one process, so that load changes on the machine hit them alike.

    All inference rounds run before the training rounds: ``train()`` drops the text-feature cache, which the first
    (untimed, warm-up) inference round builds."""
    fns = {m: _setup(m, classes, batches[m], device) for m in methods}
    times = {(m, k): [] for m in fns for k in ("train", "infer")}
    for kind, pos in (("infer", 1), ("train", 0)):
        for i in range(repeats + 1):  # the first round warms up
            for m in fns:
                ms = _timed(fns[m][pos], device)
                if i:
                    times[(m, kind)].append(ms)
    med = statistics.median
    return [
        {"method": m, "classes": classes, "batch": batches[m], "train_ms": med(times[(m, "train")]),
         "infer_ms": med(times[(m, "infer")])}
        for m in fns
    ]  # fmt: skip


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
    p.add_argument("--batch", default="8", help="images per step, or `recipe` (each method's own)")
    p.add_argument("--methods", nargs="+", choices=tuple(RECIPE_BATCH), default=["coop", "plot", "cocoop"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory", nargs=2, metavar=("METHOD", "CLASSES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = ["coop", *(m for m in args.methods if m != "coop")]
    batches = {m: RECIPE_BATCH[m] if args.batch == "recipe" else int(args.batch) for m in RECIPE_BATCH}
    if args.memory:
        print(json.dumps(peak_memory(args.memory[0], int(args.memory[1]), batches[args.memory[0]], args.device)))
        return
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
        for row in measure(methods, classes, batches, args.device, args.repeats)
    ]
    print(f"RN50 (random weights), 224 px, batch {args.batch}, device {args.device}, median of {args.repeats}")
    print("| method | classes | batch | train step ms | train ms/img | inference ms/img | train ratio/img | "
          "inference ratio/img | peak memory MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["classes"]: r for r in rows if r["method"] == "coop"}
    for r in rows:
        b = base[r["classes"]]
        train, infer = r["train_ms"] / r["batch"], r["infer_ms"] / r["batch"]
        ratios = f"{train / (b['train_ms'] / b['batch']):.2f}x | {infer / (b['infer_ms'] / b['batch']):.2f}x"
        print(
            f"| {r['method']} | {r['classes']} | {r['batch']} | {r['train_ms']:.0f} | {train:.1f} | {infer:.1f} | "
            f"{ratios} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
