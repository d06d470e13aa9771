"""When a Ray Train run loses a node or is interrupted: what happened, in words, and how to continue.

Lab 02's training cell uses three pieces:

- :func:`check_resume` (at the parameter check) and :func:`run_dir_for` pick the run folder: a new one, or
  (``resume="last"`` / a folder name) the folder of an unfinished run, which Ray Train V2 continues from its
  last checkpoint because the run's name and storage path are the same;
- :class:`RunWatch` (driver side, during ``trainer.fit()``) prints when a node leaves or joins the cluster and
  what Ray Train does next, and turns an interrupt into a ``KeyboardInterrupt`` that says how to continue;
- :func:`story` (after ``fit()``) tells the run attempt by attempt: which epochs, how many workers, on
  which nodes, where each restart resumed, and whether every finished epoch was kept.

A run folder gets a ``finished.json`` when ``fit()`` returns (:func:`mark_finished`); a folder with a
checkpoint Ray Train registered and without it is an unfinished run.
"""
from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from labkit.params import ParameterError

FINISHED_FILE = "finished.json"
_CHECKPOINT_DIR = re.compile(r"epoch(\d+)_attempt(\d+)$")
#: Ray Train V2's list of the checkpoints its controller registered for a run (ray.train.v2 constants).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


# --------------------------------------------------------------------------- run folders
def last_checkpoint_epoch(run_dir: str | os.PathLike) -> int:
    """The epoch Ray Train would continue ``run_dir`` after: the newest checkpoint its controller registered
    (0 when there is none).

    Ray Train V2 resumes from the checkpoints listed in the run's ``checkpoint_manager_snapshot.json``, not from
    whatever lies in the folder: a checkpoint a worker finished writing just as the run was interrupted, before
    the controller registered it, is on disk but is not where Ray continues. Without a snapshot Ray starts from
    scratch, so the answer is 0."""
    run_dir = Path(run_dir)
    try:
        snapshot = json.loads((run_dir / RAY_SNAPSHOT_FILE).read_text())
        names = {row["checkpoint_dir_name"] for row in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    epochs = [int(m.group(1)) for name in names
              if (m := _CHECKPOINT_DIR.search(str(name))) and (run_dir / name / "checkpoint.pt").is_file()]
    return max(epochs, default=0)


def mark_finished(run_dir: str | os.PathLike, epochs: int) -> None:
    """Write ``run_dir/finished.json`` (atomically): ``resume="last"`` skips this run from now on."""
    path = Path(run_dir) / FINISHED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"epochs": int(epochs)}))
    os.replace(tmp, path)


def unfinished_runs(storage: str | os.PathLike) -> list[Path]:
    """Run folders in ``storage`` that have a checkpoint but never finished, oldest first."""
    storage = Path(storage)
    if not storage.is_dir():
        return []
    return sorted(p for p in storage.glob("run-*")
                  if p.is_dir() and not (p / FINISHED_FILE).exists() and last_checkpoint_epoch(p) > 0)


def check_resume(resume: str | None, storage: str | os.PathLike) -> Path | None:
    """The unfinished run folder ``resume`` names in ``storage`` — the newest for ``"last"``, or a folder name
    or path — or ``None`` for a new run. Raises :class:`~labkit.params.ParameterError` naming ``resume`` when
    there is nothing to continue."""
    if resume is None:
        return None
    storage = Path(storage)
    if resume == "last":
        left = unfinished_runs(storage)
        if not left:
            raise ParameterError(f"parameter 'resume' = 'last': there is no unfinished run in {storage} (a run folder "
                                 f"with a checkpoint and without {FINISHED_FILE}): use resume=None to start a new run.")
        return left[-1].resolve()
    run_dir = Path(resume) if os.sep in str(resume) else storage / resume
    if not run_dir.is_dir():
        raise ParameterError(f"parameter 'resume' = {resume!r}: no run folder {run_dir}. Use resume='last', the "
                             f"name of a folder in {storage}, or None for a new run.")
    if (run_dir / FINISHED_FILE).exists():
        raise ParameterError(f"parameter 'resume' = {resume!r}: that run already finished; there is nothing to "
                             "continue: use resume=None to start a new run.")
    if last_checkpoint_epoch(run_dir) == 0:
        raise ParameterError(f"parameter 'resume' = {resume!r}: {run_dir} holds no checkpoint to continue from "
                             "(it stopped before its first epoch finished): use resume=None to start a new run.")
    return run_dir.resolve()


def run_dir_for(resume: str | None, storage: str | os.PathLike, new: Callable[[], Path],
                say: Callable[[str], Any] = print) -> Path:
    """The run folder for this ``fit()``: the unfinished run ``resume`` names (:func:`check_resume`; Ray Train
    V2 continues a run whose name and storage path it finds again), or ``new()`` when ``resume`` is ``None`` —
    then an unfinished run in ``storage`` gets a note on how to continue it instead."""
    run_dir = check_resume(resume, storage)
    if run_dir is not None:
        say(f"Continuing run {run_dir.name} after epoch {last_checkpoint_epoch(run_dir)}, its last checkpoint.")
        return run_dir
    left = unfinished_runs(storage)
    if left:
        say(f"Note: run {left[-1].name} stopped after epoch {last_checkpoint_epoch(left[-1])} without finishing "
            "(interrupted, or it lost its workers). This starts a new run; set resume='last' to continue that one "
            "from its checkpoint instead.")
    return new()


# --------------------------------------------------------------------------- nodes during fit()
def alive_nodes() -> dict[str, dict]:
    """The cluster's live nodes, by 8-character node id: ``{"ip": …, "cpus": …, "head": bool}``."""
    import ray

    return {n["NodeID"][:8]: {"ip": n.get("NodeManagerAddress", "?"), "cpus": n.get("Resources", {}).get("CPU", 0),
                              "head": "node:__internal_head__" in n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")}


def _describe(node_id: str, info: dict) -> str:
    cpus = info.get("cpus", 0)
    return f"node {node_id} ({info.get('ip', '?')}, {cpus:g} CPU{'s' if cpus != 1 else ''})"


@contextmanager
def notebook_interrupts(message: str | Callable[[], str] = "training interrupted: Ray Train stopped the run and "
                        "its workers.") -> Iterator[None]:
    """Around ``trainer.fit()`` in a notebook. On an interrupt (Jupyter's ■, Ctrl-C) Ray Train V2's own SIGINT
    handler aborts the run and raises ``SystemExit``; this turns it into the ``KeyboardInterrupt`` a notebook
    expects, with ``message`` (a string, or a function that writes it then). Either way it puts back the
    interrupt handler ``fit()`` replaced — otherwise a later ■ in *any* cell would go to Ray's handler of a run
    that is long gone."""
    import signal

    before = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt(message() if callable(message) else message) from None
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


class RunWatch:
    """Driver side, around ``trainer.fit()``: what happens to the run while it trains, said as it happens.

    - Every ``every_s`` seconds it compares the cluster's live nodes with the previous look and prints when one
      leaves or joins, with what Ray Train does about it (``run_dir`` gives the last finished epoch,
      ``workers`` the size of the worker group). The nodes that left are kept in :attr:`left` for :func:`story`.
    - An interrupt (Jupyter's ■, Ctrl-C) becomes a ``KeyboardInterrupt`` that says which checkpoint the run folder
      keeps and how to continue (:func:`notebook_interrupts`, which also puts back the interrupt handler).
    """

    def __init__(self, run_dir: str | os.PathLike, workers: int, every_s: float = 1.0,
                 say: Callable[[str], Any] = print) -> None:
        self.run_dir, self.workers, self.every_s, self.say = Path(run_dir), workers, every_s, say
        self.nodes: dict[str, dict] = {}
        self.left: dict[str, dict] = {}
        self.joined: dict[str, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "RunWatch":
        self.nodes = alive_nodes()
        self.interrupts = notebook_interrupts(self._interrupted)
        self.interrupts.__enter__()
        self.thread.start()
        return self

    def __exit__(self, kind, error, tb) -> bool | None:
        self.stop.set()
        self.thread.join()
        return self.interrupts.__exit__(kind, error, tb)

    def _interrupted(self) -> str:
        done = last_checkpoint_epoch(self.run_dir)
        kept = f"keeps the checkpoint of epoch {done}" if done else "has no checkpoint yet (no epoch had finished)"
        return (f"training interrupted: Ray Train stopped the run and its workers. Run folder {self.run_dir.name} "
                f"{kept}; nothing else was written. Re-run with resume='last' to continue from there (any number "
                "of workers), or resume=None to start anew.")

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the cluster is shutting down; fit() reports the real error
                return

    def _done(self) -> int:
        try:
            return int(json.loads((self.run_dir / "progress.json").read_text())["done"])
        except (OSError, ValueError, KeyError):
            return last_checkpoint_epoch(self.run_dir)

    def check(self) -> None:
        """Look once and print what changed."""
        now = alive_nodes()
        for node_id in self.nodes.keys() - now.keys():
            self.left[node_id] = self.nodes[node_id]
            done = self._done()
            where = f"the checkpoint of epoch {done}" if done else "the start (no epoch had finished)"
            self.say(f"⚠ {_describe(node_id, self.nodes[node_id])} left the Ray cluster during training; its workers "
                     f"are gone. Ray Train restarts all {self.workers} workers from {where} as soon as the cluster has "
                     f"room for them again: bring the node back (`ray start --address=…` on it), or interrupt this cell "
                     f"and re-run with fewer workers and resume='last'. No finished epoch is lost either way. (Until then "
                     f"Ray Train logs that the worker group's start timed out, and tries again: expected.)")
        for node_id in now.keys() - self.nodes.keys():
            self.joined[node_id] = now[node_id]
            self.say(f"{_describe(node_id, now[node_id])} joined the Ray cluster.")
        self.nodes = now


# --------------------------------------------------------------------------- after fit()
def _span(epochs: Sequence[int]) -> str:
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"


def _workers(n: Any) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def story(history: Sequence[dict], attempts: int | None = None, left: dict[str, dict] | None = None) -> str:
    """The run in words, attempt by attempt, from the per-epoch ``history`` (rows with ``epoch``, ``attempt``,
    ``world_size`` and ``nodes``, the node of each rank). ``attempts`` is the number of worker-group starts
    (``worker.count_attempts``: also those that stopped before finishing an epoch); ``left`` the nodes
    :class:`RunWatch` saw leave. Ends by saying whether every epoch was trained exactly once."""
    groups: list[tuple[int, list[dict]]] = []
    for row in history:
        if groups and groups[-1][0] == row.get("attempt"):
            groups[-1][1].append(row)
        else:
            groups.append((row.get("attempt"), [row]))
    lines, previous = [], 0
    for attempt, rows in groups:
        epochs = [r["epoch"] for r in rows]
        nodes = rows[0].get("nodes") or []
        names = sorted(set(nodes))
        where = f" on {len(names)} node{'s' if len(names) != 1 else ''} ({', '.join(names)})" if nodes else ""
        start = f"resumed from the checkpoint of epoch {previous}, trained" if previous else "trained"
        note = f"; {rows[0]['resume']}" if rows[0].get("resume") else ""      # the LR it resumed with
        lines.append(f"attempt {attempt}: {start} {_span(epochs)} with {_workers(rows[0].get('world_size'))}{where}{note}")
        previous = epochs[-1]
    seen = {a for a, _ in groups}
    for attempt in range(1, (attempts or 0) + 1):
        if attempt not in seen:
            lines.append(f"attempt {attempt}: stopped before it finished an epoch")
    for node_id, info in (left or {}).items():
        lines.append(f"{_describe(node_id, info)} left the cluster during the run")
    epochs = [r["epoch"] for r in history]
    if epochs and epochs == list(range(1, len(epochs) + 1)):
        lines.append(f"every epoch from 1 to {epochs[-1]} trained exactly once: no finished epoch was lost")
    elif epochs:
        repeats = sorted({e for e in epochs if epochs.count(e) > 1})
        missing = sorted(set(range(1, max(epochs) + 1)) - set(epochs))
        lines.append("epochs trained more than once: " + (", ".join(map(str, repeats)) or "none")
                     + "; epochs missing: " + (", ".join(map(str, missing)) or "none"))
    return "\n".join(lines)
