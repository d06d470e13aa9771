"""Labs as reviewable text: every ``labs/NN_*.ipynb`` is paired with a jupytext percent-format
``labs/NN_*.py`` that holds every cell, its markdown and its tags.

Why the percent format: a lab is mostly Python, and ``# %%`` cells keep it a plain ``.py`` file
that editors highlight, linters read and ``git diff`` shows line by line; the cell tags the course
relies on (``parameters``, ``nbval-check-output``, ``nbval-ignore-output``) sit on the cell's
``# %% tags=[...]`` line and the ``# BEGIN SOLUTION`` markers are ordinary comments.

The notebooks stay committed, without outputs, so Colab badges, papermill and nbval keep working.
``labkit labs sync`` (or ``make labs``) brings each pair together: the side edited last wins,
unless ``prefer`` says which; ``labkit labs check`` (and the test suite) names any lab whose two
sides differ. Cell ids of unchanged cells are kept, so a one-line edit is a one-cell diff.
The sync also writes each lab's set-up cell and Colab badge from the template in ``labkit.course.colab``;
the check names a lab whose set-up cell or badge differs from it.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Sequence

import jupytext
import nbformat

from labkit.course import colab
from labkit.files import atomic_path

TEXT_FORMAT = "py:percent"
# kept out of both files: it changes with the jupytext release, not with the lab
_METADATA_FILTER = "-jupytext.text_representation.jupytext_version"


def _stems(labs_dir: Path, only: Sequence[str] | None = None) -> list[str]:
    stems = sorted({p.stem for p in labs_dir.glob("[0-9][0-9]_*.ipynb")} |
                   {p.stem for p in labs_dir.glob("[0-9][0-9]_*.py")})
    if only:
        unknown = [o for o in only if not any(s == o or s.startswith(f"{o}_") for s in stems)]
        if unknown:
            raise ValueError(f"no lab {', '.join(unknown)} in {labs_dir}; labs: {', '.join(stems)}.")
        stems = [s for s in stems if any(s == o or s.startswith(f"{o}_") for o in only)]
    return stems


def _cell_key(cell) -> tuple:
    """What must agree between the two sides: type, source and metadata (tags included)."""
    meta = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("execution", "papermill", "id")}
    return cell.cell_type, cell.source.strip("\n"), repr(sorted(meta.items()))


def read_text(path: Path) -> nbformat.NotebookNode:
    """The notebook a lab's ``.py`` source describes (no outputs)."""
    try:
        return jupytext.read(path, fmt=TEXT_FORMAT)
    except Exception as exc:  # jupytext raises many types; name the file either way
        raise ValueError(f"{path}: not a readable jupytext percent-format lab ({exc}).") from exc


def read_notebook(path: Path) -> nbformat.NotebookNode:
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable notebook ({exc}); restore it from git or rebuild it "
                         f"from its .py with `labkit labs sync --prefer py`.") from exc


def pair_problem(ipynb: Path, text: Path) -> str | None:
    """Why a lab's ``.ipynb`` and ``.py`` disagree (or that one side is missing); ``None`` when in sync."""
    if not text.exists() or not ipynb.exists():
        missing = text if not text.exists() else ipynb
        return f"{ipynb.stem}: {missing.name} is missing; run `labkit labs sync` to write it."
    a = [_cell_key(c) for c in read_notebook(ipynb).cells]
    b = [_cell_key(c) for c in read_text(text).cells]
    if a == b:
        return None
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"{ipynb.stem}: {ipynb.name} and {text.name} differ from cell {first} on ({len(a)} vs {len(b)} cells); "
            f"edit one side, then run `labkit labs sync`.")


def differences(labs_dir: str | os.PathLike = "labs") -> list[str]:
    """One line per lab whose ``.ipynb`` and ``.py`` disagree (or that lacks one side); empty when in sync."""
    labs_dir = Path(labs_dir)
    found = []
    for stem in _stems(labs_dir):
        ipynb, text = labs_dir / f"{stem}.ipynb", labs_dir / f"{stem}.py"
        found += [pair_problem(ipynb, text), template_problem(ipynb, text)]
    return [line for line in found if line]


def template_problem(ipynb: Path, text: Path) -> str | None:
    """Why a lab's set-up cell or Colab badge (on either side) differs from ``labkit.course.colab``'s template;
    ``None`` when both sides agree with it."""
    found: list[str] = []
    for path, read in ((text, read_text), (ipynb, read_notebook)):
        if path.exists():
            found += [f"{path.name}: {p}" for p in colab.problems(read(path), ipynb.name)]
    return f"{ipynb.stem}: {'; '.join(found)}; run `labkit labs sync`." if found else None


def _new_id(cell, taken: set[str]) -> str:
    digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()
    for n in range(8, len(digest) + 1):
        if digest[:n] not in taken:
            return digest[:n]
    raise RuntimeError("cell id collision")  # pragma: no cover - a full sha1 collision


def _keep_ids(new: nbformat.NotebookNode, old: nbformat.NotebookNode | None) -> None:
    """Give ``new``'s cells the ids of the matching (or replaced) cells of ``old``; fresh ones otherwise."""
    old_cells = old.cells if old is not None else []
    ids: list[str | None] = [None] * len(new.cells)
    matcher = difflib.SequenceMatcher(a=[_cell_key(c) for c in old_cells], b=[_cell_key(c) for c in new.cells],
                                      autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("equal", "replace"):
            for i, j in zip(range(i1, i2), range(j1, j2)):
                ids[j] = old_cells[i].get("id")
    taken = {i for i in ids if i}
    for j, cell in enumerate(new.cells):
        cell["id"] = ids[j] or _new_id(cell, taken)
        taken.add(cell["id"])


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` as ``.ipynb`` without outputs, keeping the ids of cells an older copy had."""
    old = read_notebook(path) if path.exists() else None
    nb = nbformat.from_dict(nb)
    nb.metadata.pop("jupytext", None)
    nb.metadata.setdefault("language_info", {"name": "python"})
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    _keep_ids(nb, old)
    nb.nbformat, nb.nbformat_minor = 4, 5
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))


def write_text(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` as a percent-format ``.py`` lab source."""
    nb = nbformat.from_dict(nb)
    nb.metadata.setdefault("jupytext", {})["notebook_metadata_filter"] = _METADATA_FILTER
    text = jupytext.writes(nb, fmt=TEXT_FORMAT)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sync(labs_dir: str | os.PathLike = "labs", prefer: str | None = None,
         only: Sequence[str] | None = None) -> list[str]:
    """Bring every pair together (or the labs named in ``only``: ``"01"`` or ``"01_baseline"``) and
    write each lab's set-up cell and badge from the template; returns one line per file written.

    The side modified last is the source, unless ``prefer`` is ``"py"`` or ``"ipynb"``.
    """
    if prefer not in (None, "py", "ipynb"):
        raise ValueError(f"prefer={prefer!r}: use 'py', 'ipynb' or None (the side edited last).")
    labs_dir = Path(labs_dir)
    if not labs_dir.is_dir():
        raise FileNotFoundError(f"{labs_dir}: no labs folder here; run from the course root or pass the folder.")
    written = []
    for stem in _stems(labs_dir, only):
        ipynb, text = labs_dir / f"{stem}.ipynb", labs_dir / f"{stem}.py"
        in_sync = False
        if ipynb.exists() and text.exists():
            in_sync = pair_problem(ipynb, text) is None
            source = prefer or ("py" if text.stat().st_mtime >= ipynb.stat().st_mtime else "ipynb")
        else:
            source = "py" if text.exists() else "ipynb"
        nb = read_text(text) if source == "py" else read_notebook(ipynb)
        templated = colab.apply(nb, ipynb.name)
        if in_sync and not templated:
            continue
        if source == "ipynb" or templated:
            write_text(nb, text)
            written.append(f"{text} ← {ipynb.name}" if not templated else f"{text} ← labkit.course.colab template")
        if source == "py" or templated:
            write_notebook(nb, ipynb)
            written.append(f"{ipynb} ← {text.name}" if not templated else f"{ipynb} ← labkit.course.colab template")
    return written
