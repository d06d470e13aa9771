"""Lab 04 (bad parameters: ``tests/reliability/test_bad_parameters.py``; its plumbing:
``test_lung_vit_runner.py``): the quick course run (executed once for the whole suite by the ``course``
fixture) learns, writes its record and plots, and tracks the run in MLflow inside results/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit import params
from labkit.labs.lung_vit import tracking

ROOT = Path(__file__).resolve().parents[2]
QUICK_MARGIN = 0.05   # balanced accuracy above max(chance 0.11, majority rate) in the quick run; seen: 0.22


@pytest.mark.slow
def test_quick_notebook_runs_and_tracks(course):
    """The lab in quick mode through papermill (the ``course`` fixture's run): record, plots and an MLflow
    run with the parameters, per-epoch metrics and the best checkpoint, all inside results/."""
    from labkit.course.run import format_runs

    run = next(r for r in course["runs"] if r.lab == "04_lung_vit")
    assert run.ok, format_runs([run])
    results_dir = course["results"]
    lab = results_dir / "04_lung_vit"
    rec = json.loads(next(lab.glob("*.json")).read_text())
    epochs = params.QUICK["04_lung_vit"]["epochs"]
    assert rec["params"]["quick"] is True and len(rec["epochs"]) == epochs and rec["final"]["kept_checkpoints"] in (3, 4)
    # the quick run learns: balanced accuracy clearly above both chance (1/9) and the majority-class rate
    final = rec["final"]
    assert final["balanced_acc"] >= max(final["chance"], final["majority_rate"]) + QUICK_MARGIN, final
    assert rec["env"]["precision"] in ("bf16-mixed", "32-true") and "channels_last" in rec["env"]
    versus = final["vs_cnn"]                      # ViT vs CNN: is 0 outside the paired bootstrap interval?
    assert versus["low"] <= versus["high"] and versus["noise"] >= 0
    assert versus["verdict"] == ("within noise" if versus["low"] <= 0 <= versus["high"] else "beyond noise")
    for name in ("samples", "training_curves", "confusion_matrix", "cls_attention", "vit_vs_cnn"):
        assert (lab / f"{name}.png").is_file() and f"04_lung_vit/{name}.png" in rec["artifacts"]
    uri = f"sqlite:///{lab / 'mlflow.db'}"
    logged = tracking.read_run(uri, rec["final"]["mlflow_run_id"])
    assert logged["params"]["depth"] == str(rec["params"]["depth"]) and logged["params"]["workers"] == "2"
    assert [step for step, _ in logged["history"]["val_loss"]] == list(range(1, epochs + 1))
    assert "best_checkpoint/best_model.pt" in logged["artifacts"]
    assert logged["artifact_uri"].startswith(lab.resolve().as_uri())
    # the lab ran in the course folder: MLflow's defaults (./mlruns, ./mlflow.db) must not have appeared there
    assert [p for p in ("mlruns", "mlflow.db") if (ROOT / p).exists()] == course["strays_before"]
