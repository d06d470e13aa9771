"""labkit summary: README table and summary.png from run records, also with none."""
from __future__ import annotations

import re

import pytest

from labkit import results
from labkit.course import cli
from labkit.course.summary import final_metric, seconds_per_epoch, summary_frame, write_summary
from labkit.results import RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(lab, *, seconds, final, world_size=1, device="cpu", synthetic=True, quick=True, started="2025-11-23T09:30:00+00:00"):
    return RunRecord(lab=lab, params={"quick": quick}, env={"device": device, "world_size": world_size, "cpu_count": 2,
                                                            "device_name": "NVIDIA H100" if device == "cuda" else "x86_64"},
                     data={"synthetic": synthetic}, epochs=[{"epoch": i + 1, "seconds": s} for i, s in enumerate(seconds)],
                     final=final, started=started)


def test_final_metric_prefers_test_then_val_then_acc():
    assert final_metric({"loss": 0.5, "val_acc": 0.7, "test_acc": 0.8}) == ("test_acc", 0.8)
    assert final_metric({"acc": 0.6, "val_acc": 0.7}) == ("val_acc", 0.7)
    assert final_metric({"top1": 0.3, "acc": 0.6}) == ("acc", 0.6)
    assert final_metric({"loss": 0.5, "auc": 0.9}) == ("loss", 0.5)
    assert final_metric({"note": "x", "ok": True}) == (None, None)


def test_seconds_per_epoch_is_mean_of_epochs():
    assert seconds_per_epoch(_record("x", seconds=[2.0, 4.0, 6.0], final={})) == pytest.approx(4.0)
    assert seconds_per_epoch(_record("x", seconds=[], final={})) is None


def test_summary_table_and_plot(tmp_path, capsys):
    root = tmp_path / "results"
    results.save(_record("01_baseline", seconds=[2.0, 4.0], final={"test_acc": 0.8125, "val_acc": 0.5,
                                                                          "balanced_acc": 0.6, "macro_f1": 0.55,
                                                                          "majority_rate": 0.5, "chance": 0.25}), root)
    three_classes = _record("02_ray", seconds=[90.0, 150.0], final={"val_acc": 0.625}, world_size=2, synthetic=False,
                            quick=False, device="cuda", started="2025-11-24T10:00:00+00:00")
    three_classes.data["classes"] = ["a", "b", "c"]          # no chance in final: 1/K from the data's classes
    results.save(three_classes, root)
    results.save(_record("04_lung_vit", seconds=[], final={}), root)
    (root / "01_baseline" / "metrics.json").write_text('{"not": "a record"}')
    assert cli.main(["summary", "--results", str(root)]) == 0
    assert "3 run records summarised" in capsys.readouterr().out

    readme = (root / "SUMMARY.md").read_text()
    assert "This folder holds" in readme and "labkit summary" in readme and "summary.png" in readme
    rows = [line for line in readme.splitlines() if line.startswith("| ") and not line.startswith("| lab ")]
    assert len(rows) == 3
    assert re.search(r"\| 01_baseline \| cpu \(2 cores\) \| 1 \| quick \| 3\.0s \| 0\.812 \(test_acc\) \| 0\.600 \| 0\.550 \| 0\.500 \| 0\.250 \| yes \| 2025-11-23 09:30 UTC \|", readme)  # noqa: E501
    assert re.search(r"\| 02_ray \| NVIDIA H100 \| 2 \| full \| 2m 00s \| 0\.625 \(val_acc\) \| — \| — \| — \| 0\.333 \| no \|", readme)  # noqa: E501
    assert re.search(r"\| 04_lung_vit \| .* \| — \| — \|", readme)
    assert "synthetic data = yes" in readme and "metrics.json" in readme
    png = (root / "summary.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert not [p for p in root.iterdir() if p.name.startswith(".")]   # no temporaries left


def test_summary_with_no_records(tmp_path):
    readme, png = write_summary(tmp_path / "empty")
    assert "No run records yet" in readme.read_text()
    assert png.read_bytes().startswith(PNG_MAGIC)
    frame, skipped = summary_frame(tmp_path / "empty")
    assert frame.empty and skipped == []
