"""Scale-out on a real cluster, and what happens when it breaks: Lab 02 joins a two-node Ray cluster on
loopback by ``address`` and loses a node, then the notebook is interrupted, then re-run with fewer workers.

One scenario (Ray start-up is the expensive part, so the cluster and the run are shared by the tests below):

1. a head and a second node, separate ``ray start`` processes with one CPU each — two workers of one CPU each
   *must* run on both;
2. Lab 02 (quick, 3 epochs, 2 workers, batches of 8) with ``address``, in a Jupyter kernel; in epoch 2 the second node is
   killed (every process of it, at once), then a new node joins: Ray Train restarts the workers from the
   checkpoint of epoch 1;
3. in epoch 3 the training cell is interrupted the way Jupyter's ■ does it (SIGINT to the kernel);
4. as a student would: set ``workers = 1`` and ``resume = "last"`` and run the notebook again from the
   check cell, in the same kernel — it continues from the checkpoint of epoch 2.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from loopback_cluster import LoopbackCluster
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from labkit import results
from labkit.distributed import recovery

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "labs" / "02_ray.ipynb"


def progress(storage: Path) -> dict | None:
    """Rank 0's ``progress.json`` of the (only) Lab 02 run in ``storage``, or ``None`` before it exists."""
    for path in storage.glob("run-*/progress.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def wait_for(condition, running: threading.Thread, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert running.is_alive(), f"the training cell ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.1)


def in_epoch(storage: Path, epoch: int):
    """A condition: rank 0 is inside ``epoch`` (the one before it is finished and checkpointed)."""
    def check() -> bool:
        state = progress(storage)
        return state is not None and state["done"] == epoch - 1 and state["epoch"] == epoch and state["batch"] >= 1
    return check


def train_workers(cluster: LoopbackCluster) -> list[psutil.Process]:
    found = []
    for proc in cluster.processes():
        try:
            if "RayTrainWorker" in proc.name() or "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def text_of(cells) -> str:
    return "\n".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.get("outputs", []))


class Kernel:
    """Lab 02 in a Jupyter kernel, cell by cell (``nbclient``): parameters are set the way papermill injects
    them, in a cell after the ``parameters`` cell."""

    def __init__(self, env: dict) -> None:
        self.nb = nbformat.read(NOTEBOOK, as_version=4)
        self.client = NotebookClient(self.nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT)}})
        self.env = env
        code = [i for i, c in enumerate(self.nb.cells) if c.cell_type == "code"]
        self.params = next(i for i in code if "parameters" in self.nb.cells[i].metadata.get("tags", []))
        self.train = next(i for i in code if "recovery.run_dir_for" in self.nb.cells[i].source)

    def run(self, index: int) -> None:
        self.client.execute_cell(self.nb.cells[index], index)

    def set(self, **values) -> None:
        cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
        self.client.execute_cell(cell, self.params)

    def interrupt(self) -> None:
        os.kill(self.client.km.provisioner.process.pid, signal.SIGINT)   # what Jupyter's ■ button sends


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, small_data):
    tmp = tmp_path_factory.mktemp("cluster")
    results_dir = tmp / "results"
    storage = results_dir / "02_ray" / "ray"
    seen: dict = {}
    cluster = LoopbackCluster(cpus=1)
    env = cluster.driver_env({**os.environ, "LABKIT_RESULTS": str(results_dir)})
    env.pop("LABKIT_QUICK", None)
    kernel = Kernel(env)
    starting = threading.Thread(target=lambda: (cluster.add_node("head", head=True), cluster.add_node("second")))
    try:
        starting.start()                                          # the nodes start while the kernel imports
        with kernel.client.setup_kernel(env=env, cwd=str(ROOT)):
            for index in range(kernel.params + 1):
                kernel.run(index)
            # Batches of 8 (4 per worker): ~50 steps an epoch, so that epoch 3 outlasts the interrupt's way to Ray
            # Train's controller even on a fast CPU (at 32, epoch 3 could finish and be registered first).
            kernel.set(data_dir=str(small_data), quick=True, epochs=3, workers=2, address=cluster.address,
                       batch_size=8)
            starting.join()
            seen["listening"] = cluster.listening_addresses()
            for index in range(kernel.params + 1, kernel.train):
                kernel.run(index)

            # 2.-3. train; a node dies in epoch 2 and another joins; the cell is interrupted in epoch 3.
            failure: list = []
            training = threading.Thread(target=lambda: _run_expecting_error(kernel, kernel.train, failure))
            training.start()
            try:
                wait_for(in_epoch(storage, 2), training, 300, "second epoch")
                seen["killed"] = cluster.kill_node("second")         # a node vanishes in the middle of epoch 2
                seen["second_left"] = cluster.processes("second")
                cluster.add_node("third")                         # a node (a new one) comes back
                wait_for(in_epoch(storage, 3), training, 300, "third epoch after the restart")
                kernel.interrupt()
            finally:
                training.join(timeout=180)
            seen["first_error"] = failure[0] if failure else None
            seen["first_text"] = text_of([kernel.nb.cells[kernel.train]])
            deadline = time.monotonic() + 30                      # the aborted run's workers exit
            while train_workers(cluster) and time.monotonic() < deadline:
                time.sleep(0.5)
            seen["workers_after_interrupt"] = train_workers(cluster)
            seen["records_after_interrupt"] = list((results_dir / "02_ray").glob("*.json"))
            seen["tmp_after_interrupt"] = list(results_dir.rglob("*.tmp"))
            seen["unfinished"] = recovery.unfinished_runs(storage)
            seen["done_at_interrupt"] = (recovery.last_checkpoint_epoch(seen["unfinished"][0])
                                         if seen["unfinished"] else 0)

            # 4. fewer workers, continue the interrupted run: the rest of the notebook from the check cell on.
            kernel.set(workers=1, resume="last")
            try:
                for index in range(kernel.params + 1, len(kernel.nb.cells)):
                    kernel.run(index)
                seen["second_error"] = None
            except CellExecutionError as exc:
                seen["second_error"] = str(exc)[-5000:]
            seen["second_text"] = text_of(kernel.nb.cells[kernel.params + 1:])
    finally:
        if starting.is_alive():
            starting.join()
        seen["left_after_shutdown"] = cluster.shutdown()
    seen["record"] = results.latest("02_ray", results_dir) if seen.get("second_error", "x") is None else None
    seen["storage"] = storage
    return seen


def _run_expecting_error(kernel: Kernel, index: int, failure: list) -> None:
    try:
        kernel.run(index)
    except CellExecutionError as exc:
        failure.append(exc)


def test_the_cluster_listens_on_loopback_only(scenario):
    ips = scenario["listening"]
    assert ips and all(LoopbackCluster.is_loopback(ip) for ip in ips), f"the cluster listens on {ips}"


def test_the_workers_run_on_both_nodes(scenario):
    record = scenario["record"]
    assert record is not None, scenario["second_error"]
    first_attempt = [e for e in record.epochs if e["attempt"] == record.epochs[0]["attempt"]]
    assert len(set(first_attempt[0]["nodes"])) == 2, first_attempt[0]["nodes"]


def test_a_lost_node_is_said_and_the_run_resumes_when_a_node_comes_back(scenario):
    assert scenario["killed"] and not scenario["second_left"], "the second node was not killed"
    record = scenario["record"]
    assert record is not None, scenario["second_error"]
    by_attempt: dict[int, list] = {}
    for row in record.epochs:
        by_attempt.setdefault(row["attempt"], []).append(row)
    (a1, rows1), (a2, rows2) = list(by_attempt.items())[:2]
    nodes1, nodes2 = set(rows1[0]["nodes"]), set(rows2[0]["nodes"])
    assert [r["epoch"] for r in rows1] == [1] and [r["epoch"] for r in rows2] == [2], by_attempt
    assert len(nodes2) == 2 and len(nodes1 & nodes2) == 1, (nodes1, nodes2)   # the head stayed, a new node joined
    lost = (nodes1 - nodes2).pop()
    text = scenario["first_text"]
    assert f"node {lost}" in text and "left the Ray cluster during training" in text, text[-3000:]


def test_an_interrupt_stops_the_run_cleanly_and_writes_nothing(scenario):
    error = scenario["first_error"]
    assert error is not None and error.ename == "KeyboardInterrupt", error
    assert "resume='last'" in error.evalue and "checkpoint of epoch 2" in error.evalue, error.evalue
    assert not scenario["workers_after_interrupt"], "training workers still running after the interrupt"
    assert not scenario["records_after_interrupt"], "an interrupted run wrote a record"
    assert not scenario["tmp_after_interrupt"], "a half-written file was left behind"
    assert len(scenario["unfinished"]) == 1 and scenario["done_at_interrupt"] == 2


def test_a_rerun_with_fewer_workers_continues_and_loses_no_epoch(scenario):
    assert scenario["second_error"] is None, scenario["second_error"]
    record, run_dir = scenario["record"], scenario["unfinished"][0]
    assert Path(record.final["run_dir"]) == run_dir
    epochs = [e["epoch"] for e in record.epochs]
    assert epochs == list(range(1, record.params["epochs"] + 1)) == [1, 2, 3], f"an epoch was lost or repeated: {epochs}"
    assert [e["world_size"] for e in record.epochs] == [2, 2, 1]
    assert [e["attempt"] for e in record.epochs] == sorted(e["attempt"] for e in record.epochs)
    assert recovery.unfinished_runs(scenario["storage"]) == []
    text = scenario["second_text"]
    assert f"Continuing run {run_dir.name} after epoch 2" in text
    assert "resumed from the checkpoint of epoch 1" in text and "resumed from the checkpoint of epoch 2" in text
    assert "no finished epoch was lost" in text


def test_nothing_of_the_cluster_is_left_running(scenario):
    assert not scenario["left_after_shutdown"]
