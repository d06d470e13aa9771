# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lab 02 — The same training, distributed with Ray Train
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/labs/02_ray.ipynb)
#
# Lab 01 trained one model in one process. Here the **same loop** runs in several *workers* that each hold a
# copy of the model, train on their own share of the data and average their gradients after every step:
# **data parallelism**, orchestrated by [Ray Train](https://docs.ray.io/en/latest/train/train.html).
# The number of workers is a parameter (`workers`), and the lab compares the result with your Lab 01 run.
#
# **You will learn to**
# - turn a plain PyTorch loop into a Ray Train job with a handful of calls (`prepare_model`, `prepare_data_loader`,
#   `ray.train.report`, `ray.train.get_checkpoint`) — the loop itself does not change;
# - explain data parallelism and **all-reduce**, and how the learning rate relates to the global batch;
# - measure where distributed time goes (start-up, data, compute, waiting for gradients) and why 2 CPU workers
#   on one 2-core machine are **not** faster than one process;
# - survive a crashed worker: checkpoints, `FailureConfig` and resuming without losing a finished epoch.
#
# **Run time**: quick mode (`quick=True`) ≈ 2 min on 2 CPU cores (about 1 min of it is Ray starting up);
# the full configuration (5 epochs, 128 px, 6,400 images, 2 workers) ≈ 20–30 min on 2 CPU cores, a few minutes
# with one GPU per worker.

# %% [markdown]
# ## 0. Setup
# In Colab this cell installs labkit; anywhere else the course's `make course` / `make setup` already did.

# %%
import sys
if "google.colab" in sys.modules:  # Colab only: fetch the course and install labkit (elsewhere `make course` did it)
    # !git clone -q https://github.com/labkit-course/labkit /content/labkit 2>/dev/null || true
    # %pip install -q -e /content/labkit
    # %cd /content/labkit

import inspect
import pandas as pd
import torch
import labkit
from labkit import distributed, env, params, plotting, ray_train, results, train
from labkit.exercises import lab02 as exercises
from labkit.data.augment import batch_transform
from labkit.models.cnn import AlzheimerCNN
from labkit.models.summary import count_parameters

# %% [markdown]
# ## 1. Parameters
# Every knob lives in the next cell (tagged `parameters`); run the lab headless with e.g.
# `papermill labs/02_ray.ipynb out.ipynb -p workers 2 -p quick True`.
# The defaults are the source project's configuration: 2 workers, 5 epochs, batch 32 **per worker**, Adam 1e-3, 128 px.
#
# - `lr_scaling`: how the learning rate grows with the number of workers (`"none"`, `"linear"`, `"sqrt"`; see exercise 1).
# - `address`: a running Ray cluster (`"ray://head:10001"` or `"head:6379"`); `None` starts a local cluster on this
#   machine (the environment variable `RAY_ADDRESS` works too). A cluster is how you outgrow one machine.
# - `fail_at_epoch`: kill one worker once at that epoch, to watch Ray Train restart it from the last checkpoint.
# - `sweep`: a list of worker counts, e.g. `[1, 2]`, to train once per count and plot speedup and efficiency.

# %% tags=["parameters"]
workers = 2
epochs = 5
batch_size = 32               # per worker: one optimizer step sees workers × batch_size images
lr = 1e-3
lr_scaling = "none"           # "none", "linear" or "sqrt"
image_size = 128
device = "auto"
data = "auto"                 # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/alzheimer"
quick = False
seed = 0
address = None                # None: a local Ray cluster; or "ray://host:10001" / "host:6379"
fail_at_epoch = None          # e.g. 2: one worker crashes once at epoch 2
sweep = None                  # e.g. [1, 2]: one run per worker count, then a speedup plot


# %% [markdown]
# ## 2. Check the parameters
# `labkit.params.check` validates every parameter (a typo fails here, naming the culprit) and applies quick mode.

# %% tags=["nbval-check-output"]
def _worker_counts(value):
    ok = isinstance(value, list) and value and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value)
    return None if ok else "must be a list of worker counts >= 1, e.g. [1, 2]"

cfg = params.check("02_ray", rules={"sweep": params.Rule(list, optional=True, test=_worker_counts)},
                   workers=workers, epochs=epochs, batch_size=batch_size, lr=lr, lr_scaling=lr_scaling,
                   image_size=image_size, device=device, data=data, data_dir=data_dir, quick=quick, seed=seed,
                   address=address, fail_at_epoch=fail_at_epoch, sweep=sweep)
env.seed_everything(cfg.seed)
out_dir = results.lab_dir("02_ray")

# %% [markdown]
# Next, Ray's resources: each worker is a process that needs at least one CPU core, and NCCL (the GPU
# communication library) needs **one GPU per worker**. `plan_scaling` decides CPU/gloo or GPU/NCCL and refuses a
# request that cannot run *before* Ray starts — asking for 64 workers on 2 cores fails now, instead of Ray waiting
# forever for cores that do not exist. (With `address` set, the plan is made from the cluster's resources instead.)

# %%
if distributed.resolve_address(cfg.address) is None:
    plan = distributed.plan_scaling(cfg.workers, cfg.device, **distributed.machine_resources())
    print("plan:", plan.describe())
    if plan.notice:
        print(plan.notice)
else:
    print(f"Ray cluster at {distributed.resolve_address(cfg.address)}: the plan is made once connected.")

# %% [markdown]
# ## 3. Data parallelism in one picture
# ```
#             ┌ worker 0: model copy ─ batch of images 0, 2, 4, … ─ gradients g0 ┐
#  dataset ──►│                                                                 ├─ all-reduce: g = (g0 + g1) / 2 ─► same step everywhere
#             └ worker 1: model copy ─ batch of images 1, 3, 5, … ─ gradients g1 ┘
# ```
# - Every worker starts from the **same weights**, trains on a **different slice** of the data (a
#   `DistributedSampler` deals the images out like cards) and computes its own gradients.
# - **All-reduce** averages the gradients across workers; every worker then takes the same optimizer step, so the
#   copies stay identical. PyTorch's `DistributedDataParallel` (DDP) does this during `backward()`, bucket by
#   bucket, overlapping communication with the rest of the backward pass. Ray Train starts the processes, sets
#   up the process group (gloo on CPU, NCCL on GPUs), wraps the model in DDP and handles failures.
# - One step now sees `workers × batch_size` images, so an epoch has `1/workers` as many steps: that is where a
#   speedup comes from — *if* each worker has its own hardware.
#
# **Why 2 CPU workers on one 2-core machine are not faster.** One process already uses both cores (PyTorch runs
# each convolution on all cores). Two workers split the same two cores (one each), so the compute per epoch is
# the same, and they add work: gradient all-reduce after every step, two copies of the data and the model, and
# about a minute of start-up. Expect them to be *slower* here. Speedups come from workers with their own
# GPUs or machines — the same code, pointed at a cluster.

# %% [markdown]
# ## 4. The data
# The same dataset and cache as Lab 01. The driver (this notebook) loads it once **before** the workers
# start, so the workers only read the cached tensors instead of racing to write them.

# %%
ds = distributed.prepare_data(cfg)   # its notices (stand-in written, decoding) differ between runs: unchecked

# %% tags=["nbval-check-output"]
counts = ds.class_counts()
print(f"layout: {ds.layout}   synthetic stand-in: {ds.synthetic}   image tensor: {tuple(ds.splits['train'].images.shape[1:])}")
print(counts.to_string())

# %% [markdown]
# ## 5. The model
# Exactly Lab 01's `AlzheimerCNN`; every worker builds its own copy (same seed, and DDP also copies rank 0's
# weights to the others at the start).

# %% tags=["nbval-check-output"]
model = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)
n_params = count_parameters(model)
print(f"AlzheimerCNN at {cfg.image_size} px: {n_params:,} parameters ({n_params / 1e6:.2f} M)")

# %% [markdown]
# ## 6. The training function every worker runs
# Read it: it is Lab 01's loop (`train_one_epoch`, `evaluate`) with a few Ray calls, marked `# Ray:`.
# - `prepare_model` moves the model to the worker's device and wraps it in DDP;
# - `prepare_data_loader` adds the `DistributedSampler` (each worker gets its own slice; `set_epoch` reshuffles);
# - `ray.train.report(metrics, checkpoint=...)` after each epoch: metrics from every rank, the checkpoint (model,
#   optimizer, epoch, history) from rank 0 only. In Ray 2.5x+ "Train V2", `Result.metrics` and
#   `metrics_dataframe` only keep metrics reported **together with a checkpoint** — so we checkpoint every epoch;
# - `ray.train.get_checkpoint()` returns the last checkpoint when Ray restarts the workers after a crash: the
#   loop continues with the next epoch.
#
# Metrics are averaged over the workers (each evaluates its own part of the test set), so the numbers describe the
# whole run, not one worker.

# %%
print(inspect.getsource(ray_train.train_loop_per_worker))

# %% [markdown]
# And the driver side: a `TorchTrainer` built from `ScalingConfig` (how many workers, GPU or not), `RunConfig`
# (where checkpoints go, how many to keep, how many restarts to allow). `train_with_ray` wraps it in
# `ray.init(...)` / `ray.shutdown()` — the shutdown also happens when training fails.

# %%
print(inspect.getsource(distributed.make_trainer))

# %% [markdown]
# ## 7. Train
# Ray starts a local cluster (or joins `address`), launches the workers and streams their output here: a progress
# bar per epoch and one line per epoch with the time left. Ray's start-up takes about a minute on 2 CPU cores —
# it is measured separately below. With `fail_at_epoch` set, one worker kills itself halfway through that epoch:
# Ray prints the dead worker's error (tracebacks are expected here), restarts the worker group, and the training
# function continues from the last checkpoint.

# %%
run = distributed.train_with_ray(cfg, data_ready=True)
summary = run.summary()
print(f"{run.plan.describe()}; restarts: {run.restarts}")
print(f"ray.init {summary['init_seconds']:.1f} s, trainer.fit {summary['fit_seconds']:.1f} s "
      f"(of which start-up and shut-down {summary['startup_seconds']:.1f} s)")

# %% [markdown]
# The per-epoch table, averaged over the workers. `seconds` is the training time of an epoch (the slowest worker),
# `images_per_s` the throughput of all workers together; `attempt` says which start of the worker group trained
# that epoch (2 after one restart). Timings vary between runs; the curves below are saved to `results/02_ray/`.

# %%
table = pd.DataFrame(run.history).set_index("epoch")
cols = ["loss", "acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s", "attempt"]
display(table[cols].round(4))
plotting.plot_history(run.history, out_dir / "training_curves.png", title=f"Lab 02: Ray Train, {cfg.workers} workers");

# %% [markdown]
# ### Where does the time go?
# Per epoch and averaged over workers: `data_s` is time spent waiting for the next batch, `compute_s` the rest of
# the step (forward, backward, optimizer — *including* any wait for gradients), and `sync_s` the time gradient
# all-reduces were in flight. `sync_s` is measured by a DDP **communication hook** (`AllReduceTimer` in
# `labkit/ray_train.py`) that starts DDP's usual all-reduce and times it until its result arrives. Buckets are
# reduced while backward is still computing earlier layers, so `sync_s` **overlaps** `compute_s`: it is an upper
# bound on the time spent waiting for gradients, not a slice to subtract. With one worker there is no all-reduce
# (`sync_s` empty); on GPUs the hook is not used (NCCL's futures complete at launch; use the PyTorch profiler).
# The one-off costs — `ray.init`, starting the workers, loading data in every worker — come on top.

# %%
breakdown = table[["data_s", "compute_s", "sync_s"]].astype(float)
display(breakdown.round(2))
ax = breakdown.plot.bar(figsize=(7, 3.5), rot=0, title="seconds per epoch (averaged over workers)")
ax.set(xlabel="epoch", ylabel="seconds")
fig = ax.get_figure()
plotting.save_figure(fig, out_dir / "time_breakdown.png")
one_off = pd.Series({"ray.init": summary["init_seconds"], "fit start-up + shut-down": summary["startup_seconds"],
                     "training (all epochs)": summary["total_seconds"],
                     "evaluation + checkpoints": sum(r["epoch_s"] - r["seconds"] for r in run.history)})
print(one_off.round(1).to_string())

# %% [markdown]
# ### What Ray kept
# Checkpoints live under `results/02_ray/ray/<run>/`; `CheckpointConfig(num_to_keep=2)` deleted the older ones.
# Ray Train V2's own `metrics_dataframe` therefore has only the epochs whose checkpoint is still kept — the full
# history above came back as the training function's return value (and is inside every checkpoint).

# %%
print("run folder:", run.run_dir)
print("checkpoints kept:", sorted(p.name for p in run.run_dir.glob("epoch*")))
display(run.metrics_dataframe[["epoch", "loss", "val_acc", "attempt"]])

# %% [markdown]
# ## 8. Evaluate the trained model
# The last checkpoint holds the final weights; load them into a fresh model here in the notebook and evaluate
# it on the whole test set. Compare the accuracy with the majority-class rate, as in Lab 01.

# %% tags=["nbval-check-output"]
dev = env.pick_device(cfg.device)
final_model = run.load_model(AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)).to(dev)
test_loader = ds.loader("test", batch_size=cfg.batch_size)
final = train.evaluate(final_model, test_loader, device=dev, transform=batch_transform(train=False),
                       amp_dtype=env.amp_dtype("auto", dev), return_outputs=True)
y_true, y_pred = final["y_true"], final["y_pred"]
majority = float((y_true == pd.Series(y_true).mode()[0]).mean())
print(f"test accuracy       {final['acc']:.2f}")
print(f"majority-class rate {majority:.2f}")

# %%
plotting.plot_confusion(y_true, y_pred, ds.classes, out_dir / "confusion_matrix.png");

# %% [markdown]
# ## 9. Compare with Lab 01
# The source project compared time per epoch, total training time and final accuracy of the single-device
# baseline with the Ray run. We do the same with your latest Lab 01 record (`results/01_baseline/`). Read the
# settings line: a fair comparison uses the same image size, data and epochs.

# %%
baseline = results.latest("01_baseline")
ray_row = {"run": f"Lab 02 Ray ({cfg.workers} workers, {run.plan.backend})", "device": "cuda" if run.plan.use_gpu else "cpu",
           "seconds_per_epoch": summary["seconds_per_epoch"], "total_seconds": summary["total_seconds"],
           "test_acc": final["acc"]}
comparison = None
if baseline is None:
    print("No Lab 01 record in results/01_baseline/ yet: run labs/01_baseline.ipynb first to compare. "
          "Showing this lab's results only.")
    display(pd.DataFrame([ray_row]).set_index("run").round(3))
else:
    base_row = {"run": "Lab 01 baseline (1 process)", "device": baseline.env.get("device"),
                "seconds_per_epoch": baseline.final.get("seconds_per_epoch"),
                "total_seconds": baseline.final.get("total_seconds"), "test_acc": baseline.final.get("test_acc")}
    comparison = pd.DataFrame([base_row, ray_row])
    ratio = {k: ray_row[k] / base_row[k] for k in ("seconds_per_epoch", "total_seconds") if base_row[k]}
    display(comparison.set_index("run").round(3))
    print("Ray / baseline: " + ", ".join(f"{k} × {v:.2f}" for k, v in ratio.items()))
    keys = ("image_size", "epochs", "batch_size", "max_train", "max_test", "data")
    differ = {k: (baseline.params.get(k), cfg.get(k)) for k in keys if baseline.params.get(k) != cfg.get(k)}
    print("settings differ (Lab 01 vs Lab 02): " + str(differ) if differ else "same data and settings as the Lab 01 run")
    plotting.plot_comparison(comparison, out_dir / "training_comparison.png",
                             metrics=["seconds_per_epoch", "total_seconds", "test_acc"], label_col="run",
                             title="Single process vs Ray Train")

# %% [markdown]
# ### Optional: a speedup sweep
# With `sweep=[1, 2]` (or more counts, on a machine or cluster that has them) the lab trains once per worker count
# and plots **speedup** = time per epoch with the fewest workers / time per epoch with *n* workers and
# **efficiency** = speedup / (workers ratio); 1.0 is perfect scaling. On 2 CPU cores expect efficiency well below 1.

# %%
if cfg.sweep:
    sweep_runs = distributed.sweep(cfg, cfg.sweep, progress=False)
    speed = distributed.speedup_table(sweep_runs)
    display(speed.round(3))
    plotting.plot_comparison(speed.assign(run=speed["workers"].astype(str) + " workers"), out_dir / "speedup.png",
                             metrics=["seconds_per_epoch", "speedup", "efficiency"], label_col="run",
                             title="Ray Train: scaling with the number of workers")
else:
    print("sweep=None: set e.g. sweep=[1, 2] to measure speedup and efficiency.")

# %% [markdown]
# ## 10. Exercises
# **Exercise 1 — the learning-rate scaling rule.** With `workers` workers, one optimizer step averages the
# gradients of `workers × batch_size` images: a bigger batch, so a less noisy gradient. The *linear* rule
# (Goyal et al., 2017) multiplies the learning rate by `world_size`; the *sqrt* rule by `sqrt(world_size)`
# (gentler, common with Adam); `"none"` keeps it. Implement it; Ray workers use `labkit.train.scale_lr`, which
# follows the same rule. Then re-run with `-p lr_scaling linear` and compare the curves.

# %%
import math

def my_scale_lr(lr, world_size, rule="none"):
    # BEGIN SOLUTION
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    return lr
    # END SOLUTION


# %% tags=["nbval-check-output"]
exercises.check_lr_scaling(my_scale_lr)


# %% [markdown]
# **Exercise 2 — who reads which image?** `prepare_data_loader` gave each worker a
# `DistributedSampler(dataset, num_replicas=world_size, rank=rank)`. Without shuffling, which dataset indices does
# rank `rank` read? Write the rule (hint: every rank gets the same number of samples; the sampler pads the list
# by repeating its first indices, then deals them out like cards). The check tries a small case and this lab's
# training set.

# %%
def my_shard(dataset_len, world_size, rank):
    # BEGIN SOLUTION
    per_rank = math.ceil(dataset_len / world_size)
    padded = list(range(dataset_len))
    padded += padded[: per_rank * world_size - dataset_len]
    return padded[rank::world_size]
    # END SOLUTION


# %% tags=["nbval-check-output"]
exercises.check_sampler_shard(my_shard(5, 2, 1), 5, 2, 1)
n_train = len(ds.splits["train"].labels)
exercises.check_sampler_shard(my_shard(n_train, 2, 1), n_train, 2, 1)

# %% [markdown]
# ## 11. Save the run record
# The record keeps parameters, environment (world size = number of workers, backend), data, every epoch (with the
# attempt that trained it) and the final numbers, including the number of restarts. `labkit summary` and later
# labs read it.

# %%
record = results.RunRecord(lab="02_ray", params=dict(cfg), data=ds.describe(), epochs=run.history,
                           env={**env.environment("cuda" if run.plan.use_gpu else "cpu", world_size=cfg.workers),
                                "backend": run.plan.backend, "cpus_per_worker": run.plan.cpus_per_worker,
                                "ray_cluster": run.cluster})
record.final = {**summary, "test_acc": final["acc"], "test_loss": final["loss"], "majority_rate": majority,
                "parameters": n_params, "run_dir": str(run.run_dir)}
if comparison is not None:
    record.final["comparison"] = comparison.to_dict(orient="records")
plots = ["training_curves", "time_breakdown", "confusion_matrix"]
plots += ["training_comparison"] if comparison is not None else []
plots += ["speedup"] if cfg.sweep else []
for name in plots:
    record.add_artifact(out_dir / f"{name}.png")
path = results.save(record)
print("saved", path)

# %% [markdown]
# ## Take-aways
# - Going distributed with Ray Train changed a handful of lines: `prepare_model`, `prepare_data_loader`,
#   `report`, `get_checkpoint`. The training loop is Lab 01's.
# - Data parallelism = a model copy per worker + a different data slice each + gradient **all-reduce** every step.
#   More workers mean a bigger global batch: decide how the learning rate follows (`lr_scaling`).
# - Distribution costs start-up time and communication. It pays off when each worker has its **own** GPU or machine;
#   two workers sharing two CPU cores are slower than one process.
# - Checkpoint every epoch and let `FailureConfig` restart crashed workers: with `get_checkpoint()` the run loses no
#   finished epoch (try `fail_at_epoch=2`).
# - The same notebook scales out: give it `address` of a real Ray cluster with one GPU per worker.
