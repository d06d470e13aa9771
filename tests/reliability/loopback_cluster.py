"""A real multi-node Ray cluster on this machine, for the reliability tests.

Each node is its own ``ray start`` (a head, then nodes that join it by address) with its own CPUs and its own
temp folder, so killing one node's processes is what losing a machine looks like to Ray. Every port listens on
127.0.0.1 (:mod:`loopback_ray_start`), token authentication is on (a fresh token, passed through the
environment: nothing is written to ``~/.ray``), and every process a node starts carries a marker in its
environment, so the test finds — and at the end kills — exactly the processes of this cluster.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from labkit.distributed import local_ray
from labkit.distributed.ddp import free_port

START = Path(__file__).with_name("loopback_ray_start.py")
MARK, NODE = "LABKIT_TEST_CLUSTER", "LABKIT_TEST_NODE"


class LoopbackCluster:
    """``with LoopbackCluster() as c: c.add_node("head", head=True); c.add_node("second"); … c.kill_node("second")``.

    ``cpus`` per node; ``start_timeout_s`` is Ray Train's worker-group start timeout on this cluster (how often
    it retries while waiting for room for all workers)."""

    def __init__(self, cpus: int = 1, start_timeout_s: float = 10.0) -> None:
        self.cpus, self.start_timeout_s = cpus, start_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="lkc", dir="/tmp"))  # short: Ray's socket paths are length-limited
        self.tag, self.token, self.port = secrets.token_hex(8), secrets.token_hex(32), free_port()
        self.address = f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ environments
    def driver_env(self, base: dict | None = None) -> dict:
        """Environment for a driver (a notebook) that joins this cluster by :attr:`address`."""
        env = {k: v for k, v in (base or os.environ).items() if k not in ("RAY_ADDRESS", MARK, NODE)}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _node_env(self, name: str) -> dict:
        env = self.driver_env()
        local_ray.lean_env(env)                                      # what labkit gives its own local clusters
        env.update({MARK: self.tag, NODE: name, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(self.start_timeout_s),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # the head declares a silent node dead after ~10 s (Ray: 5 missed checks 3 s apart), robust to a busy CPU
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "10"})
        return env

    # ------------------------------------------------------------------ nodes
    def add_node(self, name: str, head: bool = False) -> float:
        """Start node ``name`` (the head first); returns the seconds ``ray start`` took."""
        where = ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        folder = self.root / name
        folder.mkdir()
        cmd = [sys.executable, str(START), *where, "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
               "--num-gpus=0", f"--temp-dir={folder}", "--disable-usage-stats"]
        tick = time.perf_counter()
        done = subprocess.run(cmd, env=self._node_env(name), capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray start for node {name!r} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return time.perf_counter() - tick

    def processes(self, name: str | None = None) -> list[psutil.Process]:
        """This cluster's live processes (of node ``name`` only, when given): found by the environment marker."""
        found = []
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
                if env.get(MARK) == self.tag and (name is None or env.get(NODE) == name) and proc.status() != psutil.STATUS_ZOMBIE:  # noqa: E501
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of node ``name`` at once (raylet, agents, log monitor, its workers): to Ray, a
        machine that vanished. Returns their PIDs."""
        return _kill(self.processes(name))

    def listening_addresses(self) -> set[str]:
        """The IP addresses this cluster's processes listen on."""
        ips = set()
        for proc in self.processes():
            try:
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            ips |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
        return ips

    @staticmethod
    def is_loopback(ip: str) -> bool:
        """A listening address on loopback (an IPv4-mapped ``::ffff:127.0.0.1`` counts)."""
        return local_ray.is_loopback(ip.removeprefix("::ffff:"))

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> list[int]:
        """Kill every process of the cluster and remove its folders; returns the PIDs still there (none)."""
        for _ in range(3):                    # a dying raylet may still start a worker: look again
            if not _kill(self.processes()):
                break
        left = [p.pid for p in self.processes()]
        shutil.rmtree(self.root, ignore_errors=True)
        return left

    def __enter__(self) -> "LoopbackCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _kill(procs: list[psutil.Process]) -> list[int]:
    """SIGKILL ``procs`` and wait for them; returns their PIDs."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]
