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
# - turn a plain PyTorch loop into a Ray Train job with a handful of calls (`get_context`, `prepare_model`, a
#   `DistributedSampler`, `ray.train.report`, `ray.train.get_checkpoint`) — the loop itself does not change;
# - explain data parallelism and **all-reduce**, and how the learning rate relates to the global batch;
# - measure where distributed time goes (start-up, data, compute, waiting for gradients) and why 2 CPU workers
#   on one 2-core machine are **not** faster than one process;
# - survive a crashed worker: checkpoints, `FailureConfig` and resuming without losing a finished epoch;
# - compare fairly with Lab 01: the same global batch, balanced accuracy, paired on the same test images.
#
# **Run time**: quick mode (`quick=True`) ≈ 2 min on 2 CPU cores (about 1 min of it is Ray starting up);
# the full configuration (5 epochs, 128 px, 6,400 images, 2 workers) ≈ 20–30 min on 2 CPU cores, a few minutes
# with one GPU per worker.

# %% [markdown]
# ## 0. Setup
# In Colab this cell installs labkit; anywhere else the course's `make course` / `make setup` already did.

# %%
# labkit set-up cell: on Colab it fetches the course and installs labkit; elsewhere it does nothing (`make setup` did it).
# Keep results/ across Colab sessions (Lab 02 compares with Lab 01's record): set results_on_drive = True.
results_on_drive = False
import sys
if "google.colab" in sys.modules:
    import importlib.metadata, importlib.util, os, re, subprocess, tempfile
    def sh(*cmd, hint):  # run a command; on failure stop here with its error and what to do
        done = subprocess.run(list(cmd), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}\n{hint}")
    if not os.path.isdir("/content/labkit"):
        sh("git", "clone", "--depth", "1", "https://github.com/labkit-course/labkit", "/content/labkit",
            hint="Check that the runtime has internet (Runtime > Change runtime type) and that the URL is right.")
    if importlib.util.find_spec("labkit") is None:  # keep Colab's torch, torchvision, ipykernel, jupyter*
        keep = [f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                if re.fullmatch(r"torch|torchvision|ipykernel|jupyter.*", (d.metadata["Name"] or "").lower())]
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
            pins.write("\n".join(keep) + "\n")
        sh(sys.executable, "-m", "pip", "install", "-q", "/content/labkit", "-c", pins.name,
            hint="pip could not install labkit beside Colab's packages; read the error above, then rerun this cell.")
    os.environ["LABKIT_HOME"] = "/content/labkit"  # data/ and results/ live in the clone
    if results_on_drive:
        from google.colab import drive
        drive.mount("/content/drive")
        os.environ["LABKIT_RESULTS"] = "/content/drive/MyDrive/labkit/results"

# %%
import tempfile
import time

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from labkit import distributed, env, metrics, params, plotting, results, timing, train
from labkit.distributed import recovery, worker
from labkit.exercises import lab02 as exercises
from labkit.data.augment import batch_transform
from labkit.models.cnn import AlzheimerCNN
from labkit.models.summary import count_parameters

# %% [markdown]
# ## 1. Parameters
# Every knob lives in the next cell (tagged `parameters`); run the lab headless with e.g.
# `papermill labs/02_ray.ipynb out.ipynb -p workers 2 -p quick True`.
# The defaults are the source project's configuration: 2 workers, 5 epochs, Adam 1e-3, 128 px, and Lab 01's
# **global batch** of 32 images per optimizer step, split over the workers (16 each with 2 workers), so that this
# run and Lab 01's differ only in how the step is computed.
#
# - `amp`: mixed precision. `"auto"` = bf16 autocast where the hardware runs it natively (recent GPUs, and CPUs
#   with AVX512-BF16/AMX), fp16 **with a gradient scaler** on older GPUs, else fp32; `False` forces fp32.
# - `lr_scaling`: multiplies the learning rate by the number of workers (`"linear"`) or its square root (`"sqrt"`);
#   meant for a global batch that grows with the workers (`batch_size` = workers × 32): at Lab 01's global batch keep
#   `"none"`, or the comparison with Lab 01 changes the learning rate too (exercise 3).
# - `address`: a running Ray cluster (`"ray://head:10001"` or `"head:6379"`); `None` starts a local cluster on this
#   machine (the environment variable `RAY_ADDRESS` works too). A cluster is how you outgrow one machine.
# - `fail_at_epoch`: kill one worker once at that epoch, to watch Ray Train restart it from the last checkpoint.
# - `resume`: `"last"` continues the newest run that did not finish (the cell was interrupted, or the cluster lost
#   a node and you stopped waiting for it) from its last checkpoint — with the same or a different number of
#   workers; or the name of a run folder in `results/02_ray/ray/`. `None` starts a new run.
# - `sweep`: a list of worker counts, e.g. `[1, 2]`, to train once per count and plot speedup and efficiency.

# %% tags=["parameters"]
workers = 2
epochs = 5
batch_size = 32               # global, as in Lab 01: each worker takes batch_size / workers images per step
lr = 1e-3
lr_scaling = "none"           # "none", "linear" or "sqrt"
image_size = 128
device = "auto"
amp = "auto"                  # "auto", "bf16", "fp16" or False (fp32)
data = "auto"                 # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/alzheimer"
quick = False
seed = 0
address = None                # None: a local Ray cluster; or "ray://host:10001" / "host:6379"
fail_at_epoch = None          # e.g. 2: one worker crashes once at epoch 2
resume = None                 # "last": continue the newest unfinished run from its last checkpoint
sweep = None                  # e.g. [1, 2]: one run per worker count, then a speedup plot


# %% [markdown]
# ## 2. Check the parameters
# `labkit.params.check` validates every parameter (a typo fails here, naming the culprit) and applies quick mode;
# the rules of the distributed knobs (`workers`, `address`, `resume`, …) come from `labkit.distributed.RULES`.
# `distributed.check_cluster` then asks what only the machine can answer: do `workers` fit here (or does a
# cluster answer at `address`)? Its answer is the plan the next cell prints.

# %% tags=["nbval-check-output"]
def _worker_counts(value):
    ok = isinstance(value, list) and value and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value)
    return None if ok else "must be a list of worker counts >= 1, e.g. [1, 2]"

cfg = params.check("02_ray", rules={**distributed.RULES, "sweep": params.Rule(list, optional=True, test=_worker_counts)},
                   workers=workers, epochs=epochs, batch_size=batch_size, lr=lr, lr_scaling=lr_scaling,
                   image_size=image_size, device=device, amp=amp, data=data, data_dir=data_dir, quick=quick, seed=seed,
                   address=address, fail_at_epoch=fail_at_epoch, resume=resume, sweep=sweep)
plan = distributed.check_cluster(cfg)                             # None when joining the cluster at `address`
worker.check_global_batch(cfg.batch_size, cfg.sweep or cfg.workers)  # the global batch splits evenly over the workers
env.seed_everything(cfg.seed)
out_dir = results.lab_dir("02_ray")
recovery.check_resume(cfg.resume, out_dir / "ray")                # a run to continue? (fails here if none)

# %% [markdown]
# Next, Ray's resources: each worker is a process that needs at least one CPU core, and NCCL (the GPU
# communication library) needs **one GPU per worker**. The check above made the plan with `distributed.plan_scaling`,
# which decides CPU/gloo or GPU/NCCL and refuses a request that cannot run *before* Ray starts — asking for 64 workers on 2 cores fails now, instead of Ray waiting
# forever for cores that do not exist. With fewer GPUs than workers (`workers=2` on Colab's one GPU) the workers
# *share* the GPU — half of it each — and all-reduce with gloo, and the plan prints why; `workers=1` uses NCCL.
# (With `address` set, the plan is made from the cluster's resources instead.)

# %%
if plan is not None:
    print("plan:", plan.describe())
    if plan.notice:
        print(plan.notice)
    worker_device = torch.device("cuda" if plan.use_gpu else "cpu")
    worker_dtype = env.amp_dtype(cfg.amp, worker_device)
    print(f"precision in the workers: {env.precision_name(worker_dtype)}"
          + (" autocast (convolutions and matmuls; weights, optimizer and metrics stay fp32)" if worker_dtype is not None else "")
          + (" with a GradScaler" if worker_dtype == torch.float16 else "")
          + (", channels_last" if env.use_channels_last(worker_device, worker_dtype) else ""))
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
# - One step averages the gradients of all workers' batches: with `batch_size` the **global** batch (here, as in
#   Lab 01), each worker computes `batch_size / workers` images per step and the epoch keeps Lab 01's number of
#   steps; each step's work is split, which is where a speedup comes from — *if* each worker has its own hardware.
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
# ### Predict, then run
# **Predict** before you run the next cell: with `workers` workers sharing a global batch of `batch_size` images,
# how many optimizer steps does *each worker* take per epoch on this training set, and how many images does each
# one see? And with a single worker? Write your numbers down. The next cell asks a real `DistributedSampler`.

# %% tags=["nbval-check-output"]
n_train = len(ds.splits["train"].labels)
for world in sorted({1, cfg.workers}):
    shard = torch.utils.data.DistributedSampler(range(n_train), num_replicas=world, rank=0, shuffle=False)
    steps = len(torch.utils.data.DataLoader(range(n_train), batch_size=cfg.batch_size // world, sampler=shard))
    print(f"{world} worker(s): each sees {len(shard)} of {n_train} images per epoch in {steps} steps "
          f"of {cfg.batch_size // world} (global batch {cfg.batch_size})")

# %% [markdown]
# **The answer.** Each worker sees `ceil(n_train / workers)` images, in batches `workers` times smaller, so it
# takes as many steps as one process with the whole batch: the same steps as Lab 01, each computed in `workers`
# pieces side by side — which only pays off when every worker has hardware of its own (section 3). Keeping 32 images
# per *worker* instead would make the global batch `workers` times bigger and the epoch `workers` times shorter in
# steps: a different optimisation (exercise 3), not only a different machine.
#
# **Exercise 1 — who reads which image?** Each worker reads its training data through a
# `DistributedSampler(dataset, num_replicas=world_size, rank=rank)`. Without shuffling, which dataset indices does
# rank `rank` read? Write the rule (hint: every rank gets the same number of samples; the sampler pads the list
# by repeating its first indices, then deals them out like cards). The check tries a small case and this lab's
# training set.

# %%
import math

def my_shard(dataset_len, world_size, rank):
    # BEGIN SOLUTION
    per_rank = math.ceil(dataset_len / world_size)
    padded = list(range(dataset_len))
    padded += padded[: per_rank * world_size - dataset_len]
    return padded[rank::world_size]
    # END SOLUTION


# %% labkit={"points": 1, "question": "sampler_shard"} tags=["nbval-check-output"]
from labkit.exercises import reported
from labkit.exercises.lab02 import check_sampler_shard
with reported("sampler_shard"):                     # ✔ or ✘ with a hint; Run All goes on either way
    check_sampler_shard(my_shard, 5, 2, 1)
    check_sampler_shard(my_shard, n_train, 2, 1)

# %% labkit={"hidden": "sampler_shard"} tags=["hidden-check"]
from torch.utils.data import DistributedSampler
for n, ws, r in ((10, 3, 2), (7, 4, 3), (1, 2, 1)):
    assert list(my_shard(n, ws, r)) == list(DistributedSampler(range(n), num_replicas=ws, rank=r, shuffle=False)), (n, ws, r)

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
# First Lab 01's loop for one epoch, unchanged except for one detail: it returns **sums** (loss × images, correct
# answers, images) instead of means, so that the workers' numbers can be added up later. Under DDP,
# `loss.backward()` also averages the gradients over all workers (the all-reduce of section 3) — no extra line.
# Precision follows `amp`: autocast to bf16 (or fp16 with a `GradScaler`, which scales the loss so that small fp16
# gradients do not underflow to zero), and `channels_last` images where `env.use_channels_last` says so.

# %%
def train_epoch(model, batches, optimizer, loss_fn, *, device, augment, dtype, scaler, channels_last):
    """One pass over ``batches`` (Lab 01's loop); returns sums and timings, not means."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    images, data_s = 0, 0.0
    timing.sync(device)
    start = tick = time.perf_counter()
    for x, y in batches:
        data_s += time.perf_counter() - tick                       # waiting for the next batch
        x, y = augment(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:                                     # fp16: scaled loss, unscaled step
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()                                        # DDP: gradients all-reduced in here
            optimizer.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().float().argmax(1) == y).sum()  # metrics in fp32
        images += len(y)
        tick = time.perf_counter()
    timing.sync(device)
    seconds = time.perf_counter() - start
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "images": images,
            "seconds": seconds, "data_s": data_s}


# %% [markdown]
# Each worker only knows its own shard. To report the numbers **of the whole run**, the workers add up their sums
# and counts with one `all_reduce` and divide afterwards: an image-weighted mean. (Averaging the per-worker
# *means* is wrong as soon as the shards differ in size — exercise 2.) The epoch time is the slowest worker's
# (everyone waits for it at every gradient all-reduce); the time split is the mean over workers.

# %%
def all_reduce_epoch(sums, val, sync_s, device):
    """This epoch's numbers for the whole run: sums and counts added over all workers, then divided."""
    totals = torch.tensor([sums["loss_sum"], sums["correct"], sums["images"],
                           val["loss"] * val["images"], val["acc"] * val["images"], val["images"],
                           sums["data_s"], sums["seconds"] - sums["data_s"], sync_s or 0.0], dtype=torch.float64)
    slowest = torch.tensor([sums["seconds"]], dtype=torch.float64)
    world = 1
    if dist.is_available() and dist.is_initialized():             # Ray set up the process group
        world = dist.get_world_size()
        where = device if dist.get_backend() == "nccl" else torch.device("cpu")
        totals, slowest = totals.to(where), slowest.to(where)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)              # add up every worker's sums and counts
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)             # the epoch lasts as long as the slowest worker
    t, seconds = totals.tolist(), slowest.item()
    return {"loss": t[0] / t[2], "acc": t[1] / t[2], "val_loss": t[3] / t[5], "val_acc": t[4] / t[5],
            "images": round(t[2]), "val_images": round(t[5]), "seconds": seconds,
            "images_per_s": t[2] / seconds if seconds > 0 else 0.0,
            "data_s": t[6] / world, "compute_s": t[7] / world, "sync_s": None if sync_s is None else t[8] / world}


# %% [markdown]
# **Exercise 2 — the weighted all-reduce.** Four workers evaluated shards of 3, 1, 2 and 0 images and
# hold `(sum, count)` pairs, e.g. `(2.0, 3)` for a summed loss of 2.0 over 3 images. Write `my_global_mean(pairs)`:
# the mean over **all images**, as `all_reduce_epoch` computes it (a worker with no images counts for nothing).
# The check compares with the plain mean over every image and tells you if you averaged the workers' means.

# %%
def my_global_mean(pairs):
    # BEGIN SOLUTION
    total = sum(s for s, _ in pairs)
    count = sum(n for _, n in pairs)
    return total / count
    # END SOLUTION


# %% labkit={"points": 1, "question": "global_mean"} tags=["nbval-check-output"]
from labkit.exercises import reported
from labkit.exercises.lab02 import check_global_mean
with reported("global_mean"):
    check_global_mean(my_global_mean)

# %% labkit={"hidden": "global_mean"} tags=["hidden-check"]
assert abs(my_global_mean([(1.5, 2), (0.0, 0), (4.5, 1)]) - 2.0) < 1e-9
assert abs(my_global_mean([(0.0, 0), (3.0, 4)]) - 0.75) < 1e-9

# %% [markdown]
# **Exercise 3 — the learning-rate scaling rule.** When the global batch grows with the workers (each worker keeps
# Lab 01's 32 images, `batch_size` = workers × 32), one step averages the gradients of `workers` times more
# images: a less noisy gradient, and `workers` times fewer steps per epoch. The *linear* rule (Goyal et al., 2017)
# multiplies the learning rate by `world_size`; the *sqrt* rule by `sqrt(world_size)` (gentler, common with Adam);
# `"none"` keeps it. Implement it: **the workers below train with your function** (`scale_lr`), so a wrong
# answer changes what trains. Then re-run with `-p batch_size 64 -p lr_scaling linear` and compare the curves.

# %%
def my_scale_lr(lr, world_size, rule="none"):
    # BEGIN SOLUTION
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    return lr
    # END SOLUTION


# %% labkit={"points": 2, "question": "lr_scaling"} tags=["nbval-check-output"]
from labkit.exercises import reported
from labkit.exercises.lab02 import check_lr_scaling
with reported("lr_scaling"):
    check_lr_scaling(my_scale_lr)

# %% labkit={"hidden": "lr_scaling"} tags=["hidden-check"]
import math
assert math.isclose(my_scale_lr(0.01, 9, "sqrt"), 0.03) and math.isclose(my_scale_lr(0.01, 9, "linear"), 0.09)
assert math.isclose(my_scale_lr(0.01, 9), 0.01) and math.isclose(my_scale_lr(0.5, 1, "linear"), 0.5)

# %% [markdown]
# The workers use your rule. (An untouched exercise falls back to the reference rule, with a one-line notice, so the
# rest of the lab still runs; a wrong answer is used as it is.)

# %%
scale_lr = exercises.lr_rule_for_run(my_scale_lr)

# %% [markdown]
# Now the function every worker runs. It is Lab 01's loop plus the Ray lines, each marked `# RAY:`:
# - `ray.train.get_context()` / `ray.train.torch.get_device()`: this worker's rank, the number of workers, its device;
# - `ray.train.torch.prepare_model` moves the model to the worker's device and wraps it in DDP. DDP would copy rank
#   0's BatchNorm running statistics to every rank before each step; we turn that off (`broadcast_buffers=False`) and
#   average all ranks' statistics after each epoch (`worker.average_buffers`): they then describe the whole global
#   batch, as Lab 01's do, not only rank 0's half of it;
# - a `DistributedSampler` gives each worker its own slice of the training set, shuffled from `seed`, and
#   `sampler.set_epoch(epoch)` a new shuffle each epoch. (`ray.train.torch.prepare_data_loader(loader)` would add
#   this sampler for you, but always shuffled from seed 0, whatever `seed` says: here the data order follows `seed`);
# - `ray.train.report(metrics, checkpoint=...)` after each epoch: metrics from every rank, the checkpoint (model,
#   optimizer, GradScaler, epoch, history; `worker.save_checkpoint`) from rank 0 only. In Ray 2.5x+ "Train V2",
#   `Result.metrics` and `metrics_dataframe` only keep metrics reported **together with a checkpoint** — so we
#   checkpoint every epoch;
# - `ray.train.get_checkpoint()` returns the last checkpoint when Ray restarts the workers after a crash (or when
#   you resume a run): the loop continues with the next epoch.
#
# Everything else labkit adds — counting attempts, the node of each rank, quiet worker logs, timing the gradient
# all-reduce, the crash for `fail_at_epoch`, relaying progress to this notebook, restoring a checkpoint at the
# learning rate scaled for *this* run's workers — sits behind one object, `hook` (`worker.WorkerHook`). Ray ships
# this function, defined right here, to every worker (with `cloudpickle`): edit it and re-run the training cell.

# %%
def train_loop_per_worker(config):
    """Train Lab 01's model on this worker's share of the data; returns the per-epoch history."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()                                  # RAY: who am I, how many are we?
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()                          # RAY: this worker's GPU, or the CPU
    hook = worker.WorkerHook(config, rank, world_size, device)     # labkit's instrumentation, in one place

    env.seed_everything(config["seed"])                            # identical initial weights on every rank
    with hook.quiet():                                             # the driver already showed the data notices
        ds = distributed.prepare_data(config)
    model = AlzheimerCNN(num_classes=len(ds.classes), image_size=config["image_size"])
    dtype = env.amp_dtype(config["amp"], device)                   # bf16 / fp16 autocast, or None (fp32)
    scaler = env.grad_scaler(dtype, device)                        # only for fp16
    channels_last = env.use_channels_last(device, dtype)           # NHWC weights and images (GPUs, native bf16)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})  # RAY: DDP
    lr = scale_lr(config["lr"], world_size, config["lr_scaling"])  # exercise 3: your rule
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    augment, normalise = batch_transform(train=True), batch_transform(train=False)
    env.seed_everything(config["seed"] + rank)                     # different augmentation on each rank

    sampler = torch.utils.data.DistributedSampler(                 # RAY/DDP: this worker's slice, shuffled by seed
        range(len(ds.splits["train"].labels)), num_replicas=world_size, rank=rank, seed=config["seed"])
    train_loader = ds.loader("train", batch_size=config["batch_size"] // world_size, sampler=sampler)
    test_loader = ds.loader("test", batch_size=config["batch_size"],  # evaluation: every test image exactly once
                            sampler=train.shard_indices(len(ds.splits["test"].labels), rank, world_size))

    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")  # RAY: after a crash, the last checkpoint
    done, history = hook.resume(checkpoint, model, optimizer, scaler)     # (keeps the lr scaled above)
    for epoch in hook.epochs(done):
        sampler.set_epoch(epoch)                                   # RAY/DDP: a new shuffle of the shards each epoch
        sums = train_epoch(model, hook.batches(train_loader, epoch), optimizer, loss_fn, device=device,
                           augment=augment, dtype=dtype, scaler=scaler, channels_last=channels_last)
        worker.average_buffers(model)                              # BatchNorm statistics averaged over the ranks
        val = train.evaluate(train.unwrap(model), test_loader, loss_fn, device=device, transform=normalise,
                             amp_dtype=dtype)                      # (channels_last as in training)
        history.append(hook.row(epoch, all_reduce_epoch(sums, val, hook.sync_s, device), optimizer))
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:                                          # one copy of the weights is enough
                worker.save_checkpoint(folder, model, optimizer, epoch, history, scaler=scaler)
                checkpoint = ray.train.Checkpoint.from_directory(folder)  # RAY: the folder as a checkpoint
            ray.train.report(history[-1], checkpoint=checkpoint,   # RAY: metrics + checkpoint, every epoch
                             checkpoint_dir_name=hook.checkpoint_name(epoch))
    return history


# %% [markdown]
# ## 7. Train
# The driver side, in this notebook: a `TorchTrainer` runs `train_loop_per_worker` on every worker.
# `ScalingConfig` says how many workers and what each one gets (the plan of section 2), `RunConfig` where
# checkpoints go, `CheckpointConfig` how many to keep and `FailureConfig` how many restarts to allow.
# `distributed.worker_config` turns the parameters into the `config` dict each worker receives (absolute paths:
# workers run in their own folders).

# %%
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


def make_trainer(plan, run_dir, fail_at_epoch=cfg.fail_at_epoch, progress=True):
    """A TorchTrainer for ``plan`` (workers, CPU/GPU) that stores its checkpoints in ``run_dir``."""
    return TorchTrainer(
        train_loop_per_worker,                                     # the function above, shipped to every worker
        train_loop_config=distributed.worker_config({**cfg, "fail_at_epoch": fail_at_epoch}, plan, run_dir,
                                                    progress=progress),
        torch_config=TorchConfig(backend=plan.backend, timeout_s=300),  # gloo on CPUs, NCCL on GPUs
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=plan.resources()),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=1),           # restart the workers once after a crash
            checkpoint_config=CheckpointConfig(num_to_keep=2),      # keep only the last 2 checkpoints
            logging_config=LoggingConfig(log_level=distributed.TRAIN_LOG_LEVEL)),  # Ray Train's chatter off
    )


# %% [markdown]
# Now train. `distributed.ray_cluster` starts a local Ray cluster (or joins `address`) and shuts it down
# afterwards, also when training fails; the workers' progress is drawn here as two bars plus one line per
# epoch. Ray's start-up takes about a minute on 2 CPU cores — it is measured separately below. With
# `fail_at_epoch` set, one worker kills itself halfway through that epoch: Ray prints the dead worker's error
# (tracebacks are expected here), restarts the worker group, and `get_checkpoint()` continues from the last
# checkpoint.
#
# On a real cluster a whole **node** can go (a preempted VM, a pulled cable). `recovery.RunWatch` says so here
# when it happens; Ray Train then waits until the cluster has room for all workers again and restarts them from
# the last checkpoint. If the node does not come back, interrupt the cell and re-run with fewer workers and
# `resume="last"`: the run folder keeps every checkpoint, so no finished epoch is lost. The same holds when you
# interrupt this cell yourself (■ in Jupyter): Ray is shut down cleanly, no record is written, and
# `resume="last"` continues where the last checkpoint left off. A resumed run restores the optimizer's state and
# (fp16) the gradient scaler's, but trains at the learning rate scaled for its **own** number of workers — the
# history row of its first epoch says which. Afterwards the run is told attempt by attempt.

# %%
run_dir = recovery.run_dir_for(cfg.resume, out_dir / "ray", new=distributed.new_run_dir)  # new, or resume
with distributed.ray_cluster(cfg.address) as cluster:              # ray.init(...) ... ray.shutdown()
    if plan is None:                                               # a remote cluster: plan from its resources
        plan = distributed.plan_scaling(cfg.workers, cfg.device, **distributed.cluster_resources(),
                                        where=f"the cluster at {cluster['address']}")
    trainer = make_trainer(plan, run_dir)
    with worker.ProgressBars(run_dir, cfg.epochs), recovery.RunWatch(run_dir, plan.workers) as watch:
        tick = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - tick
run = distributed.RayRun.from_result(result, plan, run_dir, fit_seconds, cluster)
summary = run.summary()
print(f"{run.plan.describe()}; restarts: {run.restarts}")
print(recovery.story(run.history, worker.count_attempts(run_dir), watch.left))
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
# `labkit/distributed/worker.py`) that starts DDP's usual all-reduce and times it until its result arrives. Buckets are
# reduced while backward is still computing earlier layers, so `sync_s` **overlaps** `compute_s`: it is an upper
# bound on the time spent waiting for gradients, not a slice to subtract. With one worker there is no all-reduce
# (`sync_s` empty); on GPUs the hook is not used (NCCL's futures complete at launch; use the PyTorch profiler).
# The one-off costs — `ray.init`, starting the workers, loading data in every worker — come on top.

# %%
breakdown = table[["data_s", "compute_s", "sync_s"]].astype(float)
display(breakdown.round(2))
if breakdown["sync_s"].notna().all():
    share = breakdown["sync_s"].sum() / (breakdown["data_s"] + breakdown["compute_s"]).sum()
    print(f"gradient all-reduce in flight during {share:.0%} of the training time (overlapping compute)")
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
# The last checkpoint holds the final weights; load them into a fresh model here in the notebook, recompute its
# BatchNorm statistics with those weights in one pass over the training images (`update_bn`, as Lab 01 does: the
# running statistics trail the weights, and each rank's follow its own half of every batch), and evaluate it on the
# whole test set, in the workers' precision, with the metrics computed in fp32 from the logits. (The per-epoch
# `val_acc` above used the running statistics as they were.)
# Read accuracy beside the **majority-class rate** (always answering the most common training class) and
# balanced accuracy beside **chance** (1/K): a model that learned nothing scores exactly those.

# %% tags=["nbval-check-output", "labkit-result"]
dev = env.pick_device("cuda" if run.plan.use_gpu else "cpu")
final_model = run.load_model(AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)).to(dev)
normalise = batch_transform(train=False)               # BatchNorm statistics for the final weights, as in Lab 01
torch.optim.swa_utils.update_bn((normalise(x.to(dev)) for x, _ in ds.loader("train", batch_size=cfg.batch_size)),
                                final_model)
test_loader = ds.loader("test", batch_size=cfg.batch_size)
final = train.evaluate(final_model, test_loader, device=dev, transform=normalise,
                       amp_dtype=env.amp_dtype(cfg.amp, dev), return_outputs=True)
y_true, y_pred = final["y_true"], final["y_pred"]
scores = metrics.summarize(y_true, y_pred, num_classes=len(ds.classes), train_labels=ds.splits["train"].labels)
for name in ("acc", "balanced_acc", "macro_f1", "majority_rate", "chance"):
    print(f"{name:<14}{scores[name]:.2f}")

# %%
plotting.plot_confusion(y_true, y_pred, ds.classes, out_dir / "confusion_matrix.png");

# %% [markdown]
# ## 9. Compare with Lab 01
# The source project compared time per epoch, total training time and final accuracy of the single-device
# baseline with the Ray run. We do the same with your latest Lab 01 record (`results/01_baseline/`), fairly:
# - **the same global batch** (by default both take 32 images per optimizer step; the settings line says if not);
# - **balanced accuracy**, the number Lab 01 taught to read on imbalanced data, not accuracy;
# - **paired on the same test images**: Lab 01's record keeps its prediction for every test file, so both models
#   are scored image by image. The paired bootstrap (`metrics.paired_interval`) resamples the test images and
#   recomputes the difference each time: the luck both models share cancels. The difference is "beyond noise"
#   only when 0 lies outside its 95 % interval (`metrics.interval_verdict`). That is test-sample noise only;
#   another seed moves results further still (Lab 03 measures that).

# %%
baseline = results.latest("01_baseline")
ray_row = {"run": f"Lab 02 Ray ({cfg.workers} workers, {run.plan.backend})", "device": "cuda" if run.plan.use_gpu else "cpu",
           "global_batch": cfg.batch_size, "lr": run.history[-1]["lr"],
           "seconds_per_epoch": summary["seconds_per_epoch"], "total_seconds": summary["total_seconds"],
           "test_acc": scores["acc"], "balanced_acc": scores["balanced_acc"]}
comparison, versus = None, None
if baseline is None:
    print("No Lab 01 record in results/01_baseline/ yet: run labs/01_baseline.ipynb first to compare. "
          "Showing this lab's results only.")
    display(pd.DataFrame([ray_row]).set_index("run").round(3))
else:
    base_row = {"run": "Lab 01 baseline (1 process)", "device": baseline.env.get("device"),
                "global_batch": baseline.params.get("batch_size"), "lr": baseline.params.get("lr"),
                "seconds_per_epoch": baseline.final.get("seconds_per_epoch"),
                "total_seconds": baseline.final.get("total_seconds"), "test_acc": baseline.final.get("test_acc"),
                "balanced_acc": baseline.final.get("balanced_acc")}
    comparison = pd.DataFrame([base_row, ray_row])
    ratio = {k: ray_row[k] / base_row[k] for k in ("seconds_per_epoch", "total_seconds") if base_row[k]}
    display(comparison.set_index("run").round(4))
    print("Ray / baseline: " + ", ".join(f"{k} × {v:.2f}" for k, v in ratio.items()))
    keys = ("image_size", "epochs", "batch_size", "lr", "max_train", "max_test", "data", "amp", "seed")
    differ = {k: (baseline.params.get(k), cfg.get(k)) for k in keys if baseline.params.get(k) != cfg.get(k)}
    if ray_row["lr"] != cfg.lr:
        differ["lr used"] = (base_row["lr"], ray_row["lr"])
    print("settings differ (Lab 01 vs Lab 02): " + str(differ) if differ else "same data and settings as the Lab 01 run")
    # Pair the two runs' predictions by test file: the same image, scored by both models.
    ours = pd.DataFrame({"file": ds.splits["test"].files, "y_true": y_true, "lab02": y_pred})
    theirs = pd.DataFrame((baseline.final.get("test_predictions") or {"files": [], "y_pred": []}))
    paired = ours.merge(theirs.rename(columns={"files": "file", "y_pred": "lab01", "y_true": "y_true_lab01"}), on="file")
    if len(paired) == 0:
        print("The Lab 01 record holds no test predictions for these test images (an older record, or other data): "
              "re-run Lab 01 with the same data to compare image by image.")
    else:
        low, high = metrics.paired_interval(paired["y_true"], paired["lab02"], paired["lab01"],
                                            metric=metrics.balanced_accuracy, seed=cfg.seed)
        if (paired["y_true"] != paired["y_true_lab01"]).any():
            print("Warning: some test files carry another label in the Lab 01 record (other classes?): compare with care.")
        diff = (metrics.balanced_accuracy(paired["y_true"], paired["lab02"])
                - metrics.balanced_accuracy(paired["y_true"], paired["lab01"]))
        versus = {"metric": "balanced_acc", "diff": diff, "low": low, "high": high, "paired_images": len(paired),
                  "verdict": metrics.interval_verdict(low, high)}
        print(f"balanced accuracy, Lab 02 − Lab 01 on the same {len(paired)} test images: {diff:+.3f}, "
              f"95 % paired-bootstrap interval [{low:+.3f}, {high:+.3f}] → {versus['verdict']}")
    plotting.plot_comparison(comparison, out_dir / "training_comparison.png",
                             metrics=["seconds_per_epoch", "total_seconds", "balanced_acc"], label_col="run",
                             title="Single process vs Ray Train")

# %% [markdown]
# ### Optional: a speedup sweep
# With `sweep=[1, 2]` (or more counts, on a machine or cluster that has them) the lab trains once per worker count
# and plots **speedup** = time per epoch with the fewest workers / time per epoch with *n* workers and
# **efficiency** = speedup / (workers ratio); 1.0 is perfect scaling. On 2 CPU cores expect efficiency well below 1.

# %%
if cfg.sweep:
    sweep_runs, plans = [], {}
    if distributed.resolve_address(cfg.address) is None:           # check every count before Ray starts
        plans = {w: distributed.plan_scaling(w, cfg.device, **distributed.machine_resources()) for w in cfg.sweep}
    with distributed.ray_cluster(cfg.address), recovery.notebook_interrupts():  # one Ray start for every count
        for count in cfg.sweep:
            count_plan = plans.get(count) or distributed.plan_scaling(count, cfg.device,
                                                                      **distributed.cluster_resources())
            count_dir = distributed.new_run_dir()
            tick = time.perf_counter()
            count_result = make_trainer(count_plan, count_dir, fail_at_epoch=None, progress=False).fit()
            sweep_runs.append(distributed.RayRun.from_result(count_result, count_plan, count_dir,
                                                             time.perf_counter() - tick))
    speed = distributed.speedup_table(sweep_runs)
    display(speed.round(3))
    plotting.plot_comparison(speed.assign(run=speed["workers"].astype(str) + " workers"), out_dir / "speedup.png",
                             metrics=["seconds_per_epoch", "speedup", "efficiency"], label_col="run",
                             title="Ray Train: scaling with the number of workers")
else:
    print("sweep=None: set e.g. sweep=[1, 2] to measure speedup and efficiency.")

# %% [markdown]
# ## 10. Save the run record
# The record keeps parameters, environment (world size = number of workers, backend), data, every epoch (with the
# attempt that trained it) and the final numbers, including the number of restarts. `labkit summary` and later
# labs read it.

# %%
record = results.RunRecord(lab="02_ray", params=dict(cfg), data=ds.describe(), epochs=run.history,
                           env={**env.environment("cuda" if run.plan.use_gpu else "cpu", world_size=cfg.workers),
                                "backend": run.plan.backend, "cpus_per_worker": run.plan.cpus_per_worker,
                                "ray_cluster": run.cluster,
                                "precision": env.precision_name(env.amp_dtype(cfg.amp, dev)),
                                "channels_last": env.use_channels_last(dev, env.amp_dtype(cfg.amp, dev))})
record.final = {**summary, **scores, "test_acc": scores["acc"], "test_loss": final["loss"],
                "parameters": n_params, "run_dir": str(run.run_dir)}
if comparison is not None:
    record.final["comparison"] = comparison.to_dict(orient="records")
    record.final["vs_lab01"] = versus           # paired balanced-accuracy difference (None: nothing to pair)
plots = ["training_curves", "time_breakdown", "confusion_matrix"]
plots += ["training_comparison"] if comparison is not None else []
plots += ["speedup"] if cfg.sweep else []
for name in plots:
    record.add_artifact(out_dir / f"{name}.png")
path = results.save(record)
print("saved", path)

# %% [markdown]
# ## Your exercises
# Each exercise's check above said ✔ or ✘; here they are together. When your notebook is graded (`labkit grade`),
# the same checks run again, with a few more the instructor keeps back.

# %%
from labkit.exercises import status_table
print(status_table())

# %% [markdown]
# ## Take-aways
# - Going distributed with Ray Train changed a handful of lines, all in `train_loop_per_worker`: `get_context`,
#   `prepare_model`, a seeded `DistributedSampler` (+ `set_epoch`), `report` with a `Checkpoint`, `get_checkpoint`.
#   The training loop is Lab 01's; the driver is one `TorchTrainer(...).fit()`.
# - Metrics of a distributed run are all-reduced as sums and counts, then divided — never averaged per worker.
# - Data parallelism = a model copy per worker + a different data slice each + gradient **all-reduce** every step.
#   Keep the global batch to compare with one process; grow it with the workers and the learning rate must follow
#   (`lr_scaling`) — a different optimisation, not only a different machine.
# - Compare like with like: the same global batch, balanced accuracy, paired on the same test images.
# - Distribution costs start-up time and communication. It pays off when each worker has its **own** GPU or machine;
#   two workers sharing two CPU cores are slower than one process.
# - Checkpoint every epoch and let `FailureConfig` restart crashed workers: with `get_checkpoint()` the run loses no
#   finished epoch (try `fail_at_epoch=2`).
# - The same notebook scales out: give it `address` of a real Ray cluster with one GPU per worker.
