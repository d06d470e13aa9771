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
- :func:`worker_config`, :class:`RayRun`, :func:`speedup_table` (in ``runs.py``, re-exported here) — the
  worker's config with absolute paths, the outcome of a run (history, timings, Ray's ``Result``) and a scaling
  table; :class:`ScalingPlan` and :func:`plan_scaling` are in ``scaling.py``.
"""
from __future__ import annotations

import copyreg
import importlib
import logging
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

# Ray reads this when it is first imported: hide two harmless warnings that a busy machine triggers.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX",
                      "Failed to query Ray Train Controller actor state|has constructor arguments in the object store")

import torch  # noqa: E402

from labkit.distributed import local_ray, recovery, worker  # noqa: E402,F401  (labs use distributed.recovery/.worker)
from labkit.errors import ParameterError  # noqa: E402
from labkit.params import Rule  # noqa: E402


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


from labkit.distributed.scaling import ScalingPlan, cpus_per_worker, plan_scaling  # noqa: E402,F401  (re-exported)


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


# The trainer's side (the worker config, run folders, RayRun) lives in runs.py; imported last, since it uses
# this module's recovery and worker imports.
from labkit.distributed.runs import (  # noqa: E402,F401  (re-exported)
    RayRun,
    default_run_name,
    new_run_dir,
    prepare_data,
    speedup_table,
    worker_config,
)
