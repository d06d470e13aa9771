"""Ray plumbing for the labs: size the run, start or join a Ray cluster, shut it down, keep the results.

Lab 02 writes its worker function and its ``TorchTrainer`` in the notebook; this module holds
what surrounds them (Lab 04 uses the same pieces)::

    plan = distributed.plan_scaling(cfg.workers, cfg.device, **distributed.machine_resources())
    with distributed.ray_cluster(cfg.address) as cluster:        # ray.init ... ray.shutdown, always
        trainer = TorchTrainer(train_loop_per_worker, train_loop_config=distributed.worker_config(cfg, plan, run_dir),
                               scaling_config=ScalingConfig(num_workers=plan.workers, ...), run_config=RunConfig(...))
        result = trainer.fit()
    run = distributed.RayRun.from_result(result, plan, run_dir, fit_seconds, cluster)

- :func:`plan_scaling` — a pure function: how many workers, CPU (gloo) or GPU (NCCL), how many CPU
  cores each. It refuses impossible requests *before* Ray starts (Ray would wait forever for CPUs
  that do not exist) and lets workers share the GPU(s) when there are fewer GPUs than workers.
- :func:`ray_cluster` — a context manager: ``ray.init`` for a local cluster sized to this machine,
  or the cluster at ``address`` / ``$RAY_ADDRESS`` (checked first, so a wrong address fails in
  seconds), quiet logs, and ``ray.shutdown()`` on the way out, also when training fails.
- :func:`worker_config`, :class:`RayRun`, :func:`speedup_table` — the worker's config with absolute
  paths, the outcome of a run (history, timings, Ray's ``Result``) and a scaling table.
"""
from __future__ import annotations

import copyreg
import importlib
import logging
import math
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

# Ray reads this when it is first imported: hide two harmless warnings that a busy machine triggers.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX",
                      "Failed to query Ray Train Controller actor state|has constructor arguments in the object store")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from labkit.data.alzheimer import load_alzheimer
from labkit.distributed import local_ray, recovery, worker  # noqa: E402
from labkit.env import resolve_path  # noqa: E402
from labkit.errors import ParameterError  # noqa: E402
from labkit.params import Rule  # noqa: E402
from labkit.results import lab_dir  # noqa: E402

LAB = "02_ray"


def _pickle_torch_classes_by_reference() -> None:
    """Let cloudpickle ship notebook-defined worker functions that use ``torch`` and ``.classes``.

    Ray pickles a function defined in a notebook by value, with the submodules of its global modules
    whose names appear in its code: ``torch`` plus any ``ds.classes`` pulls in ``torch.classes``, a
    ``ModuleType`` subclass that cloudpickle cannot pickle ("cannot pickle '_Classes' object"). Pickle
    it by reference (import it again on the worker), as cloudpickle does for plain modules."""
    classes_type = type(torch.classes)
    if classes_type not in copyreg.dispatch_table:
        copyreg.pickle(classes_type, lambda module: (importlib.import_module, (module.__name__,)))


_pickle_torch_classes_by_reference()
DEFAULT_PORTS = {"ray": 10001, "gcs": 6379}  # Ray Client (ray://host) and the cluster's GCS (host)


#: Rules of the parameters the distributed labs share (Ray workers, DDP ranks, a cluster address, resume),
#: passed to :func:`labkit.params.check` as ``rules=``.
RULES: dict[str, Rule] = {
    "workers": Rule(int, 1, 4096, help="Ray Train workers (processes), one model replica each"),
    "world_size": Rule(int, 1, 4096, help="DDP processes, one model replica each"),
    "lr_scaling": Rule(str, choices=("none", "linear", "sqrt"),
                       help="how the learning rate grows with the number of workers"),
    "address": Rule(str, optional=True, help="a running Ray cluster ('ray://host:10001' or 'host:6379')"),
    "fail_at_epoch": Rule(int, 1, 10_000, optional=True, help="kill one worker once at this epoch"),
    "resume": Rule(str, optional=True, help="'last' (the newest unfinished run) or a run folder name: continue it"),
}


# --------------------------------------------------------------------------- sizing the run
@dataclass(frozen=True)
class ScalingPlan:
    """How a run is laid out: ``workers`` processes on CPU (gloo), on one GPU each (NCCL), or sharing
    fewer GPUs (``gpu_share`` < 1 of one GPU each, gloo)."""

    workers: int
    use_gpu: bool
    backend: str              # "gloo" (CPU, or GPUs shared by several workers) or "nccl" (one GPU per worker)
    cpus_per_worker: int      # CPU cores Ray reserves for each worker (= its torch threads on CPU)
    notice: str = ""          # why the plan differs from what was asked, if it does
    gpu_share: float = 1.0    # the fraction of one GPU Ray reserves for each worker (when use_gpu)

    def resources(self) -> dict[str, float]:
        """``resources_per_worker`` for ``ScalingConfig``."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpu_share} if self.use_gpu else {})}

    def describe(self) -> str:
        """One line for the notebook."""
        where = (("1 GPU" if self.gpu_share == 1 else f"{self.gpu_share:g} of a GPU") if self.use_gpu
                 else f"{self.cpus_per_worker} CPU core(s)")
        return f"{self.workers} worker(s), {where} each, backend {self.backend}"


def cpus_per_worker(node_cpus: Sequence[int], workers: int) -> int:
    """The most CPU cores every worker can get when ``workers`` workers are packed onto nodes with
    ``node_cpus`` cores (a worker lives on one node); 0 when not even one core each fits."""
    best = 0
    for c in range(1, max(node_cpus, default=0) + 1):
        if sum(n // c for n in node_cpus) >= workers:
            best = c
    return best


def plan_scaling(workers: int, device: str = "auto", *, node_cpus: Sequence[int], gpus: int,
                 where: str = "this machine") -> ScalingPlan:
    """Choose CPU/gloo or GPU/NCCL and the cores per worker for ``workers`` workers.

    ``node_cpus`` lists the CPU cores of each node and ``gpus`` counts the GPUs (see
    :func:`machine_resources` / :func:`cluster_resources`). Rules:

    - One GPU or more per worker (``device`` "auto" or "cuda"): one GPU each, NCCL.
    - Fewer GPUs than workers, but at least one (e.g. ``workers=2`` on Colab's one GPU): the workers
      **share** the GPUs — Ray reserves a fraction of a GPU for each — and all-reduce with gloo,
      because NCCL needs its own GPU per process (two ranks on one GPU fail with "Duplicate GPU
      detected"). The plan's notice says so; use ``workers <= gpus`` for NCCL.
    - No GPU: CPU workers with gloo (``device="cuda"`` then raises).
    - More workers than CPU cores raises :class:`ParameterError` at once (each worker needs a core;
      Ray would otherwise wait for resources that never come).
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ParameterError(f"workers={workers!r}: need an integer >= 1 (one model replica per worker), "
                             "e.g. -p workers 2.")
    name = str(device).lower()
    notice, share = "", 1.0
    if name == "cpu":
        use_gpu = False
    elif name == "mps":
        use_gpu, notice = False, "device='mps': Ray Train workers cannot share Apple's MPS device; training on CPU workers."
    elif name == "auto" or name.startswith("cuda"):
        use_gpu = gpus > 0
        if not use_gpu and name.startswith("cuda"):
            raise ParameterError(f"device={device!r}: {where} has no GPU. Use device='auto' or 'cpu' to train on CPU "
                                 "workers.")
        if use_gpu and gpus < workers:
            per_gpu = math.ceil(workers / gpus)
            share = math.floor(10_000 / per_gpu) / 10_000      # Ray counts GPU fractions in 1/10,000ths
            notice = (f"Notice: {workers} workers but {gpus} GPU(s) on {where}: the workers share the GPU(s), "
                      f"{share:g} of a GPU each, and all-reduce with gloo (NCCL needs one GPU per worker: sharing "
                      "fails with 'Duplicate GPU detected'). gloo copies gradients through host memory, so this "
                      "shows how the code scales, not how fast it would be on separate GPUs; use "
                      f"workers <= {gpus} to train with NCCL.")
    else:
        raise ParameterError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'mps'.")

    total = sum(node_cpus)
    per_worker = cpus_per_worker(node_cpus, workers)
    if per_worker == 0:
        raise ParameterError(
            f"workers={workers}, but {where} has {total} CPU core(s) for Ray and every worker needs at least one "
            f"(Ray would wait forever for the missing {workers - total}). Use workers <= {total} "
            f"(e.g. -p workers {max(total, 1)}), or connect to a bigger Ray cluster with address=... / RAY_ADDRESS.")
    shared = use_gpu and share < 1
    return ScalingPlan(workers=workers, use_gpu=use_gpu, backend="nccl" if use_gpu and not shared else "gloo",
                       cpus_per_worker=per_worker, notice=notice, gpu_share=share)


def machine_resources() -> dict[str, Any]:
    """This machine's CPU cores (those this process may use) and CUDA GPUs, for :func:`plan_scaling`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"node_cpus": [cpus], "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def cluster_resources() -> dict[str, Any]:
    """CPU cores per live node and the GPUs of the Ray cluster this process is connected to."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"node_cpus": [int(n["Resources"].get("CPU", 0)) for n in nodes],
            "gpus": int(sum(n["Resources"].get("GPU", 0) for n in nodes))}


# --------------------------------------------------------------------------- the cluster
def resolve_address(address: str | None = None) -> str | None:
    """``address``, else ``$RAY_ADDRESS``, else ``None`` (= start a local cluster)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address.strip()


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` seconds when nothing listens at a cluster ``address``.

    Accepts ``ray://host[:10001]`` (Ray Client) and ``host[:6379]`` (the head node's GCS);
    ``"auto"`` (a cluster started with ``ray start`` on this machine) is left to Ray.
    Without this check ``ray.init`` retries an unreachable address for minutes.
    """
    if address == "auto":
        return
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        raise ParameterError(f"address={address!r}: use 'ray://HOST:10001' (Ray Client) or 'HOST:6379' (the head "
                             "node), not a dashboard or job-submission URL.")
    hostport = rest if sep else address
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    port_number = int(port) if port.isdigit() else DEFAULT_PORTS["ray" if sep else "gcs"]
    try:
        with socket.create_connection((host.strip("[]"), port_number), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"address={address!r}: no Ray cluster answers at {host}:{port_number} ({exc}). Start one there with "
            "`ray start --head`, check the host, port and firewall, or use address=None (and unset RAY_ADDRESS) "
            "to start a local cluster on this machine.") from None



def check_cluster(cfg: dict) -> ScalingPlan | None:
    """What only the machine can tell, checked in a lab's parameter cell before anything starts.

    With a Ray ``address`` (or ``$RAY_ADDRESS``): that a cluster answers there (a 5-second probe instead of
    Ray's minutes of retries); returns ``None`` (the plan is made once connected). Without one: that
    ``workers`` fit this machine; returns the :class:`ScalingPlan` for it (``None`` when the lab has no
    ``workers``). Raises :class:`ParameterError` naming ``address`` or ``workers``.
    """
    lab = cfg.get("lab", "this lab")
    address = resolve_address(cfg.get("address"))
    try:
        if address is not None:
            check_address(address)
            return None
        if "workers" in cfg:
            return plan_scaling(cfg["workers"], cfg.get("device", "auto"), **machine_resources())
        return None
    except (ConnectionError, ParameterError) as exc:
        name, value = ("address", cfg.get("address") or address) if address is not None else ("workers", cfg["workers"])
        raise ParameterError(f"{lab}: parameter {name!r} = {value!r}: {exc}") from None

#: Level of Ray Train's own console logs in the labs. ERROR, not WARNING: on a busy 2-core machine
#: Train V2's controller logs a harmless "Failed to send resource request … safe to ignore" warning
#: with a full traceback into the notebook. Real failures still raise in the driver, and every
#: level still goes to Ray's log files (``/tmp/ray/session_latest/logs/train``).
TRAIN_LOG_LEVEL = "ERROR"


def ray_daemon_pids(under: str | os.PathLike | None = None) -> set[int]:
    """PIDs of Ray's cluster daemons (``raylet``, ``gcs_server``) on this machine; with ``under``,
    only those of clusters whose files live there (``$RAY_TMPDIR``). After :func:`ray_cluster`
    exits, none of the ones it started should be left."""
    import psutil

    pids = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            words = [proc.info["name"] or "", *(os.path.basename(a) for a in cmdline[:1])]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(w in ("raylet", "gcs_server") for w in words) and (under is None or str(under) in " ".join(cmdline)):
            pids.add(proc.pid)
    return pids


def _cluster_info(address: str | None, init_seconds: float) -> dict[str, Any]:
    import ray

    res = cluster_resources()
    return {"address": address or "local", "nodes": len(res["node_cpus"]), "cpus": sum(res["node_cpus"]),
            "gpus": res["gpus"], "init_seconds": init_seconds, "ray": ray.__version__}


@contextmanager
def ray_cluster(address: str | None = None, *, quiet: bool = True, timeout_s: float = 5.0) -> Iterator[dict]:
    """Start (or join) Ray for the ``with`` block and shut it down afterwards, also on errors.

    ``address=None`` (and no ``$RAY_ADDRESS``) starts a local cluster sized to this machine;
    otherwise it connects to that cluster (see :func:`check_address`; a remote cluster gets
    labkit's code shipped to it). ``quiet`` keeps Ray's own logging to errors; the workers' output
    (progress, epoch lines) still reaches the notebook. When Ray is already running in this process
    (someone called ``ray.init``), it is used and left running. Yields a dict describing the cluster.
    """
    import ray

    if ray.is_initialized():
        yield _cluster_info(resolve_address(address), 0.0)
        return
    address = resolve_address(address)
    course = _course_cluster() if address is None else None
    if course is not None:
        address = course
    if address is not None:
        check_address(address, timeout_s)
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.ERROR if quiet else logging.INFO,
                              "include_dashboard": False}
    on_loopback = address is None or local_ray.is_loopback(address)   # this machine: 127.0.0.1 only
    if address is None:
        res = machine_resources()
        kwargs.update(address="local", num_cpus=sum(res["node_cpus"]), num_gpus=res["gpus"])
        local_ray.lean_env()
    elif on_loopback:  # a cluster on this machine: its workers import this labkit already
        kwargs.update(address=address)
        if course:
            local_ray.lean_env()
    else:  # the cluster's nodes get this labkit (torch and ray must be installed there)
        kwargs.update(address=address, runtime_env={"py_modules": [str(Path(__file__).parent)]})
    tick = time.perf_counter()
    tries = 1 if address else 3  # a local start can time out on a busy machine (a slow raylet): try again
    for attempt in range(1, tries + 1):
        try:
            with local_ray.loopback_only() if on_loopback else nullcontext():
                ray.init(**kwargs)
            break
        except Exception as exc:
            ray.shutdown()
            if attempt < tries:
                print(f"Ray did not start ({exc}); trying once more ...")
                continue
            where = f"the cluster at {address!r}" if address else "a local Ray cluster"
            hint = ("If that cluster uses token authentication, put its token in ~/.ray/auth_token or "
                    "$RAY_AUTH_TOKEN." if address else
                    "On a busy machine start-up can time out: close other heavy programs and try again.")
            raise RuntimeError(f"Ray could not start or connect to {where}: {exc}\n{hint}") from exc
    try:
        info = _cluster_info(None if course else address, time.perf_counter() - tick)
        yield {**info, "course_cluster": course} if course else info
    finally:
        ray.shutdown()


def _course_cluster() -> str | None:
    """The course run's shared local cluster (``labkit run`` sets :data:`local_ray.COURSE_CLUSTER_VAR`), when it
    still answers; ``None`` otherwise (the lab then starts its own, and says why)."""
    course = os.environ.get(local_ray.COURSE_CLUSTER_VAR) or None
    if course is None:
        return None
    try:
        check_address(course, 2.0)
    except (ConnectionError, ParameterError) as exc:
        print(f"The course run's Ray cluster at {course} does not answer ({exc}); starting one for this lab.")
        return None
    print(f"Ray: joining the course run's local cluster at {course} (`labkit run` started it once for all labs).")
    return course


# --------------------------------------------------------------------------- the trainer
def worker_config(cfg: dict, plan: ScalingPlan, run_dir: Path, progress: bool = True,
                  resume_from: str | os.PathLike | None = None) -> dict:
    """The ``train_loop_config`` every worker receives: the lab's parameters with absolute paths
    (Ray workers run in their own working directory) and the cores each worker may use."""
    keys = ("epochs", "batch_size", "lr", "lr_scaling", "image_size", "data", "max_train", "max_test", "seed",
            "fail_at_epoch", "amp")
    config = {k: cfg.get(k) for k in keys}
    config.update(data_dir=str(resolve_path(cfg.get("data_dir", "data/alzheimer")).resolve()),
                  lr_scaling=cfg.get("lr_scaling") or "none", data=cfg.get("data") or "auto",
                  amp=cfg.get("amp", "auto"), run_dir=str(run_dir), threads=plan.cpus_per_worker, progress=progress,
                  resume_from=str(resume_from) if resume_from else None)
    return config


@dataclass
class RayRun:
    """The outcome of one ``trainer.fit()`` (see :meth:`from_result`): per-epoch history, timings and Ray's ``Result``."""

    history: list[dict]
    plan: ScalingPlan
    run_dir: Path
    fit_seconds: float                 # trainer.fit(), from the call to its return
    cluster: dict = field(default_factory=dict)
    restarts: int = 0
    result: Any = None                 # ray.train.Result

    @property
    def checkpoint(self):
        """The latest checkpoint (``ray.train.Checkpoint``) of the run."""
        return self.result.checkpoint if self.result is not None else None

    @property
    def metrics_dataframe(self) -> pd.DataFrame | None:
        """Ray's own table of reported metrics: in Train V2 only those reported with a checkpoint
        that is still kept (the last ``keep`` epochs); :attr:`history` has every epoch."""
        return self.result.metrics_dataframe if self.result is not None else None

    @classmethod
    def from_result(cls, result: Any, plan: ScalingPlan, run_dir: Path, fit_seconds: float,
                    cluster: dict | None = None) -> "RayRun":
        """Collect ``trainer.fit()``'s ``Result``: the history is the worker function's return value
        (every epoch, also those whose checkpoint was deleted); restarts come from the attempt log. The run
        folder is marked finished (``resume="last"`` skips it from now on)."""
        history = list(result.return_value or [])
        recovery.mark_finished(run_dir, history[-1]["epoch"] if history else 0)
        return cls(history=history, plan=plan, run_dir=Path(run_dir), fit_seconds=fit_seconds,
                   cluster=dict(cluster or {}), result=result, restarts=max(worker.count_attempts(run_dir) - 1, 0))

    def load_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the final weights (from :attr:`checkpoint`) into ``model`` and return it."""
        worker.restore(self.checkpoint, model)
        return model

    def summary(self) -> dict:
        """Headline numbers for the run record (``seconds`` = training time per epoch, as in Lab 01)."""
        seconds = [r["seconds"] for r in self.history]
        last = self.history[-1] if self.history else {}
        return {"test_acc": last.get("val_acc"), "test_loss": last.get("val_loss"),
                "total_seconds": sum(seconds), "seconds_per_epoch": sum(seconds) / max(len(seconds), 1),
                "fit_seconds": self.fit_seconds, "init_seconds": self.cluster.get("init_seconds"),
                "startup_seconds": self.fit_seconds - sum(r.get("epoch_s", 0.0) for r in self.history),
                "restarts": self.restarts, "workers": self.plan.workers, "backend": self.plan.backend}


def default_run_name() -> str:
    """A new run folder name (Train V2 resumes a run whose name already exists, so names are unique)."""
    return datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")


def new_run_dir(storage: str | os.PathLike | None = None, lab: str = LAB) -> Path:
    """A fresh, absolute run folder ``storage/run-<time>`` (default ``results/<lab>/ray``) for
    ``RunConfig(name=run_dir.name, storage_path=str(run_dir.parent))``."""
    return Path(storage or lab_dir(lab) / "ray").resolve() / default_run_name()


def prepare_data(cfg: dict):
    """Load (and, the first time, write and cache) the dataset on the driver, before any worker
    starts, so that the workers only read the cache instead of racing to write it."""
    return load_alzheimer(data=cfg.get("data") or "auto", data_dir=cfg.get("data_dir", "data/alzheimer"),
                          image_size=cfg["image_size"], max_train=cfg.get("max_train"),
                          max_test=cfg.get("max_test"), seed=cfg.get("seed", 0), progress=False)


def speedup_table(runs: Sequence[RayRun]) -> pd.DataFrame:
    """Seconds per epoch, throughput, speedup and parallel efficiency of runs with different worker
    counts, relative to the run with the fewest workers (efficiency 1 = perfect scaling)."""
    rows = [{"workers": r.plan.workers, "seconds_per_epoch": r.summary()["seconds_per_epoch"],
             "images_per_s": sum(h["images_per_s"] for h in r.history) / len(r.history)} for r in runs]
    df = pd.DataFrame(rows).sort_values("workers").reset_index(drop=True)
    base = df.iloc[0]
    df["speedup"] = base["seconds_per_epoch"] / df["seconds_per_epoch"]
    df["efficiency"] = df["speedup"] / (df["workers"] / base["workers"])
    return df
