"""Throughput of training-free dense inference vs open_clip's plain ``encode_image``.

For one architecture, input size and batch size, times in the same run:
  * ``encode_image``: open_clip's own image forward (the model built at that input size),
  * each dense mode's features (``dense_clip_encoder``),
  * each mode's full dense prediction: features, cosine scores against C class embeddings,
    bilinear upsampling to the input size and argmax.
Weights are random (speed does not depend on them). Prints a table (images/s, ratio to plain).

    python benchmarks/zeroshot_speed.py --model RN50 --size 512 --batch 1 16
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch
import torch.nn.functional as F

from clipdense.clip.dense import MODES, dense_clip_encoder


def timeit(fn, x: torch.Tensor, iters: int, warmup: int) -> float:
    """Seconds per call (median of ``iters`` timed calls after ``warmup`` untimed ones)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--classes", type=int, default=150, help="text embeddings scored per pixel")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = open_clip.create_model(args.model, force_image_size=args.size).eval().to(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    text = F.normalize(torch.randn(args.classes, model.visual.output_dim, device=device), dim=-1)
    encoders = {m: dense_clip_encoder(model.visual, m) for m in args.modes}

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def plain(x):
        with torch.inference_mode(), autocast():
            return model.encode_image(x)

    def features(enc):
        def run(x):
            with torch.inference_mode(), autocast():
                return enc(x)

        return run

    def segment(enc):
        def run(x):
            with torch.inference_mode(), autocast():
                dense = F.normalize(enc(x).dense.float(), dim=1)
                scores = torch.einsum("bdhw,cd->bchw", dense, text)
                return F.interpolate(scores, size=x.shape[-2:], mode="bilinear").argmax(1)

        return run

    print(f"# {args.model} {args.size}x{args.size} {args.precision} on {device} "
          f"({torch.get_num_threads()} CPU threads, torch {torch.__version__}), {args.classes} classes")  # fmt: skip
    header = f"| {'what':<24} | {'batch':>5} | {'images/s':>9} | {'s/image':>8} | {'vs encode_image':>15} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        base = timeit(plain, x, args.iters, args.warmup)
        rows = [("encode_image (open_clip)", base)]
        for mode, enc in encoders.items():
            rows.append((f"{mode} features", timeit(features(enc), x, args.iters, args.warmup)))
            rows.append((f"{mode} segmentation", timeit(segment(enc), x, args.iters, args.warmup)))
        for what, sec in rows:
            print(f"| {what:<24} | {batch:>5} | {batch / sec:>9.2f} | {sec / batch:>8.4f} | {base / sec:>14.1%} |")


if __name__ == "__main__":
    main()
