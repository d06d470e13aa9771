"""Plumbing around the Ray Train worker function of Lab 02 (the function itself lives in the notebook).

Lab 02 defines ``train_loop_per_worker`` in a notebook cell: Lab 01's loop plus the Ray calls, with labkit's
instrumentation behind one :class:`WorkerHook`. Here: checkpoint save/restore (the files inside a
``ray.train.Checkpoint``), the all-reduce timer (a DDP communication hook), the one-time crash of the
fault-tolerance demo, attempt counting, the node of each rank. Quiet worker logs and the progress relay
(worker writes ``progress.json``, the driver draws ``tqdm`` bars from it) are in ``progress.py``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from labkit.distributed.progress import (  # noqa: F401  (re-exported: Lab 02 calls worker.ProgressBars)
    ProgressBars,
    ProgressFile,
    quiet_prints,
    quiet_ray_worker_logs,
    say,
)
from labkit.errors import ParameterError
from labkit.timing import format_seconds
from labkit.train import unwrap

CHECKPOINT_FILE = "checkpoint.pt"
ATTEMPTS_FILE = "attempts.log"
CRASH_MARKER = "fail_at_epoch.done"


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, history: list[dict], scaler: Any = None) -> Path:
    """Write model + optimizer state, the finished ``epoch``, the per-epoch ``history`` and (fp16) the
    ``GradScaler``'s state to ``folder/checkpoint.pt``: everything a restarted worker needs to continue at
    ``epoch + 1`` (without the scaler's state, a resumed fp16 run would start again from the initial
    loss scale and skip steps finding it)."""
    path = Path(folder) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": int(epoch), "history": list(history)}, path)
    return path


def load_checkpoint(checkpoint: Any) -> dict | None:
    """The state :func:`save_checkpoint` wrote, from a ``ray.train.Checkpoint``, a folder or a file;
    ``None`` for ``None`` (a fresh start)."""
    if checkpoint is None or isinstance(checkpoint, dict):  # nothing, or already loaded
        return checkpoint
    if hasattr(checkpoint, "as_directory"):  # ray.train.Checkpoint
        with checkpoint.as_directory() as folder:
            return load_checkpoint(folder)
    path = Path(checkpoint)
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"restore: no {CHECKPOINT_FILE} at {path}; pass a folder written by save_checkpoint.")
    try:  # weights_only: tensors, numbers, strings, lists and dicts only; nothing in the file can run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — name the file whatever went wrong
        why = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), exc)
        raise ValueError(f"restore: checkpoint {path} was not loaded ({type(exc).__name__}: {why}); it is damaged, "
                         "not written by save_checkpoint, or holds objects that could run code.") from None


def restore(checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
            scaler: Any = None, lr: float | None = None) -> tuple[int, list[dict]]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``, ``scaler``).

    ``checkpoint`` is a ``ray.train.Checkpoint``, a folder path, or ``None`` (fresh start). With ``lr``, every
    parameter group of ``optimizer`` gets that learning rate *after* ``optimizer.load_state_dict`` (which
    would otherwise bring back the checkpoint's: a run resumed with another number of workers must train
    at the rate scaled for the new number). Returns ``(last finished epoch, history so far)``; ``(0, [])``
    for a fresh start.
    """
    state = load_checkpoint(checkpoint)
    if state is None:
        return 0, []
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), list(state["history"])


# --------------------------------------------------------------------------- ranks
def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank (no-op without a process group),
    so all ranks evaluate the same model as the one rank 0 checkpoints."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def average_buffers(model: nn.Module) -> None:
    """Average the BatchNorm running statistics over all ranks (floating buffers; counters come from rank 0;
    no-op without a process group), so every rank evaluates and checkpoints the same model. With DDP's own
    per-step buffer broadcast off, each rank's statistics follow its own batches during the epoch; their
    average weighs every rank's images alike, as one process seeing the whole global batch would."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for buf in unwrap(model).buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf.data, op=dist.ReduceOp.SUM)
                buf.data.div_(world)
            else:
                dist.broadcast(buf.data, src=0)


def worker_nodes() -> list[str]:
    """The Ray node each rank runs on (8-character node ids, indexed by rank): gathered from every rank, so
    rank 0's report says where the whole worker group ran (``recovery.story`` tells restarts from it)."""
    import ray

    # Ray Train's local mode (num_workers=0) runs without a cluster; asking it for the node would start one
    me = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "local"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        return everyone
    return [me]


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


# --------------------------------------------------------------------------- the one hook of Lab 02's worker
def check_global_batch(batch_size: int, workers: int | Sequence[int]) -> None:
    """``batch_size`` is the *global* batch (Lab 01's, by default): each of ``workers`` workers takes
    ``batch_size // workers`` images per step. Raises :class:`ParameterError` naming both when it does not
    split evenly (the global batch would silently differ from the one asked for)."""
    for count in [workers] if isinstance(workers, int) else list(workers):
        if batch_size % count:
            fits = [w for w in range(1, min(batch_size, 64) + 1) if batch_size % w == 0]
            raise ParameterError(f"parameter 'batch_size' = {batch_size} is the global batch of one optimizer step "
                                 f"(as in Lab 01); it must split evenly over workers={count}: use a multiple of {count} "
                                 f"(e.g. -p batch_size {batch_size + count - batch_size % count}), or a worker count "
                                 f"that divides it ({', '.join(map(str, fits))}).")


class WorkerHook:
    """Everything labkit adds to Lab 02's worker function, behind one object, so that the function in the
    notebook reads as its lesson (Lab 01's loop, the Ray calls, fault tolerance). Made once after
    ``get_context()``, it quiets Ray Train's per-report log line, gives a CPU worker the cores Ray reserved,
    counts the group's starts (:func:`record_attempt`), gathers every rank's node (:func:`worker_nodes`);
    :meth:`resume` restores a checkpoint at *this* run's scaled LR and starts the all-reduce timer
    (:class:`AllReduceTimer`) and progress relay (:class:`ProgressFile`); :meth:`epochs`, :meth:`batches`
    (with the ``fail_at_epoch`` crash, :func:`crash_halfway`) and :meth:`row` do the per-epoch bookkeeping."""

    def __init__(self, config: dict, rank: int, world_size: int, device: torch.device) -> None:
        quiet_ray_worker_logs()
        if torch.device(device).type == "cpu" and config.get("threads"):
            torch.set_num_threads(config["threads"])               # the cores Ray reserved for this worker
        self.config, self.rank, self.world_size = config, rank, world_size
        self.run_dir = Path(config["run_dir"])
        self.attempt = record_attempt(self.run_dir) if rank == 0 else 0
        self.nodes = worker_nodes()                                # the node each rank runs on (for restarts)
        self.started = self.tick = time.perf_counter()
        self.timer: AllReduceTimer | None = None
        self.progress: ProgressFile | None = None
        self.first, self.setup_s, self.note, self.last_row = 1, 0.0, "", None

    quiet = staticmethod(quiet_prints)                             # ``with hook.quiet():`` silences print

    def resume(self, checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: Any = None) -> tuple[int, list[dict]]:
        """Restore ``checkpoint`` (``None``: a fresh start) into the model, optimizer and scaler, then put back
        the learning rate ``optimizer`` was built with (scaled for *this* run's workers); start the all-reduce
        timer and the progress relay. Returns ``(last finished epoch, history so far)``."""
        lr = optimizer.param_groups[0]["lr"]
        state = load_checkpoint(checkpoint)
        done, history = restore(state, model, optimizer, scaler=scaler, lr=lr)
        if state is not None:
            old_lr = state["optimizer"]["param_groups"][0]["lr"]
            old_world = history[-1].get("world_size", "?") if history else "?"
            changed = abs(old_lr - lr) > 1e-12 * lr
            self.note = (f"lr {lr:.3g} for {self.world_size} worker(s), " + (
                f"newly scaled (lr_scaling={self.config.get('lr_scaling', 'none')!r}; the checkpoint's optimizer had "
                f"{old_lr:.3g} with {old_world} worker(s))" if changed else "as in the checkpoint"))
            if self.rank == 0:
                say(f"resumed after epoch {done}: {self.note}")
        self.timer = AllReduceTimer.attach(model)
        self.first, self.setup_s = done + 1, time.perf_counter() - self.started
        if self.rank == 0 and self.config.get("progress"):
            self.progress = ProgressFile(self.run_dir, self.config["epochs"], done)
        return done, history

    def epochs(self, done: int) -> Iterator[int]:
        """The epochs left after ``done``; each starts the epoch's clock and timer, and ends with the driver's
        progress line."""
        for epoch in range(done + 1, self.config["epochs"] + 1):
            self.tick = time.perf_counter()
            if self.timer:
                self.timer.reset()
            yield epoch
            if self.progress and self.last_row:
                self.progress.epoch_done(self.last_row, format_seconds)

    def batches(self, loader, epoch: int):
        """The loader's batches, relayed to the driver's progress bar (and cut short by the ``fail_at_epoch``
        crash on the rank :func:`should_crash` picks)."""
        batches = crash_halfway(loader, self.config.get("fail_at_epoch"), epoch, self.rank, self.world_size,
                                self.run_dir)
        return self.progress.batches(batches, epoch, len(loader)) if self.progress else batches

    @property
    def sync_s(self) -> float | None:
        """Seconds the gradient all-reduce was in flight this epoch (``None``: not timed)."""
        return self.timer.seconds if self.timer else None

    def row(self, epoch: int, stats: dict, optimizer: torch.optim.Optimizer) -> dict:
        """The history row of ``epoch``: the all-reduced ``stats`` plus the LR the optimizer used, world size,
        attempt, nodes, the epoch's wall time and (first epoch of an attempt) set-up time and resume note."""
        row = {"epoch": epoch, **stats, "lr": optimizer.param_groups[0]["lr"], "world_size": self.world_size,
               "attempt": self.attempt, "nodes": self.nodes, "epoch_s": time.perf_counter() - self.tick,
               "setup_s": self.setup_s if epoch == self.first else 0.0}
        if epoch == self.first and self.note:
            row["resume"] = self.note
        self.last_row = row
        return row

    def checkpoint_name(self, epoch: int) -> str:
        """The checkpoint folder's name: epoch and attempt (``recovery`` reads them back)."""
        return f"epoch{epoch:03d}_attempt{self.attempt or 1}"
