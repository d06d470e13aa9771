"""The labs' set-up cell, run as Colab would run it: a stand-in ``google.colab`` in ``sys.modules`` and
``subprocess.run`` captured, never run. Plus: every lab's set-up cell and badge come from the template."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from labkit import results
from labkit.course import colab

REPO = Path(__file__).resolve().parents[2]
LABS = sorted((REPO / "labs").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture
def on_colab(monkeypatch):
    """A pretend Colab: ``google.colab`` (with ``drive``) imported, no clone yet, labkit not installed,
    and every command the cell runs recorded (with the constraints file's text for pip)."""
    google, colab_mod, drive = (types.ModuleType(n) for n in ("google", "google.colab", "google.colab.drive"))
    mounts: list[str] = []
    drive.mount = lambda where, **kw: mounts.append(where)
    colab_mod.drive, google.colab = drive, colab_mod
    for name, module in (("google", google), ("google.colab", colab_mod), ("google.colab.drive", drive)):
        monkeypatch.setitem(sys.modules, name, module)

    isdir, find_spec = os.path.isdir, importlib.util.find_spec
    monkeypatch.setattr(os.path, "isdir", lambda p: False if str(p) == colab.COLAB_HOME else isdir(p))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "labkit" else find_spec(name, *a))
    for var in ("LABKIT_HOME", "LABKIT_RESULTS"):
        monkeypatch.setenv(var, "unset-by-the-test")     # restored when the test ends
        monkeypatch.delenv(var)

    state = types.SimpleNamespace(commands=[], constraints={}, mounts=mounts, fail=None)

    def fake_run(cmd, **kwargs):
        assert kwargs.get("capture_output") and kwargs.get("text"), "the cell must capture the command's output"
        state.commands.append(list(cmd))
        if "-c" in cmd:
            state.constraints = dict(line.split("==", 1) for line in
                                     Path(cmd[cmd.index("-c") + 1]).read_text().split())
        if state.fail and state.fail in cmd:
            return subprocess.CompletedProcess(cmd, 128, "", "fatal: unable to access: Could not resolve host: github.com\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return state


def _run_cell(source: str = colab.SETUP_CELL) -> dict:
    namespace: dict = {}
    exec(compile(source, "<set-up cell>", "exec"), namespace)
    return namespace


def test_clones_the_course_and_installs_labkit_keeping_colabs_own_packages(on_colab):
    _run_cell()
    clone, pip = on_colab.commands
    assert clone[:2] == ["git", "clone"] and colab.REPO_URL in clone and clone[-1] == colab.COLAB_HOME
    assert pip[:4] == [sys.executable, "-m", "pip", "install"] and colab.COLAB_HOME in pip
    assert not {"-U", "--upgrade", "--force-reinstall"} & set(pip), pip
    pins = {name.lower().replace("_", "-"): version for name, version in on_colab.constraints.items()}
    for name in ("torch", "torchvision", "ipykernel", "jupyter-client"):
        assert pins.get(name) == importlib.metadata.version(name), f"{name} is not pinned to its installed version"
    assert "numpy" not in pins, "only Colab's own torch/ipykernel/jupyter* packages are pinned"
    assert os.environ["LABKIT_HOME"] == colab.COLAB_HOME
    assert "LABKIT_RESULTS" not in os.environ and on_colab.mounts == []


def test_results_go_to_google_drive_when_asked(on_colab):
    source = colab.SETUP_CELL.replace("results_on_drive = False", "results_on_drive = True")
    assert source != colab.SETUP_CELL, "the set-up cell has no results_on_drive switch"
    _run_cell(source)
    assert on_colab.mounts == ["/content/drive"]
    assert os.environ["LABKIT_RESULTS"] == colab.DRIVE_RESULTS
    assert results.results_root() == Path(colab.DRIVE_RESULTS)


def test_a_failed_clone_stops_the_notebook_and_says_what_failed_and_what_to_do(on_colab):
    on_colab.fail = "clone"
    with pytest.raises(RuntimeError) as err:
        _run_cell()
    text = str(err.value)
    assert f"git clone --depth 1 {colab.REPO_URL}" in text and "exit 128" in text
    assert "Could not resolve host" in text and "internet" in text and "URL" in text
    assert len(on_colab.commands) == 1, "nothing runs after a failed clone"


def test_a_failed_install_names_pip(on_colab):
    on_colab.fail = "install"
    with pytest.raises(RuntimeError, match=r"pip install .*failed \(exit 128\)"):
        _run_cell()


def test_off_colab_the_cell_runs_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command off Colab"))
    assert _run_cell()["results_on_drive"] is False


def test_the_cell_is_short_and_the_url_is_written_once():
    assert 15 <= len(colab.SETUP_CELL.splitlines()) <= 25
    assert colab.SETUP_CELL.startswith(colab.MARKER)
    sources = [p for p in (REPO / "labkit").rglob("*.py") if colab.REPO_URL.removeprefix("https://") in p.read_text()]
    assert sources == [REPO / "labkit" / "course" / "colab.py"]


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_every_labs_set_up_cell_and_badge_come_from_the_template(lab):
    nb = nbformat.read(lab, as_version=4)
    assert colab.problems(nb, lab.name) == [], f"{lab.name}: run `labkit labs sync`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == colab.SETUP_CELL.rstrip("\n"), "the set-up cell is the lab's first code cell"
    assert colab.badge(lab.name) in nb.cells[0].source
