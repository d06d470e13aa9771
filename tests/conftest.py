"""Shared test set-up: results and caches go to temporary folders, never into the course's results/."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = "nbval-check-output"

# Headless plotting, quiet Ray, no accidental quick mode leaking from a developer's shell.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("LABKIT_QUICK", None)
# Decoded-image caches of "real" test datasets go to a throwaway folder, not the course's data/.cache.
os.environ.setdefault("LABKIT_CACHE", tempfile.mkdtemp(prefix="labkit-cache-"))


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """Each test starts with the SIGINT handler the one before it found: an in-process Ray Train or Tune run leaves
    its own handler installed (Train V2 does), and a later test of what Ctrl-C does would test Ray's handler
    instead of Python's."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


@pytest.fixture
def results_tmp(tmp_path, monkeypatch):
    """Point labkit's results folder at a fresh temporary directory."""
    path = tmp_path / "results"
    monkeypatch.setenv("LABKIT_RESULTS", str(path))
    return path


def _tiny_labs(folder: Path) -> list[Path]:
    """Two small labs in the course's cell layout (parameters, checked echo, timings, checked metric,
    run record) for when labs/ is still empty."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, name in ((1, "01_tiny"), (2, "02_tiny")):
        nb = nbformat.v4.new_notebook()
        nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
        code = nbformat.v4.new_code_cell
        nb.cells = [
            nbformat.v4.new_markdown_cell(f"# Tiny lab {number}"),
            code("epochs = 4\nseed = 0\nquick = False", metadata={"tags": ["parameters"]}),
            code(f'import random, time\nfrom labkit import params, results, timing\n'
                 f'cfg = params.check("{name}", epochs=epochs, seed=seed, quick=quick)', metadata={"tags": [CHECK]}),
            code("history = []\nfor epoch in range(cfg.epochs):\n    t0 = time.perf_counter()\n"
                 "    time.sleep(0.01 * (1 + random.random()))\n    history.append({'epoch': epoch + 1, 'seconds': time.perf_counter() - t0})\n"  # noqa: E501
                 "    print(f\"epoch {epoch + 1}: {timing.format_seconds(history[-1]['seconds'])}\")"),
            code(f"random.seed(cfg.seed + {number})\nacc = sum(random.random() for _ in range(200)) / 200\n"
                 "print(f'test_acc {acc:.3f}')", metadata={"tags": [CHECK]}),
            code(f'rec = results.RunRecord("{name}", params=dict(cfg), env={{"device": "cpu", "world_size": {number}}},\n'
                 '                         data={"synthetic": True}, epochs=history, final={"test_acc": acc})\n'
                 'print("saved", results.save(rec))'),
        ]
        paths.append(folder / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    return paths


@pytest.fixture(scope="session")
def course(tmp_path_factory):
    """``labkit run --quick`` over every lab (or the tiny stand-ins), then ``labkit summary``.

    Session-scoped: each lab notebook executes once per test run; lab tests read its executed copy
    and run record, the regrade tests re-execute those copies."""
    from labkit.course.run import environ, run_labs
    from labkit.course.summary import write_summary

    tmp = tmp_path_factory.mktemp("course")
    labs = sorted((REPO / "labs").glob("*.ipynb")) or _tiny_labs(tmp / "labs")
    results = tmp / "results"
    # Ray's files in a folder of this run's own (short: Ray's socket paths are length-limited), so the
    # tests can tell this run's Ray daemons from any other cluster on the machine.
    ray_dir = tempfile.mkdtemp(prefix="lkc", dir="/tmp")
    strays = [p for p in ("mlruns", "mlflow.db") if (REPO / p).exists()]
    with environ(LABKIT_RESULTS=str(results), LABKIT_HOME=str(REPO), LABKIT_QUICK=None, RAY_TMPDIR=ray_dir,
                 RAY_ADDRESS=None):
        runs = run_labs([str(p) for p in labs], quick=True, results_dir=results, echo=lambda line: print(line))
        write_summary(results)
        yield {"labs": labs, "runs": runs, "results": results, "tmp": tmp, "ray_dir": ray_dir,
               "strays_before": strays}
    shutil.rmtree(ray_dir, ignore_errors=True)


