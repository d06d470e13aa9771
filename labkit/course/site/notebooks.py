"""Lab pages of the course website: each executed lab turned into its student copy, outputs kept.

The site never re-executes a lab to render it. It takes the course run's executed copy
(``results/executed/NN_*.ipynb``) and applies the student transform cell by cell
(:mod:`labkit.course.student`): hidden-check cells are dropped, solution spans become the stub. A
cell whose source the transform changed loses its outputs (they came from the solution), and so does
every exercise check cell (``metadata.labkit.question``: its output would show the solution's ✔). Every
other cell keeps the outputs the course run produced.

Outputs are made safe to publish: Jupyter widget views (tqdm bars) are left out (a widget would load
its JavaScript from a CDN, and its text form is its first state, "0%"), and absolute paths of the
build machine are replaced by short relative ones.
"""
from __future__ import annotations

import os
import re
import sys
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterable

import nbformat

from labkit.course import colab
from labkit.course.grading.questions import is_hidden
from labkit.course.student import strip_solutions

#: Tag papermill gives the cell it injects with the run's parameters.
INJECTED = "injected-parameters"
#: Output MIME types never published (they need a live kernel or JavaScript from the web).
DROPPED_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
_TMP = re.compile(r"(?<![\w.])/tmp/[^\s'\"<>)\]]*")
_BAR = re.compile(r"!{10,}")


def lab_cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """Cell types and sources of a lab, without papermill's injected-parameters cell: what decides
    whether an executed copy still matches its lab."""
    return [(c.cell_type, c.source) for c in nb.cells if INJECTED not in c.metadata.get("tags", [])]


def is_fresh(executed: str | os.PathLike, lab: str | os.PathLike) -> bool:
    """Whether ``executed`` exists and was run from the current cells of the lab notebook ``lab``
    (compared by content, not file times: a fresh clone gives every file a new time)."""
    executed = Path(executed)
    if not executed.is_file():
        return False
    try:
        ran = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001 - an unreadable executed copy is simply not fresh
        return False
    return lab_cells(ran) == lab_cells(nbformat.read(lab, as_version=4))


def path_replacements(results: str | os.PathLike, courses: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """``(absolute path, shown instead)`` pairs, longest first: the results folder → ``results``, each course
    folder (where the labs ran, where the site is built) → ``.``, Python's prefix → ``<python>``, the home
    folder → ``~``."""
    pairs = []
    named = [(results, "results"), *((c, ".") for c in courses), (sys.prefix, "<python>"),
             (sys.base_prefix, "<python>"), (Path.home(), "~")]
    for folder, shown in named:
        if folder and len(Path(folder).parts) > 1:
            pairs.append((str(Path(folder).expanduser().resolve()), shown))
            pairs.append((str(Path(folder).expanduser()), shown))
    return sorted(set(pairs), key=lambda p: -len(p[0]))


def course_folder(executed: nbformat.NotebookNode) -> Path | None:
    """The course folder a lab ran in: papermill's ``input_path`` is ``<course>/labs/NN_x.ipynb``."""
    source = executed.metadata.get("papermill", {}).get("input_path")
    return Path(source).parent.parent if source and Path(source).is_absolute() else None


def scrub(text: str, replacements: Iterable[tuple[str, str]]) -> str:
    """``text`` with every listed absolute path, and any ``/tmp/...`` path, replaced by a relative one; a
    stand-in's ``!!`` notice box (:func:`labkit.data.cache.notice_box`) keeps its right border straight."""
    for old, new in replacements:
        if old not in ("/", ""):
            text = text.replace(old, new)
    return _reframe(_TMP.sub(lambda m: "<tmp>/" + Path(m.group(0)).name, text))


def _reframe(text: str) -> str:
    """Pad each ``!! … !!`` line back to the width of the ``!!!…`` bar above it (a shorter path left it ragged)."""
    if not _BAR.search(text):
        return text
    lines, width = text.split("\n"), 0
    for i, line in enumerate(lines):
        if _BAR.fullmatch(line):
            width = len(line)
        elif width and line.startswith("!! ") and line.endswith(" !!") and len(line) <= width:
            lines[i] = f"!! {line[3:-3].rstrip():<{width - 6}} !!"
        elif not line.startswith("!! "):
            width = 0                              # the box ended
    return "\n".join(lines)


def _scrub_output(output: nbformat.NotebookNode, replacements: list[tuple[str, str]]) -> None:
    if "text" in output:
        output["text"] = scrub(output["text"] if isinstance(output["text"], str) else "".join(output["text"]),
                               replacements)
    if "traceback" in output:
        output["traceback"] = [scrub(line, replacements) for line in output["traceback"]]
    data = output.get("data", {})
    for mime in DROPPED_MIME:
        data.pop(mime, None)
    for mime, value in list(data.items()):
        if not mime.startswith("image/") and isinstance(value, (str, list)):     # text, html, svg, latex
            data[mime] = scrub(value if isinstance(value, str) else "".join(value), replacements)
    output.get("metadata", {}).pop("application/vnd.jupyter.widget-view+json", None)


def with_outputs(lab: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The cells of ``lab`` (as it is now), each code cell with the outputs of the executed cell that has the
    same source (matched in order); a cell changed since the run has none. Neither input is changed."""
    pool: dict[str, deque] = defaultdict(deque)
    for cell in executed.cells:
        if cell.cell_type == "code":
            pool[cell.source].append(cell)
    page = nbformat.from_dict(lab)
    for cell in page.cells:
        if cell.cell_type == "code":
            ran = pool[cell.source].popleft() if pool[cell.source] else None
            cell.outputs = nbformat.from_dict(ran.outputs) if ran else []
            cell.execution_count = ran.execution_count if ran else None
    return page


def student_page(executed: nbformat.NotebookNode, notebook: str, replacements: list[tuple[str, str]] = (),
                 lab: nbformat.NotebookNode | None = None) -> tuple[nbformat.NotebookNode, dict[str, int]]:
    """The page notebook of one lab: ``executed`` (not changed) as its student copy, with the outputs of
    every cell a student does not edit. With ``lab`` (the lab notebook now), the cells are the lab's and
    the outputs those of identical executed cells, so a stale executed copy can never show an older
    version's code. ``notebook`` is the lab's file name (its Colab link opens ``student/<notebook>``).
    Returns the notebook and counts: ``stubbed`` solution spans, ``cleared`` cells whose outputs were
    dropped, ``hidden`` check cells dropped."""
    page = with_outputs(lab, executed) if lab is not None else nbformat.from_dict(executed)
    kept = [c for c in page.cells if not is_hidden(c) and INJECTED not in c.metadata.get("tags", [])]
    counts = {"hidden": sum(is_hidden(c) for c in page.cells), "stubbed": 0, "cleared": 0}
    page.cells = kept
    colab.set_badges(page, notebook, "student")
    replacements = list(replacements)
    for index, cell in enumerate(page.cells):
        for key in ("papermill", "execution", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            continue
        cell.source, spans = strip_solutions(cell.source, where=f"{notebook}, cell {index}")
        counts["stubbed"] += spans
        if spans or "question" in (cell.metadata.get("labkit") or {}):
            counts["cleared"] += bool(cell.outputs)
            cell.outputs, cell.execution_count = [], None
        # a widget (a tqdm bar) has only its first state as text ("0%| 0/100"): leave it out
        cell.outputs = [o for o in cell.outputs if DROPPED_MIME[0] not in o.get("data", {})]
        for output in cell.outputs:
            _scrub_output(output, replacements)
        cell.outputs = [o for o in cell.outputs if o.get("output_type") not in ("display_data", "execute_result")
                        or o.get("data")]
    for key in ("papermill", "widgets"):
        page.metadata.pop(key, None)
    return page, counts
