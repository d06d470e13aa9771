"""`labkit grade` on a small lab in the course's layout: seven kinds of submissions, each gets the points it earned.

The lab and the submissions are built by ``tests/gradecases.py``.
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import nbformat
import pytest
from gradecases import EXPECTED_TOTALS, build_submissions, tiny_lab

from labkit.course import cli
from labkit.course.grading import grade
from labkit.course.grading.pool import find_submissions
from labkit.course.grading.questions import read_rubric
from labkit.course.student import student_notebook


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("grade")
    labs, subs = root / "labs", root / "submissions"
    build_submissions(labs, subs)
    tick = time.monotonic()
    results, paths = grade(subs, "01", root / "out", jobs=2, timeout=40, cell_timeout=30, labs_dir=labs,
                           echo=lambda line: None)
    return {"results": {r["student"]: r for r in results}, "paths": paths, "root": root, "labs": labs,
            "seconds": time.monotonic() - tick}


def _grades(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["student"]: row for row in csv.DictReader(fh)}


def test_rubric_and_student_copy_keep_hidden_checks_back(tmp_path):
    nbformat.write(tiny_lab(), tmp_path / "01_tiny.ipynb")
    rubric = read_rubric(tmp_path / "01_tiny.ipynb")
    assert [q.name for q in rubric.questions] == ["square", "double"] and rubric.max_points == 5
    assert rubric.questions[0].hidden and not rubric.questions[1].hidden
    student, _ = student_notebook(tiny_lab(), "01_tiny.ipynb")
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
    assert {name: total[name] for name in EXPECTED_TOTALS} == EXPECTED_TOTALS


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
        nbformat.write(tiny_lab(), flat / name)
    assert [s.student for s in find_submissions(flat, "01_tiny")] == ["alice", "bob"]
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        find_submissions(tmp_path / "flat2" if (tmp_path / "flat2").mkdir() is None else flat, "01_tiny")
    (flat / "carol_01_tiny.ipynb").write_text("{not json")
    with pytest.raises(ValueError, match="carol"):
        find_submissions(flat, "01_tiny")


def test_cli_errors_are_one_line_and_grade_nothing(tmp_path, capsys):
    labs = tmp_path / "labs"
    labs.mkdir()
    nbformat.write(tiny_lab(), labs / "01_tiny.ipynb")
    (tmp_path / "subs").mkdir()
    out = tmp_path / "out"
    assert cli.main(["grade", str(tmp_path / "subs"), "--lab", "09", "--out", str(out), "--labs-dir", str(labs)]) == 2
    assert cli.main(["grade", str(tmp_path / "subs"), "--lab", "01", "--out", str(out), "--labs-dir", str(labs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--lab '09'" in err[0] and "nothing to grade" in err[1]
    assert not out.exists()
    help_text = cli._parser().parse_args(["grade", "x", "--lab", "01", "--out", "y"])
    assert help_text.jobs is None and sys.executable
