"""`labkit grade` on the real labs (issue #30's acceptance): seven kinds of Lab 01 submissions and three of Lab 02
(a Ray lab), built from the course run's executed labs and the student copies, graded in quick mode two at a time
(``--jobs 2``) and, for Lab 02, again as Ray tasks on a two-node cluster on loopback (``--address``).

Lab 01 has one question (``class_weights``, 2 points, a public and a hidden check), plus 1 point for running to the
end and 1 for trained results that reproduce; Lab 02 three questions (1 + 1 + 2 points) plus the same two.

Opt-in: grading re-runs every submission (about 15 lab runs, ~15 min on two cores), more than CI's budget holds, so
these tests run only with ``LABKIT_GRADE_REAL_LABS=1`` (``make grade-check``). CI grades the same seven kinds of
submission on a small lab in the course's layout (tests/course/test_grade.py, tests/reliability/test_grade_on_cluster.py).
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.course.grading import grade
from labkit.course.student import student_notebook

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("LABKIT_GRADE_REAL_LABS"),
                                 reason="re-runs ~15 labs (~15 min on 2 cores): set LABKIT_GRADE_REAL_LABS=1 "
                                        "(make grade-check)")]
REPO = Path(__file__).resolve().parents[2]
code = nbformat.v4.new_code_cell


def _solution(course, lab: str) -> nbformat.NotebookNode:
    """The lab as a student who solved it submits it: the course run's executed copy (quick mode), without the
    instructor's hidden checks."""
    nb = nbformat.read(course["results"] / "executed" / f"{lab}.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if "hidden-check" not in c.metadata.get("tags", [])]
    return nb


def _edit(nb: nbformat.NotebookNode, old: str, new: str) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(nb)
    hits = 0
    for cell in nb.cells:
        if old in cell.source:
            cell.source, hits = cell.source.replace(old, new), hits + 1
    assert hits, f"{old!r} not found: the test's edit no longer matches the lab"
    return nb


def _insert_before(nb: nbformat.NotebookNode, heading: str, cell) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(nb)
    at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and heading in c.source)
    nb.cells.insert(at, cell)
    return nb


def _totals(out: Path) -> dict[str, float]:
    with open(out / "grades.csv", newline="", encoding="utf-8") as fh:
        return {r["student"]: float(r["total"]) for r in csv.DictReader(fh) if r["student"] != "max points"}


WRONG_WEIGHTS = ("    inverse = [1.0 / c for c in counts]\n    return [w * len(inverse) / sum(inverse) for w in inverse]",
                 "    return [1.0 / c for c in counts]")


def _submissions(course, root: Path) -> Path:
    """The ten submissions, one folder per student under ``root/<lab>/``. An edited source keeps the solution's
    stored outputs, as a student's notebook does (no extra runs before grading)."""
    lab01, lab02 = _solution(course, "01_baseline"), _solution(course, "02_ray")
    untouched = {lab: student_notebook(nbformat.read(REPO / "labs" / f"{lab}.ipynb", as_version=4), f"{lab}.ipynb")[0]
                 for lab in ("01_baseline", "02_ray")}
    before_record = "## 7. Save the run record"
    cases = {
        "s01_solution": lab01,
        "s01_untouched": untouched["01_baseline"],
        "s01_wrong": _edit(lab01, *WRONG_WEIGHTS),
        "s01_raises": _insert_before(lab01, before_record, code('raise RuntimeError("boom")')),
        "s01_hangs": _insert_before(lab01, before_record, code("import time\ntime.sleep(10_000)")),
        "s01_cheat": _insert_before(_edit(lab01, *WRONG_WEIGHTS), "## 6. Evaluate", code(
            "import contextlib, labkit.exercises as ex\nex.reported = lambda q: contextlib.suppress(AssertionError)\n"
            "ex.STRICT = False\ndef reported(q):\n    return contextlib.suppress(AssertionError)\n"
            "print('✔ class_weights: PASS')")),
        "s02_solution": lab02,
        "s02_untouched": untouched["02_ray"],
        "s02_wrong": _edit(lab02, '    if rule == "linear":\n        return lr * world_size',
                           '    if rule == "linear":\n        return lr + world_size'),
    }
    edited, moved = nbformat.from_dict(lab01), 0
    for cell in edited.cells:
        if "labkit-result" in cell.metadata.get("tags", []):
            for out in cell.outputs:
                if out.get("output_type") == "stream" and not moved:     # the first metric, e.g. "acc 0.81" → 0.99
                    out["text"], moved = re.subn(r"\b0\.\d\d\b", lambda m: f"{min(0.99, float(m.group()) + 0.2):.2f}",
                                                 out["text"], count=1)
    assert moved, "no trained result printed in Lab 01's labkit-result cell: the test's edit no longer matches"
    cases["s01_edited"] = edited
    for name, nb in cases.items():
        lab = "01_baseline" if name.startswith("s01") else "02_ray"
        where = "hang" if name == "s01_hangs" else lab
        (root / where / name).mkdir(parents=True)
        nbformat.write(nb, root / where / name / f"{lab}.ipynb")
    return root


@pytest.fixture(scope="module")
def submissions(course, tmp_path_factory) -> Path:
    return _submissions(course, tmp_path_factory.mktemp("subs"))


def _check_hidden_checks_stay_private(out: Path, lab: str) -> None:
    hidden = [c.source for c in nbformat.read(REPO / "labs" / f"{lab}.ipynb", as_version=4).cells
              if "hidden-check" in c.metadata.get("tags", [])]
    written = "".join(p.read_text(encoding="utf-8") for p in [out / "grades.csv", *(out / "feedback").glob("*.md")])
    lines = [line.strip() for src in hidden for line in src.splitlines() if len(line.strip()) > 20]
    assert lines and not [line for line in lines if line in written]


def _check_lab02(totals: dict[str, float], by: dict[str, dict]) -> None:
    """Lab 02 (out of 6): the solution earns everything, the untouched copy the point for running to the end (it
    stored no results to reproduce), the wrong lr rule loses exactly its 2 points (quick mode trains with
    ``lr_scaling="none"``, so the run still reproduces)."""
    assert totals["s02_solution"] == 6, by.get("s02_solution")
    assert totals["s02_untouched"] == 1, by.get("s02_untouched")
    assert totals["s02_wrong"] == 4, by.get("s02_wrong")
    if by:
        assert not by["s02_wrong"]["questions"]["lr_scaling"]["passed"]


def test_lab01_and_lab02_submissions_get_the_points_they_earned(submissions, tmp_path):
    """Each submission's total, graded two at a time; the hang alone, with a short notebook time limit."""
    echo = lambda line: None  # noqa: E731
    res01, _ = grade(submissions / "01_baseline", "01", tmp_path / "g01", jobs=2, timeout=1500, cell_timeout=1200,
                     echo=echo, labs_dir=REPO / "labs", quick=True)
    res02, _ = grade(submissions / "02_ray", "02", tmp_path / "g02", jobs=2, timeout=1500, cell_timeout=1200,
                     echo=echo, labs_dir=REPO / "labs", quick=True)
    hang, _ = grade(submissions / "hang", "01", tmp_path / "ghang", jobs=1, timeout=120, cell_timeout=1200,
                    echo=echo, labs_dir=REPO / "labs", quick=True)
    by = {r["student"]: r for r in res01 + res02 + hang}
    t01, t02 = _totals(tmp_path / "g01"), _totals(tmp_path / "g02")
    assert t01["s01_solution"] == 4, by["s01_solution"]
    assert t01["s01_untouched"] == 1 and by["s01_untouched"]["ran_to_end"], by["s01_untouched"]  # ran, nothing else
    assert t01["s01_wrong"] == t01["s01_solution"] - 2, by["s01_wrong"]                           # exactly its points
    assert by["s01_raises"]["status"] == "error" and "boom" in by["s01_raises"]["reason"], by["s01_raises"]
    assert by["s01_hangs"]["status"] == "timeout" and by["s01_hangs"]["wall_seconds"] <= 120 + 60, by["s01_hangs"]
    assert t01["s01_edited"] == 3 and not by["s01_edited"]["reproduces"], by["s01_edited"]
    assert t01["s01_cheat"] == t01["s01_wrong"], by["s01_cheat"]                                   # gains nothing
    _check_lab02(t02, by)
    _check_hidden_checks_stay_private(tmp_path / "g01", "01_baseline")
    _check_hidden_checks_stay_private(tmp_path / "g02", "02_ray")


def test_lab02_grades_are_the_same_as_ray_tasks_on_a_two_node_cluster(submissions, tmp_path):
    """``labkit grade --address``: each Lab 02 submission a Ray task, the lab's own Ray run inside it."""
    sys.path.insert(0, str(REPO / "tests" / "reliability"))
    from loopback_cluster import LoopbackCluster

    with LoopbackCluster(cpus=2) as cluster:
        cluster.add_node("head", head=True)
        cluster.add_node("second")
        done = subprocess.run([sys.executable, "-m", "labkit", "grade", str(submissions / "02_ray"), "--lab", "02",
                               "--out", str(tmp_path / "remote"), "--timeout", "1500", "--quick",
                               "--labs-dir", str(REPO / "labs"), "--address", cluster.address],
                              env=cluster.driver_env(), capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr[-3000:]
    _check_lab02(_totals(tmp_path / "remote"), {})
