"""A lab's cells as the tests read them: the code up to its ``parameters`` cell, its check cell (the next
one), and the parameters' defaults, from the lab's jupytext source ``labs/NN_name.py``."""
from __future__ import annotations

import ast
from pathlib import Path

import jupytext
from IPython.core.inputtransformer2 import TransformerManager

REPO = Path(__file__).resolve().parents[1]
LABS = sorted((REPO / "labs").glob("[0-9][0-9]_*.py"))


def lab_cells(lab: Path) -> tuple[list[str], str, dict]:
    """The code before the check cell (as Python, IPython's syntax turned into calls), the check cell, and
    the ``parameters`` cell's defaults."""
    code = [c for c in jupytext.read(lab).cells if c.cell_type == "code"]
    index = next(i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", []))
    to_python = TransformerManager().transform_cell
    defaults = {}
    for node in ast.parse(code[index].source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return [to_python(c.source) for c in code[:index + 1]], to_python(code[index + 1].source), defaults


def run_check_cell(lab: Path, **override) -> dict:
    """Run the lab's cells up to and including its check cell, as papermill would with ``-p`` overrides;
    returns the notebook's namespace."""
    before, check, _ = lab_cells(lab)
    namespace: dict = {"__name__": "__main__", "display": print}
    for source in before:
        exec(compile(source, str(lab), "exec"), namespace)
    namespace.update(override)
    exec(compile(check, str(lab), "exec"), namespace)
    return namespace


def function_source(lab: Path, name: str) -> str:
    """The source of the function ``name`` as a code cell of the lab's jupytext source defines it (top level)."""
    to_python = TransformerManager().transform_cell
    for cell in jupytext.read(lab).cells:
        if cell.cell_type != "code" or f"def {name}(" not in cell.source:
            continue
        source = to_python(cell.source)
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return ast.get_source_segment(source, node, padded=True)
    raise AssertionError(f"{lab.name} defines no function {name}() in a code cell")


def code_lines(lab: Path, name: str) -> list[str]:
    """The lines of code of the function ``name`` in ``lab``: neither blank nor only a comment (the ``def`` line
    and the docstring count). A test bounds their number so that a taught function stays readable as its lesson."""
    return [line for line in function_source(lab, name).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def question_cells(lab: Path) -> dict[str, dict]:
    """The lab's graded questions, from its jupytext source: ``{question: {"points", "public": source, "hidden":
    [sources]}}`` (``hidden`` lists the cells of ``metadata.labkit.hidden`` naming that question, in order)."""
    out: dict[str, dict] = {}
    cells = [c for c in jupytext.read(lab).cells if c.cell_type == "code"]
    for cell in cells:
        meta = cell.metadata.get("labkit", {})
        if "question" in meta:
            out[meta["question"]] = {"points": meta.get("points"), "public": cell.source, "hidden": []}
    for cell in cells:
        name = cell.metadata.get("labkit", {}).get("hidden")
        if name is not None:
            out.setdefault(name, {"points": None, "public": None, "hidden": []})["hidden"].append(cell.source)
    return out


def run_hidden_checks(lab: Path, question: str, namespace: dict) -> None:
    """Run the hidden check cells of ``question`` in ``namespace`` (holding the answer under test, as the graded
    kernel does); an ``AssertionError`` (or any error) means the answer fails them."""
    hidden = question_cells(lab)[question]["hidden"]
    assert hidden, f"{lab.name} has no hidden check for {question!r}"
    for source in hidden:
        exec(compile(TransformerManager().transform_cell(source), f"{lab.name}:hidden:{question}", "exec"), namespace)


def answer_namespace(lab: Path, *functions: str, source: str | None = None) -> dict:
    """A namespace like the lab's kernel for an exercise: the usual imports, ``cfg`` (the parameters' defaults) and
    either the lab's own ``functions`` (its solutions) or, with ``source``, the answer written there."""
    import math
    import types

    import numpy as np
    import torch
    from torch import nn

    namespace: dict = {"__name__": "__main__", "math": math, "np": np, "torch": torch, "nn": nn, "Path": Path,
                       "cfg": types.SimpleNamespace(**lab_cells(lab)[2])}
    for name in functions:
        exec(compile(function_source(lab, name), f"{lab.name}:{name}", "exec"), namespace)
    if source is not None:
        exec(compile(source, f"{lab.name}:answer", "exec"), namespace)
    return namespace


def assert_hidden_check_earns_its_place(lab: Path, question: str, solution: tuple[str, ...], wrong: str) -> None:
    """The hidden check of ``question`` (kept back for ``labkit grade``, never in a student copy) passes the lab's
    solution (the functions named in ``solution``) and fails ``wrong``, a plausible answer that the public check
    lets through: the reason it exists. The public check runs as in grading (``STRICT``: it raises)."""
    import pytest

    import labkit.exercises as exercise_kit

    strict, exercise_kit.STRICT = exercise_kit.STRICT, True
    try:
        run_hidden_checks(lab, question, answer_namespace(lab, *solution))
        namespace = answer_namespace(lab, source=wrong)
        exec(question_cells(lab)[question]["public"], namespace)      # the public check lets it through ...
        with pytest.raises((AssertionError, TypeError)):
            run_hidden_checks(lab, question, namespace)                 # ... the hidden check does not
    finally:
        exercise_kit.STRICT = strict
