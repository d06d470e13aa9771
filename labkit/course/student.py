"""Student versions of the labs: solutions replaced by a stub, outputs cleared.

In a lab, an exercise's solution sits between two comment lines in a code cell::

    def my_scale_lr(lr, world_size, rule):
        # BEGIN SOLUTION
        return lr * world_size if rule == "linear" else lr
        # END SOLUTION

The student copy keeps everything outside the markers and replaces the span (markers included)
with ``raise NotImplementedError("Exercise: complete this cell")`` at the indentation of the
``# BEGIN SOLUTION`` line. The check cells stay, so students see them fail until they solve it; hidden checks (cells tagged
``hidden-check``, kept back for ``labkit grade``) are dropped.
Each copy's "Open in Colab" badge opens the student copy (``student/NN_x.ipynb``), not the lab.

``student/`` is committed (``make student`` writes it); :func:`stale_copies` names every copy that
no longer matches what ``labs/`` would give, so a test fails when someone forgets to regenerate.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat

from labkit.course import colab
from labkit.course.grading.questions import is_hidden
from labkit.files import atomic_path

BEGIN = re.compile(r"^(?P<indent>[ \t]*)#+\s*BEGIN SOLUTION\b")
END = re.compile(r"^[ \t]*#+\s*END SOLUTION\b")
STUB = 'raise NotImplementedError("Exercise: complete this cell")'


class SolutionMarkerError(ValueError):
    """A ``# BEGIN SOLUTION`` without its ``# END SOLUTION`` (or the other way round)."""


def strip_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """Replace every solution span of one cell's source with the stub.

    Returns the new source and the number of spans replaced. ``where`` names the cell in errors.
    """
    out: list[str] = []
    begin_line: int | None = None
    spans = 0
    for number, line in enumerate(source.splitlines(), 1):
        start, end = BEGIN.match(line), END.match(line)
        if start:
            if begin_line is not None:
                raise SolutionMarkerError(f"{where}: line {number} opens '# BEGIN SOLUTION' again; the one on line "
                                          f"{begin_line} has no '# END SOLUTION' before it.")
            begin_line = number
            out.append(start.group("indent") + STUB)
        elif end:
            if begin_line is None:
                raise SolutionMarkerError(f"{where}: line {number} has '# END SOLUTION' without a '# BEGIN SOLUTION' "
                                          "before it.")
            begin_line = None
            spans += 1
        elif begin_line is None:
            out.append(line)
    if begin_line is not None:
        raise SolutionMarkerError(f"{where}: '# BEGIN SOLUTION' on line {begin_line} has no '# END SOLUTION'; "
                                  "close the span in the same cell.")
    return "\n".join(out) + ("\n" if source.endswith("\n") else ""), spans


def student_notebook(nb: nbformat.NotebookNode, name: str = "notebook",
                     folder: str = "student") -> tuple[nbformat.NotebookNode, int]:
    """A student copy of ``nb`` (the original is not changed) and the number of exercises stubbed.

    Its Colab badges open ``folder/<name's file name>`` (the student copy in the repository)."""
    copy = nbformat.from_dict(nb)
    copy.cells = [c for c in copy.cells if not is_hidden(c)]      # instructor-only: never in a student copy
    colab.set_badges(copy, Path(name).name if name.endswith(".ipynb") else f"{name}.ipynb", folder)
    spans = 0
    for index, cell in enumerate(copy.cells):
        if cell.cell_type != "code":
            continue
        cell.source, n = strip_solutions(cell.source, where=f"{name}, cell {index}")
        spans += n
        cell.outputs = []
        cell.execution_count = None
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    copy.metadata.pop("papermill", None)
    return copy, spans


def write_student_versions(labs_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[Path, int]:
    """Write a student copy of every ``*.ipynb`` in ``labs_dir`` into ``out_dir``.

    Returns ``{written path: exercises stubbed}``. All notebooks are checked before anything is
    written, so a marker error leaves ``out_dir`` untouched; each file is written atomically.
    """
    src, dst = Path(labs_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder of lab notebooks.")
    if dst.resolve() == src.resolve():
        raise ValueError(f"OUTDIR {dst} is the labs folder itself; pick another folder so the solutions are kept.")
    notebooks = sorted(p for p in src.glob("*.ipynb") if not p.name.startswith("."))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {src}.")
    copies = {}
    for path in notebooks:
        copies[path.name] = student_notebook(nbformat.read(path, as_version=4), name=str(path))
    written: dict[Path, int] = {}
    for name, (nb, spans) in copies.items():
        target = dst / name
        with atomic_path(target) as tmp:
            nbformat.write(nb, str(tmp))
        written[target] = spans
    return written


def _key(cell) -> tuple:
    return cell.cell_type, cell.source, repr(sorted(cell.get("metadata", {}).items()))


def stale_copies(labs_dir: str | os.PathLike = "labs", out_dir: str | os.PathLike = "student") -> list[str]:
    """One line per student copy in ``out_dir`` that is missing, extra or differs (cell sources and
    metadata) from the copy ``labs_dir`` would give now; empty when ``out_dir`` is up to date."""
    src, dst = Path(labs_dir), Path(out_dir)
    labs = {p.name: p for p in sorted(src.glob("*.ipynb")) if not p.name.startswith(".")}
    found = []
    for name, path in labs.items():
        target = dst / name
        if not target.exists():
            found.append(f"{dst.name}/{name} is missing; run `make student`.")
            continue
        fresh, _ = student_notebook(nbformat.read(path, as_version=4), name=str(path))
        have = nbformat.read(target, as_version=4)
        a, b = [_key(c) for c in fresh.cells], [_key(c) for c in have.cells]
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            found.append(f"{dst.name}/{name} is stale against {src.name}/{name} (from cell {first} on); "
                         "run `make student`.")
    found += [f"{dst.name}/{p.name} has no lab in {src.name}/; delete it or run `make student`."
              for p in sorted(dst.glob("*.ipynb")) if p.name not in labs]
    return found
