"""DDP scaling: the same quick Lab 03 workload on world size 1 and 2, in one run.

    .venv/bin/python benchmarks/ddp_scaling.py            # ~1-2 min on 2 CPU cores

Each rank keeps its batch size (the usual DDP "weak scaling": the global batch grows with the world
size), so perfect scaling doubles the images per second. Throughput is measured on the training
epochs only (reduced over the ranks: all images / slowest rank's seconds); the first epoch is a
warm-up and the later epochs count. Prints ``ddp scaling efficiency: N%`` =
images/s(2 ranks) / (2 × images/s(1 rank)). It also compares mixed precision with fp32 on one rank
where the hardware runs it natively: on a GPU (channels_last in both), or on a CPU with native bf16
(AVX512-BF16/AMX: bf16 autocast + channels_last against plain fp32).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from labkit import env, imagenet
from labkit.data.imagenet import load_imagenet
from labkit.params import QUICK

WHY_CPU = """\
Why well under 100% on a small CPU machine: the two ranks share the same few cores (each rank gets
cpu_count // world_size intra-op threads, so one rank alone could use them all), they share one
memory bus and cache, and gloo's all-reduce of every gradient runs over loopback TCP on those same
cores, after every step, with nothing to overlap it with. DDP pays off when each rank brings its own
compute (a GPU, or a node) and the interconnect is fast (NCCL over NVLink/InfiniBand)."""


def measure(data, world_size: int, cfg: imagenet.AblationConfig, device: str, repeats: int = 2) -> dict:
    """Train ``cfg`` ``repeats`` times on ``world_size`` ranks (one process group); the best images/s
    over the epochs after the first (the best of the repeats shrugs off other load on the machine)."""
    configs = [imagenet.make_config({**cfg.__dict__, "name": f"{cfg.name}{i}"}) for i in range(repeats)]
    runs = imagenet.run_ablations(configs, data, world_size=world_size, device=device, progress=False,
                                  save_dir=os.environ.get("TMPDIR", "/tmp") + "/labkit_ddp_bench")
    best = None
    for result in runs:
        timed = result["history"][1:] or result["history"]
        images = sum(h["images_per_s"] * h["seconds"] for h in timed)
        seconds = sum(h["seconds"] for h in timed)
        if best is None or images / seconds > best["images_per_s"]:
            best = {"world_size": world_size, "images_per_s": images / seconds, "seconds": seconds}
    return best


def amp_comparison(data, cfg: imagenet.AblationConfig, device: str) -> None:
    """One rank, ``amp="auto"`` (bf16/fp16 + channels_last) against fp32 (channels_last only on CUDA)."""
    fast = measure(data, 1, imagenet.make_config({**cfg.__dict__, "amp": "auto"}), device)
    slow = measure(data, 1, imagenet.make_config({**cfg.__dict__, "amp": False}), device)
    dtype = env.precision_name(env.amp_dtype("auto", torch.device(device)))
    print(f"{device}, 1 rank: {dtype} + channels_last {fast['images_per_s']:.0f} img/s, fp32 "
          f"{slow['images_per_s']:.0f} img/s -> speed-up x{fast['images_per_s'] / slow['images_per_s']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement (the first is warm-up)")
    p.add_argument("--max-train", type=int, default=QUICK["03_imagenet_ddp_ablations"]["max_train"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    data = load_imagenet("auto", "data/tiny-imagenet", image_size=args.image_size, max_train=args.max_train,
                         max_val=200, progress=False)
    cfg = imagenet.make_config(name="bench", model="resnet18", width=args.width, image_size=args.image_size,
                               epochs=args.epochs, batch_size=args.batch_size, progressive=False, lr=1e-3,
                               affine=False, color_jitter=False, erasing=False)  # per-image augmentation off:
    # it runs in a Python loop and would measure the augmentation, not DDP's scaling
    print(f"workload: resnet18 width {args.width}, {args.image_size}px, {len(data['train'])} train images, "
          f"batch {args.batch_size} per rank, MixUp/CutMix on, {args.epochs} epochs (first = warm-up); "
          f"device {args.device}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    load = os.getloadavg()
    one = measure(data, 1, cfg, args.device)
    two = measure(data, 2, cfg, args.device)
    for r in (one, two):
        print(f"world size {r['world_size']}: {r['images_per_s']:7.1f} img/s  ({r['seconds']:.1f}s timed)")
    eff = two["images_per_s"] / (2 * one["images_per_s"])
    print(f"speed-up x{two['images_per_s'] / one['images_per_s']:.2f} with 2 ranks")
    print(f"ddp scaling efficiency: {eff:.0%}")
    print(f"load average (1 min) before / after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if torch.device(args.device).type == "cpu" and eff < 0.9:
        print(WHY_CPU)
    elif torch.device(args.device).type == "cpu":
        print("(near or above 100% on a CPU machine means the measurement was disturbed, e.g. by other "
              "processes slowing the multi-threaded single rank; run again on an idle machine)")
    if torch.cuda.is_available():
        amp_comparison(data, cfg, "cuda")
    elif env.cpu_has_native_bf16():
        amp_comparison(data, cfg, "cpu")
    else:
        print("mixed precision vs fp32: skipped (no GPU, and this CPU does not run bf16 natively).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
