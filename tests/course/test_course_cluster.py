"""`labkit run` starts one Ray cluster for all the Ray labs of a course run and shuts it down at the end."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest

from labkit.course.run import course_cluster, environ, run_lab, run_labs, uses_ray
from labkit.distributed import ray_daemon_pids
from labkit.distributed.local_ray import COURSE_CLUSTER_VAR

#: A lab that starts (or joins) Ray the way the course's labs do, and prints where it ran.
RAY_LAB = '''import ray
from labkit import distributed
with distributed.ray_cluster(None) as cluster:
    print("GCS", ray.get_runtime_context().gcs_address)
    print("SHARED", cluster.get("course_cluster"))
    print("CPUS", cluster["cpus"], ray.get(ray.remote(lambda: 6 * 7).remote()))
'''


def _lab(folder: Path, name: str, source: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("quick = False", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def _printed(path: Path) -> dict[str, str]:
    nb = nbformat.read(path, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in text.splitlines() if " " in line}


def test_uses_ray_finds_the_labs_that_start_a_cluster(tmp_path):
    assert uses_ray(_lab(tmp_path, "a", RAY_LAB))
    assert not uses_ray(_lab(tmp_path, "b", "print('no ray here')"))


def test_no_shared_cluster_for_fewer_than_two_ray_labs_or_a_given_address(tmp_path, monkeypatch):
    one = [_lab(tmp_path, "a", RAY_LAB), _lab(tmp_path, "b", "print(1)")]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with course_cluster(one, {}) as address:
        assert address is None
    two = [_lab(tmp_path, "c", RAY_LAB), _lab(tmp_path, "d", RAY_LAB)]
    with course_cluster(two, {"address": "127.0.0.1:6379"}) as address:
        assert address is None                      # the user named a cluster: every lab joins that one
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with course_cluster(two, {}) as address:
        assert address is None


@pytest.mark.slow
def test_the_ray_labs_of_a_course_run_join_one_cluster_that_is_gone_afterwards(tmp_path):
    labs = [_lab(tmp_path, "01_first", RAY_LAB), _lab(tmp_path, "02_plain", "print('CPUS none')"),
            _lab(tmp_path, "03_second", RAY_LAB)]
    ray_dir = tempfile.mkdtemp(prefix="lkcc", dir="/tmp")  # short: Ray's socket paths are length-limited
    lines: list[str] = []
    try:
        with environ(RAY_TMPDIR=ray_dir, RAY_ADDRESS=None, **{COURSE_CLUSTER_VAR: None}):
            runs = run_labs([str(p) for p in labs], results_dir=tmp_path / "results", echo=lines.append)
        assert all(r.ok for r in runs), [r.failure.describe() for r in runs if not r.ok]
        first, second = _printed(runs[0].output), _printed(runs[2].output)
        assert first["GCS"] == second["GCS"], "the two Ray labs ran on different clusters"
        assert first["SHARED"] == first["GCS"] and first["CPUS"].endswith(" 42")
        assert any(f"at {first['GCS']}" in line for line in lines), lines     # the run says where the cluster is
        assert not ray_daemon_pids(ray_dir), "the course run's Ray cluster was left running"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.slow
def test_each_lab_starts_its_own_cluster_with_ray_per_lab_or_when_the_course_cluster_is_gone(tmp_path):
    labs = [_lab(tmp_path, "01_first", RAY_LAB), _lab(tmp_path, "02_second", RAY_LAB)]
    ray_dir = tempfile.mkdtemp(prefix="lkcc", dir="/tmp")
    try:
        with environ(RAY_TMPDIR=ray_dir, RAY_ADDRESS=None, **{COURSE_CLUSTER_VAR: "127.0.0.1:1"}):
            runs = run_labs([str(p) for p in labs], results_dir=tmp_path / "results", shared_ray=False,
                            echo=lambda line: None)
        assert all(r.ok for r in runs), [r.failure.describe() for r in runs if not r.ok]
        # with shared_ray=False the variable is cleared for the labs: each starts its own
        assert _printed(runs[0].output)["SHARED"] == "None"
        assert _printed(runs[0].output)["GCS"] != _printed(runs[1].output)["GCS"]
        # a course cluster that no longer answers: the lab says so and starts its own
        with environ(RAY_TMPDIR=ray_dir, RAY_ADDRESS=None, **{COURSE_CLUSTER_VAR: "127.0.0.1:1"}):
            alone = run_lab(labs[0], tmp_path / "alone.ipynb")
        assert alone.ok, alone.failure and alone.failure.describe()
        text = "".join(o.get("text", "") for c in nbformat.read(alone.output, as_version=4).cells
                       if c.cell_type == "code" for o in c.outputs)
        assert "does not answer" in text and "127.0.0.1:1" in text and "SHARED None" in text
        assert not ray_daemon_pids(ray_dir)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
