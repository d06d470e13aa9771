"""Sizing a distributed run: :class:`ScalingPlan` (how many workers, CPU/gloo or GPU/NCCL, cores each) and
:func:`plan_scaling`, a pure function that refuses impossible requests before Ray starts. Re-exported by
``labkit.distributed``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from labkit.errors import ParameterError


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
