"""Lab 01 under papermill: bad parameters fail at the check cell naming the parameter; the quick run
(executed once for the whole suite by the ``course`` fixture) writes its record and plots."""
from __future__ import annotations

from pathlib import Path

import papermill as pm
import pytest

from labkit import results

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "labs" / "01_baseline.ipynb"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, value", [("epochs", "zero"), ("batch_size", -1)])
def test_bad_parameter_fails_naming_it(tmp_path, results_tmp, name, value):
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(LAB), str(tmp_path / "out.ipynb"), parameters={name: value, "quick": True},
                            progress_bar=False, cwd=str(REPO), kernel_name="python3")
    assert err.value.ename == "ParameterError"
    assert f"'{name}'" in err.value.evalue and repr(value) in err.value.evalue
    assert not list(results_tmp.glob("01_baseline/*.json")), "a failed run must not leave a record"


def test_quick_run_writes_record_and_plots(course):
    record = results.latest("01_baseline", course["results"])
    assert record is not None, "Lab 01 wrote no run record"
    assert record.params["quick"] is True and record.data["synthetic"] is True
    assert len(record.epochs) == record.params["epochs"] >= 1
    for key in ("loss", "acc", "val_loss", "val_acc", "seconds", "images_per_s"):
        assert key in record.epochs[0]
    # the stand-in is learnable but not trivial: the trained CNN beats always answering the majority
    # class, and it is not perfect
    assert record.final["majority_rate"] < record.final["test_acc"] < 1.0, record.final
    for artifact in record.artifacts:
        path = course["results"] / artifact
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", artifact
