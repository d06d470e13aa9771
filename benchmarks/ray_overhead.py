"""Ray Train overhead: 1 Ray worker vs the plain Lab 01 loop, same data, same cores, in one run.

    .venv/bin/python benchmarks/ray_overhead.py            # ~3 min on 2 CPU cores

Both sides train Lab 01's model with ``labkit.train.train_one_epoch`` and evaluate it after every epoch.
The Ray side is a minimal worker function (below) with what Lab 02's notebook adds per epoch: a
``ray.train.report`` with a checkpoint. The Ray worker reserves every core of the machine
(``plan_scaling(1, ...)``), as the plain loop uses them.
Order: plain loop, Ray, plain loop again (the plain time is the mean of both, which cancels a slow drift
of a shared machine). Per-epoch time is the wall time of an epoch (train + evaluate, and for Ray also the
metric report with a checkpoint), averaged over the epochs after the first (warm-up). Ends with::

    ray per-epoch overhead: N%      # (Ray epoch - plain epoch) / plain epoch; target <= 15 %
    ray fit start-up: N s           # trainer.fit() time not spent in epochs: workers, setup, shut-down
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from labkit import distributed, ray_train
from labkit.data.augment import batch_transform
from labkit.env import seed_everything
from labkit.models.cnn import AlzheimerCNN
from labkit.params import check
from labkit.train import evaluate, train_one_epoch


def plain_epochs(cfg, ds, epochs: int) -> list[float]:
    """Wall seconds of each epoch of the plain Lab 01 loop (train + evaluate) in this process."""
    seed_everything(cfg.seed)
    model = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = ds.loader("train", batch_size=cfg.batch_size, seed=cfg.seed)
    test_loader = ds.loader("test", batch_size=cfg.batch_size)
    times = []
    for _ in range(epochs):
        tick = time.perf_counter()
        train_one_epoch(model, train_loader, optimizer, loss_fn, device="cpu",
                        transform=batch_transform(train=True), progress=False)
        evaluate(model, test_loader, loss_fn, device="cpu", transform=batch_transform(train=False))
        times.append(time.perf_counter() - tick)
    return times


def ray_worker(config: dict) -> list[dict]:
    """The plain loop inside one Ray Train worker, reporting a checkpoint every epoch like Lab 02."""
    import ray.train
    import ray.train.torch

    ray_train.quiet_ray_worker_logs()
    torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])
    with ray_train.quiet_prints():
        ds = distributed.prepare_data(config)
    model = ray.train.torch.prepare_model(AlzheimerCNN(num_classes=len(ds.classes), image_size=config["image_size"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loss_fn = nn.CrossEntropyLoss()
    train_loader = ds.loader("train", batch_size=config["batch_size"], seed=config["seed"])
    test_loader = ds.loader("test", batch_size=config["batch_size"])
    history = []
    for epoch in range(1, config["epochs"] + 1):
        tick = time.perf_counter()
        stats = train_one_epoch(model, train_loader, optimizer, loss_fn, device="cpu",
                                transform=batch_transform(train=True), progress=False)
        evaluate(model, test_loader, loss_fn, device="cpu", transform=batch_transform(train=False))
        row = {"epoch": epoch, "seconds": stats["seconds"]}
        with tempfile.TemporaryDirectory() as folder:
            ray_train.save_checkpoint(folder, model, optimizer, epoch, history)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))
        history.append({**row, "epoch_s": time.perf_counter() - tick})
    return history


def after_warmup(times: list[float]) -> float:
    return statistics.mean(times[1:] if len(times) > 1 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=1200)
    parser.add_argument("--max-test", type=int, default=400)
    parser.add_argument("--data-dir", default="data/alzheimer")
    args = parser.parse_args()

    cfg = check("02_ray", workers=1, epochs=args.epochs, batch_size=32, lr=1e-3, lr_scaling="none",
                image_size=args.image_size, device="cpu", data="auto", data_dir=args.data_dir, quick=False,
                seed=0, address=None, fail_at_epoch=None, show=False)
    cfg.update(max_train=args.max_train, max_test=args.max_test)
    ds = distributed.prepare_data(cfg)
    print(f"data: {len(ds.splits['train'].labels)} train / {len(ds.splits['test'].labels)} test images at "
          f"{cfg.image_size} px (synthetic stand-in: {ds.synthetic}); {args.epochs} epochs; "
          f"torch threads {torch.get_num_threads()}")

    plain_a = plain_epochs(cfg, ds, cfg.epochs)
    print("plain loop  epoch s:", " ".join(f"{t:.2f}" for t in plain_a))
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = distributed.plan_scaling(1, "cpu", **distributed.machine_resources())
    with tempfile.TemporaryDirectory() as storage, distributed.ray_cluster(None) as cluster:
        run_dir = distributed.new_run_dir(storage)
        trainer = TorchTrainer(ray_worker, train_loop_config=distributed.worker_config(cfg, plan, run_dir, progress=False),
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker=plan.resources()),
                               run_config=RunConfig(name=run_dir.name, storage_path=str(Path(storage))))
        tick = time.perf_counter()
        result = trainer.fit()
        run = distributed.RayRun.from_result(result, plan, run_dir, time.perf_counter() - tick, cluster)
    ray_times = [row["epoch_s"] for row in run.history]
    print(f"ray 1 worker epoch s: {' '.join(f'{t:.2f}' for t in ray_times)}   ({run.plan.describe()})")
    plain_b = plain_epochs(cfg, ds, cfg.epochs)
    print("plain loop  epoch s:", " ".join(f"{t:.2f}" for t in plain_b))

    plain = (after_warmup(plain_a) + after_warmup(plain_b)) / 2
    ray_epoch = after_warmup(ray_times)
    ray_train_only = after_warmup([row["seconds"] for row in run.history])
    summary = run.summary()
    print(f"per epoch after warm-up: plain {plain:.2f} s, ray {ray_epoch:.2f} s "
          f"(of which training {ray_train_only:.2f} s; evaluation, report and checkpoint the rest)")
    print(f"ray.init: {summary['init_seconds']:.1f} s, trainer.fit: {summary['fit_seconds']:.1f} s")
    print(f"ray per-epoch overhead: {100 * (ray_epoch - plain) / plain:.0f}%")
    print(f"ray fit start-up: {summary['startup_seconds']:.0f} s")


if __name__ == "__main__":
    main()
