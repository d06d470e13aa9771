"""labkit.distributed.recovery without Ray: the run folders a resume may continue, the story of a run's attempts, the
messages when a node leaves or the cell is interrupted. (The real thing — a two-node cluster that loses a node,
an interrupted notebook re-run with fewer workers — is tests/reliability/test_two_node_cluster.py.)"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from labkit.distributed import recovery
from labkit.distributed.local_ray import is_loopback
from labkit.params import ParameterError


def make_run(storage: Path, name: str, epochs: int, finished: bool = False) -> Path:
    """A run folder as Ray Train V2 leaves it: one checkpoint folder per epoch, each registered in the snapshot."""
    run = storage / name
    run.mkdir(parents=True)
    for epoch in range(1, epochs + 1):
        (run / f"epoch{epoch:03d}_attempt1").mkdir()
        (run / f"epoch{epoch:03d}_attempt1" / "checkpoint.pt").write_bytes(b"x")
    if epochs:
        register(run, [f"epoch{epoch:03d}_attempt1" for epoch in range(1, epochs + 1)])
    if finished:
        recovery.mark_finished(run, epochs)
    return run


def register(run: Path, names: list[str]) -> None:
    rows = [{"version": 0, "checkpoint_dir_name": name, "metrics": {}} for name in names]
    (run / recovery.RAY_SNAPSHOT_FILE).write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": rows}))


def test_a_checkpoint_counts_once_ray_train_registered_it(tmp_path):
    run = make_run(tmp_path, "run-1", 2)
    (run / "epoch003_attempt1").mkdir()                      # written by a worker as the run was interrupted,
    (run / "epoch003_attempt1" / "checkpoint.pt").write_bytes(b"x")   # never registered: Ray continues after 2
    assert recovery.last_checkpoint_epoch(run) == 2
    register(run, ["epoch001_attempt1", "epoch002_attempt1", "epoch003_attempt1"])
    assert recovery.last_checkpoint_epoch(run) == 3
    (run / recovery.RAY_SNAPSHOT_FILE).unlink()              # no snapshot: Ray starts from scratch
    assert recovery.last_checkpoint_epoch(run) == 0
    (run / recovery.RAY_SNAPSHOT_FILE).write_text("{not json")
    assert recovery.last_checkpoint_epoch(run) == 0


def test_unfinished_runs_are_those_with_a_checkpoint_and_no_finished_marker(tmp_path):
    make_run(tmp_path, "run-1", 3, finished=True)
    old = make_run(tmp_path, "run-2", 1)
    make_run(tmp_path, "run-3", 0)                           # stopped before its first checkpoint
    new = make_run(tmp_path, "run-4", 2)
    (new / "epoch003_attempt2").mkdir()                      # a checkpoint folder without its file: not counted
    assert recovery.unfinished_runs(tmp_path) == [old, new]
    assert recovery.last_checkpoint_epoch(new) == 2
    assert recovery.unfinished_runs(tmp_path / "missing") == []
    assert not list(tmp_path.rglob("*.tmp"))


def test_check_resume_names_the_parameter_when_there_is_nothing_to_continue(tmp_path):
    assert recovery.check_resume(None, tmp_path) is None
    with pytest.raises(ParameterError, match=r"'resume' = 'last'.*no unfinished run.*resume=None"):
        recovery.check_resume("last", tmp_path)
    make_run(tmp_path, "run-done", 3, finished=True)
    with pytest.raises(ParameterError, match="already finished"):
        recovery.check_resume("run-done", tmp_path)
    make_run(tmp_path, "run-empty", 0)
    with pytest.raises(ParameterError, match="no checkpoint"):
        recovery.check_resume("run-empty", tmp_path)
    with pytest.raises(ParameterError, match="no run folder"):
        recovery.check_resume("run-typo", tmp_path)
    run = make_run(tmp_path, "run-open", 2)
    assert recovery.check_resume("last", tmp_path) == run.resolve()
    assert recovery.check_resume(str(run), tmp_path) == run.resolve()


def test_run_dir_for_continues_or_starts_anew_and_says_which(tmp_path):
    said = []
    new = tmp_path / "run-new"
    assert recovery.run_dir_for(None, tmp_path, new=lambda: new, say=said.append) == new
    assert said == []
    open_run = make_run(tmp_path, "run-open", 2)
    assert recovery.run_dir_for(None, tmp_path, new=lambda: new, say=said.append) == new
    assert "run-open stopped after epoch 2" in said[-1] and "resume='last'" in said[-1]
    assert recovery.run_dir_for("last", tmp_path, new=lambda: new, say=said.append) == open_run.resolve()
    assert said[-1] == "Continuing run run-open after epoch 2, its last checkpoint."


def row(epoch, attempt, world, nodes):
    return {"epoch": epoch, "attempt": attempt, "world_size": world, "nodes": nodes}


def test_story_tells_each_attempt_where_it_resumed_and_whether_an_epoch_was_lost():
    history = [row(1, 1, 2, ["aaaa", "bbbb"]), row(2, 2, 2, ["aaaa", "cccc"]), row(3, 4, 1, ["cccc"])]
    text = recovery.story(history, attempts=4, left={"bbbb": {"ip": "127.0.0.1", "cpus": 1}})
    lines = text.splitlines()
    assert lines[0] == "attempt 1: trained epoch 1 with 2 workers on 2 nodes (aaaa, bbbb)"
    assert lines[1] == "attempt 2: resumed from the checkpoint of epoch 1, trained epoch 2 with 2 workers on 2 nodes (aaaa, cccc)"
    assert lines[2] == "attempt 4: resumed from the checkpoint of epoch 2, trained epoch 3 with 1 worker on 1 node (cccc)"
    assert "attempt 3: stopped before it finished an epoch" in text
    assert "node bbbb (127.0.0.1, 1 CPU) left the cluster during the run" in text
    assert lines[-1] == "every epoch from 1 to 3 trained exactly once: no finished epoch was lost"
    resumed = [row(1, 1, 2, []), {**row(2, 2, 1, []), "resume": "lr 0.001 for 1 worker(s), newly scaled"}]
    assert recovery.story(resumed).splitlines()[1].endswith("with 1 worker; lr 0.001 for 1 worker(s), newly scaled")
    repeated = recovery.story([row(1, 1, 2, []), row(2, 1, 2, []), row(2, 2, 2, []), row(4, 2, 2, [])])
    assert repeated.splitlines()[-1] == "epochs trained more than once: 2; epochs missing: 3"


def test_run_watch_says_when_a_node_leaves_and_joins(tmp_path, monkeypatch):
    looks = iter([{"aaaa": {"ip": "127.0.0.1", "cpus": 1}, "bbbb": {"ip": "127.0.0.1", "cpus": 1}},
                  {"aaaa": {"ip": "127.0.0.1", "cpus": 1}, "cccc": {"ip": "127.0.0.1", "cpus": 2}}])
    monkeypatch.setattr(recovery, "alive_nodes", lambda: next(looks))
    make_run(tmp_path, "run", 1)
    said = []
    watch = recovery.RunWatch(tmp_path / "run", workers=2, every_s=3600, say=said.append)
    with watch:
        watch.check()
    assert said[0].startswith("⚠ node bbbb (127.0.0.1, 1 CPU) left the Ray cluster during training")
    assert "restarts all 2 workers from the checkpoint of epoch 1" in said[0] and "resume='last'" in said[0]
    assert said[1] == "node cccc (127.0.0.1, 2 CPUs) joined the Ray cluster."
    assert list(watch.left) == ["bbbb"] and list(watch.joined) == ["cccc"]


def test_run_watch_turns_ray_trains_interrupt_into_keyboard_interrupt_and_restores_the_handler(tmp_path, monkeypatch):
    monkeypatch.setattr(recovery, "alive_nodes", dict)
    make_run(tmp_path, "run", 2)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=r"run keeps the checkpoint of epoch 2.*resume='last'"):
        with recovery.RunWatch(tmp_path / "run", workers=2, every_s=3600):
            signal.signal(signal.SIGINT, lambda *_: None)    # what Ray Train's fit() does
            raise SystemExit(0)                              # ... and its handler, on Ctrl-C
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(ValueError):                          # other errors pass through unchanged
        with recovery.RunWatch(tmp_path / "run", workers=2, every_s=3600):
            raise ValueError("boom")


def test_notebook_interrupts_turn_ray_trains_abort_into_keyboard_interrupt(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="training interrupted: Ray Train stopped the run"):
        with recovery.notebook_interrupts():
            signal.signal(signal.SIGINT, lambda *_: None)
            raise SystemExit(0)
    assert signal.getsignal(signal.SIGINT) is before
    with recovery.notebook_interrupts():                     # no interrupt: the handler is put back all the same
        signal.signal(signal.SIGINT, lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True), ("[::1]:6379", True),
    ("10.1.2.3:6379", False), ("ray://head:10001", False), ("auto", False), (None, False)])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback
