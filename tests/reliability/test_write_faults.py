"""Faults that are cheap to cause: a full disk while a record is written, writers killed at random moments, a
damaged decode cache, and two runs of one lab saving records at the same time."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import badfiles
import pytest
import torch
from tqdm import auto as tqdm_auto
from tqdm import std as tqdm_std

from labkit import files, results
from labkit.data import cache

pytestmark = pytest.mark.usefixtures("isolated_course")



def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_saving_a_record_keeps_the_old_one(monkeypatch):
    record = results.RunRecord(lab="01_baseline", final={"test_acc": 0.5})
    path = results.save(record)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", disk_full)     # the write is flushed to disk before it replaces the old file
    record.final["test_acc"] = 0.9
    with pytest.raises(OSError) as err:
        results.save(record)
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert str(path) in message and "left as it was" in message and "disk space" in message
    assert path.read_bytes() == before, "the previous record is intact"
    assert temporaries(path.parent) == [], "no temporary file left behind"
    assert results.load_record(path).final == {"test_acc": 0.5}


def test_disk_full_for_a_new_file_says_nothing_was_written(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", disk_full)
    target = tmp_path / "out" / "new.json"
    with pytest.raises(OSError, match="not written"):
        files.write_json(target, {"a": 1})
    assert not target.exists() and temporaries(tmp_path / "out") == []


# ----------------------------------------------------------------------------- killed writers
def forked(body) -> int:
    """Run ``body()`` in a forked child (labkit and torch already imported: no start-up cost); returns its pid."""
    pid = os.fork()
    if pid == 0:                                   # the child: never returns into pytest
        code = 1
        try:
            warnings.simplefilter("ignore")
            # tqdm's write lock holds a multiprocessing semaphore, shared with this process's parent after the
            # fork: a child SIGKILLed inside a progress bar would keep it forever and hang the parent's next bar.
            tqdm_std.tqdm.set_lock(threading.RLock())
            tqdm_auto.tqdm.set_lock(threading.RLock())
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_after(pid: int, delay: float) -> None:
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_a_record_writer_killed_at_random_moments_never_leaves_a_half_written_record(tmp_path):
    target = tmp_path / "results" / "01_baseline" / "run.json"
    payload = ["x" * 200] * 2000                   # ~0.4 MB: a write takes long enough to be hit mid-way

    def write_forever():
        for version in range(1, 10**9):
            files.write_json(target, {"version": version, "payload": payload, "end": "complete"})
    files.write_json(target, {"version": 0, "payload": payload, "end": "complete"})
    rng = random.Random(17)
    seen = set()
    for _ in range(8):
        kill_after(forked(write_forever), rng.uniform(0.02, 0.3))
        data = json.loads(target.read_text())      # complete JSON every time: never a torn write
        assert data["end"] == "complete" and len(data["payload"]) == 2000
        seen.add(data["version"])
        # a killed writer may leave a hidden temporary; labkit never reads one as a record
        assert results.record_paths("01_baseline", tmp_path / "results") == [target]
    assert len(seen) > 1, "the writer was killed at different points"


def test_a_cache_writer_killed_at_random_moments_never_leaves_a_cache_that_is_trusted(tmp_path):
    lay = badfiles.alzheimer(tmp_path / "data")
    folder = Path(os.environ["LABKIT_CACHE"])

    def decode_forever():
        while True:                                # decode and write the cache again and again
            for p in folder.rglob("*.pt"):
                p.unlink()
            lay.load()
    rng = random.Random(5)
    for _ in range(5):
        kill_after(forked(decode_forever), rng.uniform(0.05, 0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = lay.load()
        assert badfiles.count(data) == lay.n
        assert all(torch.all(p.images > 60) for p in data.splits.values()), "no zero-filled (torn) images"


# ----------------------------------------------------------------------------- damaged cache
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_decode_cache_is_detected_and_rebuilt(tmp_path, damage):
    lay = badfiles.alzheimer(tmp_path / "data")
    clean = lay.load()
    [path] = list(Path(os.environ["LABKIT_CACHE"]).rglob("alzheimer-train-*.pt"))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:   # flip bytes inside the image tensor's data: torch.load alone does not notice this
        at = raw.index(bytes([badfiles.GOOD_VALUE]) * 64)
        raw[at: at + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        again = lay.load()
    assert torch.equal(again["train"].images, clean["train"].images)
    entry = torch.load(path, weights_only=True)                      # rebuilt: valid again
    assert entry["digest"] == cache.images_digest(entry["images"])


def test_a_damaged_memory_map_note_is_rebuilt(tmp_path):
    lay = badfiles.tiny_imagenet(tmp_path / "data")
    first = lay.load(memory_budget=0)                               # decoded to disk and memory-mapped
    [note] = list(Path(os.environ["LABKIT_CACHE"]).rglob("*-train-mmap-*.json"))
    note.write_text('{"stamps": "abc", "kept": [1, 2')
    with pytest.warns(UserWarning, match=re.escape(note.name)):
        again = lay.load(memory_budget=0)
    assert torch.equal(again["train"].images, first["train"].images)


# ----------------------------------------------------------------------------- two runs at once
def test_two_runs_of_one_lab_at_once_keep_every_record(tmp_path):
    """Two processes forked from one (same clock, same start second) save 15 records each for the same lab."""
    go = time.time() + 0.3

    def save(writer):
        def body():
            while time.time() < go:
                time.sleep(0.001)
            for i in range(15):
                results.save(results.RunRecord(lab="02_ray", final={"writer": writer, "i": i}))
        return body
    pids = [forked(save(w)) for w in "ab"]
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    paths = results.record_paths("02_ray")
    assert len(paths) == 30, "no record overwrote another"
    got = sorted((r.final["writer"], r.final["i"]) for r in map(results.load_record, paths))
    assert got == sorted((w, i) for w in "ab" for i in range(15))


def test_records_made_in_the_same_second_get_distinct_run_ids():
    ids = {results.RunRecord(lab="01_baseline").run_id for _ in range(200)}
    assert len(ids) == 200
