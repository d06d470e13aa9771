"""A lab's graded questions, read from the instructor's lab notebook (never from a submission).

Otter-grader's shape, in the labs' own cells:

- a **public check** cell carries ``metadata.labkit = {"question": "class_weights", "points": 2}``; the student
  copy keeps it and runs it (it reports ✔/✘ and a hint, and Run All goes on);
- a **hidden check** cell carries the tag ``hidden-check`` and ``metadata.labkit = {"hidden": "class_weights"}``;
  it exists only in the instructor's lab: ``labkit student`` drops it, so it is never in ``student/``, a
  feedback file or anything a student receives;
- the notebook's ``metadata.labkit.grading`` may give points for running to the end (``"runs"``) and for trained
  results that reproduce within the tolerance (``"reproduces"``).

In jupytext's percent format (``labs/NN_*.py``)::

    # %% tags=["nbval-check-output"] labkit={"question": "class_weights", "points": 2}
    # %% tags=["hidden-check"] labkit={"hidden": "class_weights"}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nbformat

#: Tag of the instructor-only check cells (dropped from student copies).
HIDDEN_TAG = "hidden-check"
#: Points for running to the end and for reproducing trained results, when the lab does not say.
DEFAULT_SPECIAL = {"runs": 1.0, "reproduces": 1.0}


@dataclass
class Question:
    """One graded question: its public check cells (sources) and hidden check cells, and its points."""

    name: str
    points: float
    public: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    cell: int | None = None          # the public check cell's index in the instructor's lab


@dataclass
class Rubric:
    """Everything graded in one lab: the questions in notebook order and the special points."""

    lab: str
    questions: list[Question]
    runs: float = DEFAULT_SPECIAL["runs"]
    reproduces: float = DEFAULT_SPECIAL["reproduces"]

    @property
    def max_points(self) -> float:
        """The most a submission can earn."""
        return sum(q.points for q in self.questions) + self.runs + self.reproduces

    def columns(self) -> list[str]:
        """Gradebook columns, in order: each question, then ``runs``, ``reproduces``."""
        return [q.name for q in self.questions] + ["runs", "reproduces"]

    def max_row(self) -> dict[str, float]:
        """Each column's maximum (otter's first row of ``final_grades.csv``)."""
        return {**{q.name: q.points for q in self.questions}, "runs": self.runs, "reproduces": self.reproduces}


def _labkit_meta(cell: nbformat.NotebookNode) -> dict:
    meta = cell.get("metadata", {}).get("labkit", {})
    return meta if isinstance(meta, dict) else {}


def is_hidden(cell: nbformat.NotebookNode) -> bool:
    """Whether a cell is an instructor-only check (by tag or metadata)."""
    return HIDDEN_TAG in cell.get("metadata", {}).get("tags", []) or "hidden" in _labkit_meta(cell)


def rubric(lab_nb: nbformat.NotebookNode, lab: str = "lab") -> Rubric:
    """The :class:`Rubric` declared by an instructor's lab notebook.

    Raises ``ValueError`` naming the cell for a question without positive points, a hidden check of a question
    the lab does not declare, or a question declared twice."""
    questions: dict[str, Question] = {}
    hidden: list[tuple[int, str, str]] = []
    for index, cell in enumerate(lab_nb.cells):
        if cell.cell_type != "code":
            continue
        meta = _labkit_meta(cell)
        if "question" in meta:
            name, points = str(meta["question"]), meta.get("points")
            if not name.isidentifier():
                raise ValueError(f"{lab}, cell {index}: question name {name!r} must be a Python name (a CSV column).")
            if not isinstance(points, (int, float)) or isinstance(points, bool) or points <= 0:
                raise ValueError(f"{lab}, cell {index}: question {name!r} needs points > 0 in metadata.labkit, "
                                 f"got {points!r}.")
            if name in questions:
                raise ValueError(f"{lab}, cell {index}: question {name!r} is declared twice (also cell "
                                 f"{questions[name].cell}); give each public check cell its own name.")
            questions[name] = Question(name, float(points), [cell.source], cell=index)
        elif is_hidden(cell):
            hidden.append((index, str(meta.get("hidden", "")), cell.source))
    for index, name, source in hidden:
        if name not in questions:
            raise ValueError(f"{lab}, cell {index}: hidden check for {name!r}, but the lab declares no such question "
                             f"(questions: {', '.join(questions) or 'none'}).")
        questions[name].hidden.append(source)
    special = {**DEFAULT_SPECIAL, **(lab_nb.metadata.get("labkit", {}).get("grading", {}) or {})}
    return Rubric(lab, list(questions.values()), float(special["runs"]), float(special["reproduces"]))


def read_rubric(lab_path: str | Path) -> Rubric:
    """:func:`rubric` of the lab notebook at ``lab_path``."""
    path = Path(lab_path)
    return rubric(nbformat.read(path, as_version=4), path.stem)
