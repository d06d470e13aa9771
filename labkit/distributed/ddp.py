"""Plain PyTorch DDP: launch ranks, reduce metrics, checkpoint and resume — all in view.

:func:`launch` starts ``world_size`` processes with ``torch.multiprocessing`` (start method
``spawn``) and calls ``fn(rank, world_size, device, *args)`` in each, after joining the process
group (gloo on CPU, nccl with one GPU per rank). ``fn`` must live in an importable module (spawn
pickles it by name; a function defined in a notebook cannot be found by the children).

What the seed's hand-written launcher got wrong and this one does instead:

- the rendezvous port is a **free** port found by binding port 0 (a fixed MASTER_PORT hangs when
  an earlier run still holds it), and ``init_process_group`` has a timeout, so a missing peer
  fails with an error instead of waiting forever;
- a rank that raises stops every rank, and its traceback reaches the caller in a
  :class:`DDPError` that names the rank;
- an error or a KeyboardInterrupt in the caller terminates the ranks: no process is left behind.

Rank 0 talks to the caller through :func:`report` (per-epoch events) and by returning a value.
"""
from __future__ import annotations

import multiprocessing.util
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labkit.distributed.local_ray import free_port
from labkit.env import pick_device
from labkit.files import atomic_path

_EVENTS = None  # the queue to the caller, set inside each rank by _rank_main
#: PIDs of the ranks of the latest launch (the tests check that none survives).
last_pids: list[int] = []
#: The rendezvous port of the last :func:`launch` (tests check it is free again afterwards).
last_port: list[int] = [0]


class DDPError(RuntimeError):
    """A rank failed; ``rank`` is its index and ``remote_traceback`` its traceback."""

    def __init__(self, rank: int, remote_traceback: str, world_size: int) -> None:
        last = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else "unknown error"
        super().__init__(f"DDP rank {rank} of {world_size} failed: {last}\n\n"
                         f"--- traceback of rank {rank} ---\n{remote_traceback}")
        self.rank, self.world_size, self.remote_traceback = rank, world_size, remote_traceback


def choose_backend(device: str | torch.device, world_size: int, backend: str = "auto") -> tuple[str, str]:
    """``(backend, device_type)`` for a run: nccl with one GPU per rank, else gloo.

    With more ranks than GPUs, nccl cannot run (it needs a GPU per rank): the ranks then share the
    GPUs over gloo, with a warning. ``backend="nccl"`` on a CPU run is an error.
    """
    dev = pick_device(device)
    if dev.type == "mps":
        warnings.warn("DDP does not run on Apple MPS; the ranks use the CPU (gloo).", stacklevel=2)
        dev = torch.device("cpu")
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend={backend!r} is unknown; use 'auto', 'gloo' or 'nccl'.")
    if dev.type != "cuda":
        if backend == "nccl":
            raise ValueError("backend='nccl' needs CUDA GPUs; this run is on the CPU: use backend='gloo' or 'auto'.")
        return "gloo", "cpu"
    gpus = torch.cuda.device_count()
    if world_size > gpus:
        if backend == "nccl":
            raise ValueError(f"world_size={world_size} > {gpus} GPU(s): nccl needs one GPU per rank; "
                             f"use world_size <= {gpus} or backend='gloo'.")
        warnings.warn(f"world_size={world_size} > {gpus} GPU(s): the ranks share the GPUs and talk over gloo "
                      "(slower than nccl); use world_size <= the GPU count for real speed-ups.", stacklevel=2)
        return "gloo", "cuda"
    return ("nccl" if backend == "auto" else backend), "cuda"


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, backend: str, device_type: str,
               timeout_s: float, events, threads: int | None, args: tuple) -> None:
    """Body of each spawned process: join the group, run ``fn``, send the result or the error."""
    global _EVENTS
    _EVENTS = events
    try:
        if device_type == "cuda":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, device, *args)
        if rank == 0:
            events.put(("result", 0, time.time(), result))
    except BaseException:
        events.put(("error", rank, time.time(), traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 — shutting down after an error of another rank
                pass
    # Success: flush the queue and leave at once. The interpreter's teardown of torch takes seconds
    # per process, and nothing is left to clean up (the process group is gone, files are closed).
    events.close()
    events.join_thread()
    multiprocessing.util._run_finalizers()  # e.g. unlink tqdm's semaphore, as a normal exit would
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def report(event: Any) -> None:
    """Send ``event`` (picklable: dicts of numbers/strings) from a rank to the caller's ``on_event``."""
    if _EVENTS is not None:
        _EVENTS.put(("event", dist.get_rank() if dist.is_initialized() else 0, time.time(), event))


def _stop(processes) -> None:
    """Terminate what is still running, then kill what ignores SIGTERM; reap everything."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 10
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _cause(exc: Exception, processes, errors: list) -> tuple[int, str]:
    """``(rank, text)`` of the rank that failed first.

    A rank killed by a signal from outside (SIGKILL from the out-of-memory killer) reports nothing;
    otherwise the earliest error report wins — later ones are peers losing their connection.
    """
    reported = {r for _, r, _ in errors}
    for i, p in enumerate(processes):
        if (p.exitcode or 0) < 0 and p.exitcode != -signal.SIGTERM and i not in reported:
            return i, (f"process {i} was killed by signal {signal.Signals(-p.exitcode).name} "
                       "(from outside, e.g. the out-of-memory killer); it left no Python traceback")
    if errors:
        _, rank, text = min(errors)
        return rank, text
    return exc.error_index, f"{exc} (it exited before reporting an error; see its output above)"


def launch(fn: Callable, world_size: int, args: tuple = (), *, backend: str = "auto", device: str = "auto",
           timeout_s: float = 600, on_event: Callable[[Any], None] | None = None,
           threads: int | None = None) -> Any:
    """Run ``fn(rank, world_size, device, *args)`` on ``world_size`` spawned ranks; return rank 0's result.

    ``on_event`` receives what ranks send with :func:`report` while they run. ``timeout_s`` bounds
    the rendezvous and every collective (a missing or dead peer fails instead of hanging).
    ``threads``: intra-op threads per CPU rank (default: the CPU count shared out over the ranks).
    Raises :class:`DDPError` naming the first rank that failed; the other ranks are stopped.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1 (the number of DDP processes).")
    backend, device_type = choose_backend(device, world_size, backend)
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    port = free_port()
    last_port[0] = port
    pctx = mp.start_processes(_rank_main, nprocs=world_size, join=False, daemon=True, start_method="spawn",
                              args=(fn, world_size, port, backend, device_type, timeout_s, events, threads, args))
    last_pids[:] = pctx.pids()
    result, errors = None, []

    def drain() -> None:
        nonlocal result
        while True:
            try:
                kind, rank, stamp, payload = events.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "result":
                result = payload
            elif kind == "error":
                errors.append((stamp, rank, payload))
            elif on_event is not None:
                on_event(payload)

    try:
        while True:
            done = pctx.join(timeout=0.2, grace_period=2)
            drain()
            if done:
                return result
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        _stop(pctx.processes)
        time.sleep(0.1)
        drain()
        raise DDPError(*_cause(exc, pctx.processes, errors), world_size=world_size) from None
    finally:  # KeyboardInterrupt, an error in on_event, …: leave nothing running
        _stop(pctx.processes)
        events.close()
        events.join_thread()


def torchrun(script: str | os.PathLike, args: list[str], world_size: int, *, device: str = "auto",
             on_line: Callable[[str], None] | None = print, env: dict | None = None,
             tail: int = 60) -> list[str]:
    """Run ``torchrun --standalone --nproc-per-node=world_size script *args`` with this Python and stream its
    output (stdout and stderr, every rank) to ``on_line`` line by line **as it comes**; returns the last
    ``tail`` lines. On a CPU run every rank gets an equal share of the cores (``OMP_NUM_THREADS``).

    Raises :class:`RuntimeError` with the last lines when torchrun fails; an interrupt (or any error while
    streaming) terminates torchrun, which stops its ranks: no process is left behind.
    """
    import collections
    import subprocess

    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1 (the number of DDP processes).")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               str(script), *map(str, args)]
    extra = {"PYTHONUNBUFFERED": "1"}
    if pick_device(device).type != "cuda":
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
    last: collections.deque = collections.deque(maxlen=tail)
    proc = subprocess.Popen(command, env={**os.environ, **extra, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:          # interrupted: torchrun forwards SIGTERM to its ranks
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    if code != 0:
        shown = "\n".join(last)
        raise RuntimeError(f"torchrun {Path(script).name} on {world_size} rank(s) failed with exit code {code}; "
                           f"its last lines:\n{shown}")
    return list(last)


def running(pids: list[int] | None = None) -> list[int]:
    """Which of ``pids`` (default: the ranks of the latest :func:`launch`) are still running."""
    alive = []
    for pid in last_pids if pids is None else pids:
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(pid)
    return alive


# --------------------------------------------------------------------------- inside a rank
def is_main() -> bool:
    """True on rank 0 (or when no process group is running)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def reduce_sums(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum each value over the ranks (one ``all_reduce``); identity without a process group."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def reduce_max(value: float, device: torch.device | str = "cpu") -> float:
    """The largest ``value`` over the ranks (e.g. the slowest rank's seconds)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def reduce_metrics(stats: dict, keys: tuple[str, ...], device: torch.device | str = "cpu") -> dict:
    """Image-weighted means of ``keys`` over the ranks; ``images`` summed; ``seconds`` the maximum."""
    n = stats["images"]
    sums = reduce_sums({"images": n, **{k: stats[k] * n for k in keys if k in stats}}, device)
    total = sums.pop("images")
    out = {k: v / total for k, v in sums.items()}
    out["images"] = int(total)
    if "seconds" in stats:
        out["seconds"] = reduce_max(stats["seconds"], device)
        out["images_per_s"] = total / out["seconds"] if out["seconds"] > 0 else 0.0
    return out


def gather_arrays(*arrays) -> list:
    """Concatenate each array over the ranks (``all_gather_object``; rank order), e.g. every rank's labels
    and predictions of its evaluation shard, so rank 0 can compute balanced accuracy and macro-F1 over the
    whole split. Returns the arrays unchanged without a process group."""
    import numpy as np

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [np.asarray(a) for a in arrays]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [np.asarray(a) for a in arrays])
    return [np.concatenate([part[i] for part in gathered]) for i in range(len(arrays))]


def hello(rank: int, world_size: int, device: torch.device, fail_rank: int | None = None,
          sleep_rank: int | None = None, sleep_s: float = 0.0) -> dict:
    """A toy rank function: ``all_reduce`` the rank numbers (the lab's first DDP step).

    ``fail_rank`` raises on that rank, ``sleep_rank`` sleeps ``sleep_s`` before the collective:
    the lab and the tests use them to show an error reaching the caller and a timeout.
    """
    if rank == sleep_rank:
        time.sleep(sleep_s)
    if rank == fail_rank:
        raise RuntimeError(f"rank {rank} failed on purpose (fail_rank={fail_rank})")
    t = torch.tensor([float(rank)], device=device)
    dist.all_reduce(t)  # every rank ends with 0 + 1 + … + (world_size - 1)
    return {"world_size": world_size, "rank_sum": t.item(), "backend": dist.get_backend(), "device": str(device)}


def broadcast_buffers(*modules: torch.nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s buffers (BatchNorm running mean/var, batch counts) to every rank; returns how many.

    DDP keeps the *parameters* identical (gradients are all-reduced) but each rank's BatchNorm
    layers update their running statistics from that rank's own batches, so the replicas drift
    apart. Call this before evaluating or checkpointing, so every rank judges, and rank 0 saves,
    the same network. A no-op without a process group.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    count = 0
    with torch.no_grad():
        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf.data, src)
                count += 1
    return count


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save`` ``state`` atomically (only tensors, numbers, strings, lists, dicts: loadable
    with ``weights_only=True``). Call on rank 0 only."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a last.pt written by a run.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 — name the file whatever went wrong
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                         "it is not a labkit checkpoint or it is damaged.") from exc
