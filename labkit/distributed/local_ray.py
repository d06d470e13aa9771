"""How labkit starts a lab's single-machine Ray cluster (:func:`labkit.distributed.ray_cluster`): listening on
127.0.0.1 only, and without the parts a one-machine course run never uses (measured in
``benchmarks/ray_overhead.py``). A cluster given by ``address`` is joined as it is.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, MutableMapping

#: Where ``labkit run`` tells each lab's kernel the address of the one local cluster it started for the whole course
#: run; :func:`labkit.distributed.ray_cluster` joins it instead of starting a cluster of its own (a lab run alone
#: never sees it).
COURSE_CLUSTER_VAR = "LABKIT_COURSE_RAY_ADDRESS"
#: Ray's switch for its single-machine mode (meant for Windows/macOS): the node binds to 127.0.0.1.
_SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def loopback_only() -> Iterator[None]:
    """Start a local cluster that listens on 127.0.0.1 only. On Linux Ray 2.60 binds a local cluster to the
    machine's routable address (and rewrites ``_node_ip_address="127.0.0.1"`` to it); its single-machine mode
    — the driver's constant and the variable the raylet, GCS and workers inherit — keeps every port on
    loopback. Restored afterwards, so joining a real cluster later is unaffected."""
    from ray._private import ray_constants

    before_const, before_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(_SINGLE_MACHINE_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_SINGLE_MACHINE_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(_SINGLE_MACHINE_VAR, None)
        else:
            os.environ[_SINGLE_MACHINE_VAR] = before_env


def is_loopback(address: str | None) -> bool:
    """True for an ``address`` on this machine's loopback (``127.0.0.1:6379``, ``localhost:6379``,
    ``ray://127.0.0.1:10001``): a cluster started with ``--node-ip-address=127.0.0.1``. Ray joins one only in
    its single-machine mode (:func:`loopback_only`); otherwise it rewrites 127.0.0.1 to the routable address,
    where nothing listens, and retries for minutes."""
    import ipaddress

    if not address or address in ("auto", "local"):
        return False
    rest = address.split("://", 1)[-1]                     # HOST:PORT, [IPv6]:PORT or HOST
    if rest.startswith("["):
        host = rest[1:rest.find("]")]
    else:
        host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Ray Train V2 helpers a lab's single-machine cluster does not use, and a faster controller poll: together
#: ~12 s less ``fit()`` start-up on 2 cores (``benchmarks/ray_overhead.py``). A user's own setting wins.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
#: Optional packages every Ray process would import for nothing (jsonschema's optional ``iri`` format checker:
#: ~4 s of each ``import ray`` here); a local cluster's processes see a stub that declines to import.
SKIPPED_IMPORTS = ("rfc3987_syntax",)


def lean_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Environment for a local cluster's processes (they inherit it at ``ray.init``, or ``ray start``'s when
    ``environ`` is the one it is started with): :data:`LOCAL_TRAIN_ENV` and stubs for :data:`SKIPPED_IMPORTS` on
    ``PYTHONPATH``."""
    import tempfile

    for name, value in LOCAL_TRAIN_ENV.items():
        environ.setdefault(name, value)
    stubs = Path(tempfile.gettempdir()) / "labkit-ray-stubs"
    stubs.mkdir(exist_ok=True)
    for module in SKIPPED_IMPORTS:
        stub = stubs / f"{module}.py"
        if not stub.exists():
            stub.write_text(f'raise ImportError("labkit keeps {module} out of its local Ray cluster\'s processes '
                            f'(optional, slow to import)")\n')
    paths = environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(stubs) not in paths:
        environ["PYTHONPATH"] = os.pathsep.join([str(stubs), *filter(None, paths)])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
