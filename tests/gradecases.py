"""A small lab in the course's layout and the kinds of submissions an instructor gets, for the `labkit grade` tests.

The lab has two exercises (``square``: 2 points with a hidden check, ``double``: 1 point), a trained-result cell
and the status table; the submissions are built from the lab and its student copy, executed with papermill like a
student's Run All: the full solution, the untouched student copy, one exercise wrong (passes its public check, not
the hidden one), a cell that raises, a cell that never ends, a stored result edited, and a submission that
redefines the checks to pass.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

from labkit.course.student import student_notebook

CHECK = "nbval-check-output"
#: The total each kind of submission earns (of 5: square 2, double 1, runs 1, reproduces 1) and why.
EXPECTED_TOTALS = {
    "solution": 5.0,     # everything
    "untouched": 2.0,    # no exercise, but it reports and runs to the end, and its result reproduces
    "wrong": 3.0,        # square's hidden check fails: exactly its 2 points lost
    "raises": 4.0,       # both exercises ran before the raise; it does not run to the end
    "hangs": 3.0,        # both exercises defined before the hang; no end, no result
    "edited": 4.0,       # the stored result does not reproduce
    "cheat": 3.0,        # redefining the checks gains nothing: square still 0
}
code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell


def tiny_lab() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["labkit"] = {"grading": {"runs": 1, "reproduces": 1}}
    nb.cells = [
        md("# Tiny lab"),
        code("quick = False", metadata={"tags": ["parameters"]}),
        code("def square(x):\n    # BEGIN SOLUTION\n    return x * x\n    # END SOLUTION"),
        code('from labkit.exercises import reported\nwith reported("square"):\n'
             '    assert square(3) == 9, f"square(3) = {square(3)}, expected 9: multiply x by itself"\n'
             '    print("✔ square")', metadata={"tags": [CHECK], "labkit": {"question": "square", "points": 2}}),
        code('assert square(-4) == 16, "negative numbers"', metadata={"tags": ["hidden-check"],
                                                                     "labkit": {"hidden": "square"}}),
        code("def double(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION"),
        code('from labkit.exercises import reported\nwith reported("double"):\n'
             '    assert double(5) == 10, "double(5) should be 10"\n    print("✔ double")',
             metadata={"tags": [CHECK], "labkit": {"question": "double", "points": 1}}),
        code('acc = sum(range(10)) / 50\nprint(f"test accuracy {acc:.3f}")', metadata={"tags": [CHECK, "labkit-result"]}),
        code("from labkit.exercises import status_table\nprint(status_table())"),
    ]
    return nb


def execute(nb: nbformat.NotebookNode, path: Path) -> Path:
    """Run All as a student would (stop at the first error), keeping the outputs."""
    import papermill

    nbformat.write(nb, path)
    try:
        papermill.execute_notebook(str(path), str(path), kernel_name="python3", progress_bar=False, cwd=str(path.parent))
    except Exception:  # noqa: BLE001 - a submission that raises is one of the cases
        pass
    return path


def replace(nb: nbformat.NotebookNode, old: str, new: str) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        cell.source = cell.source.replace(old, new)
    return nb


def build_submissions(labs: Path, subs: Path) -> None:
    """Write ``labs/01_tiny.ipynb`` and one folder per kind of submission under ``subs``."""
    labs.mkdir(parents=True, exist_ok=True)
    subs.mkdir(parents=True, exist_ok=True)
    lab = tiny_lab()
    nbformat.write(lab, labs / "01_tiny.ipynb")
    solution = nbformat.from_dict(lab)
    solution.cells = [c for c in solution.cells if "hidden-check" not in c.metadata.get("tags", [])]
    student, _ = student_notebook(lab, "01_tiny.ipynb")
    wrong_square = replace(solution, "return x * x", "return 0")
    cases = {
        "solution": solution,
        "untouched": student,
        "wrong": replace(solution, "return x * x", "return x * abs(x)"),     # passes the public check, not the hidden
        "raises": nbformat.from_dict({**solution, "cells": [*solution.cells[:7], code('raise RuntimeError("boom")'),
                                                            *solution.cells[7:]]}),
        "hangs": nbformat.from_dict({**solution, "cells": [*solution.cells[:6], code("import time\ntime.sleep(10_000)"),
                                                           *solution.cells[6:]]}),
        "cheat": nbformat.from_dict({**solution, "cells": [
            *wrong_square.cells[:3],
            code("import contextlib, labkit.exercises as ex\n"
                 "ex.reported = lambda q: contextlib.suppress(AssertionError)\nex.STRICT = False\n"
                 "get_ipython().set_custom_exc((AssertionError,), lambda *a, **k: print('PASS'))\n"
                 "def reported(q):\n    return contextlib.suppress(AssertionError)\nprint('PASS')"),
            *wrong_square.cells[3:]]}),
    }
    for name, nb in cases.items():
        folder = subs / name
        folder.mkdir()
        if name == "hangs":                       # never executed by the student: it would not end either
            nbformat.write(nb, folder / "01_tiny.ipynb")
        else:
            execute(nb, folder / "01_tiny.ipynb")
    edited = nbformat.read(subs / "solution" / "01_tiny.ipynb", as_version=4)
    for cell in edited.cells:
        for out in cell.get("outputs", []):
            if "test accuracy" in out.get("text", ""):
                out["text"] = out["text"].replace("0.900", "0.990")
    (subs / "edited").mkdir()
    nbformat.write(edited, subs / "edited" / "01_tiny.ipynb")
