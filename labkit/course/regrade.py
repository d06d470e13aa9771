"""Instructor regrade: re-execute submitted notebooks with nbval and check that they reproduce.

Students submit executed notebooks. :func:`regrade` re-runs each one in a fresh kernel of the
current environment (``pytest --nbval-lax --nbval-current-env``) and compares the outputs of the
cells tagged ``nbval-check-output`` (configuration echo, class counts, parameter counts, exercise
checks, rounded final metrics) with what the submission shows, after the substitutions in
``labkit/course/nbval_sanitize.cfg`` (timings, dates, run ids, addresses, paths, progress bars).
What is the same on every machine is compared exactly; cells tagged ``labkit-result`` (each lab's
trained headline metrics) number by number within a tolerance (:mod:`labkit.course.nbval_tolerance`,
default 0.05), because a notebook trained on a GPU in mixed precision does not end with exactly
the CPU's numbers. A result typed in by hand that moved further still fails; a different training
time does not. The report says where each notebook was executed and where it was re-run.

The re-executed labs write their run records and plots into a scratch copy of the results
folder, so regrading never adds runs to the course's ``results/``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nbformat

from labkit.course.nbval_tolerance import DEFAULT_TOLERANCE, RESULT_TAG
from labkit.env import ENV_MIME, describe_machine, machine, pick_device, project_root
from labkit.results import results_root

#: The sanitize file shipped with labkit (nbval's ``--nbval-sanitize-with``).
SANITIZE_FILE = Path(__file__).with_name("nbval_sanitize.cfg")

_ANSI = re.compile(r"\x1b\[[0-9;]*m|#x1B\[[0-9;]*m")


@dataclass
class CellResult:
    """One code cell of a regraded notebook (nbval tests code cells, numbered from 0)."""

    cell: int            # index among all cells of the notebook (as nbformat counts)
    code_cell: int       # index among code cells (nbval's "Cell N")
    first_line: str
    checked: bool        # whether its output is compared
    result: bool = False  # a trained result, compared within the tolerance
    outcome: str = "not run"   # "passed", "failed", "skipped", "not run"
    reason: str = ""     # nbval's one-line reason ("Cell outputs differ", ...)
    diff: list[str] = field(default_factory=list)


@dataclass
class NotebookReport:
    """The regrade of one notebook: a result per code cell, or an ``error`` when nbval could
    not run it at all (e.g. the file is not a notebook)."""

    path: Path
    cells: list[CellResult] = field(default_factory=list)
    error: str | None = None
    executed_on: dict | None = None     # the machine note the submitted notebook carries
    rerun_on: dict | None = None        # this machine
    tolerance: float = DEFAULT_TOLERANCE

    def count(self, outcome: str) -> int:
        """How many code cells ended with ``outcome``."""
        return sum(c.outcome == outcome for c in self.cells)

    @property
    def checked(self) -> int:
        """Number of cells whose outputs are compared."""
        return sum(c.checked for c in self.cells)

    @property
    def failures(self) -> list[CellResult]:
        """The cells that failed (output differs, or the cell raised)."""
        return [c for c in self.cells if c.outcome == "failed"]

    @property
    def ok(self) -> bool:
        """True when nbval ran and no cell failed."""
        return self.error is None and not self.failures and self.count("passed") > 0


def sanitize(text: str) -> str:
    """``text`` as nbval compares it: the substitutions of :data:`SANITIZE_FILE` applied in order.

    Handy to check that a lab's checked output survives sanitising (its results stay visible).
    """
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns(SANITIZE_FILE.read_text()):
        text = re.sub(regex, replace, text)
    return text


def _first_line(source: str) -> str:
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 70 else line[:67] + "..."


def notebook_cells(path: str | os.PathLike, lax: bool = True) -> list[CellResult]:
    """The code cells nbval will test in ``path``, with whether each output is checked (using
    nbval's own tag and comment rules: ``nbval-check-output``, ``nbval-ignore-output``, ...)."""
    from nbval.plugin import find_comment_markers, find_metadata_tags

    nb = nbformat.read(str(path), as_version=4)
    cells, code = [], 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        options = dict(find_metadata_tags(cell.metadata))
        options.update(dict(find_comment_markers(cell.source)))
        checked = bool(options.get("check", not lax)) and not options.get("skip", False)
        result = checked and RESULT_TAG in cell.metadata.get("tags", [])
        cells.append(CellResult(index, code, _first_line(cell.source), checked, result))
        code += 1
    return cells


def machine_note(path: str | os.PathLike) -> dict | None:
    """The machine a notebook was executed on, from the note :func:`labkit.params.check` leaves."""
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if ENV_MIME in output.get("data", {}):
                return dict(output["data"][ENV_MIME])
    return None


def short_diff(message: str, max_lines: int = 8) -> tuple[str, list[str]]:
    """nbval's failure text → (one-line reason, a few diff lines).

    Output differences become ``submitted: ...`` / ``re-run:    ...`` lines (pytest's diff marks
    the submitted notebook's text with ``+`` and the re-executed text with ``-``); an exception
    becomes its last traceback line.
    """
    text = _ANSI.sub("", message)
    found = re.search(r"Cell \d+: (.+)", text)
    reason = found.group(1).strip() if found else (text.strip().splitlines() or ["failed"])[0]
    lines = text.splitlines()
    out: list[str] = []
    marker = next((i for i, ln in enumerate(lines) if "assert reference_output == test_output failed" in ln), None)
    outside = next((ln.strip() for ln in lines if ln.strip().startswith("trained result outside the tolerance")), None)
    if outside:
        reason = outside
    if marker is not None:
        mismatch = next((ln.strip() for ln in lines if ln.strip().startswith("mismatch")), "")
        if mismatch:
            out.append(mismatch.replace("mismatch", "output", 1) + " differs:")
        for ln in lines[marker + 1:]:
            body = ln[2:] if ln.startswith("  ") else ln
            if body.startswith("+ "):
                out.append("  submitted: " + body[2:])
            elif body.startswith("- "):
                out.append("  re-run:    " + body[2:])
    elif "Traceback:" in text:
        tail = [ln.strip() for ln in text.split("Traceback:", 1)[1].splitlines() if ln.strip()]
        errors = [ln for ln in tail if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
        out.extend(errors[-1:] or tail[:max_lines])
    if len(out) > max_lines:
        out = out[:max_lines] + [f"  ... ({len(out) - max_lines} more lines)"]
    return reason, out


def _parse_junit(xml_path: Path) -> dict[int, tuple[str, str]]:
    """``{code cell number: (outcome, failure text)}`` from pytest's JUnit XML report."""
    results: dict[int, tuple[str, str]] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        found = re.fullmatch(r"Cell (\d+)", case.get("name", ""))
        if not found:
            continue
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, text = "failed", (child.text or child.get("message", ""))
            elif child.tag == "skipped" and outcome == "passed":
                outcome, text = "skipped", child.get("message", "")
        results[int(found.group(1))] = (outcome, text)
    return results


def _scratch_results(scratch: Path) -> Path:
    """Copy the run records (JSON only) of the current results folder into ``scratch``, so labs
    that compare with earlier runs see the same records, while new files stay out of results/."""
    src = results_root()
    if src.is_dir():
        for record in src.glob("*/*.json"):
            if not record.name.startswith("."):
                target = scratch / record.parent.name / record.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(record, target)
    return scratch


def regrade_notebook(path: str | os.PathLike, *, lax: bool = True, quick: bool = False,
                     cell_timeout: float | None = None, exitfirst: bool = False,
                     tolerance: float = DEFAULT_TOLERANCE) -> NotebookReport:
    """Re-execute one notebook with nbval and compare its checked outputs.

    ``lax=False`` compares every cell's output (nbval's full mode) instead of only the tagged
    ones. ``quick`` sets ``LABKIT_QUICK=1`` for the re-run (notebooks executed by ``labkit run
    --quick`` already carry ``quick = True`` in their injected parameters). ``exitfirst`` stops
    at the first failing cell (faster; later cells are reported as "not run"). ``tolerance``: how
    far (absolute) each number of a ``labkit-result`` cell may move.
    """
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r}: need a number >= 0 (e.g. 0.05 for metrics printed in [0, 1]).")
    path = Path(path).resolve()
    report = NotebookReport(path, tolerance=float(tolerance), rerun_on=machine(pick_device("auto")))
    if not path.is_file():
        report.error = f"{path} does not exist"
        return report
    try:
        report.cells = notebook_cells(path, lax)
        report.executed_on = machine_note(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable submission is reported, not raised
        report.error = f"not a readable notebook: {exc}"
        return report
    with tempfile.TemporaryDirectory(prefix="labkit-regrade-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "pytest.ini").write_text("[pytest]\n")
        junit = tmp / "report.xml"
        scratch = _scratch_results(tmp / "results")
        cmd = [sys.executable, "-m", "pytest", "--nbval-lax" if lax else "--nbval", "--nbval-current-env",
               "--nbval-sanitize-with", str(SANITIZE_FILE), "-p", "no:cacheprovider", "-p", "labkit.course.nbval_tolerance",
               "--noconftest",
               "-c", str(tmp / "pytest.ini"), "--rootdir", str(tmp), "--color=no", "-vv",
               "--junitxml", str(junit), str(path)]
        if cell_timeout:
            cmd[4:4] = ["--nbval-cell-timeout", str(cell_timeout)]
        if exitfirst:
            cmd[4:4] = ["--exitfirst"]
        env = {**os.environ, "LABKIT_RESULTS": str(scratch), "LABKIT_REGRADE_TOLERANCE": repr(float(tolerance)),
               "LABKIT_HOME": os.environ.get("LABKIT_HOME") or str(project_root())}
        if quick:
            env["LABKIT_QUICK"] = "1"
        proc = subprocess.run(cmd, cwd=env["LABKIT_HOME"], env=env, capture_output=True, text=True)
        results = _parse_junit(junit) if junit.is_file() else {}
    for cell in report.cells:
        if cell.code_cell in results:
            cell.outcome, text = results[cell.code_cell]
            if cell.outcome == "failed":
                cell.reason, cell.diff = short_diff(text)
    if not results:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        report.error = f"nbval did not run (pytest exit status {proc.returncode}):\n{tail}"
    return report


def regrade(paths: Sequence[str | os.PathLike], *, lax: bool = True, quick: bool = False,
            cell_timeout: float | None = None, exitfirst: bool = False,
            tolerance: float = DEFAULT_TOLERANCE) -> list[NotebookReport]:
    """Regrade several notebooks, one fresh kernel each; see :func:`regrade_notebook`."""
    return [regrade_notebook(p, lax=lax, quick=quick, cell_timeout=cell_timeout, exitfirst=exitfirst,
                             tolerance=tolerance) for p in paths]


def format_reports(reports: Sequence[NotebookReport]) -> str:
    """A plain-text table (notebook, cells, checked, of them results within the tolerance, passed,
    failed, result), then per notebook where it was executed and re-run, and each failed cell with
    its first source line and a short diff."""
    header = ("notebook", "cells", "checked", "results", "passed", "failed", "result")
    rows = []
    for r in reports:
        result = "ERROR" if r.error else "ok" if r.ok else "FAILED"
        rows.append((r.path.name, str(len(r.cells)), str(r.checked), str(sum(c.result for c in r.cells)),
                     str(r.count("passed")), str(r.count("failed")), result))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(row).rstrip() for row in rows)]
    details: dict[str, list[str]] = defaultdict(list)
    for r in reports:
        details[r.path.name] += [f"  executed on: {describe_machine(r.executed_on)}",
                                 f"  re-run on:   {describe_machine(r.rerun_on)}; results within ±{r.tolerance:g}"]
        if r.error:
            details[r.path.name].append("  " + r.error.replace("\n", "\n    "))
        for c in r.failures:
            kind = "checked" if c.checked else "unchecked"
            details[r.path.name].append(f"  ✗ cell {c.cell} (nbval Cell {c.code_cell}, {kind}) `{c.first_line}`: {c.reason}")
            details[r.path.name].extend("      " + d for d in c.diff)
        if not r.error and r.count("not run"):
            details[r.path.name].append(f"  {r.count('not run')} cells not run (nbval stopped early)")
    for name, text in details.items():
        lines += ["", f"{name}:", *text]
    bad = [r for r in reports if not r.ok]
    lines += ["", f"{len(reports) - len(bad)} of {len(reports)} notebooks reproduce"
              + ("." if not bad else f"; not reproduced: {', '.join(r.path.name for r in bad)}.")]
    return "\n".join(lines)
