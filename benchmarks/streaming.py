"""Ray Data pipeline vs a plain DataLoader on the same decode + augment, and Ray Data's start-up cost.

    .venv/bin/python benchmarks/streaming.py                      # ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/streaming.py --images 1200 --image-size 128 --concurrency 2

Both sides read the same image files (Lab 06's default: the Alzheimer layout, the stand-in when the real data
is absent) and run the same ``labkit.labs.streaming.DecodeAugment`` (PIL decode, resize, flip/rotate, uint8 out):

- **Ray Data**: ``from_items`` → ``map_batches(DecodeAugment, concurrency=N)`` → ``iter_torch_batches``;
- **DataLoader**: ``DataLoader(items, num_workers=N, collate_fn=DecodeAugment.collate)`` (spawned workers).

Each side runs ``--rounds`` passes in turn (Ray, DataLoader, Ray, ...); a pass's first batch is its start-up
(Ray Data: planning and launching tasks; DataLoader: spawning workers), the rest its steady throughput. Printed:
the median images/s of each side and their **ratio** (measured in this one run), the median start-up of each,
and ``ray.init`` once. Absolute numbers are this machine's only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from labkit import distributed
from labkit.labs import streaming


def one_pass(batches) -> tuple[float, float, int]:
    """(start-up seconds = wait for the first batch, steady images/s over the rest, images)."""
    tick = time.perf_counter()
    it = iter(batches)
    next(it)
    startup = time.perf_counter() - tick
    images, steady = 0, time.perf_counter()
    for batch in it:
        images += len(batch["label"])
    seconds = time.perf_counter() - steady
    return startup, images / seconds if seconds > 0 else float("nan"), images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="alzheimer", choices=sorted(streaming.LAYOUTS))
    parser.add_argument("--images", type=int, default=600, help="training files read per pass")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2, help="Ray Data tasks / DataLoader workers")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    listing = streaming.list_image_files(args.data, max_train=args.images, max_val=1, progress=False)
    items = listing.items("train", shuffle_seed=0)
    step = streaming.DecodeAugment(args.image_size, listing.mode, train=True)
    print(f"{len(items)} {listing.layout} files ({'stand-in' if listing.synthetic else 'real'}), "
          f"{args.image_size} px, batch {args.batch_size}, concurrency {args.concurrency}, {args.rounds} rounds")

    with distributed.ray_cluster() as cluster:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        runs: dict[str, list[tuple[float, float, int]]] = {"Ray Data": [], "DataLoader": []}
        for _ in range(args.rounds):
            ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // args.batch_size)).map_batches(
                step, batch_size=args.batch_size, concurrency=args.concurrency)
            runs["Ray Data"].append(one_pass(ds.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=2)))
            loader = torch.utils.data.DataLoader(items, batch_size=args.batch_size, num_workers=args.concurrency,
                                                 multiprocessing_context="spawn", collate_fn=step.collate)
            runs["DataLoader"].append(one_pass(loader))
    rate = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    start = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    for name in runs:
        print(f"{name:<11} {rate[name]:8.0f} img/s   start-up (first batch) {start[name]:5.2f} s   "
              f"passes: {', '.join(f'{r[1]:.0f}' for r in runs[name])} img/s")
    print(f"Ray Data / DataLoader throughput: {rate['Ray Data'] / rate['DataLoader']:.2f}×; "
          f"ray.init {cluster['init_seconds']:.1f} s (once per lab)")
    return {"rate": rate, "startup": start, "init_seconds": cluster["init_seconds"]}


if __name__ == "__main__":
    main()
