"""Lab 06's measuring: the training function's instrumentation and the backpressure run's arithmetic.

- :class:`WorkerMeter` — everything the lab's Ray Train worker measures, behind one name: time spent
  waiting for data, the ids each worker saw (coverage across workers), one report per epoch with the
  last checkpoint, and the trainer-alone timing (``torch.cuda.synchronize`` before each clock read).
- :class:`Stamped`, :func:`in_flight_bytes`, :func:`idle_seconds` — what the backpressure run stamps,
  plots and records.
- :func:`replace_folder`, :func:`folder_bytes` — the inference folders Ray writes, swapped in whole.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


# --------------------------------------------------------------------------- the worker's instrumentation
class WorkerMeter:
    """Everything the lab's training function measures, behind one name, so the function reads as its lesson.

    ``meter.batches(it)`` yields ``it``'s batches, timing the waits for data and keeping the ids;
    ``meter.add(loss, right)`` counts a step; ``meter.report(epoch, model, optimizer)`` gathers every
    worker's ids (coverage: rows missed or repeated across the whole epoch against ``n_train``), reports
    the epoch to Ray Train (with a checkpoint after the last) and prints one line on rank 0;
    ``meter.time_compute(step, model, optimizer)`` times training steps on a synthetic batch already on
    the device — the trainer alone — with ``torch.cuda.synchronize`` before every clock read (a GPU runs
    asynchronously) — and returns the history. Run inside a Ray Train worker.
    """

    def __init__(self, config: dict, device: torch.device) -> None:
        import ray.train

        from labkit.distributed import worker

        worker.quiet_ray_worker_logs()
        context = ray.train.get_context()
        self.rank, self.world, self.device, self.config = context.get_world_rank(), context.get_world_size(), device, config
        if device.type == "cpu":
            torch.set_num_threads(config["threads"])
        self.history: list[dict] = []

    def batches(self, iterator):
        """Yield ``iterator``'s batches; the time between a step's end and the next batch is waiting for data."""
        from labkit.timing import sync

        self.loss_sum, self.correct, self.images, self.wait_s, self.ids = 0.0, 0, 0, 0.0, []
        self.start = tick = time.perf_counter()
        for batch in iterator:
            self.wait_s += time.perf_counter() - tick
            self.ids.append(batch["id"].cpu())
            self.last = len(batch["label"])
            yield batch
            sync(self.device)
            tick = time.perf_counter()
        self.seconds = time.perf_counter() - self.start

    def add(self, loss: torch.Tensor, right: torch.Tensor) -> None:
        """Count one step: its mean loss and number of right answers."""
        self.loss_sum += float(loss) * self.last
        self.correct += int(right)
        self.images += self.last

    def _gather(self, value):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def report(self, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """One epoch's row (this worker's loss/accuracy, all workers' throughput and coverage), reported."""
        import ray.train

        from labkit.distributed import worker

        ids = torch.cat(self.ids) if self.ids else torch.empty(0, dtype=torch.long)
        parts = self._gather((ids.tolist(), self.seconds))
        all_ids = [i for part, _ in parts for i in part]
        unique, n_train = len(set(all_ids)), self.config["n_train"]
        row = {"epoch": epoch, "loss": self.loss_sum / max(self.images, 1), "acc": self.correct / max(self.images, 1),
               "images": len(all_ids), "seconds": self.seconds, "wait_s": self.wait_s,
               # all workers together: images of the epoch over the slowest worker's time
               "images_per_s": len(all_ids) / max(s for _, s in parts),
               "worker_images_per_s": self.images / self.seconds, "rows_seen": len(all_ids), "unique_ids": unique,
               "missed_rows": n_train - unique, "repeated_rows": len(all_ids) - unique,
               "shard_rows": len(ids), "shard_unique": int(ids.unique().numel()), "world_size": self.world}
        self.history.append(row)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0 and epoch == self.config["epochs"]:
                worker.save_checkpoint(folder, model, optimizer, epoch, self.history)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(row, checkpoint=checkpoint)
        if self.rank == 0:
            worker.say(f"epoch {epoch}/{self.config['epochs']}: loss {row['loss']:.3f}  acc {row['acc']:.3f}  "
                       f"{row['images_per_s']:.0f} img/s, waiting for data {self.wait_s:.1f} of {self.seconds:.1f} s")
        return row

    def time_compute(self, step, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Images/s of ``step(model, optimizer, x, y)`` alone, on a copy of the model (the trained weights
        stay as reported) and one synthetic uint8 batch on the device; returns the history with it."""
        from labkit.timing import sync

        c = self.config
        probe = copy.deepcopy(getattr(model, "module", model))
        probe_opt = type(optimizer)(probe.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                           if k in ("lr", "betas", "eps", "weight_decay")})
        channels = 1 if c["mode"] == "L" else 3
        x = torch.randint(0, 256, (c["batch_size"], channels, c["image_size"], c["image_size"]),
                          dtype=torch.uint8, device=self.device)
        y = torch.randint(0, c["num_classes"], (c["batch_size"],), device=self.device)
        for _ in range(2):
            step(probe, probe_opt, x, y)                                  # warm-up
        sync(self.device)                                                 # the GPU has finished the warm-up
        tick = time.perf_counter()
        for _ in range(c["n_batches"]):
            step(probe, probe_opt, x, y)
        sync(self.device)                                                 # ... and every timed step
        rate = c["n_batches"] * c["batch_size"] / (time.perf_counter() - tick)
        rates = self._gather(rate)
        for row in self.history:
            row["compute_images_per_s"] = float(np.mean(rates))          # one worker's compute
            row["compute_images_per_s_total"] = float(np.sum(rates))     # what all workers could consume
        return self.history


# --------------------------------------------------------------------------- backpressure
def in_flight_bytes(made_at: np.ndarray, made_bytes: np.ndarray, consumed_at: np.ndarray,
                    consumed_bytes: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Bytes made by the pipeline but not yet consumed, at each of ``times`` (all in one clock)."""
    made = np.array([made_bytes[made_at <= t].sum() for t in times], dtype=np.float64)
    used = np.array([consumed_bytes[consumed_at <= t].sum() for t in times], dtype=np.float64)
    return np.maximum(made - used, 0.0)


class Stamped:
    """Wrap a batch function: its output gains ``started_at`` and ``made_at`` (``time.time()`` when the
    call began and ended), so a plot can follow each block from its task to its consumer."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        out = self.fn(batch)
        n = len(next(iter(out.values()))) if out else 0
        return {**out, "started_at": np.full(n, start), "made_at": np.full(n, time.time())}


def idle_seconds(starts: np.ndarray, ends: np.ndarray) -> float:
    """Time between the first start and the last end during which no task ran (the gaps in the union
    of the ``[start, end]`` intervals): how long the operator stood paused."""
    if len(starts) == 0:
        return 0.0
    order = np.argsort(starts)
    idle, reach = 0.0, float(ends[order[0]])
    for i in order[1:]:
        if starts[i] > reach:
            idle += float(starts[i]) - reach
        reach = max(reach, float(ends[i]))
    return idle


def replace_folder(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the folder ``new`` (written in full) where ``final`` was, so a re-run never mixes old files in."""
    new, final = Path(new), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)
    return final


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the Parquet files in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.parquet"))


__all__ = ["Stamped", "WorkerMeter", "folder_bytes", "idle_seconds", "in_flight_bytes", "replace_folder"]
