"""Lab 02 end to end: the notebook through papermill, as a user runs it (slow: each run starts Ray).

The quick lab with 2 workers is the course run's (the session ``course`` fixture executes every lab
once, Lab 01 before it, so the comparison has a record to read); one more run here, ``fail_at_epoch=2``
without a Lab 01 record, shows the restart. Its results and data go to temporary folders.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from labkit import results
from labkit.course.run import format_runs
from labkit.distributed import ray_daemon_pids

pytestmark = pytest.mark.slow
#: What the quick run (3 epochs, 2 workers, Lab 01's global batch, fixed seed, stand-in data: majority rate 0.50,
#: chance 0.25) must beat (issue 29): a model that learned nothing scores the majority rate in accuracy and chance
#: in balanced accuracy, whatever it answers.
ACC_MARGIN = 0.15
BALANCED_MARGIN = 0.20
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "labs" / "02_ray.ipynb"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A stand-in of quick mode's size (1200 / 400 images), written once for both runs."""
    from labkit.data.synth_mri import write_alzheimer_standin

    return write_alzheimer_standin(tmp_path_factory.mktemp("data") / "alzheimer", n_train=1200, n_test=400,
                                   progress=False)


@pytest.fixture
def ray_dir():
    folder = tempfile.mkdtemp(prefix="lk2", dir="/tmp")  # short: Ray's socket paths are length-limited
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_lab02(tmp: Path, data_dir: Path, ray_dir: str, *params: str) -> tuple[nbformat.NotebookNode, Path]:
    """``papermill labs/02_ray.ipynb OUT -p data_dir DATA -p …`` with results in ``tmp/results`` and
    Ray's files in ``ray_dir`` (to find this run's Ray daemons among any others on the machine)."""
    out = tmp / "02_ray.out.ipynb"
    env = {**os.environ, "LABKIT_RESULTS": str(tmp / "results"), "RAY_TMPDIR": ray_dir}
    env.pop("LABKIT_QUICK", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(out), "-k", "python3", "--cwd", str(ROOT),
           "-p", "data_dir", str(data_dir), *params]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"papermill failed:\n{done.stderr[-4000:]}"
    return nbformat.read(out, as_version=4), tmp / "results"


def assert_no_ray_daemons(ray_dir: str) -> None:
    """No raylet / gcs_server of this run's cluster is left (given a moment to exit)."""
    import psutil

    _, alive = psutil.wait_procs([psutil.Process(p) for p in ray_daemon_pids(ray_dir)], timeout=20)
    assert not alive, f"Ray daemons still running after the lab: {alive}"


def assert_learned(record, acc_margin: float = ACC_MARGIN, balanced_margin: float = BALANCED_MARGIN) -> None:
    """The run beats the majority-class rate in accuracy and chance in balanced accuracy by the margins above."""
    final = record.final
    for key in ("acc", "balanced_acc", "macro_f1", "majority_rate", "chance"):
        assert key in final, f"the record's final lacks {key}: {sorted(final)}"
    assert final["acc"] >= final["majority_rate"] + acc_margin, final
    assert final["balanced_acc"] >= final["chance"] + balanced_margin, final
    assert final["test_acc"] == final["acc"]


def all_output(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def quick_run(course):
    """The course run of ``02_ray`` (quick, default parameters: 2 workers, lr_scaling "none")."""
    executed = [r for r in course["runs"] if r.lab == "02_ray"]
    assert executed and executed[0].ok, f"the course run of 02_ray failed:\n{format_runs(executed)}"
    nb = nbformat.read(executed[0].output, as_version=4)
    return nb, results.latest("02_ray", course["results"]), course["results"], course["ray_dir"]


def test_quick_lab_records_two_workers_and_every_epoch(quick_run):
    _, record, _, _ = quick_run
    assert record is not None, "the lab saved no run record"
    assert record.env["world_size"] == 2 and record.env["backend"] == "gloo"
    assert record.params["quick"] is True and record.params["workers"] == 2
    epochs = record.epochs
    assert [e["epoch"] for e in epochs] == list(range(1, record.params["epochs"] + 1))
    for e in epochs:
        assert e["world_size"] == 2 and e["attempt"] == 1
        assert e["images"] == record.params["max_train"]          # the two shards cover the training set
        assert e["val_images"] == record.params["max_test"]       # ... and the test set, once
        assert e["loss"] > 0
        assert e["lr"] == pytest.approx(record.params["lr"])      # lr_scaling="none": the lr as given
        assert "resume" not in e                                   # a fresh run: no resume note
        assert e["sync_s"] is not None                             # all-reduce was timed
    assert record.final["restarts"] == 0 and record.final["workers"] == 2
    assert record.env["precision"] in ("bf16", "fp16", "fp32") and record.params["amp"] == "auto"
    assert_learned(record)
    assert epochs[-1]["val_acc"] > record.final["majority_rate"]   # the workers' all-reduced metric agrees


def test_quick_lab_compares_with_lab01_and_keeps_the_last_checkpoints(quick_run):
    nb, record, results_dir, _ = quick_run
    from labkit import metrics

    rows = record.final["comparison"]
    assert len(rows) == 2 and rows[0]["run"].startswith("Lab 01")
    assert rows[0]["global_batch"] == rows[1]["global_batch"] == record.params["batch_size"]   # the same global batch
    versus = record.final["vs_lab01"]            # balanced accuracy, paired on the same test images
    assert versus["metric"] == "balanced_acc" and versus["paired_images"] == record.params["max_test"]
    assert versus["low"] <= versus["high"] and versus["verdict"] == metrics.interval_verdict(versus["low"], versus["high"])
    base = results.latest("01_baseline", results_dir)
    assert versus["diff"] == pytest.approx(record.final["balanced_acc"] - base.final["balanced_acc"])
    assert f"→ {versus['verdict']}" in all_output(nb)
    assert (results_dir / "02_ray" / "training_comparison.png").is_file()
    assert "02_ray/training_comparison.png" in record.artifacts
    kept = sorted(p.name for p in Path(record.final["run_dir"]).glob("epoch*"))
    assert len(kept) == 2 and kept[-1].startswith(f"epoch{len(record.epochs):03d}")
    assert all_output(nb).count("✓") >= 4                        # every exercise check passed
    assert "not implemented yet" not in all_output(nb)             # the solutions trained, not the fallback


def test_quick_lab_leaves_no_ray_processes(quick_run):
    *_, ray_dir = quick_run
    assert_no_ray_daemons(ray_dir)


def test_a_worker_crash_is_survived_without_losing_an_epoch(tmp_path, data_dir, ray_dir):
    nb, results_dir = run_lab02(tmp_path, data_dir, ray_dir, "-p", "workers", "2", "-p", "quick", "True",
                                "-p", "fail_at_epoch", "2")
    record = results.latest("02_ray", results_dir)
    assert [e["epoch"] for e in record.epochs] == list(range(1, record.params["epochs"] + 1))
    assert [e["attempt"] for e in record.epochs] == [1] + [2] * (record.params["epochs"] - 1)
    assert record.final["restarts"] == 1
    assert (Path(record.final["run_dir"]) / "fail_at_epoch.done").is_file()
    assert "No Lab 01 record" in all_output(nb) and record.final.get("comparison") is None
    # The restart did not cost the result: the model still learned. (Its run differs from the course run's after
    # the restart — the restarted workers draw new augmentations — so it is held to "clearly learned", 0.10 above
    # both floors; issue 29's quick-mode target is asserted on the course run above.)
    assert_learned(record, acc_margin=0.10, balanced_margin=0.10)
    assert_no_ray_daemons(ray_dir)
