"""`labkit grade --address`: the same grades when each submission is a Ray task on a two-node cluster on loopback."""
from __future__ import annotations

import csv

import pytest
from gradecases import EXPECTED_TOTALS, build_submissions
from loopback_cluster import LoopbackCluster

from labkit.course.grading import grade

pytestmark = pytest.mark.slow


def _totals(path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["student"]: float(row["total"]) for row in csv.DictReader(fh) if row["student"] != "max points"}


def test_grades_are_the_same_as_ray_tasks_on_two_nodes(tmp_path, monkeypatch):
    """The totals tests/course/test_grade.py finds with a local pool (``--jobs 2``), here on the cluster."""
    labs, subs = tmp_path / "labs", tmp_path / "subs"
    build_submissions(labs, subs)
    with LoopbackCluster(cpus=1) as cluster:
        cluster.add_node("head", head=True)
        cluster.add_node("second")
        for name, value in cluster.driver_env().items():
            monkeypatch.setenv(name, value)
        remote, _ = grade(subs, "01", tmp_path / "remote", timeout=40, cell_timeout=30, labs_dir=labs,
                          address=cluster.address, echo=lambda line: None)
    assert _totals(tmp_path / "remote" / "grades.csv") == EXPECTED_TOTALS
    assert {r["student"]: r["status"] for r in remote}["hangs"] == "timeout"
    assert len({r["ray_node"] for r in remote}) == 2, "every submission was graded on one node"
