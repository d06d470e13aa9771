"""What Ray Train workers show: quiet logs and prints, and the progress relay (rank 0 writes
``progress.json``, the driver draws ``tqdm`` bars from it). Re-exported by ``labkit.distributed.worker``."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path


def say(message: str) -> None:
    """Print one line from a worker, once: straight to the process's stdout, which Ray forwards to the
    driver (a plain ``print`` in Train V2 goes through its logging *and* the stream, so it shows twice)."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


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
