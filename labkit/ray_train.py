"""What every Ray Train worker runs in Lab 02: Lab 01's loop plus a handful of Ray calls.

:func:`train_loop_per_worker` is the function ``TorchTrainer`` starts once per worker (see
:mod:`labkit.distributed` for the driver side). It uses the same data, model and
``labkit.train.train_one_epoch`` / ``evaluate`` as Lab 01; the Ray calls are marked ``# Ray:``.
The small helpers around it (checkpoint save/restore, metric averaging across ranks, the
all-reduce timer, the one-time crash for the fault-tolerance demo) are plain functions that the
tests call directly.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from labkit.train import shard_indices, unwrap

CHECKPOINT_FILE = "checkpoint.pt"
ATTEMPTS_FILE = "attempts.log"
CRASH_MARKER = "fail_at_epoch.done"


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, history: list[dict]) -> Path:
    """Write model + optimizer state, the finished ``epoch`` and the per-epoch ``history`` to
    ``folder/checkpoint.pt``: everything a restarted worker needs to continue at ``epoch + 1``."""
    path = Path(folder) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": int(epoch), "history": list(history)}, path)
    return path


def restore(checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, list[dict]]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    ``checkpoint`` is a ``ray.train.Checkpoint``, a folder path, or ``None`` (fresh start).
    Returns ``(last finished epoch, history so far)``; ``(0, [])`` for a fresh start.
    """
    if checkpoint is None:
        return 0, []
    if hasattr(checkpoint, "as_directory"):  # ray.train.Checkpoint
        with checkpoint.as_directory() as folder:
            return restore(folder, model, optimizer)
    path = Path(checkpoint)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"restore: no {CHECKPOINT_FILE} at {path}; pass a folder written by save_checkpoint.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])


# --------------------------------------------------------------------------- ranks
def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank (no-op without a process group),
    so all ranks evaluate the same model as the one rank 0 checkpoints."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def reduce_epoch(train: dict, val: dict, sync_s: float | None, device: torch.device) -> dict:
    """Combine one epoch's per-rank statistics into the numbers of the whole run.

    Loss and accuracy are image-weighted means over all ranks (= over the whole split), images are
    summed, the epoch time is that of the slowest rank (everyone waits for it at each all-reduce),
    and the time split (data / compute / all-reduce) is the mean over ranks.
    """
    keys = ("loss", "acc", "val_loss", "val_acc")
    weights = (train["images"], train["images"], val["images"], val["images"])
    sums = [train["loss"] * weights[0], train["acc"] * weights[1], val["loss"] * weights[2], val["acc"] * weights[3],
            train["images"], val["images"], train["data_s"], train["compute_s"], sync_s or 0.0, val["seconds"]]
    times = [train["seconds"]]
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        where = device if dist.get_backend() == "nccl" else torch.device("cpu")
        s = torch.tensor(sums, dtype=torch.float64, device=where)
        t = torch.tensor(times, dtype=torch.float64, device=where)
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sums, times = s.tolist(), t.tolist()
    images, val_images = sums[4], sums[5]
    out = {k: sums[i] / (images if i < 2 else val_images) for i, k in enumerate(keys)}
    seconds = times[0]
    out.update(images=int(images), val_images=int(val_images), seconds=seconds,
               images_per_s=images / seconds if seconds > 0 else 0.0,
               data_s=sums[6] / world, compute_s=sums[7] / world,
               sync_s=None if sync_s is None else sums[8] / world, val_seconds=sums[9] / world)
    return out


class AllReduceTimer:
    """Time DDP's gradient all-reduce with a communication hook (``register_comm_hook``).

    DDP calls the hook once per gradient *bucket* as soon as that bucket's gradients are ready, and
    backward only returns after every bucket has been averaged. The hook starts the same all-reduce
    as DDP's default hook and adds up the time from launch until the result is there. Buckets are
    reduced while backward still computes earlier layers, so ``seconds`` is the time gradients were
    *in flight*: an upper bound on the time spent waiting for them. Measured on CPU (gloo); with
    NCCL the future completes at launch, so :meth:`attach` leaves GPU runs untimed (``None``).
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def reset(self) -> None:
        """Start a new epoch."""
        self.seconds = 0.0

    @classmethod
    def attach(cls, model: nn.Module) -> "AllReduceTimer | None":
        """Register the timing hook on a DDP model on gloo; ``None`` when there is nothing to time."""
        if not isinstance(model, nn.parallel.DistributedDataParallel) or dist.get_backend() != "gloo":
            return None
        timer = cls()
        model.register_comm_hook(timer, _timed_allreduce_hook)
        return timer


def _timed_allreduce_hook(timer, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP's default all-reduce of one gradient bucket, timed until its result is there."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    start = time.perf_counter()

    def done(fut: torch.futures.Future) -> torch.Tensor:
        timer.seconds += time.perf_counter() - start
        return fut.value()

    return allreduce_hook(None, bucket).then(done)


def say(message: str) -> None:
    """Print one line from a worker, once: straight to the process's stdout, which Ray forwards to the
    driver (a plain ``print`` in Train V2 goes through its logging *and* the stream, so it shows twice)."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


# --------------------------------------------------------------------------- fault-tolerance demo
def record_attempt(run_dir: str | os.PathLike) -> int:
    """Append a line to ``run_dir/attempts.log`` and return this attempt's number (1 = first start).

    Rank 0 calls it each time the worker group (re)starts, so the number of lines minus one is the
    number of restarts, also when a crash happened before the first checkpoint.
    """
    path = Path(run_dir) / ATTEMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{time.time():.3f}\n")
    return len(path.read_text().splitlines())


def count_attempts(run_dir: str | os.PathLike) -> int:
    """How many times the worker group started in ``run_dir`` (0 when it never started)."""
    path = Path(run_dir) / ATTEMPTS_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def should_crash(fail_at_epoch: int | None, epoch: int, rank: int, world_size: int,
                 run_dir: str | os.PathLike) -> bool:
    """True on the last rank at ``fail_at_epoch``, the first time only: a marker file in ``run_dir``
    (shared by all attempts of the run) remembers that the crash already happened."""
    return (fail_at_epoch is not None and epoch == fail_at_epoch and rank == world_size - 1
            and not (Path(run_dir) / CRASH_MARKER).exists())


def crash(epoch: int, rank: int, run_dir: str | os.PathLike) -> None:
    """Kill this worker process on purpose (no exception, no clean-up: like a killed process or a
    lost node), after writing the marker and after Ray committed the last reported checkpoint."""
    marker = Path(run_dir) / CRASH_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} crashed on purpose during epoch {epoch}\n")
    try:  # a crash within a second of a report could otherwise beat the checkpoint's registration
        import ray.train

        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    except Exception:  # noqa: BLE001 - outside a Ray Train run (tests) there is nothing to wait for
        pass
    say(f"fail_at_epoch={epoch}: worker rank {rank} crashes now, halfway through the epoch, on purpose; "
        "Ray Train restarts the workers from the last checkpoint.")
    os._exit(1)


def crash_halfway(loader, fail_at_epoch: int | None, epoch: int, rank: int, world_size: int,
                  run_dir: str | os.PathLike):
    """The loader's batches; on the rank chosen by :func:`should_crash` the process dies halfway."""
    if not should_crash(fail_at_epoch, epoch, rank, world_size, run_dir):
        yield from loader
        return
    half = len(loader) // 2
    for i, batch in enumerate(loader):
        if i == half:
            crash(epoch, rank, run_dir)
        yield batch


# --------------------------------------------------------------------------- the training function
def quiet_ray_worker_logs() -> None:
    """Hide Ray Train's per-report INFO line ("Reporting training result …"): its logger is named after
    its file, so ``LoggingConfig(log_level=…)`` does not reach it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@contextmanager
def quiet_prints():
    """Silence ``sys.stdout`` for a block: every worker would otherwise repeat the data notice that
    the driver already showed once (:func:`say` writes to the real stdout and still gets through)."""
    with open(os.devnull, "w") as sink, redirect_stdout(sink):
        yield


def worker_lr(config: dict, world_size: int) -> float:
    """The learning rate every worker uses: ``config["lr"]`` scaled for ``world_size`` workers by
    ``config["lr_scaling"]`` (``labkit.train.scale_lr``: none / linear / sqrt)."""
    from labkit.train import scale_lr

    return scale_lr(config["lr"], world_size, config.get("lr_scaling", "none"))


def train_loop_per_worker(config: dict) -> list[dict]:
    """Train the Lab 01 model on this worker's share of the data; returns the per-epoch history.

    Every worker runs this same function; Ray tells it its rank, builds the process group (gloo or
    NCCL), wraps the model in DistributedDataParallel and gives each worker a different slice of the
    training set. After each epoch the metrics (averaged over all workers) are reported to Ray, with
    a checkpoint from rank 0, so a restarted run continues after the last finished epoch.
    """
    import ray.train
    import ray.train.torch

    from labkit.data.alzheimer import load_alzheimer
    from labkit.data.augment import batch_transform
    from labkit.env import amp_dtype, seed_everything
    from labkit.models.cnn import AlzheimerCNN
    from labkit.timing import format_seconds
    from labkit.train import evaluate, train_one_epoch

    quiet_ray_worker_logs()
    ctx = ray.train.get_context()                                # Ray: who am I, how many are we?
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()                        # Ray: this worker's GPU, or the CPU
    if device.type == "cpu" and config.get("threads"):
        torch.set_num_threads(config["threads"])                 # the CPU cores Ray reserved for this worker
    run_dir = Path(config["run_dir"])
    attempt = record_attempt(run_dir) if rank == 0 else 0
    started = time.perf_counter()

    # Same data and model as Lab 01: every worker reads the cache the driver prepared.
    seed_everything(config["seed"])                              # identical initial weights on every rank
    with quiet_prints():
        ds = load_alzheimer(data=config["data"], data_dir=config["data_dir"], image_size=config["image_size"],
                            max_train=config["max_train"], max_test=config["max_test"], seed=config["seed"],
                            progress=False)
    model = AlzheimerCNN(num_classes=len(ds.classes), image_size=config["image_size"])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)                 # Ray: move to the device, wrap in DDP
    sync_timer = AllReduceTimer.attach(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=worker_lr(config, world_size))
    loss_fn = nn.CrossEntropyLoss()
    dtype = amp_dtype("auto", device)
    augment, normalise = batch_transform(train=True), batch_transform(train=False)  # Lab 01's, on the device
    seed_everything(config["seed"] + rank)                       # different augmentation on each rank

    # Ray: add a DistributedSampler, so each worker trains on its own 1/world_size of the images.
    train_loader = ray.train.torch.prepare_data_loader(
        ds.loader("train", batch_size=config["batch_size"], seed=config["seed"]), move_to_device=False)
    test_set = ds.splits["test"]
    test_loader = ds.loader("test", batch_size=config["batch_size"],
                            sampler=shard_indices(len(test_set.labels), rank, world_size))

    # Ray: after a crash, continue from the last checkpoint (or from a checkpoint of an earlier run).
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    done, history = restore(checkpoint, model, optimizer)
    setup_s = time.perf_counter() - started  # loading data, building the model: once per attempt
    progress = ProgressFile(run_dir, config["epochs"], done) if rank == 0 and config.get("progress") else None

    for epoch in range(done + 1, config["epochs"] + 1):
        tick = time.perf_counter()
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)                # a new shuffle every epoch
        if sync_timer:
            sync_timer.reset()
        loader = crash_halfway(train_loader, config.get("fail_at_epoch"), epoch, rank, world_size, run_dir)
        loader = progress.batches(loader, epoch, len(train_loader)) if progress else loader
        stats = train_one_epoch(model, loader, optimizer, loss_fn, device=device,
                                transform=augment, amp_dtype=dtype, progress=False)
        broadcast_buffers(model)
        val = evaluate(unwrap(model), test_loader, loss_fn, device=device,
                       transform=normalise, amp_dtype=dtype)
        row = {"epoch": epoch, **reduce_epoch(stats, val, sync_timer.seconds if sync_timer else None, device),
               "lr": optimizer.param_groups[0]["lr"], "world_size": world_size, "attempt": attempt,
               "epoch_s": time.perf_counter() - tick, "setup_s": setup_s if epoch == done + 1 else 0.0}
        history.append(row)
        with tempfile.TemporaryDirectory() as folder:            # Ray: report metrics + checkpoint
            ckpt = None
            if rank == 0:
                save_checkpoint(folder, model, optimizer, epoch, history)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=f"epoch{epoch:03d}_attempt{attempt or 1}")
        if progress:
            progress.epoch_done(row, format_seconds)
    return history


class ProgressFile:
    """Where rank 0 is, in ``run_dir/progress.json`` (epoch, batch, finished epochs), rewritten at most
    every ``every_s`` seconds; the driver draws progress bars from it (see ``labkit.distributed``).
    Rank 0 also prints one line per epoch with the estimated time left."""

    NAME = "progress.json"

    def __init__(self, run_dir: str | os.PathLike, epochs: int, done: int, every_s: float = 0.5) -> None:
        self.path, self.epochs, self.done, self.every_s = Path(run_dir) / self.NAME, epochs, done, every_s
        self.times: list[float] = []
        self.last = 0.0
        self.write(epoch=done, batch=0, batches=0, force=True)

    def write(self, *, epoch: int, batch: int, batches: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epochs": self.epochs, "done": self.done, "epoch": epoch, "batch": batch,
                                   "batches": batches}))
        os.replace(tmp, self.path)  # readers never see a half-written file

    def batches(self, loader, epoch: int, total: int):
        """Yield the loader's batches, recording the position."""
        for i, batch in enumerate(loader, 1):
            yield batch
            self.write(epoch=epoch, batch=i, batches=total, force=i == total)

    def epoch_done(self, row: dict, fmt) -> None:
        self.done = row["epoch"]
        self.write(epoch=row["epoch"], batch=0, batches=0, force=True)
        self.times.append(row["epoch_s"])
        left = (self.epochs - row["epoch"]) * sum(self.times) / len(self.times)
        say(f"epoch {row['epoch']}/{self.epochs}: loss {row['loss']:.3f}  acc {row['acc']:.3f}  "
            f"test_acc {row['val_acc']:.3f}  {fmt(row['epoch_s'])}/epoch  time left ≈ {fmt(left)}")


class ProgressBars:
    """Driver side of :class:`ProgressFile`: a background thread that redraws two ``tqdm.auto`` bars
    (epochs, with the time left; batches of the current epoch) from ``run_dir/progress.json``.
    Use as a context manager around ``trainer.fit()``."""

    def __init__(self, run_dir: str | os.PathLike, epochs: int, every_s: float = 0.5) -> None:
        import threading

        from tqdm.auto import tqdm

        self.path, self.every_s = Path(run_dir) / ProgressFile.NAME, every_s
        self.epoch_bar = tqdm(total=epochs, desc="epochs", unit="epoch", dynamic_ncols=True)
        self.batch_bar = tqdm(total=0, desc="waiting for the workers", unit="batch", dynamic_ncols=True, leave=False)
        self.epoch = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ProgressBars":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.refresh()
        self.batch_bar.close()
        self.epoch_bar.close()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self.refresh()

    def refresh(self) -> None:
        """Move the bars to what the file says (a missing or unreadable file changes nothing)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if state["done"] != self.epoch_bar.n:
            self.epoch_bar.update(state["done"] - self.epoch_bar.n)
        if state["batches"]:
            if state["epoch"] != self.epoch or state["batch"] < self.batch_bar.n:  # a new epoch or a restart
                self.epoch = state["epoch"]
                self.batch_bar.reset(total=state["batches"])
                self.batch_bar.set_description(f"epoch {state['epoch']}/{state['epochs']}")
            self.batch_bar.update(state["batch"] - self.batch_bar.n)
