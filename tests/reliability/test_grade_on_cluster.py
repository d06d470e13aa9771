"""`labkit grade --address`: the same grades when each submission is a Ray task on a two-node cluster on loopback."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from gradecases import EXPECTED_TOTALS, build_submissions
from loopback_cluster import LoopbackCluster

pytestmark = pytest.mark.slow


def _totals(path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["student"]: float(row["total"]) for row in csv.DictReader(fh) if row["student"] != "max points"}


def test_grades_are_the_same_as_ray_tasks_on_two_nodes(tmp_path):
    """The totals tests/course/test_grade.py finds with a local pool (``--jobs 2``), here on the cluster."""
    labs, subs = tmp_path / "labs", tmp_path / "subs"
    build_submissions(labs, subs)
    with LoopbackCluster(cpus=1) as cluster:
        cluster.add_node("head", head=True)
        cluster.add_node("second")
        # as an instructor runs it: its own process (Ray keeps per-process auth state from earlier clusters)
        done = subprocess.run([sys.executable, "-m", "labkit", "grade", str(subs), "--lab", "01", "--out",
                               str(tmp_path / "remote"), "--timeout", "40", "--cell-timeout", "30", "--labs-dir",
                               str(labs), "--address", cluster.address], env=cluster.driver_env(),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    remote = [json.loads(p.read_text()) for p in (tmp_path / "remote" / "results").glob("*.json")]
    assert _totals(tmp_path / "remote" / "grades.csv") == EXPECTED_TOTALS
    assert {r["student"]: r["status"] for r in remote}["hangs"] == "timeout"
    assert len({r["ray_node"] for r in remote}) == 2, "every submission was graded on one node"
