"""Ray Train overhead: start-up broken down, per-epoch cost of 1 worker vs the plain loop, start-up options.

    .venv/bin/python benchmarks/ray_overhead.py                 # ~4-6 min on 2 CPU cores
    .venv/bin/python benchmarks/ray_overhead.py --no-options    # without the start-up options (~3 min)

Both sides train Lab 01's model with ``labkit.train.train_one_epoch`` and evaluate it after every epoch; the
Ray side is a minimal worker function (below) that also does what Lab 02's notebook adds per epoch: a
``ray.train.report`` with a checkpoint. The worker reserves every core (``plan_scaling(1, ...)``), as the plain
loop uses them. Everything printed is measured in this one run:

1. **Start-up breakdown** of a cold ``trainer.fit()`` (the first in a fresh cluster): ``ray.init`` (dashboard
   off, as ``labkit.distributed.ray_cluster`` starts it); fit() → the Train controller's process exists;
   → the worker's process exists (controller start, placement group, worker group); → the worker function
   runs (Ray and torch imports in the worker, process group set-up, shipping the function); the process group
   set-up alone (a gloo group re-created inside the worker, timed); the first batch (data from the cache, the
   first training step); and after the last epoch → fit() returns (the controller notices the end, tears down).
   Process start times come from ``psutil`` (``create_time``), the rest from ``time.time()`` on one machine.
2. **Per-epoch overhead**: plain loop, Ray, plain loop again (the mean of both plain runs cancels a slow drift);
   epochs after the first. ``ray per-epoch overhead`` counts the whole epoch (train + evaluate + Ray's report
   with a checkpoint); the training part alone is shown beside it.
3. **Warm fit() start-up** (a second fit() in the running cluster: what a notebook pays for each run after the
   first), and the same with each start-up option (environment variables Ray Train V2 reads in the driver
   and passes on to its controller and workers), one short fit each.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from labkit import distributed
from labkit.data.augment import batch_transform
from labkit.distributed import worker
from labkit.env import seed_everything
from labkit.models.cnn import AlzheimerCNN
from labkit.params import check
from labkit.train import evaluate, train_one_epoch

#: Start-up options measured on a warm cluster (Ray Train V2 2.60 reads these; see the report).
OPTIONS: dict[str, dict[str, str]] = {
    "controller polls every 0.2 s (default 2 s)": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
    "no preemption watcher, no Train metrics": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                                "RAY_TRAIN_METRICS_ENABLED": "0"},
    "all of the above + no structured logs": {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_METRICS_ENABLED": "0", "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
        "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"},
}

#: Cluster options (``ray.init(_system_config=...)``): each needs a fresh cluster and a cold fit.
SYSTEM_CONFIGS: list[dict] = [{"enable_worker_prestart": True}]


def first_step(model, loader, optimizer, loss_fn, transform) -> float:
    """Seconds of one training step on the first batch (both sides do it, before the timed epochs)."""
    tick = time.perf_counter()
    x, y = next(iter(loader))
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(transform(x)), y).backward()
    optimizer.step()
    return time.perf_counter() - tick


def plain_epochs(cfg, ds, epochs: int) -> dict:
    """The plain Lab 01 loop in this process: first-batch seconds and wall seconds of each epoch."""
    seed_everything(cfg.seed)
    model = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = ds.loader("train", batch_size=cfg.batch_size, seed=cfg.seed)
    test_loader = ds.loader("test", batch_size=cfg.batch_size)
    first = first_step(model, train_loader, optimizer, loss_fn, batch_transform(train=True))
    times, train_s = [], []
    for _ in range(epochs):
        tick = time.perf_counter()
        stats = train_one_epoch(model, train_loader, optimizer, loss_fn, device="cpu",
                                transform=batch_transform(train=True), progress=False)
        evaluate(model, test_loader, loss_fn, device="cpu", transform=batch_transform(train=False))
        times.append(time.perf_counter() - tick)
        train_s.append(stats["seconds"])
    return {"epoch_s": times, "train_s": train_s, "first_batch_s": first}


def _process_started(name: str) -> float | None:
    """Start time (epoch seconds) of the newest process whose command line starts with ``name``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith(name):
            found.append(proc.info["create_time"])
    return max(found) if found else None


def ray_worker(config: dict) -> dict:
    """The plain loop inside one Ray Train worker, reporting a checkpoint every epoch like Lab 02,
    plus the timestamps of the start-up breakdown."""
    entered = time.time()
    import psutil
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    marks = {"fn_start": entered, "worker_process": psutil.Process().create_time(),
             "controller_process": _process_started("ray::TrainController")}
    if dist.is_initialized():  # the process group Ray set up: time a fresh one of the same kind
        from labkit.distributed.ddp import free_port

        tick = time.perf_counter()
        group = dist.new_group(backend="gloo")
        dist.barrier(group=group)
        marks["new_group_s"] = time.perf_counter() - tick
        dist.destroy_process_group(group)
        tick = time.perf_counter()
        store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=__import__("datetime").timedelta(seconds=30))
        dist.ProcessGroupGloo(store, 0, 1)  # rendezvous + gloo context: what init_process_group does
        marks["init_pg_s"] = time.perf_counter() - tick
    worker.quiet_ray_worker_logs()
    torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])
    with worker.quiet_prints():
        ds = distributed.prepare_data(config)
    model = ray.train.torch.prepare_model(AlzheimerCNN(num_classes=len(ds.classes), image_size=config["image_size"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loss_fn = nn.CrossEntropyLoss()
    train_loader = ds.loader("train", batch_size=config["batch_size"], seed=config["seed"])
    test_loader = ds.loader("test", batch_size=config["batch_size"])
    marks["first_batch_s"] = first_step(model, train_loader, optimizer, loss_fn, batch_transform(train=True))
    marks["setup_done"] = time.time()
    history = []
    for epoch in range(1, config["epochs"] + 1):
        tick = time.perf_counter()
        stats = train_one_epoch(model, train_loader, optimizer, loss_fn, device="cpu",
                                transform=batch_transform(train=True), progress=False)
        evaluate(model, test_loader, loss_fn, device="cpu", transform=batch_transform(train=False))
        row = {"epoch": epoch, "seconds": stats["seconds"]}
        with tempfile.TemporaryDirectory() as folder:
            worker.save_checkpoint(folder, model, optimizer, epoch, history)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))
        history.append({**row, "epoch_s": time.perf_counter() - tick})
    marks["fn_end"] = time.time()
    return {"history": history, "marks": marks}


@contextmanager
def environ(values: dict[str, str]):
    """Set environment variables for the ``with`` block (Train V2 reads them at ``fit()``)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit(cfg, epochs: int, storage: str, env: dict[str, str] | None = None) -> dict:
    """One ``TorchTrainer.fit()`` of :func:`ray_worker` with 1 worker; timestamps and the worker's result."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = distributed.plan_scaling(1, "cpu", **distributed.machine_resources())
    run_dir = distributed.new_run_dir(storage)
    config = {**distributed.worker_config(cfg, plan, run_dir, progress=False), "epochs": epochs}
    with environ(env or {}):
        trainer = TorchTrainer(ray_worker, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker=plan.resources()),
                               run_config=RunConfig(name=run_dir.name, storage_path=storage))
        start = time.time()
        result = trainer.fit()
        end = time.time()
    out = dict(result.return_value)
    out.update(start=start, end=end, plan=plan)
    out["startup_s"] = (end - start) - sum(h["epoch_s"] for h in out["history"])
    return out


def cold_fit_with_system_config(cfg, system_config: dict) -> tuple[float, float]:
    """``(ray.init seconds, cold 1-epoch fit() start-up seconds)`` in a fresh local cluster started with
    ``_system_config`` (otherwise as ``labkit.distributed.ray_cluster`` starts it)."""
    import logging

    import ray

    res = distributed.machine_resources()
    tick = time.perf_counter()
    ray.init(address="local", num_cpus=sum(res["node_cpus"]), num_gpus=res["gpus"], include_dashboard=False,
             logging_level=logging.ERROR, _system_config=system_config)
    init_s = time.perf_counter() - tick
    try:
        with tempfile.TemporaryDirectory() as storage:
            return init_s, fit(cfg, 1, storage)["startup_s"]
    finally:
        ray.shutdown()


def after_warmup(times: list[float]) -> float:
    return statistics.mean(times[1:] if len(times) > 1 else times)


def import_seconds(module: str) -> float:
    """Wall seconds of ``python -c 'import <module>'`` in a fresh interpreter (what each worker process pays)."""
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - tick


def print_breakdown(init_s: float, cold: dict) -> None:
    m = cold["marks"]
    ctrl = m.get("controller_process")
    rows = [("ray.init (local cluster, dashboard off)", init_s)]
    if ctrl and ctrl < cold["start"]:  # the controller took over a worker process Ray had started before fit()
        rows += [("Train controller: ran in a pre-started worker process (created this long before fit())",
                  cold["start"] - ctrl),
                 ("fit() -> worker process exists (controller, placement group, worker group)",
                  m["worker_process"] - cold["start"])]
    elif ctrl:
        rows += [("fit() -> Train controller process exists", ctrl - cold["start"]),
                 ("controller -> worker process exists (placement group, worker group)", m["worker_process"] - ctrl)]
    else:
        rows += [("fit() -> worker process exists (controller, placement group, worker group)",
                  m["worker_process"] - cold["start"])]
    rows += [("worker process -> worker function runs (imports, process group, function shipped)",
              m["fn_start"] - m["worker_process"]),
             ("  of which: a gloo process group set up again in the worker (store + group)", m.get("init_pg_s", float("nan"))),
             ("worker function -> first batch done (data from the cache, model, first step)",
              m["setup_done"] - m["fn_start"]),
             ("  of which: the first batch (load + step; plain loop: see below)", m["first_batch_s"]),
             ("last epoch done -> fit() returns (controller notices, tears down)", cold["end"] - m["fn_end"])]
    print("\n== 1. start-up breakdown of a cold fit() (first fit in a fresh cluster), seconds")
    for name, s in rows:
        print(f"{name:<92}{s:7.2f}")
    print(f"{'fit() total minus the timed epochs':<92}{cold['startup_s']:7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=1200)
    parser.add_argument("--max-test", type=int, default=400)
    parser.add_argument("--data-dir", default="data/alzheimer")
    parser.add_argument("--no-options", action="store_true", help="leave out part 3's start-up options")
    parser.add_argument("--without-rfc3987-syntax", action="store_true",
                        help="start Ray's processes with the optional rfc3987_syntax package hidden (a stub on "
                             "PYTHONPATH that fails to import): jsonschema, which every Ray process imports, "
                             "then skips it and `import ray` takes ~1 s instead of ~5 s on this machine")
    args = parser.parse_args(argv)
    if args.without_rfc3987_syntax:
        stub = Path(tempfile.mkdtemp(prefix="labkit-stub-")) / "rfc3987_syntax"
        stub.mkdir()
        atexit.register(shutil.rmtree, stub.parent, True)
        (stub / "__init__.py").write_text('raise ImportError("hidden by benchmarks/ray_overhead.py")\n')
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))
        print(f"rfc3987_syntax hidden from Ray's processes (PYTHONPATH={os.environ['PYTHONPATH']})")

    cfg = check("02_ray", workers=1, epochs=args.epochs, batch_size=32, lr=1e-3, lr_scaling="none",
                image_size=args.image_size, device="cpu", data="auto", data_dir=args.data_dir, quick=False,
                seed=0, address=None, fail_at_epoch=None, show=False)
    cfg.update(max_train=args.max_train, max_test=args.max_test)
    ds = distributed.prepare_data(cfg)
    load = os.getloadavg()[0]
    print(f"data: {len(ds.splits['train'].labels)} train / {len(ds.splits['test'].labels)} test images at "
          f"{cfg.image_size} px (synthetic stand-in: {ds.synthetic}); {args.epochs} epochs; torch threads "
          f"{torch.get_num_threads()}; Ray Train V2; load average {load:.1f} on {os.cpu_count()} cores")

    plain_a = plain_epochs(cfg, ds, cfg.epochs)
    print("plain loop   epoch s:", " ".join(f"{t:.2f}" for t in plain_a["epoch_s"]))
    with tempfile.TemporaryDirectory() as storage, distributed.ray_cluster(None) as cluster:
        cold = fit(cfg, cfg.epochs, storage)
        print("ray 1 worker epoch s:", " ".join(f"{h['epoch_s']:.2f}" for h in cold["history"]),
              f"  ({cold['plan'].describe()})")
        warm = [] if args.no_options else [("defaults (warm cluster)", {})] + list(OPTIONS.items())
        warm_runs = [(name, fit(cfg, 1, storage, env)) for name, env in warm or [("defaults (warm cluster)", {})]]
    plain_b = plain_epochs(cfg, ds, cfg.epochs)
    print("plain loop   epoch s:", " ".join(f"{t:.2f}" for t in plain_b["epoch_s"]))

    print_breakdown(cluster["init_seconds"], cold)
    print(f"{'plain loop: the first batch (load + step), for comparison':<92}"
          f"{statistics.mean([plain_a['first_batch_s'], plain_b['first_batch_s']]):7.2f}")
    torch_s, labkit_s = import_seconds("torch"), import_seconds("labkit.distributed")
    print(f"{'import torch in a fresh process / import labkit.distributed (torch, pandas, ray)':<92}"
          f"{torch_s:7.2f} / {labkit_s:.2f}")

    plain = (after_warmup(plain_a["epoch_s"]) + after_warmup(plain_b["epoch_s"])) / 2
    plain_train = (after_warmup(plain_a["train_s"]) + after_warmup(plain_b["train_s"])) / 2
    ray_epoch = after_warmup([h["epoch_s"] for h in cold["history"]])
    ray_train_only = after_warmup([h["seconds"] for h in cold["history"]])
    print("\n== 2. per epoch after warm-up (train + evaluate; Ray also reports a checkpoint)")
    print(f"plain {plain:.2f} s, ray {ray_epoch:.2f} s; training part: plain {plain_train:.2f} s, ray "
          f"{ray_train_only:.2f} s ({100 * (ray_train_only - plain_train) / plain_train:+.1f}%)")
    print(f"ray per-epoch overhead: {100 * (ray_epoch - plain) / plain:+.1f}%   (goal within 2.5%)")

    print("\n== 3. fit() start-up on a warm cluster (fit() time minus the epoch; 1-epoch fits), seconds")
    base = warm_runs[0][1]["startup_s"]
    for name, run in warm_runs:
        note = "" if run is warm_runs[0][1] else f"  ({run['startup_s'] - base:+.2f} s vs defaults)"
        print(f"{name:<52}{run['startup_s']:7.2f}{note}")
    if not args.no_options:
        for system_config in SYSTEM_CONFIGS:
            try:
                init_s, startup_s = cold_fit_with_system_config(cfg, dict(system_config))
            except Exception as exc:  # noqa: BLE001 — an option this Ray does not know: say so, keep the rest
                print(f"fresh cluster with _system_config={system_config}: failed ({type(exc).__name__}: {exc})")
                continue
            print(f"fresh cluster with _system_config={system_config}: ray.init {init_s:.2f} s "
                  f"(defaults {cluster['init_seconds']:.2f}), cold fit() start-up {startup_s:.2f} s "
                  f"(defaults {cold['startup_s']:.2f})")
    print(f"ray fit start-up, warm cluster: {base:.1f} s   (goal <= 20 s); cold (first fit): {cold['startup_s']:.1f} s")
    print(f"load average (1 min) before / after: {load:.1f} / {os.getloadavg()[0]:.1f}: other processes on the "
          "same cores lengthen every figure here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
