"""Run records: one JSON file per run under ``results/<lab>/``, and loaders that return pandas.

A record holds ``lab``, ``run_id``, ``started``, ``params``, ``env``, ``data``, ``epochs`` (a list of
per-epoch dicts), ``final`` (headline metrics) and ``artifacts`` (paths relative to ``results/``).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from labkit.env import portable_path, resolve_path
from labkit.files import write_json

#: Lab name → folder under ``results/`` (the names every issue uses).
RESULT_DIRS = {
    "01_baseline": "01_baseline",
    "02_ray": "02_ray",
    "03_imagenet_ddp_ablations": "03_ablations",
    "04_lung_vit": "04_lung_vit",
    "05_federated": "05_federated",
    "06_streaming_data": "06_streaming",
    "07_tune_serve": "07_serve",
}


def results_root(results_dir: str | os.PathLike | None = None) -> Path:
    """The results folder: ``results_dir``, ``$LABKIT_RESULTS``, or ``<course>/results``."""
    return resolve_path(results_dir or os.environ.get("LABKIT_RESULTS") or "results")


def lab_dir(lab: str, results_dir: str | os.PathLike | None = None) -> Path:
    """``results/<folder of lab>/``, created when missing."""
    path = results_root(results_dir) / RESULT_DIRS.get(lab, lab)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class RunRecord:
    """Everything a run reports; build it during the lab and :func:`save` it at the end."""

    lab: str
    params: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    epochs: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def add_artifact(self, path: str | os.PathLike, results_dir: str | os.PathLike | None = None) -> None:
        """Remember a file the run wrote: relative to the results folder when inside it, else as
        :func:`labkit.env.portable_path` writes it (course-relative or ``~/…``: no home folder or user name)."""
        p, root = Path(path).resolve(), results_root(results_dir).resolve()
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else portable_path(p)
        if rel not in self.artifacts:
            self.artifacts.append(rel)


def save(record: RunRecord, results_dir: str | os.PathLike | None = None) -> Path:
    """Write ``record`` atomically to ``results/<lab>/<run_id>.json`` and return the path."""
    path = lab_dir(record.lab, results_dir) / f"{record.run_id}.json"
    return write_json(path, asdict(record))


def load_record(path: str | os.PathLike) -> RunRecord:
    """Read one record file back into a :class:`RunRecord`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return RunRecord(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path} is not a labkit run record ({exc}); delete it or re-run its lab.") from exc


def record_paths(lab: str | None = None, results_dir: str | os.PathLike | None = None) -> list[Path]:
    """Record files, oldest first (by run id, which starts with the start time)."""
    root = results_root(results_dir)
    folders = [root / RESULT_DIRS.get(lab, lab)] if lab else [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    paths = [p for f in folders if f.is_dir() for p in f.glob("*.json") if not p.name.startswith(".")]
    return sorted(paths, key=lambda p: p.stem)


def latest(lab: str, results_dir: str | os.PathLike | None = None) -> RunRecord | None:
    """The newest record of ``lab``, or ``None`` when the lab has not run yet."""
    paths = record_paths(lab, results_dir)
    return load_record(paths[-1]) if paths else None


def load(lab: str | None = None, results_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per run: lab, run_id, started, device, world size, seconds, and every final metric."""
    rows = []
    for path in record_paths(lab, results_dir):
        rec = load_record(path)
        rows.append({"lab": rec.lab, "run_id": rec.run_id, "started": rec.started,
                     "device": rec.env.get("device"), "world_size": rec.env.get("world_size", 1),
                     "synthetic": rec.data.get("synthetic"), **rec.final})
    return pd.DataFrame(rows)


def epochs_frame(record: RunRecord) -> pd.DataFrame:
    """A record's per-epoch metrics as a DataFrame indexed by epoch."""
    df = pd.DataFrame(record.epochs)
    return df.set_index("epoch") if "epoch" in df else df
