"""Bad parameters, for every lab: each fails at the lab's parameter check, naming the parameter, the value and
what is allowed — before any data is read, any process starts or any cluster is contacted for long.

Two layers, so that the whole matrix stays fast:

- in process: each lab's own cells up to its check cell (the set-up cell, the ``parameters`` cell, the check
  cell), run with the bad value injected after the ``parameters`` cell, exactly as papermill injects it;
- through papermill: one bad value per lab, to see the error arrive in the executed notebook.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from labcells import LABS, REPO, lab_cells, run_check_cell

from labkit.params import ParameterError

#: First integer parameter of each lab that counts something (the type and range cases use it).
COUNTS = ("epochs", "rounds", "num_samples", "world_size")


def _cases() -> list[tuple[Path, str, object]]:
    cases = []
    for lab in LABS:
        defaults = lab_cells(lab)[2]
        count = next(name for name in COUNTS if name in defaults)
        cases += [(lab, count, "two"), (lab, count, -1)]
        if "device" in defaults:
            cases.append((lab, "device", "tpu"))
        if "workers" in defaults:
            cases.append((lab, "workers", (os.cpu_count() or 1) + 1))   # more than this machine, no cluster given
        if "data_dir" in defaults:
            cases.append((lab, "data_dir", str(REPO / "README.md")))      # a file, not a folder
        if "address" in defaults:
            cases.append((lab, "address", "127.0.0.1:9"))                 # loopback, nothing listens there
        if "resume" in defaults:
            cases.append((lab, "resume", "last"))                         # nothing to continue
    return cases


CASES = _cases()


@pytest.mark.parametrize("lab, name, value", CASES, ids=[f"{p.stem[:2]}-{n}-{Path(str(v)).name}" for p, n, v in CASES])
def test_bad_parameter_fails_at_the_check_naming_it(lab, name, value, results_tmp, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(REPO)
    with pytest.raises(ParameterError) as err:
        run_check_cell(lab, **{name: value})
    message = str(err.value)
    assert f"'{name}'" in message and repr(value) in message, message
    assert "allowed" in message or "use" in message.lower() or "start one" in message.lower(), message
    assert not list(results_tmp.rglob("*.json")), "a refused run must not write a record"


def _papermill(lab: Path, folder: Path) -> tuple[Path, str]:
    """``papermill LAB out.ipynb -p <count> two`` in a process of its own, results in ``folder/results``."""
    import subprocess
    import sys

    name = next(n for n in COUNTS if n in lab_cells(lab.with_suffix(".py"))[2])
    folder.mkdir(parents=True)
    env = {**os.environ, "LABKIT_RESULTS": str(folder / "results")}
    for var in ("LABKIT_QUICK", "RAY_ADDRESS"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "papermill", str(lab), str(folder / "out.ipynb"), "-k", "python3", "--cwd", str(REPO),
           "-p", name, "two", "--no-progress-bar"]
    subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    return folder, name


@pytest.fixture(scope="module")
def papermill_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every lab through papermill with a bad value, three at a time: each run is mostly the kernel starting
    and the lab importing its libraries, which overlap well (the slow part of this suite otherwise)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("papermill")
    labs = [p.with_suffix(".ipynb") for p in LABS]
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = list(pool.map(lambda lab: _papermill(lab, root / lab.stem), labs))
    return {lab.stem: run for lab, run in zip(labs, runs)}


@pytest.mark.slow
@pytest.mark.parametrize("lab", [p.stem for p in LABS])
def test_bad_parameter_through_papermill_stops_the_notebook_at_the_check_cell(lab, papermill_runs):
    """What a user running ``papermill lab.ipynb out.ipynb -p epochs two`` sees: the notebook stops at the
    check cell with the message, not somewhere deep inside a later cell."""
    import nbformat

    folder, name = papermill_runs[lab]
    nb = nbformat.read(folder / "out.ipynb", as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1 and "check" in failed[0].source, [c.source[:200] for c in failed]
    [error] = [o for o in failed[0].outputs if o.output_type == "error"]
    assert error.ename == "ParameterError" and f"'{name}'" in error.evalue and "'two'" in error.evalue, error.evalue
    later = nb.cells[nb.cells.index(failed[0]) + 1:]
    assert not any(c.get("outputs") for c in later if c.cell_type == "code"), "cells after the check cell ran"
    assert not list((folder / "results").rglob("*.json"))
