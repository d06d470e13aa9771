"""labkit regrade: the sanitize file, and nbval catching an edited result but not a new timing."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import get_sanitize_patterns

from labkit.course import cli
from labkit.course.regrade import SANITIZE_FILE, format_reports, notebook_cells, regrade, sanitize, short_diff
from labkit.course.run import run_lab

PATTERNS = get_sanitize_patterns(SANITIZE_FILE.read_text())


def test_sanitize_file_is_read_by_nbval():
    assert len(PATTERNS) >= 12
    for regex, _ in PATTERNS:
        re.compile(regex)  # every pattern is valid
        assert regex == regex.strip(), f"pattern {regex!r} has spaces at its ends (nbval keeps them)"


@pytest.mark.parametrize("first, second", [
    ("epoch 1 took 12.3s", "epoch 1 took 7.9s"),
    ("total 1m 05s", "total 12m 59s"),
    ("done in 1h 02m", "done in 3h 45m"),
    ("Wall time: 1.25 s", "Wall time: 310 ms"),
    ("123.4 img/s", "88.0 img/s"),
    ("throughput 1,234.5 images/s", "throughput 987.1 images/s"),
    ("3.10it/s", "12.55it/s"),
    ("started 2025-11-23T09:30:01+00:00", "started 2026-01-02T18:04:59+00:00"),
    ("saved 2025-11-23 09:30 UTC", "saved 2024-02-29 23:59 UTC"),
    ("run 20251123-093001-a1b2c3 saved", "run 20260102-180459-0f9e8d saved"),
    ("<Model object at 0x7f3a2b1c4d50>", "<Model object at 0x55aa01234567>"),
    ("wrote /work/main/results/01_baseline/plot.png", "wrote /home/student/labkit/results/01_baseline/plot.png"),
    ("PosixPath('/tmp/a/b.json')", "PosixPath('/Users/x/y/b.json')"),
    ("train: 100%|██████████| 38/38 [00:12<00:00,  3.10it/s, loss=0.52]",
     "train: 100%|██████████| 38/38 [00:03<00:00, 11.20it/s, loss=0.52]"),
    ("(RayTrainWorker pid=1234) ready", "(RayTrainWorker pid=98765) ready"),
])
def test_sanitize_removes_what_changes_between_runs(first, second):
    assert first != second
    assert sanitize(first) == sanitize(second), (sanitize(first), sanitize(second))


@pytest.mark.parametrize("first, second", [
    ("test_acc 0.83", "test_acc 0.93"),
    ("val_acc=0.8312", "val_acc=0.8313"),
    ("parameters: 1,234,567", "parameters: 1,234,568"),
    ("MildDemented  717  14.0%", "MildDemented  718  14.0%"),
    ("epochs       3", "epochs       4"),
    ("lr           0.001", "lr           0.01"),
    ("torch.Size([32, 3, 64, 64])", "torch.Size([32, 3, 64, 65])"),
    ("✓ LR scaling: 4 workers", "✓ LR scaling: 8 workers"),
    ("loss 0.52 after 3 epochs", "loss 0.53 after 3 epochs"),
])
def test_sanitize_keeps_results(first, second):
    assert sanitize(first) != sanitize(second), f"{first!r} and {second!r} would compare equal"


def test_sanitize_keeps_relative_paths_and_config_lines():
    for text in ("data_dir     'data/alzheimer'", "device       'auto'", "image_size   64", "classes: 4 (1/2 of them rare)"):
        assert sanitize(text) == text


def test_short_diff_relabels_pytest_diff():
    message = ("Notebook cell execution failed\nCell 3: Cell outputs differ\n\nInput:\nprint(acc)\n\nTraceback:\n"
               " mismatch 'stdout'\n\n assert reference_output == test_output failed:\n\n"
               "  'acc 0.93\\n' == 'acc 0.83\\n'\n  \n  - acc 0.83\n  ?       ^\n  + acc 0.93\n  ?       ^\n")
    reason, diff = short_diff(message)
    assert reason == "Cell outputs differ"
    assert diff == ["output 'stdout' differs:", "  re-run:    acc 0.83", "  submitted: acc 0.93"]
    reason, diff = short_diff("Cell 2: Cell execution caused an exception\n\nInput:\nf()\n\nTraceback:\n"
                              "---\nValueError                 Traceback (most recent call last)\n"
                              "----> 1 f()\nValueError: bad value\n")
    assert reason == "Cell execution caused an exception" and diff == ["ValueError: bad value"]


def _tiny_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    code = nbformat.v4.new_code_cell
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A tiny lab"),
        code("quick = False\nepochs = 3\nseed = 0", metadata={"tags": ["parameters"]}),
        code('import random, time\nimport labkit.params\ncfg = labkit.params.check("tiny", epochs=epochs, seed=seed, quick=quick)',  # noqa: E501
             metadata={"tags": ["nbval-check-output"]}),
        code("t0 = time.perf_counter()\nprint(f'trained {cfg.epochs} epochs in {time.perf_counter() - t0 + 3:.4f}s')"),
        code("random.seed(cfg.seed)\nacc = sum(random.random() for _ in range(50)) / 50\n"
             "print(f'test_acc {acc:.2f}')\nprint(f'{time.perf_counter() - t0 + 1:.2f}s, {1234.5 / (time.perf_counter() - t0 + 1):.1f} img/s')",  # noqa: E501
             metadata={"tags": ["nbval-check-output"]}),
    ]
    nbformat.write(nb, path)
    return path


def _edit_output(path: Path, out: Path, cell: int, old: str, new: str) -> Path:
    nb = nbformat.read(path, as_version=4)
    text = nb.cells[cell].outputs[0]["text"]
    assert re.search(old, text), text
    nb.cells[cell].outputs[0]["text"] = re.sub(old, new, text, count=1)
    nbformat.write(nb, out)
    return out


@pytest.mark.slow
def test_regrade_catches_edited_result_and_ignores_timings(tmp_path, capsys):
    executed = tmp_path / "executed.ipynb"
    run = run_lab(_tiny_notebook(tmp_path / "tiny.ipynb"), executed, {"quick": True})
    assert run.ok, run.failure
    nb = nbformat.read(executed, as_version=4)
    # papermill added an injected-parameters cell: md, parameters, injected, check, timing, metric.
    assert "injected-parameters" in nb.cells[2].metadata.tags
    timing_cell, metric_cell = 4, 5
    # The metric cell shows a rounded result (checked) and timings (sanitised); the timing cell is unchecked.
    timing = _edit_output(executed, tmp_path / "timing.ipynb", metric_cell, r"\d+\.\d\d(?=s,)", "987.65")
    timing = _edit_output(timing, timing, metric_cell, r"[\d.]+(?= img/s)", "3.0")
    timing = _edit_output(timing, timing, timing_cell, r"[\d.]+s", "12.5s")
    acc = re.search(r"test_acc (\d\.\d\d)", nb.cells[metric_cell].outputs[0]["text"]).group(1)
    edited = f"{(float(acc) + 0.11) % 1:.2f}"
    typed = _edit_output(executed, tmp_path / "typed.ipynb", metric_cell, r"test_acc \d\.\d\d", f"test_acc {edited}")

    assert [c.checked for c in notebook_cells(executed)] == [False, False, True, False, True]
    good, bad = regrade([timing, typed])
    table = format_reports([good, bad])
    print(table)
    assert good.ok, table
    assert (len(good.cells), good.checked, good.count("passed"), good.count("failed")) == (5, 2, 5, 0)
    assert not bad.ok and [c.cell for c in bad.failures] == [metric_cell], table
    failure = bad.failures[0]
    assert failure.reason == "Cell outputs differ"
    assert f"  submitted: test_acc {edited}" in failure.diff and f"  re-run:    test_acc {acc}" in failure.diff
    assert re.search(r"timing\.ipynb\s+5\s+2\s+0\s+5\s+0\s+ok", table)
    assert re.search(r"typed\.ipynb\s+5\s+2\s+0\s+4\s+1\s+FAILED", table)
    assert f"✗ cell {metric_cell} (nbval Cell 4, checked) `random.seed(cfg.seed)`" in table

    capsys.readouterr()
    assert cli.main(["regrade", str(typed)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and f"cell {metric_cell}" in out and f"submitted: test_acc {edited}" in out


def test_regrade_reports_missing_and_broken_files(tmp_path):
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{not json")
    missing, bad = regrade([tmp_path / "missing.ipynb", broken])
    assert not missing.ok and "does not exist" in missing.error
    assert not bad.ok and "not a readable notebook" in bad.error
    table = format_reports([missing, bad])
    assert "ERROR" in table and "0 of 2 notebooks reproduce" in table


def test_compare_within_tolerance_number_by_number():
    from labkit.course.nbval_tolerance import compare_within

    assert compare_within("acc 0.63\nbalanced_acc 0.41\n", "acc 0.66\nbalanced_acc 0.38\n", 0.05) is None
    assert "differs by 0.07 > tolerance 0.05" in compare_within("acc 0.63", "acc 0.70", 0.05)
    assert compare_within("acc 0.63", "loss 0.63", 0.05) == "the text around the numbers differs"
    assert compare_within("3 classes", "4 classes", 0.05) is not None      # counts still have to match
    assert compare_within("acc 0.63", "acc 0.63", 0.0) is None
    assert compare_within("a    0.5\nbb   0.25", "a     0.55\nbb    0.2", 0.05) is None   # realigned columns


@pytest.mark.slow
def test_regrade_compares_trained_results_within_the_tolerance(tmp_path, capsys):
    """A trained result nudged inside the tolerance passes, one moved outside fails, and an edit of an
    exact output (the configuration echo) still fails; the report says where each notebook ran."""
    nb = nbformat.read(_tiny_notebook(tmp_path / "tiny.ipynb"), as_version=4)
    nb.cells[4].metadata.tags.append("labkit-result")
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    executed = tmp_path / "executed.ipynb"
    run = run_lab(tmp_path / "tiny.ipynb", executed, {"quick": True})
    assert run.ok, run.failure
    metric_cell, echo_cell = 5, 3
    acc = float(re.search(r"test_acc (\d\.\d\d)", nbformat.read(executed, as_version=4).cells[metric_cell].outputs[0]["text"]).group(1))  # noqa: E501
    inside = _edit_output(executed, tmp_path / "inside.ipynb", metric_cell, r"test_acc \d\.\d\d", f"test_acc {acc + 0.04:.2f}")
    outside = _edit_output(executed, tmp_path / "outside.ipynb", metric_cell, r"test_acc \d\.\d\d", f"test_acc {acc + 0.09:.2f}")
    echo = _edit_output(executed, tmp_path / "echo.ipynb", echo_cell, r"epochs(\s+)2", r"epochs\g<1>4")
    reports = regrade([inside, outside, echo], tolerance=0.05)
    table = format_reports(reports)
    print(table)
    ok, far, typed = reports
    assert ok.ok and [c.result for c in ok.cells].count(True) == 1, table
    assert not far.ok and [c.cell for c in far.failures] == [metric_cell], table
    assert far.failures[0].reason.startswith("trained result outside the tolerance: submitted")
    assert not typed.ok and [c.cell for c in typed.failures] == [echo_cell], table
    assert table.count("executed on: cpu") == 3 and table.count("re-run on:   cpu") == 3
    assert "results within ±0.05" in table
    # a looser tolerance lets the far result through; the CLI takes it as an option
    capsys.readouterr()
    assert cli.main(["regrade", "--tolerance", "0.1", str(outside)]) == 0
    assert "±0.1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="tolerance=-1"):
        regrade([outside], tolerance=-1)
