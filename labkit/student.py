"""Student versions of the labs: solutions replaced by a stub, outputs cleared.

In a lab, an exercise's solution sits between two comment lines in a code cell::

    def my_scale_lr(lr, world_size, rule):
        # BEGIN SOLUTION
        return lr * world_size if rule == "linear" else lr
        # END SOLUTION

The student copy keeps everything outside the markers and replaces the span (markers included)
with ``raise NotImplementedError("Exercise: complete this cell")`` at the indentation of the
``# BEGIN SOLUTION`` line. The check cells stay, so students see them fail until they solve it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat

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


def student_notebook(nb: nbformat.NotebookNode, name: str = "notebook") -> tuple[nbformat.NotebookNode, int]:
    """A student copy of ``nb`` (the original is not changed) and the number of exercises stubbed."""
    copy = nbformat.from_dict(nb)
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
