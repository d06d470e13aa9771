"""MLflow tracking for the labs, kept inside ``results/``: a local SQLite store by default, a real
tracking server when ``MLFLOW_TRACKING_URI`` is set.

By default MLflow writes ``mlflow.db`` into the working directory and artifacts into ``./mlruns``.
labkit points both into the lab's result folder instead::

    results/04_lung_vit/mlflow.db          # runs, params, metrics (the backend store)
    results/04_lung_vit/mlartifacts/...    # artifacts: checkpoints, plots, tables

and opens them with ``mlflow ui --backend-store-uri sqlite:///results/04_lung_vit/mlflow.db``.

Everything goes through :class:`mlflow.MlflowClient` with an explicit run id, so no global
"active run" state leaks between cells or processes, and MLflow's automatic context tags (user
name, host, source path) are never collected: no host, user, token or password is written into a
file. The tracking URI itself is never stored either (it may hold credentials); records keep
:func:`describe_uri` instead.

A run is created by the driver (:func:`create_run`); inside distributed training only rank 0
logs into it (see ``labkit.labs.lung_vit.lightning_module.MlflowEpochLogger``); the driver adds the test
metrics and the best checkpoint at the end.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from labkit.results import lab_dir

ENV_URI = "MLFLOW_TRACKING_URI"
STORE_FILE = "mlflow.db"
ARTIFACT_FOLDER = "mlartifacts"


def local_store(lab: str, results_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """The local backend-store URI ``sqlite:///<abs>/results/<lab>/mlflow.db`` and the artifact folder."""
    folder = lab_dir(lab, results_dir).resolve()
    return f"sqlite:///{folder / STORE_FILE}", folder / ARTIFACT_FOLDER


def tracking_uri(lab: str, results_dir: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` when set (a real server), else the lab's local SQLite store."""
    return os.environ.get(ENV_URI, "").strip() or local_store(lab, results_dir)[0]


def is_local(uri: str) -> bool:
    """True for a ``sqlite:`` or ``file:`` store on this machine."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def describe_uri(uri: str) -> str:
    """A description of ``uri`` that is safe to print and store: the path of a local store; for a
    server only that ``MLFLOW_TRACKING_URI`` was used (never its host, user or token)."""
    if uri.startswith("sqlite:///"):
        return uri
    return f"remote tracking server from ${ENV_URI}" if not is_local(uri) else "local file store"


def ui_command(uri: str) -> str:
    """The command that opens the runs of a local store in the MLflow UI."""
    if not uri.startswith("sqlite:///"):
        return "open the tracking server's web page (the address in $MLFLOW_TRACKING_URI)"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def _quiet() -> None:
    """Silence alembic's schema-migration chatter when a new SQLite store is created."""
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(uri: str):
    """An :class:`mlflow.MlflowClient` for ``uri``."""
    import mlflow

    _quiet()
    return mlflow.MlflowClient(tracking_uri=uri)


def get_experiment(uri: str, name: str, artifact_dir: str | os.PathLike | None = None) -> str:
    """The id of experiment ``name``, created when missing (with its artifacts under ``artifact_dir``
    for a local store; a server decides for itself)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_dir).resolve().as_uri() if (artifact_dir and is_local(uri)) else None
    return c.create_experiment(name, artifact_location=location)


def create_run(lab: str, run_name: str, *, results_dir: str | os.PathLike | None = None,
               experiment: str | None = None, tags: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Create an MLflow run for ``lab`` and return ``(uri, run_id)``.

    The experiment is named after the lab unless ``experiment`` is given. Only the tags passed here
    are stored (plus ``mlflow.runName``), so nothing about the user or host is recorded.
    """
    uri = tracking_uri(lab, results_dir)
    _, artifacts = local_store(lab, results_dir)
    exp_id = get_experiment(uri, experiment or lab, artifacts)
    run = client(uri).create_run(exp_id, run_name=run_name, tags={"labkit.lab": lab, **(tags or {})})
    return uri, run.info.run_id


def _flat(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameters as MLflow strings (MLflow caps values at 6000 characters)."""
    return {str(k): str(v)[:6000] for k, v in params.items()}


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log ``params`` (a run's parameters are written once; an equal value may be logged again)."""
    from mlflow.entities import Param

    c = client(uri)
    have = c.get_run(run_id).data.params
    new = [Param(k, v) for k, v in _flat(params).items() if have.get(k) != v]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric ``metrics`` at ``step`` (non-numbers are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    c = client(uri)
    for i in range(0, len(rows), 500):
        c.log_batch(run_id, metrics=rows[i:i + 500])


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Copy the file ``path`` into the run's artifacts (under ``artifact_path``)."""
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_dict(uri: str, run_id: str, data: dict, artifact_file: str) -> None:
    """Store ``data`` as a JSON/YAML artifact (by the file's extension)."""
    client(uri).log_dict(run_id, data, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED`` (or ``FAILED`` / ``KILLED``)."""
    client(uri).set_terminated(run_id, status=status)


def read_run(uri: str, run_id: str) -> dict:
    """What a run holds, read back through the client: ``params``, ``metrics`` (latest values),
    ``history`` (metric → list of (step, value)), ``artifacts`` (relative paths), ``status``."""
    c = client(uri)
    run = c.get_run(run_id)

    def walk(path: str | None = None) -> list[str]:
        out = []
        for f in c.list_artifacts(run_id, path):
            out += walk(f.path) if f.is_dir else [f.path]
        return out

    history = {k: [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)]
               for k in run.data.metrics}
    return {"params": dict(run.data.params), "metrics": dict(run.data.metrics), "history": history,
            "artifacts": walk(), "status": run.info.status, "artifact_uri": run.info.artifact_uri}
