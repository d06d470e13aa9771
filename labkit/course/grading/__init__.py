"""``labkit grade``: grade a whole class's submissions of one lab.

    labkit grade SUBMISSIONS --lab 01 --out grades/01 [--jobs N] [--timeout S] [--cell-timeout S]
                 [--tolerance T] [--address ADDR]

- :mod:`.questions` reads the lab's questions, points and hidden checks from the instructor's lab;
- :mod:`.pool` finds the submissions and grades each in its own process, scratch folder and fresh kernel
  (loopback-only network where possible), ``--jobs`` at a time or as Ray tasks on ``--address``;
- :mod:`.execute` runs one submission, then the instructor's checks in its kernel (fresh check modules, strict),
  and compares its trained results with the re-run;
- :mod:`.gradebook` writes ``grades.csv`` (otter-grader's ``final_grades.csv`` columns and max-points row, plus
  runs / reproduces / total / max / percent / status), ``feedback/<student>.md`` and ``summary.png``; the details
  of each result in ``results/<student>.json``.

The output folder is written whole or not at all.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from labkit.course.grading.gradebook import write_gradebook
from labkit.course.grading.pool import default_jobs, find_submissions, grade_all
from labkit.course.grading.questions import read_rubric
from labkit.files import atomic_path, write_json

#: Defaults: a quick lab runs in 1-3 minutes on 2 cores; a hung cell is stopped after 10 minutes.
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_CELL_TIMEOUT_S = 600.0


def find_lab(lab: str, labs_dir: str | Path = "labs") -> Path:
    """The instructor's lab notebook for ``--lab`` (``01``, ``01_baseline`` or a path); a clear error otherwise."""
    from labkit.course.run import find_labs

    try:
        return find_labs([lab], labs_dir)[0]
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--lab {lab!r}: {exc}") from None


def grade(submissions: str | Path, lab: str, out: str | Path, *, jobs: int | None = None,
          timeout: float = DEFAULT_TIMEOUT_S, cell_timeout: float = DEFAULT_CELL_TIMEOUT_S, tolerance: float = 0.05,
          address: str | None = None, labs_dir: str | Path = "labs", quick: bool = False,
          echo: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Grade every submission of ``lab`` under ``submissions`` into ``out``; returns the results and the paths.

    Everything is checked before the first notebook runs (the lab, its rubric, every submission readable), so a
    bad argument grades nothing; ``out`` is replaced whole when grading ends. ``quick`` re-runs every submission in
    quick mode (``LABKIT_QUICK=1``), whatever its parameters say."""
    for name, value in (("--timeout", timeout), ("--cell-timeout", cell_timeout)):
        if not value > 0:
            raise ValueError(f"{name} {value!r}: give the seconds a notebook (or cell) may run, e.g. {name} 600.")
    if not tolerance >= 0:
        raise ValueError(f"--tolerance {tolerance!r}: give an absolute tolerance >= 0, e.g. 0.05.")
    lab_path = find_lab(lab, labs_dir)
    rubric = read_rubric(lab_path)
    found = find_submissions(submissions, lab_path.stem)
    jobs = jobs or default_jobs()
    echo(f"grading {len(found)} submission(s) of {lab_path.stem} ({len(rubric.questions)} questions, "
         f"{rubric.max_points:g} points) " + (f"on the Ray cluster at {address}" if address else f"{jobs} at a time"))
    scratch = Path(tempfile.mkdtemp(prefix="labkit-grade-"))
    try:
        results = grade_all(found, lab_path, scratch, timeout=timeout, cell_timeout=cell_timeout, tolerance=tolerance,
                            jobs=jobs, address=address, quick=quick, echo=echo)
        with atomic_path(out) as tmp:
            write_gradebook(tmp, results, rubric)
            for result in results:          # the details behind each row (status, reasons, machines, Ray node)
                write_json(tmp / "results" / f"{result['student']}.json", result)
            for result in results:
                graded = Path(result.get("scratch", "")) / "graded.ipynb"
                if graded.is_file():
                    (tmp / "graded").mkdir(exist_ok=True)
                    shutil.copy2(graded, tmp / "graded" / f"{result['student']}.ipynb")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(out)
    return results, {"grades": out / "grades.csv", "feedback": out / "feedback", "summary": out / "summary.png"}
