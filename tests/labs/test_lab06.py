"""Lab 06 (bad parameters: ``tests/reliability/test_bad_parameters.py``): the quick course run
(executed once for the whole suite by the ``course`` fixture) learns, counts its coverage (every row once per
epoch), records a backpressure run with its budget and the decode stage's measured pause, judges data- vs
compute-bound against all workers, has the cluster write its inference as folders of Parquet files, and
writes the throughput table and plot and the size comparison."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labkit import results

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "labs" / "06_streaming_data.ipynb"
pytestmark = pytest.mark.slow
#: Quick mode must learn (issue 29): balanced accuracy at least chance (1/K: what any constant answer scores)
#: + 0.20, and plain accuracy at least the majority-class rate (what always answering the commonest class
#: scores) + 0.15 — on 4 classes with majority 0.50: >= 0.45 and >= 0.65.
BALANCED_MARGIN = 0.20
ACCURACY_MARGIN = 0.15
#: The estimate must land within this share of the bytes written (the issue's acceptance bound).
SIZE_TOLERANCE = 0.10
#: The four measured paths (section 6 of the lab), in the table's order.
PATHS = ["Ray Data preprocessing alone", "DataLoader, same decode + augment", "trainer alone (synthetic batches)",
         "combined: Ray Data → Ray Train"]


@pytest.fixture(scope="module")
def lab06(course):
    record = results.latest("06_streaming_data", course["results"])
    assert record is not None, "Lab 06 wrote no run record"
    return record, course["results"] / "06_streaming"


def test_quick_run_learns_beyond_chance_in_balanced_accuracy(lab06):
    record, _ = lab06
    final = record.final
    assert record.params["quick"] is True and record.data["synthetic"] is True
    # a model that learned nothing scores chance (1/K) in balanced accuracy, whatever it answers
    assert final["balanced_acc"] >= final["chance"] + BALANCED_MARGIN, final
    assert final["acc"] >= final["majority_rate"] + ACCURACY_MARGIN, final
    assert 0 <= final["macro_f1"] <= 1 and np.isfinite(final["test_loss"])


def test_coverage_is_counted_and_every_row_is_seen_once_per_epoch(lab06):
    record, _ = lab06
    assert len(record.epochs) == record.params["epochs"]
    n_train = record.data["train_files"]
    coverage = record.final["coverage"]
    assert coverage["train_rows"] == n_train and len(coverage["missed_rows_per_epoch"]) == len(record.epochs)
    for row in record.epochs:
        assert row["shard_rows"] == row["shard_unique"] > 0, row
        assert row["missed_rows"] == n_train - row["unique_ids"] and row["repeated_rows"] == row["rows_seen"] - row["unique_ids"]
        # the stand-in decodes and the quick run has one worker: nothing may be missed or repeated
        assert row["missed_rows"] == row["repeated_rows"] == 0 and row["rows_seen"] == n_train, row
    assert record.final["every_row_once"] is True


def test_backpressure_run_records_its_budget_and_the_measured_pause(lab06):
    record, folder = lab06
    final = record.final
    assert final["backpressure_budget_mb"] == record.params["backpressure_mb"]
    small = final["backpressure"]["small budget"]
    assert small["budget_mb"] == record.params["backpressure_mb"]
    assert final["backpressure"]["lab budget"]["budget_mb"] == record.params["object_store_mb"]
    assert final["backpressure_paused_s"] == small["decode_paused_s"]
    for row in final["backpressure"].values():
        assert 0 <= row["decode_paused_s"] <= row["decode_span_s"] and row["peak_in_flight_mb"] > 0, row
    table = pd.read_csv(folder / "backpressure.csv", index_col=0)
    assert list(table.index) == ["lab budget", "small budget"]
    assert (folder / "backpressure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_table_and_plot(lab06):
    record, folder = lab06
    table = pd.read_csv(folder / "throughput.csv", index_col="path")
    assert list(table.index) == PATHS
    assert (table["images_per_s"] > 0).all() and np.isfinite(table["images_per_s"]).all()
    assert table.loc[PATHS[0], "startup_s"] > 0
    # The pipeline alone has the machine to itself; in training it shares it and still delivered the combined rate
    # over a whole epoch. So a lower "alone" rate means the measurement timed something else (worker start-ups
    # mid-stream once made it 44 img/s against 150 delivered), and the verdict below would rest on it.
    alone, combined = table.loc[PATHS[0], "images_per_s"], table.loc[PATHS[3], "images_per_s"]
    assert alone >= combined, f"preprocessing alone {alone:.0f} img/s < {combined:.0f} img/s delivered in training"
    final = record.final
    # like with like: the pipeline against all workers' compute (one worker here, so the table's row is it)
    assert final["demand_images_per_s"] == pytest.approx(final["compute_images_per_s_per_worker"] * record.env["world_size"])
    assert final["images_per_s trainer alone (synthetic batches)"] == pytest.approx(final["demand_images_per_s"])
    data_ips = final["images_per_s Ray Data preprocessing alone"]
    assert final["verdict"] == ("data-bound" if data_ips < final["demand_images_per_s"] else "compute-bound")
    assert (folder / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for artifact in record.artifacts:
        assert (folder.parent / artifact).is_file(), artifact


def test_inference_is_a_folder_of_parquet_files_written_by_ray_sorted_top_k_and_filtered(lab06):
    record, folder = lab06
    k, threshold = record.params["top_k"], record.params["confidence_threshold"]
    files = sorted((folder / "inference").glob("*.parquet"))
    assert len(files) == record.final["inference_files"] >= 1
    assert not list(folder.glob("*.parquet")), "the driver wrote a Parquet file beside the folders"
    preds = pd.read_parquet(folder / "inference")
    assert {"path", "id", "top_k_classes", "top_k_probs", "prediction", "confidence", "confident"} <= set(preds)
    assert len(preds) == record.final["inference_rows"] == record.data["test_files"]
    assert preds["id"].is_unique and preds["path"].map(lambda p: Path(p).is_file()).all()
    classes, probs = np.stack(preds["top_k_classes"].to_numpy()), np.stack(preds["top_k_probs"].to_numpy())
    assert classes.shape == probs.shape == (len(preds), k)
    assert (np.diff(probs, axis=1) <= 0).all(), "top-k probabilities must be sorted, most probable first"
    assert ((0 <= probs) & (probs <= 1)).all() and (probs.sum(1) <= 1 + 1e-5).all()
    assert (classes[:, 0] == preds["prediction"]).all() and np.allclose(probs[:, 0], preds["confidence"])
    assert (np.sort(classes, 1)[:, 1:] != np.sort(classes, 1)[:, :-1]).all(), "a class repeated within a row's top-k"
    assert (preds["confident"] == (preds["confidence"] >= threshold)).all()
    kept = pd.read_parquet(folder / "confident") if list((folder / "confident").glob("*.parquet")) else preds[:0]
    assert len(kept) == record.final["confident_rows"]
    assert (kept["confidence"] >= threshold).all()
    assert sorted(kept["id"]) == sorted(preds.loc[preds["confident"], "id"])


def test_size_estimates_within_tolerance_of_the_bytes_written(lab06):
    _, folder = lab06
    sizes = pd.read_csv(folder / "output_sizes.csv", index_col="output")
    assert list(sizes.index) == ["predictions", "top_k", "probabilities"]
    for kind, row in sizes.iterrows():
        written = (folder / "sizes" / f"{kind}.parquet").stat().st_size
        assert row["written_bytes"] == written
        assert abs(row["estimate_bytes"] - written) <= SIZE_TOLERANCE * written, (kind, row.to_dict())
    assert sizes["estimate_100k_x_1000_MB"].is_monotonic_increasing
