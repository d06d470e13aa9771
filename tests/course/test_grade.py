"""`labkit grade` on a small lab in the course's layout: seven kinds of submissions, each gets the points it earned.

The lab has two exercises (``square``: 2 points with a hidden check, ``double``: 1 point), a trained-result cell
and the status table; the submissions are built here from the lab and its student copy, executed with papermill
like a student's Run All.
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import nbformat
import pytest

from labkit.course import cli
from labkit.course.grading import grade
from labkit.course.grading.pool import find_submissions
from labkit.course.grading.questions import read_rubric
from labkit.course.student import student_notebook

CHECK = "nbval-check-output"
code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell


def _lab() -> nbformat.NotebookNode:
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


def _execute(nb: nbformat.NotebookNode, path: Path) -> Path:
    """Run All as a student would (stop at the first error), keeping the outputs."""
    import papermill

    nbformat.write(nb, path)
    try:
        papermill.execute_notebook(str(path), str(path), kernel_name="python3", progress_bar=False, cwd=str(path.parent))
    except Exception:  # noqa: BLE001 - a submission that raises is one of the cases
        pass
    return path


def _replace(nb: nbformat.NotebookNode, old: str, new: str) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        cell.source = cell.source.replace(old, new)
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("grade")
    labs, subs = root / "labs", root / "submissions"
    labs.mkdir()
    subs.mkdir()
    lab = _lab()
    nbformat.write(lab, labs / "01_tiny.ipynb")
    solution = nbformat.from_dict(lab)
    solution.cells = [c for c in solution.cells if "hidden-check" not in c.metadata.get("tags", [])]
    student, _ = student_notebook(lab, "01_tiny.ipynb")
    cases = {
        "solution": solution,
        "untouched": student,
        "wrong": _replace(solution, "return x * x", "return x * abs(x)"),     # passes the public check, not the hidden
        "raises": nbformat.from_dict({**solution, "cells": [*solution.cells[:7], code('raise RuntimeError("boom")'),
                                                            *solution.cells[7:]]}),
        "hangs": nbformat.from_dict({**solution, "cells": [*solution.cells[:6], code("import time\ntime.sleep(10_000)"),
                                                           *solution.cells[6:]]}),
        "cheat": nbformat.from_dict({**_replace(solution, "return x * x", "return 0"), "cells": [
            *_replace(solution, "return x * x", "return 0").cells[:3],
            code("import contextlib, labkit.exercises as ex\n"
                 "ex.reported = lambda q: contextlib.suppress(AssertionError)\nex.STRICT = False\n"
                 "get_ipython().set_custom_exc((AssertionError,), lambda *a, **k: print('PASS'))\n"
                 "def reported(q):\n    return contextlib.suppress(AssertionError)\nprint('PASS')"),
            *_replace(solution, "return x * x", "return 0").cells[3:]]}),
    }
    for name, nb in cases.items():
        folder = subs / name
        folder.mkdir()
        if name == "hangs":                       # never executed by the student: it would not end either
            nbformat.write(nb, folder / "01_tiny.ipynb")
        else:
            _execute(nb, folder / "01_tiny.ipynb")
    edited = nbformat.read(subs / "solution" / "01_tiny.ipynb", as_version=4)
    for cell in edited.cells:
        for out in cell.get("outputs", []):
            if "test accuracy" in out.get("text", ""):
                out["text"] = out["text"].replace("0.900", "0.990")
    (subs / "edited").mkdir()
    nbformat.write(edited, subs / "edited" / "01_tiny.ipynb")
    tick = time.monotonic()
    results, paths = grade(subs, "01", root / "out", jobs=2, timeout=40, cell_timeout=30, labs_dir=labs,
                           echo=lambda line: None)
    return {"results": {r["student"]: r for r in results}, "paths": paths, "root": root, "labs": labs,
            "seconds": time.monotonic() - tick}


def _grades(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["student"]: row for row in csv.DictReader(fh)}


def test_rubric_and_student_copy_keep_hidden_checks_back(tmp_path):
    nbformat.write(_lab(), tmp_path / "01_tiny.ipynb")
    rubric = read_rubric(tmp_path / "01_tiny.ipynb")
    assert [q.name for q in rubric.questions] == ["square", "double"] and rubric.max_points == 5
    assert rubric.questions[0].hidden and not rubric.questions[1].hidden
    student, _ = student_notebook(_lab(), "01_tiny.ipynb")
    assert not any("square(-4)" in c.source for c in student.cells)


@pytest.mark.slow
def test_each_submission_gets_the_points_it_earned(graded):
    rows = _grades(graded["paths"]["grades"])
    assert list(rows)[0] == "max points" and rows["max points"]["square"] == "2.0"
    total = {name: float(row["total"]) for name, row in rows.items()}
    assert total["solution"] == 5.0 and rows["solution"]["status"] == "ok"
    untouched = rows["untouched"]
    assert (untouched["square"], untouched["double"]) == ("0.0", "0.0")
    assert untouched["status"] == "ok" and untouched["runs"] == "1.0"              # reported, ran to the end
    assert total["wrong"] == total["solution"] - 2                                   # exactly the hidden check's question
    res = graded["results"]
    assert res["raises"]["status"] == "error" and "boom" in res["raises"]["reason"] and rows["raises"]["runs"] == "0.0"
    assert res["hangs"]["status"] == "timeout" and res["hangs"]["wall_seconds"] <= 40 + 60
    assert rows["edited"]["reproduces"] == "0.0" and "0.99" in res["edited"]["reproduce_reason"]
    assert rows["solution"]["reproduces"] == "1.0"
    assert rows["cheat"]["square"] == "0.0", res["cheat"]["questions"]


@pytest.mark.slow
def test_feedback_names_hidden_checks_without_their_code(graded):
    out = graded["paths"]["feedback"]
    texts = {p.stem: p.read_text(encoding="utf-8") for p in out.glob("*.md")}
    assert set(texts) == set(graded["results"])
    assert "square(-4)" not in "".join(texts.values())
    assert "square(-4)" not in graded["paths"]["grades"].read_text(encoding="utf-8")
    assert "hidden check failed (square)" in texts["wrong"]
    assert graded["paths"]["summary"].read_bytes().startswith(b"\x89PNG")


def test_find_submissions_reads_both_layouts_and_refuses_bad_input(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("alice_01_tiny.ipynb", "01_tiny-bob.ipynb"):
        nbformat.write(_lab(), flat / name)
    assert [s.student for s in find_submissions(flat, "01_tiny")] == ["alice", "bob"]
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        find_submissions(tmp_path / "flat2" if (tmp_path / "flat2").mkdir() is None else flat, "01_tiny")
    (flat / "carol_01_tiny.ipynb").write_text("{not json")
    with pytest.raises(ValueError, match="carol"):
        find_submissions(flat, "01_tiny")


def test_cli_errors_are_one_line_and_grade_nothing(tmp_path, capsys):
    labs = tmp_path / "labs"
    labs.mkdir()
    nbformat.write(_lab(), labs / "01_tiny.ipynb")
    (tmp_path / "subs").mkdir()
    out = tmp_path / "out"
    assert cli.main(["grade", str(tmp_path / "subs"), "--lab", "09", "--out", str(out), "--labs-dir", str(labs)]) == 2
    assert cli.main(["grade", str(tmp_path / "subs"), "--lab", "01", "--out", str(out), "--labs-dir", str(labs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--lab '09'" in err[0] and "nothing to grade" in err[1]
    assert not out.exists()
    help_text = cli._parser().parse_args(["grade", "x", "--lab", "01", "--out", "y"])
    assert help_text.jobs is None and sys.executable
