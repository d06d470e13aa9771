"""Ray start-up as a lab sees it: labkit's lean local cluster vs Ray's defaults, in one run.

    .venv/bin/python benchmarks/ray_startup.py            # ~2 min on 2 CPU cores

Each side runs in a fresh Python process (start-up is what is measured, so nothing may be warm): ``ray.init``,
then two ``TorchTrainer.fit()`` of a 1-worker loop that only reports one metric — a cold one (the first in the
cluster) and a warm one. The fit times are whole ``fit()`` calls, so they are start-up plus tear-down.

- **Ray defaults**: ``ray.init(address="local", include_dashboard=False)``;
- **labkit**: :func:`labkit.distributed.ray_cluster` — the same, plus :mod:`labkit.distributed.local_ray`: 127.0.0.1 only,
  Train V2's preemption watcher and metrics off, a 0.2 s controller poll, and jsonschema's optional
  ``rfc3987_syntax`` kept out of Ray's processes.

``benchmarks/ray_overhead.py`` breaks the start-up into phases and measures each option on its own.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import time


def _loop(config) -> None:
    import ray.train

    ray.train.report({"x": 1.0})


def _fits() -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    times = []
    for i in range(2):
        tick = time.perf_counter()
        TorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"startup{i}", storage_path=tempfile.mkdtemp())).fit()
        times.append(time.perf_counter() - tick)
    return times[0], times[1]


def measure(mode: str) -> None:
    """One side, in this process; prints ``RESULT init cold warm``."""
    import ray

    tick = time.perf_counter()
    if mode == "labkit":
        from labkit import distributed

        with distributed.ray_cluster():
            init = time.perf_counter() - tick
            cold, warm = _fits()
    else:
        ray.init(address="local", num_cpus=min(os.cpu_count() or 1, 2), include_dashboard=False,
                 logging_level=logging.ERROR)
        init = time.perf_counter() - tick
        cold, warm = _fits()
        ray.shutdown()
    print(f"RESULT {init:.2f} {cold:.2f} {warm:.2f}", flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--side":
        measure(sys.argv[2])
        return 0
    rows = {}
    for mode in ("ray-defaults", "labkit"):
        env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="lkst", dir="/tmp")}
        out = subprocess.run([sys.executable, __file__, "--side", mode], capture_output=True, text=True, env=env,
                             timeout=900)
        found = re.search(r"^RESULT (\S+) (\S+) (\S+)$", out.stdout, flags=re.M)
        if not found:
            print(f"{mode}: no result (exit {out.returncode})\n{out.stderr[-2000:]}")
            return 1
        rows[mode] = [float(v) for v in found.groups()]
    print(f"{'':<14}{'ray.init':>10}{'cold fit()':>12}{'warm fit()':>12}")
    for mode, (init, cold, warm) in rows.items():
        print(f"{mode:<14}{init:>9.1f}s{cold:>11.1f}s{warm:>11.1f}s")
    base, lean = rows["ray-defaults"], rows["labkit"]
    print("labkit / Ray defaults: " + ", ".join(f"{name} ×{b / a:.2f} faster" for name, a, b in
                                               zip(("ray.init", "cold fit()", "warm fit()"), lean, base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
