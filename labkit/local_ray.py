"""How labkit starts a lab's single-machine Ray cluster (:func:`labkit.distributed.ray_cluster`): listening on
127.0.0.1 only, and without the parts a one-machine course run never uses (measured in
``benchmarks/ray_overhead.py``). A cluster given by ``address`` is joined as it is.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


#: Ray Train V2 helpers a lab's single-machine cluster does not use, and a faster controller poll: together
#: ~12 s less ``fit()`` start-up on 2 cores (``benchmarks/ray_overhead.py``). A user's own setting wins.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
#: Optional packages every Ray process would import for nothing (jsonschema's optional ``iri`` format checker:
#: ~4 s of each ``import ray`` here); a local cluster's processes see a stub that declines to import.
SKIPPED_IMPORTS = ("rfc3987_syntax",)


def lean_env() -> None:
    """Environment for a local cluster's processes (they inherit it at ``ray.init``): :data:`LOCAL_TRAIN_ENV`
    and stubs for :data:`SKIPPED_IMPORTS` on ``PYTHONPATH``."""
    import tempfile

    for name, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    stubs = Path(tempfile.gettempdir()) / "labkit-ray-stubs"
    stubs.mkdir(exist_ok=True)
    for module in SKIPPED_IMPORTS:
        stub = stubs / f"{module}.py"
        if not stub.exists():
            stub.write_text(f'raise ImportError("labkit keeps {module} out of its local Ray cluster\'s processes '
                            f'(optional, slow to import)")\n')
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(stubs) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(stubs), *filter(None, paths)])
