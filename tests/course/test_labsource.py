"""Labs as text: every labs/NN_*.ipynb has a jupytext .py twin, the two agree, and a sync moves an
edit from either side to the other one cell at a time."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from labkit.course import labsource
from labkit.course.cli import main

REPO = Path(__file__).resolve().parents[2]
LABS = REPO / "labs"


def test_every_committed_lab_is_paired_and_in_sync():
    notebooks = sorted(p.stem for p in LABS.glob("[0-9][0-9]_*.ipynb"))
    assert notebooks, "no labs found"
    assert sorted(p.stem for p in LABS.glob("[0-9][0-9]_*.py")) == notebooks
    assert labsource.differences(LABS) == [], "run `make labs` (labkit labs sync) and commit both sides"


def test_text_source_keeps_every_tag_and_solution_marker():
    for nb_path in sorted(LABS.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        text = labsource.read_text(nb_path.with_suffix(".py"))
        tags = lambda book: [c.metadata.get("tags", []) for c in book.cells]
        assert tags(text) == tags(nb), nb_path.name
        assert any("parameters" in t for t in tags(text)), f"{nb_path.name}: no parameters cell"
        assert sum(c.source.count("# BEGIN SOLUTION") for c in text.cells) == \
            sum(c.source.count("# BEGIN SOLUTION") for c in nb.cells)


@pytest.fixture
def labs_copy(tmp_path):
    folder = tmp_path / "labs"
    folder.mkdir()
    for path in LABS.glob("01_*"):
        shutil.copy2(path, folder / path.name)
    return folder


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))


def test_editing_the_text_changes_exactly_that_cell(labs_copy):
    text = next(labs_copy.glob("01_*.py"))
    ipynb = text.with_suffix(".ipynb")
    before = nbformat.read(ipynb, as_version=4)
    source = text.read_text()
    assert "# ## 1. Parameters" in source
    text.write_text(source.replace("# ## 1. Parameters", "# ## 1. The parameters", 1))
    _touch_later(text)
    problems = labsource.differences(labs_copy)
    assert len(problems) == 1 and problems[0].startswith(ipynb.stem + ":")
    assert main(["labs", "check", "--labs-dir", str(labs_copy)]) == 1
    assert labsource.sync(labs_copy) == [f"{ipynb} ← {text.name}"]
    after = nbformat.read(ipynb, as_version=4)
    changed = [i for i, (a, b) in enumerate(zip(before.cells, after.cells)) if a != b]
    assert len(after.cells) == len(before.cells) and len(changed) == 1
    assert after.cells[changed[0]].source.startswith("## 1. The parameters")
    assert after.cells[changed[0]].id == before.cells[changed[0]].id
    assert labsource.differences(labs_copy) == []


def test_editing_the_notebook_alone_is_caught_and_synced_back(labs_copy):
    ipynb = next(labs_copy.glob("01_*.ipynb"))
    nb = nbformat.read(ipynb, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source.replace("seed = 0", "seed = 7")
    nbformat.write(nb, ipynb)
    _touch_later(ipynb)
    assert [p.split(":")[0] for p in labsource.differences(labs_copy)] == [ipynb.stem]
    assert labsource.sync(labs_copy) == [f"{ipynb.with_suffix('.py')} ← {ipynb.name}"]
    assert "seed = 7" in ipynb.with_suffix(".py").read_text()
    assert main(["labs", "check", "--labs-dir", str(labs_copy)]) == 0


def test_missing_side_is_named_and_written(labs_copy):
    text = next(labs_copy.glob("01_*.py"))
    text.unlink()
    assert "is missing" in labsource.differences(labs_copy)[0]
    labsource.sync(labs_copy)
    assert text.exists() and labsource.differences(labs_copy) == []
    with pytest.raises(ValueError, match="prefer='both'"):
        labsource.sync(labs_copy, prefer="both")


def test_no_lab_shows_its_code_only_through_getsource():
    """The code a lab teaches is written in its cells (issue: the lesson lives in the notebook)."""
    for path in sorted(LABS.glob("[0-9][0-9]_*")):
        if path.suffix in (".ipynb", ".py"):
            assert "getsource" not in path.read_text(), f"{path.name} shows code through inspect.getsource"


def test_sync_writes_the_set_up_cell_and_badge_from_the_template_and_check_names_a_drift(labs_copy):
    from labkit.course import colab

    text = labs_copy / "01_baseline.py"
    edited = text.read_text().replace("results_on_drive = False", "results_on_drive = False  # my edit", 1)
    edited = edited.replace("/blob/main/labs/01_baseline.ipynb", "/blob/dev/labs/01_baseline.ipynb")
    text.write_text(edited)
    _touch_later(text)
    problems = labsource.differences(labs_copy)
    assert any("set-up cell differs" in p and "Colab badge" in p and "labkit labs sync" in p for p in problems), problems
    assert main(["labs", "check", "--labs-dir", str(labs_copy)]) == 1
    labsource.sync(labs_copy)
    assert labsource.differences(labs_copy) == []
    for nb in (labsource.read_text(text), labsource.read_notebook(labs_copy / "01_baseline.ipynb")):
        assert colab.problems(nb, "01_baseline.ipynb") == []
        assert "# my edit" not in "".join(c.source for c in nb.cells)


def test_sync_splits_an_older_labs_colab_cell_into_set_up_and_imports(tmp_path):
    from labkit.course import colab

    labs = tmp_path / "labs"
    labs.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Lab 09\n\n[![Open In Colab](https://colab.research.google.com/assets/"
                                              "colab-badge.svg)](https://colab.research.google.com/github/x/y/blob/"
                                              "main/labs/09_new.ipynb)"),
                nbformat.v4.new_code_cell('import sys\nif "google.colab" in sys.modules:  # Colab only\n'
                                          "    !git clone -q https://example.org/x /content/x || true\n\n"
                                          "import time\nprint(sys.version_info >= (3,))"),
                nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, labs / "09_new.ipynb")
    written = labsource.sync(labs, only=["09"])
    assert len(written) == 2
    out = labsource.read_notebook(labs / "09_new.ipynb")
    assert [c.source for c in out.cells[1:]] == [colab.SETUP_CELL.rstrip("\n"),
                                                  "import sys\nimport time\nprint(sys.version_info >= (3,))", "x = 1"]
    assert colab.badge("09_new.ipynb") in out.cells[0].source
    assert labsource.differences(labs) == []
    with pytest.raises(ValueError, match="no lab 10"):
        labsource.sync(labs, only=["10"])
