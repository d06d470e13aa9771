"""Input pipeline: the seed project's PIL pipeline vs labkit's cached tensors + BatchAugment, one run.

    .venv/bin/python benchmarks/input_pipeline.py                      # ~2-4 min on 2 CPU cores
    .venv/bin/python benchmarks/input_pipeline.py --images 512 --epoch-images 128   # short

Both pipelines read the same training images (the Alzheimer data at --data-dir, or its synthetic
stand-in, written there once when absent) and deliver normalised, augmented float batches of
--batch-size at --image-size on --device:

* seed:   torchvision ``ImageFolder`` → PIL decode of every file in every epoch → ``Resize`` /
          ``RandomHorizontalFlip`` / ``RandomRotation(10)`` / ``ToTensor`` / ``Normalize`` in a
          ``DataLoader`` with --workers worker processes (as in the source notebook), then ``.to(device)``.
* labkit: images decoded once into a cached uint8 tensor (``load_alzheimer``) → ``DataLoader`` over
          memory → ``.to(device)`` → ``BatchAugment`` (per-sample flip + rotation by index gather).

(a) images/s of the input pipeline alone (best of --repeats passes; the seed pipeline's worker
start-up is part of every pass, as in every epoch of the seed notebook). The one-time decode that
fills labkit's cache is printed separately.
(b) one training epoch with ``labkit.models.AlzheimerCNN`` and ``labkit.train.train_one_epoch``, same
model initialisation and optimiser both ways, over --epoch-images images.

Ends with exactly two lines::

    input pipeline speedup: N.Nx
    epoch speedup: N.Nx
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision import datasets, transforms

from labkit.data.alzheimer import load_alzheimer
from labkit.data.augment import BatchAugment
from labkit.data.images import stratified_subset
from labkit.env import amp_dtype, pick_device, resolve_path, seed_everything
from labkit.timing import sync


def seed_loader(train_dir, files: list[str], root, size: int, batch_size: int, workers: int, seed: int) -> DataLoader:
    """The source notebook's pipeline over exactly ``files`` (paths relative to ``root``)."""
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(),
                             transforms.RandomRotation(10), transforms.ToTensor(),
                             transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
    folder = datasets.ImageFolder(str(train_dir), transform=tf)
    index = {os.path.relpath(path, root).replace(os.sep, "/"): i for i, (path, _) in enumerate(folder.samples)}
    subset = Subset(folder, [index[f] for f in files])
    return DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def seed_batches(loader: DataLoader, device: torch.device):
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def labkit_batches(loader: DataLoader, augment: BatchAugment, device: torch.device):
    for x, y in loader:
        yield augment(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def images_per_s(make_batches, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best images/s over ``repeats`` full passes of the batch generator, and the CPU milliseconds
    spent per image (all processes; this one is insensitive to other load on the machine)."""
    best, cpu_ms = 0.0, float("inf")
    for _ in range(repeats):
        sync(device)
        tick, cpu, n = time.perf_counter(), cpu_seconds(), 0
        for x, _ in make_batches():
            n += len(x)
        sync(device)
        best = max(best, n / (time.perf_counter() - tick))
        cpu_ms = min(cpu_ms, 1000 * (cpu_seconds() - cpu) / n)
    return best, cpu_ms


def epoch_seconds(loader, transform, device: torch.device, size: int, seed: int) -> tuple[float, dict]:
    """Wall seconds of one ``train_one_epoch`` of a freshly initialised AlzheimerCNN."""
    from labkit.models.cnn import AlzheimerCNN
    from labkit.train import train_one_epoch

    seed_everything(seed)
    model = AlzheimerCNN(num_classes=4, image_size=size, in_channels=3).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync(device)
    tick = time.perf_counter()
    stats = train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), device=device, transform=transform,
                            amp_dtype=amp_dtype("auto", device), progress=False)
    sync(device)
    return time.perf_counter() - tick, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="training images per input-pipeline pass")
    parser.add_argument("--epoch-images", type=int, default=None,
                        help="images in the training epoch of part (b) (default: 512 on CPU, --images on a GPU)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed pipeline")
    parser.add_argument("--repeats", type=int, default=2, help="passes per pipeline in (a); the best counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="data/alzheimer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    epoch_images = args.epoch_images or (args.images if device.type == "cuda" else 512)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {device} ({name}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"settings: {args.images} images, {args.image_size} px, batch {args.batch_size}, "
          f"seed pipeline with {args.workers} workers, epoch of {epoch_images} images")

    tick = time.perf_counter()
    data = load_alzheimer("auto", args.data_dir, image_size=args.image_size, max_train=args.images,
                          max_test=1, seed=args.seed, progress=False)
    print(f"labkit load (decode into cache, or read the cache): {time.perf_counter() - tick:.1f}s "
          f"for {len(data.splits['train'])} images ({'synthetic stand-in' if data.synthetic else 'real data'})")
    tick = time.perf_counter()
    data = load_alzheimer("auto", args.data_dir, image_size=args.image_size, max_train=args.images,
                          max_test=1, seed=args.seed, progress=False)
    print(f"labkit load from the cache: {time.perf_counter() - tick:.2f}s")
    files = data.splits["train"].files
    train_dir = resolve_path(data.root) / os.path.dirname(os.path.dirname(files[0]))
    seed = seed_loader(train_dir, files, data.root, args.image_size, args.batch_size, args.workers, args.seed)
    augment = BatchAugment(True, out_channels=3, seed=args.seed)
    ours = data.loader("train", args.batch_size, seed=args.seed)

    # (a) input pipeline alone
    seed_rate, seed_cpu = images_per_s(lambda: seed_batches(seed, device), device, args.repeats)
    ours_rate, ours_cpu = images_per_s(lambda: labkit_batches(ours, augment, device), device, args.repeats)
    print(f"(a) seed pipeline   (ImageFolder + PIL, {args.workers} workers): {seed_rate:8.0f} images/s, "
          f"{seed_cpu:.2f} CPU ms/image")
    print(f"(a) labkit pipeline (cached uint8 + BatchAugment):     {ours_rate:8.0f} images/s, "
          f"{ours_cpu:.2f} CPU ms/image")
    print(f"(a) CPU time per image, seed / labkit: {seed_cpu / ours_cpu:.1f}x")

    # (b) one training epoch each way, same model and optimiser
    sub = data.splits["train"]
    pick = torch.from_numpy(stratified_subset(sub.labels.numpy(), epoch_images, args.seed))
    few = [files[i] for i in pick]
    seed_small = seed_loader(train_dir, few, data.root, args.image_size, args.batch_size, args.workers, args.seed)
    ours_small = DataLoader(TensorDataset(sub.images[pick], sub.labels[pick]),
                            batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(args.seed))
    seed_s, seed_stats = epoch_seconds(seed_small, None, device, args.image_size, args.seed)
    ours_s, ours_stats = epoch_seconds(ours_small, augment, device, args.image_size, args.seed)
    for label, secs, stats in (("seed", seed_s, seed_stats), ("labkit", ours_s, ours_stats)):
        print(f"(b) {label:<6} epoch: {secs:6.2f}s for {stats['images']} images "
              f"({stats['images'] / secs:6.0f} images/s; waiting for data {stats['data_s']:.2f}s)")

    print(f"input pipeline speedup: {ours_rate / seed_rate:.1f}x")
    print(f"epoch speedup: {seed_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
