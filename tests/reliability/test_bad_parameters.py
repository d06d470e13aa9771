"""Bad parameters, for every lab: each fails at the lab's parameter check, naming the parameter, the value and
what is allowed — before any data is read, any process starts or any cluster is contacted for long.

Two layers, so that the whole matrix stays fast:

- in process: each lab's own cells up to its check cell (the set-up cell, the ``parameters`` cell, the check
  cell), run with the bad value injected after the ``parameters`` cell, exactly as papermill injects it;
- through papermill: one bad value per lab, to see the error arrive in the executed notebook.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import jupytext
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from labkit.params import ParameterError

REPO = Path(__file__).resolve().parents[2]
LABS = sorted((REPO / "labs").glob("[0-9][0-9]_*.py"))
#: First integer parameter of each lab that counts something (the type and range cases use it).
COUNTS = ("epochs", "rounds", "num_samples", "world_size")


def _cells(lab: Path) -> tuple[list[str], str, dict]:
    """The code before the check cell, the check cell, and the ``parameters`` cell's defaults."""
    code = [c for c in jupytext.read(lab).cells if c.cell_type == "code"]
    index = next(i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", []))
    to_python = TransformerManager().transform_cell
    defaults = {}
    for node in ast.parse(code[index].source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return [to_python(c.source) for c in code[:index + 1]], to_python(code[index + 1].source), defaults


def _cases() -> list[tuple[Path, str, object]]:
    cases = []
    for lab in LABS:
        defaults = _cells(lab)[2]
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
    return cases


CASES = _cases()


@pytest.mark.parametrize("lab, name, value", CASES, ids=[f"{p.stem[:2]}-{n}-{Path(str(v)).name}" for p, n, v in CASES])
def test_bad_parameter_fails_at_the_check_naming_it(lab, name, value, results_tmp, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(REPO)
    before, check, _ = _cells(lab)
    namespace: dict = {"__name__": "__main__", "display": print}
    for source in before:
        exec(compile(source, str(lab), "exec"), namespace)
    namespace[name] = value
    with pytest.raises(ParameterError) as err:
        exec(compile(check, str(lab), "exec"), namespace)
    message = str(err.value)
    assert f"'{name}'" in message and repr(value) in message, message
    assert "allowed" in message or "use" in message.lower() or "start one" in message.lower(), message
    assert not list(results_tmp.rglob("*.json")), "a refused run must not write a record"


@pytest.mark.slow
@pytest.mark.parametrize("lab", [p.with_suffix(".ipynb") for p in LABS], ids=[p.stem for p in LABS])
def test_bad_parameter_through_papermill_stops_the_notebook_at_the_check_cell(lab, tmp_path, results_tmp):
    """What a user running ``papermill lab.ipynb out.ipynb -p epochs two`` sees: the notebook stops at the
    check cell with the message, not somewhere deep inside a later cell."""
    import nbformat
    import papermill as pm

    name = next(n for n in COUNTS if n in _cells(lab.with_suffix(".py"))[2])
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(lab), str(tmp_path / "out.ipynb"), parameters={name: "two"}, progress_bar=False,
                            cwd=str(REPO), kernel_name="python3")
    assert err.value.ename == "ParameterError" and f"'{name}'" in err.value.evalue and "'two'" in err.value.evalue
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1 and "check" in failed[0].source, failed[0].source[:200]
    assert not list(results_tmp.rglob("*.json"))
