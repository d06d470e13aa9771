"""The labkit command: help texts, lab names, -p parsing, `labkit run` reporting a failed cell."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.course import cli
from labkit.course.run import find_labs, format_runs, parse_parameters, parse_value

COMMANDS = {"run": "papermill", "regrade": "nbval", "student": "BEGIN SOLUTION", "summary": "SUMMARY.md",
            "data": "synth", "data synth": "stand-in", "site": "student copy"}


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*command.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: labkit")
    assert COMMANDS.get(command, "regrade") in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    assert cli.main(["data"]) == 2


def test_python_dash_m_labkit_works():
    done = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "labkit runs the lab course" in done.stdout


def test_parameters_are_read_like_papermill():
    assert [parse_value(v) for v in ("3", "0.5", "1e-3", "True", "False", "None", "cpu", "[1, 2]")] == \
        [3, 0.5, 1e-3, True, False, None, "cpu", "[1, 2]"]
    assert parse_parameters([["epochs", "3"], ["device", "cpu"]]) == {"epochs": 3, "device": "cpu"}
    with pytest.raises(ValueError, match="-p NAME VALUE"):
        parse_parameters([["not a name", "3"]])


def _notebook(path: Path, *cells: str, parameters: str = "quick = False\nepochs = 5") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"),
                nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path


def test_lab_names_resolve(tmp_path):
    labs = tmp_path / "labs"
    labs.mkdir()
    for name in ("01_baseline", "02_ray", "02_ray_extra"):
        _notebook(labs / f"{name}.ipynb")
    assert [p.stem for p in find_labs(None, labs)] == ["01_baseline", "02_ray", "02_ray_extra"]
    assert [p.stem for p in find_labs(["02_ray", "01"], labs)] == ["02_ray", "01_baseline"]
    assert find_labs([str(labs / "01_baseline.ipynb")], labs)[0] == (labs / "01_baseline.ipynb").resolve()
    with pytest.raises(ValueError, match="'02' matches several labs"):
        find_labs(["02"], labs)
    with pytest.raises(ValueError, match=r"'07' matches no lab .*labs: 01_baseline, 02_ray, 02_ray_extra"):
        find_labs(["07"], labs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_labs(["missing.ipynb"], labs)
    with pytest.raises(FileNotFoundError, match="no lab notebooks"):
        find_labs(None, tmp_path / "nothing")
    assert cli.main(["run", "07", "--labs-dir", str(labs)]) == 2


@pytest.mark.slow
def test_run_reports_which_lab_failed_and_where(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LABKIT_QUICK", raising=False)
    labs, res = tmp_path / "labs", tmp_path / "results"
    labs.mkdir()
    _notebook(labs / "01_ok.ipynb",
              "import os, sys\nprint(sys.executable)\nprint(type(epochs).__name__, epochs, quick, os.environ.get('LABKIT_QUICK'))",  # noqa: E501
              "from labkit import results\nrec = results.RunRecord('01_ok', params={'quick': quick}, data={'synthetic': True},\n"
              "    epochs=[{'epoch': 1, 'seconds': 1.5}], final={'test_acc': 0.5})\nresults.save(rec)")
    _notebook(labs / "02_fails.ipynb", "x = 1",
              "y = x + 1\nraise ValueError(f'epochs={epochs} is wrong on purpose')", "print('never')")
    code = cli.main(["run", "--quick", "-p", "epochs", "2", "--labs-dir", str(labs), "--results", str(res)])
    out = capsys.readouterr().out
    print(out)
    assert code == 1
    lines = out.splitlines()
    assert [ln.split()[:3] for ln in lines[:2]] == [["[1/2]", "01_ok", "ok"], ["[2/2]", "02_fails", "FAILED"]]
    failed = next(ln for ln in lines if ln.startswith("02_fails") and "FAILED" in ln)
    assert "cell 3 (In [" in failed and "`y = x + 1`: ValueError: epochs=2 is wrong on purpose" in failed
    assert "1 of 2 labs ran cleanly" in out and "failed: 02_fails" in out

    ok = nbformat.read(res / "executed" / "01_ok.ipynb", as_version=4)
    printed = ok.cells[3].outputs[0]["text"].splitlines()   # md, parameters, injected, print
    assert printed == [sys.executable, "int 2 True 1"]
    bad = nbformat.read(res / "executed" / "02_fails.ipynb", as_version=4)
    assert any(o.output_type == "error" for c in bad.cells if c.cell_type == "code" for o in c.outputs)
    assert not [p for p in (res / "executed").iterdir() if p.name.startswith(".")]   # no partial files
    assert "| 01_ok |" in (res / "SUMMARY.md").read_text() and (res / "summary.png").is_file()
    assert "LABKIT_QUICK" not in __import__("os").environ   # restored after the run


def test_format_runs_without_runs():
    assert format_runs([]) == "no labs were run"


def test_data_synth_writes_a_small_standin(tmp_path, capsys):
    pytest.importorskip("labkit.data.synth_mri")
    target = tmp_path / "alz"
    assert cli.main(["data", "synth", "--data-dir", str(target), "--n-train", "8", "--n-test", "4", "--seed", "1"]) == 0
    assert "not medical data" in capsys.readouterr().out
    images = list(target.rglob("*.jpg"))
    assert len(images) == 12 and {p.parent.parent.name for p in images} == {"train", "test"}


def test_version(capsys):
    import labkit

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"labkit {labkit.__version__}"


def test_yaml_parameters_carry_lists_and_dicts_like_papermill(tmp_path):
    from labkit.course.run import gather_parameters, parse_yaml_parameters

    assert parse_yaml_parameters("sweep: [1, 2]\nopts: {lr: 0.001, rule: sqrt}") == \
        {"sweep": [1, 2], "opts": {"lr": 0.001, "rule": "sqrt"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text("sweep: [1, 2, 4]\nepochs: 9\ndevice: cpu\n")
    merged = gather_parameters([str(params_file)], ["epochs: 3"], [["device", "cuda"]])
    assert merged == {"sweep": [1, 2, 4], "epochs": 3, "device": "cuda"}   # -f, then -y, then -p
    with pytest.raises(ValueError, match="must be a mapping"):
        parse_yaml_parameters("[1, 2]")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_yaml_parameters("sweep: [1, 2")
    with pytest.raises(FileNotFoundError, match="-f nope.yaml"):
        gather_parameters(["nope.yaml"])


def test_run_passes_yaml_and_file_parameters_to_the_labs(tmp_path, monkeypatch, capsys):
    from labkit.course import run as course

    seen = {}
    monkeypatch.setattr(course, "run_labs", lambda labs, **kw: seen.update(kw) or [])
    params_file = tmp_path / "p.yaml"
    params_file.write_text("clients: 4\n")
    assert cli.main(["run", "02", "-y", "sweep: [1, 2]", "-y", "split: {a: 1}", "-f", str(params_file),
                     "-p", "epochs", "2", "--no-summary"]) == 0
    assert seen["parameters"] == {"clients": 4, "sweep": [1, 2], "split": {"a": 1}, "epochs": 2}
    assert cli.main(["run", "02", "-y", "- 1", "--no-summary"]) == 2
    assert "must be a mapping" in capsys.readouterr().err


def test_a_command_needing_the_course_tools_says_how_to_install_them(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jupytext", None)          # as if labkit[dev] were not installed
    monkeypatch.delitem(sys.modules, "labkit.course.labsource", raising=False)
    monkeypatch.delattr("labkit.course.labsource", raising=False)    # so `from labkit import labsource` imports again
    assert cli.main(["labs", "check"]) == 2
    err = capsys.readouterr().err
    assert "jupytext is not installed" in err and "pip install -e '.[dev]'" in err


def test_a_lab_kernel_starts_without_its_log_noise_and_still_shows_the_cells_warnings(tmp_path, capfd):
    """ipykernel's start-up warning ("running over TCP without encryption", its sockets are on 127.0.0.1) is not
    printed once per lab; a warning raised by a cell still lands in the executed notebook."""
    from labkit.course.run import run_lab

    lab = _notebook(tmp_path / "01_noise.ipynb", "import warnings\nwarnings.warn('a cell warning')")
    run = run_lab(lab, tmp_path / "out.ipynb")
    assert run.ok, run
    assert "without encryption" not in capfd.readouterr().err
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert "a cell warning" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
