"""One Ray Train run of the labs' trainers, as the notebook sees it: the config every worker receives, the run's
folder, and :class:`RayRun`, what ``trainer.fit()`` gave back (history, timings, checkpoint). Re-exported by
``labkit.distributed``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from labkit.data.alzheimer import load_alzheimer
from labkit.distributed import recovery, worker
from labkit.distributed.scaling import ScalingPlan
from labkit.env import resolve_path
from labkit.results import lab_dir

LAB = "02_ray"


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
