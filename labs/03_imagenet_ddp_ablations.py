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
# # Lab 03 — ImageNet-style ablations with plain PyTorch DDP
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/labs/03_imagenet_ddp_ablations.ipynb)
#
# Lab 02 let Ray Train start the workers for us. This lab works one layer lower: **PyTorch's
# DistributedDataParallel (DDP)**, the machinery Ray Train (and Lightning) drive underneath.
# You write a complete DDP training script in this notebook and launch it with `torchrun`, the way DDP runs
# in practice; then a launcher replays the ablation study of the source project (seed 002): a ResNet on
# Tiny ImageNet with one training technique switched on after another.
#
# **You will learn to**
# - write and launch a DDP script: `init_process_group`, `DistributedSampler` + `set_epoch`, the DDP wrapper,
#   all-reduced metrics, a rank-0 checkpoint, `destroy_process_group` — with `torchrun --standalone`;
# - build each piece of a modern ImageNet recipe and see what it does to one batch: MixUp/CutMix
#   (`torchvision.transforms.v2`), stochastic depth, progressive resizing, OneCycleLR + AdamW, an EMA of the
#   weights (`torch.optim.swa_utils`), an LR range test;
# - run an **ablation study** as a measurement: one change per row, the baseline repeated with other seeds so
#   every difference is read seed by seed against its own 95 % noise bound, the winner chosen on validation and reported on a
#   held-out test split;
# - understand why the source project's EMA with decay 0.9999 gave 0.5 % accuracy.
#
# **Run time**: quick mode (`quick=True`) ≈ 2 min on 2 CPU cores (two `torchrun` launches: one run, then the baseline twice
# and two other rows, each over the same 2 seeds, on 2 ranks); the full configuration (ResNet-50, 30 epochs × 15 rows, every
# row over 3 seeds, on Tiny ImageNet) is a multi-GPU job — hours on 2–4 GPUs. The notebook's script runs from a terminal
# too (`torchrun … results/03_ablations/ddp_train.py --help`), and so does labkit's twin of the sweep
# (`python -m labkit.labs.ablations --help`).

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
import copy
import json
import math
import time

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.ops import StochasticDepth
from torchvision.transforms import v2

from labkit import env, params, plotting, results
from labkit.distributed import ddp
from labkit.labs.ablations import recipe, sweep
from labkit.labs.ablations import script as ablation_script
from labkit.data.imagenet import load_imagenet
from labkit.files import write_text
from labkit.models.resnet import BlurPool, resnet
from labkit.models.summary import count_parameters

# %% [markdown]
# ## 1. Parameters
# Every knob lives in the next cell (tagged `parameters`): run the lab headless with e.g.
# `papermill labs/03_imagenet_ddp_ablations.ipynb out.ipynb -p world_size 4 -p epochs 50`.
#
# `ablations` is the study itself: a list of named configs, each a dict of **switches** over the shared
# settings above it (`python -m labkit.labs.ablations --help` explains every switch). The first row is the
# **baseline** — every technique of the seed switched off — and every other row changes **exactly one** switch
# of it, so each difference can be credited to that one change. The last row switches everything on (the seed's
# recipe), to compare with the seed's headline. Add, remove or edit rows freely; a misspelt switch is refused
# with its name and the list of known switches.
#
# Defaults follow the seed: `lr = 3e-4` is the peak learning rate **at a global batch of 256** (2 ranks × 128), a
# reference that `lr_scaling` scales to the run's own global batch; progressive resizing in the seed's
# 64 : 128 : 224 ratios and epoch shares (30 / 20 / 40). The "+progressive" row changes only the image size: the
# same per-rank batch and step count as the baseline (`halve_batch: False`); the seed also halved the batch in
# each phase (≈ 2.6× the optimizer steps at the same peak lr), which only the "seed recipe" row does. The
# "fp32 (AMP off)" row trains without mixed precision (on a CPU without native bf16, `amp="auto"` already
# is fp32: the two rows then differ by seed noise only), and "cosine lr" replaces OneCycle's warm-up + cosine
# by a cosine decay from the peak.
#
# `repeats` trains **every row** with that many seeds, the same ones (`seed`, `seed + 1`, …): run *k* of a row and
# run *k* of the baseline share a seed, so their difference is free of what that seed does to both (section 8). `test_size` training images are held out as a **test split** that no choice looks at.
# `memory_budget` (bytes) caps the decoded images kept in RAM; a larger split is memory-mapped from disk.
#
# `quick=True` (or `LABKIT_QUICK=1`) shrinks the work so that each row still *learns*: only the baseline and
# the rows in `quick_ablations`, 6 epochs at 16 px on 1,000 / 300 / 300 images, a quarter-width ResNet-18 at
# batch ≤ 32 per rank (smaller when 1,000 images over `world_size` ranks would not fill one batch per rank), the
# reference lr raised to 3e-3 (the seed's 3e-4 is tuned for 90 epochs, not ~100 steps) and a 20 % warm-up; the
# next cell prints the peak lr this gives at the run's global batch.

# %% tags=["parameters"]
world_size = 2                 # DDP processes (ranks): one model replica each, one GPU each on a GPU machine
epochs = 30                    # per ablation
model = "resnet50"             # resnet18 | resnet34 | resnet50
width = 1.0                    # channel multiplier (quick mode: 0.25)
image_size = 64                # final image size (Tiny ImageNet is 64 px)
progressive_sizes = None       # None: the seed's 64:128:224 ratios of image_size, e.g. [16, 40, 64]
batch_size = 128               # per rank (with progressive and halve_batch: the first phase's, halved later)
lr = 3e-4                      # OneCycleLR peak at a global batch of 256 (the seed's), scaled by lr_scaling
lr_scaling = "sqrt"            # none | linear | sqrt: how the lr grows with the global batch / 256
repeats = None                 # seeds for every row, the same for all (None: 2 in quick mode, 3 otherwise)
test_size = 1000               # training images held out as the test split (reported once, never chosen on)
memory_budget = None           # bytes of decoded images in RAM (None: half the available memory), else memory-mapped
amp = "auto"                   # mixed precision: "auto" (bf16 where the GPU/CPU runs it natively), "bf16", "fp16", False
data = "auto"                  # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/tiny-imagenet"
layout = "auto"                # auto | tiny-imagenet | ilsvrc | plain
standin_classes = 10           # classes of the stand-in (the real Tiny ImageNet has 200)
lr_finder_steps = 100          # batches of the LR range test (0 skips it)
quick = False
device = "auto"
seed = 0
ablations = [  # the baseline: every seed technique off (flip only); each later row changes ONE switch of it
    {"name": "baseline", "variant": "basic", "mixup": 0, "cutmix": 0, "label_smoothing": 0, "progressive": False,
     "halve_batch": False, "affine": False, "color_jitter": False, "erasing": False, "drop_path_rate": 0,
     "use_blurpool": False, "ema_decay": 0, "lr_schedule": "onecycle"},
]
ablations += [{**ablations[0], **row} for row in (
    {"name": "preact", "variant": "preact"},
    {"name": "conv head", "variant": "convhead"},
    {"name": "+label smoothing", "label_smoothing": 0.1},
    {"name": "+mixup/cutmix", "mixup": 0.2, "cutmix": 1.0},
    {"name": "+shift/scale/rotate", "affine": True},
    {"name": "+color jitter", "color_jitter": True},
    {"name": "+erasing", "erasing": True},
    {"name": "+progressive", "progressive": True},      # same batch and steps; only the image size changes
    {"name": "+stochastic depth", "drop_path_rate": 0.2},
    {"name": "+blurpool", "use_blurpool": True},
    {"name": "+EMA", "ema_decay": 0.999},
    {"name": "fp32 (AMP off)", "amp": False},
    {"name": "cosine lr", "lr_schedule": "cosine"},        # no warm-up, cosine from the peak (OneCycle: warm-up)
    {"name": "seed recipe (all on)", "variant": "convhead", "label_smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0,
     "affine": True, "color_jitter": True, "erasing": True, "progressive": True, "halve_batch": True,
     "drop_path_rate": 0.2, "use_blurpool": True, "ema_decay": 0.999},
)]
quick_ablations = ["+mixup/cutmix", "+EMA"]   # quick mode: the baseline and these rows

# %% [markdown]
# ## 2. Check the parameters
# `labkit.params.check` validates every parameter (`-p world_size 0` stops here, naming `world_size`) and
# applies quick mode; `sweep.prepare` turns the `ablations` list into one validated config per run (an
# unknown switch stops here, naming it; every row becomes `repeats` runs, `baseline#1`, `baseline#2`, …).
# The echo shows what will run.

# %% tags=["nbval-check-output"]
LAB = "03_imagenet_ddp_ablations"
cfg = params.check(LAB, rules=sweep.LAB_RULES, show=False,
                   world_size=world_size, epochs=epochs, model=model, width=width, image_size=image_size,
                   progressive_sizes=progressive_sizes, batch_size=batch_size, lr=lr, lr_scaling=lr_scaling,
                   amp=amp, data=data, data_dir=data_dir, layout=layout, standin_classes=standin_classes,
                   lr_finder_steps=lr_finder_steps, quick=quick, device=device, seed=seed, ablations=ablations,
                   quick_ablations=quick_ablations, repeats=repeats, test_size=test_size, memory_budget=memory_budget)
configs = sweep.prepare(cfg)
cfg.show()
print(f"learning rate: lr = {cfg.lr:g} is the reference at a global batch of 256; this run's global batch "
      f"{cfg.world_size} x {configs[0].batch_size} = {cfg.world_size * configs[0].batch_size} gives a peak of "
      f"{sweep.peak_lr(configs[0], cfg.world_size):.3g} ({cfg.lr_scaling} scaling)")
env.seed_everything(cfg.seed)
dev = env.pick_device(cfg.device)
out_dir = results.lab_dir(LAB)

# %% [markdown]
# **Precision.** `env.amp_dtype` picks the autocast dtype: bf16 on GPUs and CPUs that run it natively
# (AVX512-BF16 / AMX), fp16 with a gradient scaler on older GPUs, else fp32; with bf16 or on a GPU the model
# and the batches use the `channels_last` memory layout. Metrics are always computed in fp32 from the logits.

# %%
amp_dtype = env.amp_dtype(cfg.amp, dev)
print(f"device: {dev} ({env.environment(dev)['device_name']}), {torch.cuda.device_count()} GPU(s); "
      f"training runs in {env.precision_name(amp_dtype)}"
      f"{' with channels_last' if env.use_channels_last(dev, amp_dtype) else ''}, metrics in fp32")
if cfg.quick and dev.type == "cpu":
    # a quarter-width ResNet-18 at 32 px gains nothing from a second thread in this (notebook) process, and
    # two threads stall badly when other processes compete for the cores
    torch.set_num_threads(1)

# %% [markdown]
# ## 3. The data
# Tiny ImageNet has 200 classes of 64×64 pictures (100,000 for training, 10,000 for validation). labkit finds
# it in its real layout under `data_dir` (`tiny-imagenet-200/`; also ILSVRC's `Data/CLS-LOC/` and plain
# `train/ val/` folders); `test_size` training images are held out as the **test** split (the real test
# images carry no labels). When it is absent, labkit writes a **synthetic stand-in in the same layout** —
# coloured shapes and textures, learnable but not trivial — and says so loudly. Numbers on the stand-in are
# **not** Tiny ImageNet numbers. The decoded images are cached on disk, so the DDP ranks below read them fast.

# %%
data_set = load_imagenet(cfg.data, cfg.data_dir, layout=cfg.layout, image_size=cfg.image_size,
                         max_train=cfg.max_train, max_val=cfg.max_test, standin_classes=cfg.standin_classes,
                         seed=cfg.seed, test_size=cfg.test_size, memory_budget=cfg.memory_budget)
plotting.plot_samples(data_set["train"].images[:16], data_set["train"].labels[:16], data_set.classes,
                      out_dir / "samples.png");

# %% tags=["nbval-check-output"]
print(f"{data_set.name}: layout {data_set.layout}, synthetic stand-in: {data_set.synthetic}, "
      f"{len(data_set.classes)} classes, images {tuple(data_set['train'].images.shape[1:])}")
print(data_set.class_counts().to_string())
print("memory-mapped splits:", sorted(data_set.memory_mapped) or "none (all in RAM)")

# %% [markdown]
# ## 4. DDP in one script, launched with `torchrun`
# DDP runs **one process per rank** (per GPU on a GPU machine). Each process runs the same script; what makes
# them one training job is a *process group*. `torchrun --standalone --nproc-per-node=N script.py` starts the N
# processes on this machine and hands each its identity in environment variables (`RANK`, `LOCAL_RANK`,
# `WORLD_SIZE`, `MASTER_ADDR`/`MASTER_PORT` of a rendezvous it runs itself; `--standalone` picks a free port).
# On a cluster the same script runs with `--nnodes` and a rendezvous address instead.
#
# The script below is the whole experiment — the ablation sweep of section 7 runs **this file**, so what you
# change here is what the table measures. Read it top to bottom; it follows PyTorch's `examples/imagenet`:
#
# 1. `dist.init_process_group(backend)` — **NCCL** with one GPU per rank; with more ranks than GPUs the ranks
#    share the GPUs over **gloo** (NCCL needs a GPU each: `cuda:1` does not exist on a one-GPU machine); gloo
#    on CPUs (`labkit.distributed.ddp.choose_backend` makes that choice);
# 2. every rank loads the data (rank 0 first, behind a `barrier`, because it may write the cache), and a
#    **`DistributedSampler`** gives each rank its own shard; **`set_epoch`** reshuffles it every epoch. A split
#    too small for one full batch per rank is refused with a message that says what to change;
# 3. the same initial weights on every rank (`seed`), but each rank draws its **own augmentation** (`seed + rank`:
#    otherwise all ranks would flip the same images of their batch); the model is wrapped in
#    **`DistributedDataParallel`**: during `backward()` it all-reduces the gradients, so every rank takes the
#    same optimizer step and the replicas stay identical;
# 4. `train_epoch`: autocast in the chosen precision, a gradient scaler only for fp16 (unscaled before clipping),
#    the LR schedule stepped per batch, the EMA updated per step; every **recipe switch is a command-line
#    argument** (`--mixup`, `--progressive`, `--ema-decay`, `--lr-schedule`, `--amp`, … — `--help` lists them);
# 5. BatchNorm's running statistics are *buffers*, which DDP does not average: each rank broadcasts rank 0's
#    before evaluating, so every rank judges — and rank 0 saves — the same network;
# 6. metrics are **sums** all-reduced over the ranks, then divided (`train_epoch`'s loss/accuracy sums, and
#    `evaluate`'s confusion matrix: each rank scores its exact share of the images). Every tensor handed to a
#    collective lives **on the model's device** — NCCL reduces GPU tensors only;
# 7. **rank 0 alone** writes the checkpoint every epoch (atomically: a temporary file, then `os.replace`) and the
#    metrics; `--resume` continues each run from its checkpoint;
# 8. `--runs runs.json` trains a whole list of runs (each its own switches) one after another in the **same**
#    process group; then `dist.destroy_process_group()`.
#
# This is the code you edit: change it, re-run the cell (it rewrites the file), launch again.

# %%
script = out_dir / "ddp_train.py"
run_dir = out_dir / "ddp_run"                   # the single run of this section (the sweep's runs: section 7)

# %%
# %%writefile {script}
"""DDP training of ResNet ablations on ImageNet-style data (after PyTorch's examples/imagenet).

One run:  torchrun --standalone --nproc-per-node=2 ddp_train.py --data-dir data/tiny-imagenet --epochs 2 --out runs/
A sweep:  torchrun --standalone --nproc-per-node=2 ddp_train.py --data-dir ... --runs runs.json --out runs/
Every recipe switch is an argument (--mixup 0.2, --progressive, --ema-decay 0.999, --amp off, --lr-schedule cosine,
...: see --help). runs.json lists runs, each its own extra arguments, e.g. [["--name", "+EMA#1", "--ema-decay",
"0.999"], ...]: all run one after another in ONE process group. --resume continues each run from its checkpoint.
torchrun starts one process per rank and gives each RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from labkit import env, metrics                     # precision choice; acc / balanced acc / macro-F1
from labkit.data.imagenet import load_imagenet      # real dataset, or the synthetic stand-in
from labkit.distributed.ddp import choose_backend   # nccl with a GPU per rank, else gloo
from labkit.labs.ablations import recipe            # the switches, augmentation, MixUp/CutMix, EMA, LR rule
from labkit.models.resnet import resnet

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data-dir", default="data/tiny-imagenet")
p.add_argument("--standin-classes", type=int, default=10, help="classes of the stand-in when the data is absent")
p.add_argument("--max-train", type=int, default=None)
p.add_argument("--max-val", type=int, default=None)
p.add_argument("--test-size", type=int, default=0, help="training images held out as the test split")
p.add_argument("--device", default="auto", help="auto | cpu | cuda")
p.add_argument("--runs", default=None, help="JSON file: a list of runs, each a list of extra arguments")
p.add_argument("--resume", action="store_true", help="continue each run from its checkpoint, if it has one")
p.add_argument("--stop-after", type=int, default=None, help="stop each run after this epoch, as if interrupted")
p.add_argument("--out", default="ddp_runs", help="one folder per run: checkpoint.pt and metrics.json")
recipe.add_switches(p)                              # --name --model --epochs --batch-size --lr --mixup ... --seed


def rank_device(device, world_size, local_rank):
    """(backend, device) of this rank: NCCL with one GPU per rank; more ranks than GPUs share them round-robin
    over gloo (NCCL cannot: there is no cuda:1 on a one-GPU machine); gloo on CPUs."""
    backend, kind = choose_backend(device, world_size)
    if kind == "cuda":
        return backend, torch.device("cuda", local_rank % torch.cuda.device_count())
    return backend, torch.device("cpu")


def autocast(device, dtype):
    """Mixed precision in the chosen dtype; nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_epoch(model, loader, optimizer, scheduler, criterion, transform, mix=None, scaler=None, dtype=None,
                clip=0.0, ema=None, fmt=torch.contiguous_format):
    """One pass over this rank's shard; returns [loss x images, correct, images] summed over ALL ranks."""
    device = next(model.parameters()).device
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # on the model's device: NCCL reduces GPU tensors only
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, target = transform(x), y
        if mix is not None:                         # MixUp/CutMix: mixed images, soft targets
            x, target = mix(x, y)
        x = x.contiguous(memory_format=fmt)
        with autocast(device, dtype):
            logits = model(x)
        loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:                      # fp16 only: scale the loss, unscale before clipping
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()                         # DDP all-reduces the gradients here
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()                            # per step, not per epoch
        if ema is not None:
            ema.update_parameters(model.module)
        sums[0] += loss.detach() * len(y)           # no .item(): no wait for the GPU inside the loop
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    dist.all_reduce(sums)                           # sum over the ranks, then divide: a mean over images
    return sums


@torch.inference_mode()
def evaluate(model, loader, transform, num_classes, dtype=None, fmt=torch.contiguous_format):
    """This rank's exact shard; returns the confusion matrix [true, predicted] and the top-5 hits, summed over
    ALL ranks (every image counted once)."""
    device = next(model.parameters()).device
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    top5 = torch.zeros(1, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(transform(x).contiguous(memory_format=fmt)).float()
        confusion.scatter_add_(0, y * num_classes + logits.argmax(1), torch.ones_like(y, dtype=torch.float64))
        top5 += (logits.topk(min(5, num_classes), 1).indices == y[:, None]).any(1).sum()
    dist.all_reduce(confusion)
    dist.all_reduce(top5)
    return confusion.view(num_classes, num_classes), top5


def scores(confusion):
    """Top-1 and balanced accuracy (mean recall over the classes present) of a confusion matrix."""
    recall = confusion.diag() / confusion.sum(1).clamp(min=1)
    return (confusion.diag().sum() / confusion.sum()).item(), recall[confusion.sum(1) > 0].mean().item()


def broadcast_buffers(*modules):
    """BatchNorm's running mean/var are buffers, not parameters: DDP all-reduces gradients, but each rank
    updated its statistics from its own batches. Give every rank rank 0's before evaluating and saving."""
    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def train(cfg, data, args, rank, world_size, device):
    """Train one config on every rank; rank 0 writes checkpoint.pt every epoch and metrics.json at the end."""
    out = os.path.join(args.out, re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name).strip("_") or "run")
    num_classes, started = len(data.classes), time.perf_counter()
    dtype = env.amp_dtype(cfg.amp, device)          # torch.bfloat16 / torch.float16 / None (= fp32)
    scaler = env.grad_scaler(dtype, device)         # only for fp16
    channels_last = env.use_channels_last(device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)                     # the same initial weights on every rank
    model = resnet(recipe.MODELS[cfg.model], num_classes, cfg.variant, cfg.drop_path_rate, cfg.use_blurpool,
                   cfg.width, small_input=cfg.image_size < 128)
    if cfg.sync_bn:                                 # GPU ranks: BatchNorm statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = DDP(model.to(device, memory_format=fmt), device_ids=[device.index] if device.type == "cuda" else None)
    ema = recipe.make_ema(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None

    train_set = TensorDataset(data["train"].images, data["train"].labels)
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True)  # rank/world from the group
    plan = recipe.schedule(cfg)                     # (image size, per-rank batch) of every epoch
    steps = [len(sampler) // bs for _, bs in plan]  # only full batches
    peak = recipe.peak_lr(cfg, world_size)          # cfg.lr belongs to a global batch of 256: scaled to this one
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=cfg.weight_decay)
    scheduler = recipe.lr_scheduler(optimizer, cfg, peak, sum(steps))   # onecycle | cosine | constant
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mix = recipe.mixup_cutmix(num_classes, cfg.mixup, cfg.cutmix)
    eval_tf = recipe.RGBTransform(cfg.image_size, train=False)

    def shard(split, indices=None):                 # this rank's exact share: every image evaluated once
        ds = TensorDataset(data[split].images, data[split].labels)
        idx = list(range(len(ds))) if indices is None else indices
        return DataLoader(Subset(ds, idx[rank::world_size]), batch_size=2 * max(bs for _, bs in plan))
    val_loader = shard("val")
    n_val = len(data["val"].labels)                 # the train-val gap: clean top-1 on as many training images
    fit_loader = shard("train", torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[:n_val].tolist())

    history, start, judged = [], 0, ema.module if ema is not None else model.module  # EMA weights when on
    if args.resume and os.path.exists(os.path.join(out, "checkpoint.pt")):
        state = torch.load(os.path.join(out, "checkpoint.pt"), map_location=device, weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, start = state["history"], state["epoch"]
        if rank == 0:
            print(f"{cfg.name}: resumed after epoch {start}/{cfg.epochs}", flush=True)

    for epoch in range(start, cfg.epochs):
        size, bs = plan[epoch]
        sampler.set_epoch(epoch)                    # a new shuffle each epoch, the same one on every rank
        torch.manual_seed(cfg.seed + rank + 1000 * epoch)  # each rank its own augmentation draws (seed + rank)
        loader = DataLoader(train_set, batch_size=bs, sampler=sampler, drop_last=True)
        lr_now, tic = optimizer.param_groups[0]["lr"], time.perf_counter()
        sums = train_epoch(model, loader, optimizer, scheduler, criterion,
                           recipe.train_transform(cfg, size), mix, scaler, dtype, cfg.grad_clip, ema, fmt)
        seconds = time.perf_counter() - tic
        if not cfg.sync_bn:
            broadcast_buffers(model.module, *([ema.module] if ema is not None else []))
        confusion, top5 = evaluate(judged, val_loader, eval_tf, num_classes, dtype, fmt)
        val_acc, val_bacc = scores(confusion)
        train_top1 = scores(evaluate(judged, fit_loader, eval_tf, num_classes, dtype, fmt)[0])[0]
        images = int(sums[2].item())
        row = {"epoch": epoch + 1, "image_size": size, "batch_size": bs, "lr": lr_now,
               "loss": (sums[0] / sums[2]).item(), "acc": (sums[1] / sums[2]).item(), "images": images,
               "val_acc": val_acc, "val_balanced_acc": val_bacc, "val_top5": (top5 / confusion.sum()).item(),
               "val_images": int(confusion.sum().item()), "train_top1": train_top1, "gap": train_top1 - val_acc,
               "seconds": seconds, "images_per_s": images / seconds}
        history.append(row)
        if rank == 0:                               # every rank holds the same weights: rank 0 saves them
            print(f"{cfg.name} epoch {epoch + 1}/{cfg.epochs} {size}px: loss {row['loss']:.3f} "
                  f"val top-1 {val_acc:.3f} top-5 {row['val_top5']:.3f} gap {row['gap']:+.3f} "
                  f"({images} train / {row['val_images']} val images, {row['images_per_s']:.0f} img/s)", flush=True)
            os.makedirs(out, exist_ok=True)
            state = {"epoch": epoch + 1, "world_size": world_size, "config": asdict(cfg),
                     "model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "ema": ema.state_dict() if ema is not None else None, "history": history}
            torch.save(state, os.path.join(out, "checkpoint.pt.tmp"))   # write, then rename: never half a file
            os.replace(os.path.join(out, "checkpoint.pt.tmp"), os.path.join(out, "checkpoint.pt"))
        if args.stop_after and epoch + 1 >= args.stop_after:
            return

    final = {"top1": history[-1]["val_acc"], "top5": history[-1]["val_top5"], "gap": history[-1]["gap"],
             "train_top1": history[-1]["train_top1"], "chance": 1 / num_classes, "peak_lr": peak,
             "global_batch": world_size * cfg.batch_size, "steps": sum(steps), "precision": env.precision_name(dtype),
             "channels_last": channels_last, "seconds": time.perf_counter() - started,
             "images_per_s": sum(h["images"] for h in history) / sum(h["seconds"] for h in history)}
    if "test" in data.splits:                       # the held-out split: scored once, at the end
        confusion, top5 = evaluate(judged, shard("test"), eval_tf, num_classes, dtype, fmt)
        pairs = torch.arange(num_classes**2).repeat_interleave(confusion.flatten().long().cpu())
        test = metrics.summarize(pairs // num_classes, pairs % num_classes, num_classes, data["train"].labels)
        final.update({f"test_{k}": v for k, v in test.items()}, test_top1=test["acc"],
                     test_top5=(top5 / confusion.sum()).item())
    if rank == 0:
        with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
            json.dump({"name": cfg.name, "seed": cfg.seed, "world_size": world_size, "config": asdict(cfg),
                       "steps_per_epoch": steps, "history": history, "final": final}, f, indent=1)
        os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))


def main():
    args = p.parse_args()
    # 1. Join the process group: torchrun set the rendezvous variables. NCCL with one GPU per rank; with more
    #    ranks than GPUs the ranks share them over gloo (NCCL cannot); gloo on CPUs.
    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend, device = rank_device(args.device, world_size, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank = dist.get_rank()
    runs = [p.parse_args(sys.argv[1:] + extra) for extra in json.load(open(args.runs))] if args.runs else [args]
    configs = [recipe.config_from_args(a) for a in runs]

    # 2. Data: rank 0 goes first (it may write the stand-in and the decoded cache), the others wait at the
    #    barrier, then read the cache. Every rank holds the dataset; a DistributedSampler picks its shard.
    if rank != 0:
        dist.barrier()
    with contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext():
        data = load_imagenet("auto", args.data_dir, image_size=max(c.image_size for c in configs),
                             max_train=args.max_train, max_val=args.max_val, standin_classes=args.standin_classes,
                             seed=configs[0].seed, test_size=args.test_size, progress=False)
    if rank == 0:
        dist.barrier()
    problems = [e for c in configs if (e := recipe.fit_error(len(data["train"].labels), world_size, c))]
    if problems:                                    # every rank sees the same: all stop, none hangs
        sys.exit("\n".join(problems))
    if rank == 0:
        print(f"world size {world_size} ({backend}, {device.type}), {len(configs)} run(s), "
              f"{len(data['train'].labels)} training images", flush=True)
    for cfg in configs:
        train(cfg, data, args, rank, world_size, device)

    # 3. Leave the process group together, then exit at once: the interpreter's teardown of torch's C++ state can
    #    abort a rank that has finished ("terminate called without an active exception"), failing a finished run.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

# %% [markdown]
# Launch it on `world_size` ranks with this environment's Python: `labkit.distributed.ddp.torchrun` runs
# `python -m torch.distributed.run --standalone --nproc-per-node=N ddp_train.py ARGS` and prints its output
# **line by line as it comes** (a long run shows every epoch while it trains, not all at the end); a rank that
# fails makes `torchrun` stop the others, and the cell raises with the last lines. The arguments are the data
# options and the baseline's switches (`recipe.switch_args` writes a config as arguments); `--lr` is the
# reference rate at a global batch of 256 — the script scales it to its own global batch (section 6). In quick
# mode this run is one epoch.

# %%
base = configs[0]
data_args = ["--data-dir", str(data_set.root), "--standin-classes", str(cfg.standin_classes),
             "--max-train", str(cfg.max_train), "--max-val", str(cfg.max_test), "--test-size", str(cfg.test_size)]
demo = sweep.make_config({**base.__dict__, "name": "run", "epochs": 1 if cfg.quick else base.epochs})
script_args = [*data_args, *recipe.switch_args(demo), "--device", cfg.device, "--out", str(run_dir)]
print("$ torchrun --standalone", f"--nproc-per-node={cfg.world_size}", script.name, " ".join(script_args))
ablation_script.check_fit([demo], len(data_set["train"]), cfg.world_size)  # one full batch per rank, or stop here
started = time.perf_counter()
ddp.torchrun(script, script_args, cfg.world_size, device=cfg.device)
print(f"torchrun finished in {time.perf_counter() - started:.1f}s")

# %% [markdown]
# What the job left behind: rank 0's metrics and checkpoint. Every rank took the same number of steps (the
# sampler gives every rank the same share), the validation confusion matrix counts each image exactly once,
# and the checkpoint holds the plain model's `state_dict` (`model.module`, without DDP's wrapper).

# %% tags=["nbval-check-output"]
ddp_metrics = json.loads((run_dir / "run" / "metrics.json").read_text())
ckpt = torch.load(run_dir / "run" / "checkpoint.pt", weights_only=True)
print(f"world size {ddp_metrics['world_size']}: {ddp_metrics['steps_per_epoch'][0]} steps per rank and epoch, "
      f"global batch {ddp_metrics['final']['global_batch']}, peak lr {ddp_metrics['final']['peak_lr']:.3g}")
for h in ddp_metrics["history"]:
    print(f"epoch {h['epoch']}: {h['images']} training images over all ranks, {h['val_images']} validation images")
print(f"checkpoint after epoch {ckpt['epoch']}: {len(ckpt['model'])} tensors, "
      f"{sum(v.numel() for k, v in ckpt['model'].items() if 'running' not in k and 'num_batches' not in k):,} numbers")

# %%
print(pd.DataFrame(ddp_metrics["history"]).round(3).to_string(index=False))

# %% [markdown]
# ### Exercise 1 — what does `set_epoch` change?
# With `shuffle=True`, `DistributedSampler` draws one permutation of the whole dataset from a generator seeded
# with `seed + epoch` — the **same** permutation on every rank, so the shards never overlap — pads it by repeating
# its first entries up to a multiple of `world_size`, and gives rank `r` the entries `r, r + world_size, …`.
# `sampler.set_epoch(epoch)` is the only way the sampler learns the epoch: forget it and every epoch repeats
# epoch 0's order. Write the indices rank `rank` reads in epoch `epoch` (use `torch.Generator`, `torch.randperm`).

# %%
def my_epoch_order(dataset_len, world_size, rank, epoch, seed=0):
    # BEGIN SOLUTION
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(dataset_len, generator=g).tolist()
    padded = order + order[: math.ceil(dataset_len / world_size) * world_size - dataset_len]
    return padded[rank::world_size]
    # END SOLUTION


# %% labkit={"points": 2, "question": "epoch_order"} tags=["nbval-check-output"]
from labkit.exercises import lab03, reported
with reported("epoch_order"):                       # ✔ or ✘ with a hint; Run All goes on either way
    lab03.check_epoch_order(my_epoch_order)

# %% labkit={"hidden": "epoch_order"} tags=["hidden-check"]
def _hidden_epoch_order():
    import torch
    from torch.utils.data import DistributedSampler
    for n, world, rank, epoch, seed in ((10, 3, 2, 1, 0), (13, 4, 3, 2, 5), (9, 1, 0, 4, 3), (11, 5, 0, 7, 11)):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        got = my_epoch_order(n, world, rank, epoch, seed)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        assert [int(i) for i in got] == list(sampler), (n, world, rank, epoch, seed)


_hidden_epoch_order()

# %% [markdown]
# **The same script, for a sweep.** Twelve rows × three seeds launched one `torchrun` each would pay the
# start-up (processes, imports, rendezvous, loading the data) 36 times — seconds each, longer than a quick run
# itself. So the sweep (section 7) launches your script **once** with `--runs runs.json`, a list of runs, each
# its own switches: all (row, seed) runs train one after another in the same process group.

# %% [markdown]
# ## 5. The models
# The seed compared three ResNet-50 variants:
# - **basic** — the original block, `relu(x + F(x))`;
# - **preact** — pre-activation: BN and ReLU move *before* the convolutions, so the skip path is a clean
#   identity without a ReLU on it (He et al. 2016);
# - **convhead** — the last fully connected layer becomes a 1×1 convolution followed by global average
#   pooling (the seed's best).
#
# Two switches change the module tree without (almost) changing the parameter count: **stochastic depth**
# (`drop_path_rate`) and **BlurPool** (`use_blurpool`: a fixed low-pass filter before every stride-2 step, so
# small shifts of the input change the output less).

# %% tags=["nbval-check-output"]
rows = []
for c in configs:
    m = resnet(sweep.MODELS[c.model], len(data_set.classes), c.variant, c.drop_path_rate, c.use_blurpool,
               c.width, small_input=c.image_size < 128)
    rows.append({"ablation": c.name, "model": c.model, "variant": c.variant, "parameters": count_parameters(m),
                 "drop-path blocks": sum(isinstance(x, StochasticDepth) for x in m.modules()),
                 "blur pools": sum(isinstance(x, BlurPool) for x in m.modules())})
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# **Stochastic depth** (Huang et al. 2016) skips a residual block's branch at random during training: the
# block computes `x + StochasticDepth(p)(F(x))`, and for some samples the branch is zero, so the block is the
# identity. `torchvision.ops.StochasticDepth(p, mode="row")` drops each sample's branch with probability `p`;
# labkit's ResNet raises `p` linearly from 0 in the first block to `drop_path_rate` in the last.
#
# **Predict, then run.** Below, a batch of 8 branch outputs that are all ones goes through
# `StochasticDepth(p=0.5, mode="row")` in training mode, then in evaluation mode. Before running it, write down:
# which values can appear in training mode, what their mean is close to, and what evaluation mode returns.

# %% tags=["nbval-check-output"]
drop = StochasticDepth(p=0.5, mode="row")
branch = torch.ones(8, 3)                 # F(x) for 8 samples, 3 features each
torch.manual_seed(cfg.seed)
drop.train()
print("train mode, first feature per sample:", drop(branch)[:, 0].tolist())
print("train mode, mean over 10,000 samples:", round(drop(torch.ones(10_000, 1)).mean().item(), 2))
drop.eval()
print("eval mode, first feature per sample: ", drop(branch)[:, 0].tolist())

# %% [markdown]
# *Answer.* In training mode each sample's branch is either **dropped (0)** or **kept and scaled by
# 1 / (1 − p) = 2**, so the mean stays ≈ 1: the block's output has the same expected value as in evaluation
# mode, where `StochasticDepth` is the identity. That is why nothing needs rescaling at test time — the same
# trick as dropout, applied to whole residual branches.

# %% [markdown]
# ## 6. The recipe, piece by piece
# Each cell below builds one piece from `torch` / `torchvision` and applies it to one batch. The sweep in
# section 7 uses the same pieces (`labkit/labs/ablations/recipe.py` keeps the ones it needs), plugged into your
# script's `train_epoch`.
#
# **Augmentation and MixUp / CutMix.** The seed's pipeline, each piece a switch of `labkit.labs.ablations.recipe.RGBTransform`
# drawn per image with `torchvision.transforms.v2`: a horizontal flip (p 0.5), ShiftScaleRotate as
# `v2.RandomAffine` (shift ≤ 6.25 %, scale 0.9–1.1, ±15°, p 0.5), `v2.ColorJitter(0.2, 0.2, 0.2, 0.1)` (p 0.3) and
# CoarseDropout as `v2.RandomErasing` (one square a quarter of the side, mean colour, p 0.5).
# **MixUp** blends two images and their labels (`λ ~ Beta(0.2, 0.2)`); **CutMix** pastes a box of one image
# into another and mixes the labels by the box area (`λ ~ Beta(1, 1)`). Each batch gets one of the two
# (`v2.RandomChoice`); the targets become *soft labels* — two classes whose weights sum to 1 (with α = 0.2, λ is
# usually close to 0 or 1, so most MixUp images are only lightly mixed). **Label smoothing 0.1**
# (`nn.CrossEntropyLoss(label_smoothing=0.1)`) then moves 10 % of every target's mass evenly over all classes.

# %%
num_classes = len(data_set.classes)
mixup, cutmix = v2.MixUp(alpha=0.2, num_classes=num_classes), v2.CutMix(alpha=1.0, num_classes=num_classes)
mix = v2.RandomChoice([mixup, cutmix])    # what the sweep applies to every training batch
torch.manual_seed(cfg.seed)
x, y = next(iter(data_set.loader("train", 8, shuffle=True, seed=cfg.seed)))
x = recipe.RGBTransform(cfg.image_size, train=True, affine=True, color_jitter=True, erasing=True)(x)  # the seed's augmentations
mean, std = torch.tensor(recipe.IMAGENET_MEAN)[:, None, None], torch.tensor(recipe.IMAGENET_STD)[:, None, None]
fig, axes = plt.subplots(2, 8, figsize=(16, 4.8), layout="constrained")
for row, (name, op) in zip(axes, [("MixUp α=0.2", mixup), ("CutMix α=1", cutmix)]):
    xm, ym = op(x, y)                     # soft targets ym: [8, num_classes]
    for ax, img, soft in zip(row, xm, ym):
        w, k = soft.topk(2)
        ax.imshow((img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(f"{w[0]:.2f}·class {k[0]} + {w[1]:.2f}·class {k[1]}", fontsize=8)
        ax.axis("off")
    row[0].text(-0.15, 0.5, name, transform=row[0].transAxes, rotation=90, va="center", ha="right")
plotting.save_figure(fig, out_dir / "mixup_cutmix.png");
smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
print(f"loss of uniform logits on the mixed targets: {smooth(torch.zeros_like(ym), ym):.3f} = ln({num_classes})")

# %% [markdown]
# ### Exercise 2 — MixUp's soft targets
# `v2.MixUp` pairs image `i` with image `i − 1` (the batch rolled by one) and returns
# `λ·x + (1 − λ)·x_rolled` with targets `λ·one_hot(y) + (1 − λ)·one_hot(y_rolled)`. Write it for a given `λ`;
# the check runs torchvision's `v2.MixUp` on the same batch and compares.

# %%
def my_mixup(x, y, lam, num_classes):
    # BEGIN SOLUTION
    one_hot = nn.functional.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x.roll(1, 0), lam * one_hot + (1 - lam) * one_hot.roll(1, 0)
    # END SOLUTION


# %% labkit={"points": 1, "question": "mixup_targets"} tags=["nbval-check-output"]
from labkit.exercises import lab03, reported
with reported("mixup_targets"):
    lab03.check_mixup_targets(my_mixup)

# %% labkit={"hidden": "mixup_targets"} tags=["hidden-check"]
def _hidden_mixup_targets():
    import torch
    from torchvision.transforms import v2
    for seed, classes, labels in ((3, 10, [1, 3, 0, 2, 3, 0, 2]), (4, 5, [4, 0])):   # not every class in the batch
        torch.manual_seed(seed)
        x, y = torch.rand(len(labels), 1, 5, 5), torch.tensor(labels)
        x_ref, y_ref = v2.MixUp(alpha=1.0, num_classes=classes)(x, y)
        lam = float(y_ref[0, y[0]])                                              # y[0] != y[-1]
        x_got, y_got = (torch.as_tensor(t).float() for t in my_mixup(x.clone(), y.clone(), lam, classes))
        assert y_got.shape == y_ref.shape and torch.allclose(y_got, y_ref, atol=1e-5), (classes, tuple(y_got.shape))
        assert x_got.shape == x_ref.shape and torch.allclose(x_got, x_ref, atol=1e-5), classes


_hidden_mixup_targets()

# %% [markdown]
# **Progressive resizing.** The seed trained ImageNet at 64 px for epochs 1–30 (batch 256), 128 px for 31–50
# (batch 128) and 224 px for 51–90 (batch 64): small images early are cheap, and the network sees the full
# size at the end. `labkit.labs.ablations.recipe.progressive_schedule` scales that plan to any run length (the last epoch is
# always at full size) and `progressive_sizes` scales 64 : 128 : 224 to our `image_size`. The cell times one
# training step of the sweep's model at each phase: a smaller image costs less per image.

# %% tags=["nbval-check-output"]
prog = next((c for c in configs if c.progressive), configs[0])
plan = sweep.schedule(prog)
print(f"{prog.name}: {prog.epochs} epochs")
print(pd.DataFrame(plan, columns=["image_size", "batch_per_rank"], index=pd.RangeIndex(1, len(plan) + 1, name="epoch")).to_string())
print("seed's plan on 90 epochs:", sorted(set(recipe.progressive_schedule(90)), reverse=False))

# %%
net = resnet(sweep.MODELS[prog.model], num_classes, prog.variant, width=prog.width, small_input=True)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
images_u8, labels = next(iter(data_set.loader("train", max(bs for _, bs in plan), shuffle=True, seed=cfg.seed)))
for size, bs in sorted(set(plan)):
    batch = recipe.RGBTransform(size, train=True)(images_u8[:bs])   # resize to this phase's size + flip
    for _ in range(2):                                                # the second step is timed
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(net(batch), labels[:bs])
        opt.zero_grad()
        loss.backward()
        opt.step()
    took = time.perf_counter() - start
    print(f"{size:>3} px, batch {bs:>3}: input {tuple(batch.shape)}, one step {1000 * took:.0f} ms, "
          f"{bs / took:.0f} img/s")

# %% [markdown]
# **OneCycleLR + AdamW.** The seed's schedule (`torch.optim.lr_scheduler.OneCycleLR`, AdamW with weight decay
# 1e-4) warms the learning rate up for 30 % of the *steps* and anneals it with a cosine; it is stepped after
# every batch, so it needs the total step count — with progressive resizing the batch size changes per
# phase, so the steps are summed over the plan. Every step also **clips the gradient norm to 1.0**.
#
# **The LR scaling rule.** The seed's peak 3e-4 belongs to a global batch of 256. With `world_size` ranks each
# taking a batch of `B`, one optimizer step sees `world_size × B` images, so the peak may grow with
# `world_size × B / 256`: linearly (*linear*) or with its square root (*sqrt*, gentler; the seed's advice for
# AdamW). Lab 02 derived the rules; here `lr_scaling` picks one.

# %% tags=["nbval-check-output"]
peak = sweep.peak_lr(prog, cfg.world_size)
per_rank = math.ceil(len(data_set["train"]) / cfg.world_size)
total_steps = sum(per_rank // bs for _, bs in plan)                  # drop_last: only full batches
w = nn.Parameter(torch.zeros(1))
opt = torch.optim.AdamW([w], lr=peak, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total_steps, pct_start=0.3,
                                            anneal_strategy="cos")
lrs = []
for _ in range(total_steps):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
print(f"reference lr {cfg.lr:g} (global batch 256) x {cfg.lr_scaling}({cfg.world_size} x {prog.batch_size} / 256) "
      f"= peak lr {peak:.3g}; "
      f"{total_steps} steps, "
      f"highest at step {lrs.index(max(lrs)) + 1}: starts at {lrs[0]:.2g}, ends at {lrs[-1]:.2g}")

# %%
fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
ax.plot(range(1, total_steps + 1), lrs, marker=".")
ax.set(xlabel="optimizer step", ylabel="learning rate", title=f"OneCycleLR over {prog.name}'s {total_steps} steps")
plotting.save_figure(fig, out_dir / "onecycle.png");

# %% [markdown]
# **EMA of the weights — and why the seed's EMA failed.** An exponential moving average keeps a second copy
# of the weights, `ema ← d · ema + (1 − d) · weights`, after every step, and validates with it: the noise of
# the last steps averages out. `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn(d)` does it
# (`use_buffers=True` averages the BatchNorm statistics too). The cell trains a small model for a few steps and
# checks the update by hand.

# %%
torch.manual_seed(cfg.seed)
toy = nn.Linear(4, 1)
ema = AveragedModel(toy, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
opt = torch.optim.SGD(toy.parameters(), lr=0.1)
by_hand = None
for step in range(1, 21):
    loss = (toy(torch.randn(16, 4)) - 1).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema.update_parameters(toy)                 # the first call copies the weights, later ones average
    w_now = toy.weight.detach().clone()
    by_hand = w_now if by_hand is None else 0.9 * by_hand + 0.1 * w_now
    if step % 5 == 0:
        print(f"step {step:>2}: weight[0] {w_now[0, 0]:+.3f}  ema {ema.module.weight[0, 0]:+.3f}  "
              f"(by hand {by_hand[0, 0]:+.3f})")

# %% [markdown]
# The EMA averages over roughly `1 / (1 − d)` steps. With the seed's `d = 0.9999` that is **10,000 steps** —
# more than a short run has. After `N` steps the randomly initialised weights still make up `d^N` of the
# average: a short run's EMA is mostly the *untrained* network, which guesses — **0.5 % is exactly chance on
# 200 classes**, the number the seed saw. Two fixes: a decay that fits the run (`0.999` ≈ 1,000 steps), and a
# **warm-up** (timm/TensorFlow): use `min(d, (1 + n) / (10 + n))` at update `n`, so the EMA follows the model
# closely at first. The sweep's EMA (`labkit.labs.ablations.recipe.make_ema`) is the `AveragedModel` above with that warm-up.

# %% tags=["nbval-check-output"]
steps = sum(per_rank // bs for _, bs in sweep.schedule(configs[-1]))
seed_steps = 100_000 // 256 * 5   # the seed: 5 epochs of Tiny ImageNet at batch 256
rows = []
for d in (0.9999, 0.999, 0.99):
    for n in (steps, seed_steps):
        warm = math.prod(min(d, (1 + i) / (10 + i)) for i in range(1, n + 1))
        rows.append({"decay": d, "horizon (steps)": round(1 / (1 - d)), "steps": n,
                     "init weight, no warm-up": f"{d ** n:.3f}", "init weight, warm-up": f"{warm:.1e}"})
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# **LR range test.** Before training, the seed looked for a learning rate with an *LR finder*: raise the
# learning rate exponentially, one batch at a time, and watch the loss. It falls while the rate is useful and
# explodes when it is too large; a common pick (fast.ai) is a tenth of the rate at the lowest smoothed loss.
# The test runs in this process on one model and puts the weights back afterwards.

# %%
def lr_range_test(model, loader, transform, start_lr=1e-6, end_lr=1.0, steps=100, smooth=0.05):
    """Loss per learning rate, raised exponentially from start_lr to end_lr; stops once the loss explodes."""
    saved = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=start_lr)
    rows, avg, best, batches = [], 0.0, math.inf, iter(loader)
    model.train()
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            x, y = next(batches)
        except StopIteration:             # start the loader again when the test outlasts one epoch
            batches = iter(loader)
            x, y = next(batches)
        loss = nn.functional.cross_entropy(model(transform(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = smooth * loss.item() + (1 - smooth) * avg
        rows.append({"lr": lr, "loss": loss.item(), "smooth_loss": avg / (1 - (1 - smooth) ** (i + 1))})
        if not math.isfinite(rows[-1]["smooth_loss"]) or rows[-1]["smooth_loss"] > 4 * best:
            break
        best = min(best, rows[-1]["smooth_loss"])
    model.load_state_dict(saved)
    return pd.DataFrame(rows)


if cfg.lr_finder_steps:
    c = configs[-1]
    torch.manual_seed(cfg.seed)
    net = resnet(sweep.MODELS[c.model], num_classes, c.variant, width=c.width, small_input=c.image_size < 128)
    finder = lr_range_test(net, data_set.loader("train", min(c.batch_size, 64), seed=cfg.seed),
                           recipe.RGBTransform(c.image_size, train=True), steps=cfg.lr_finder_steps)
    suggested = float(finder.loc[finder["smooth_loss"].idxmin(), "lr"]) / 10
    print(f"suggested peak lr: {suggested:.1e} at batch {min(c.batch_size, 64)} on one process; this run's peak is "
          f"{sweep.peak_lr(c, cfg.world_size):.2e} at its global batch {cfg.world_size * c.batch_size} "
          f"(lr = {cfg.lr:g} is the reference at a global batch of 256, scaled by {cfg.lr_scaling})")
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.plot(finder["lr"], finder["loss"], alpha=0.3, label="loss")
    ax.plot(finder["lr"], finder["smooth_loss"], label="smoothed loss")
    ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested lr {suggested:.1e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    ax.legend()
    plotting.save_figure(fig, out_dir / "lr_finder.png");
else:
    finder, suggested = None, None

# %% [markdown]
# ## 7. Run the ablations — with your script
# The sweep runs **your `ddp_train.py`** from section 4: `ablation_script.run_script` writes every (row, seed)
# run as the script's switches into `runs.json` (e.g. `--name "+EMA#2" --seed 1 --ema-decay 0.999 …`), checks
# that every run gives each rank at least one full batch (before any rank starts), and launches `torchrun`
# **once**: all runs train one after another in one process group, and the output streams in as it comes. Each
# run writes `results/03_ablations/runs/<name>/checkpoint.pt` every epoch and `metrics.json` at the end;
# `resume=True` continues every run from its checkpoint after an interruption. Edit the script — a switch's
# meaning, the loop, the evaluation — and the table below measures your edit.
# The *gap* is the clean (un-augmented) top-1 on training images minus the validation top-1 — the overfitting
# the seed watched shrink with stochastic depth. At the end each run is scored once on the held-out test split.

# %%
runs = ablation_script.run_script(script, configs, len(data_set["train"]), data_args, world_size=cfg.world_size,
                                  device=cfg.device, out_dir=out_dir / "runs")

# %% [markdown]
# ## 8. Results — paired differences against their own noise
# One row per ablation: validation top-1 (the **mean over its seeds**, with `top1_spread` = highest − lowest),
# top-5, the train–val gap, seconds and images/s. Every row ran with the baseline's seeds, so `diff` is the mean of
# the **paired** differences (row − baseline, seed by seed) and `bound` its two-sided 95 % bound: Student's *t* at
# `seeds − 1` degrees of freedom times the standard error of those differences
# (`labkit.metrics.paired_difference`). **`verdict` says "beyond noise" only when 0 lies outside `diff ± bound`**:
# with no real effect that happens in 5 % of rows — the rate the rule promises (a test simulates it). Test
# metrics are left out of this table on purpose: rows are compared and chosen on validation only.

# %%
table = sweep.ablation_table(runs)
write_text(out_dir / "ablations.csv", table.to_csv(index=False))
shown = ["ablation", "seeds", "top1", "top1_spread", "top5", "gap", "diff", "bound", "verdict", "seconds", "images_per_s"]
print(table[shown].round(3).to_string(index=False))

# %% tags=["nbval-check-output", "labkit-result"]
base_row = table.iloc[0]
print(f"{len(table)} rows, each over the same {int(base_row['seeds'])} seeds; chance {1 / num_classes:.2f}")
print(f"baseline top-1 {base_row['top1']:.2f} ± {base_row['top1_spread'] / 2:.2f} (mean ± half the spread)")
print("well above chance:", bool(base_row["top1"] > 2 / num_classes))

# %%
fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(table)), 4), layout="constrained")
ax.bar(table["ablation"], table["top1"], color=["C7" if v == "within noise" else "C0" for v in table["verdict"]])
per_seed = [r["final"]["top1"] for r in runs if r["row"] == base_row["ablation"]]
ax.axhspan(min(per_seed), max(per_seed), color="C1", alpha=0.3, label=f"baseline's seed spread ({len(per_seed)} seeds)")
ax.axhline(1 / num_classes, color="k", linestyle=":", label="chance")
ax.set(ylabel="validation top-1", title="Lab 03 ablations (grey: within noise)")
ax.tick_params(axis="x", rotation=30)
ax.legend(loc="lower right")
plotting.save_figure(fig, out_dir / "ablations.png");

# %%
curves = pd.DataFrame([{"ablation": r["name"], **h} for r in runs for h in r["history"]])
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
for ax, (col, title) in zip(axes, (("loss", "training loss (mixed targets)"),
                                   ("val_acc", "validation top-1"), ("gap", "train − val top-1"))):
    sns.lineplot(data=curves, x="epoch", y=col, hue="ablation", marker="o", ax=ax, legend=ax is axes[1])
    ax.set(title=title, xlabel="epoch", ylabel=col)
    ax.xaxis.get_major_locator().set_params(integer=True)
plotting.save_figure(fig, out_dir / "learning_curves.png");

# %% [markdown]
# **How many repeats does a claim need?** Pairing by seed removes what a seed does to both runs; what is left
# is the spread `σ_d` of the per-seed differences. Their mean has standard error `σ_d/√n`, and the bound is
# `t(n−1)·σ_d/√n` — with `t(1) = 12.7` for 2 seeds, `t(2) = 4.3` for 3, `t(7) = 2.4` for 8. To *see* an effect `d`
# (verdict "beyond noise" in about 80 % of studies, at the 5 % false-alarm rate) you need roughly
# `n ≈ (1.96 + 0.84)²·σ_d²/d² ≈ 8·σ_d²/d²` seeds, a few more for small `n` (the *t* quantile is larger than 1.96).
# For an effect as large as the noise (`d = σ_d`) that is about 10 seeds per row; for `d = 2σ_d`, about 4.
# Quick mode's 2 seeds only ever call huge effects — and it will say "within noise" for most rows, honestly.
#
# The source project ran every configuration **once**. Its ablation differences of a point or two on Tiny
# ImageNet are of the size a different seed, data order or augmentation draw produces by itself, so its
# single runs cannot separate such small effects — only the large ones (its +10 points for progressive
# resizing + MixUp/CutMix, and EMA's collapse to chance) are clearly beyond run-to-run noise.

# %% [markdown]
# **The headline, honestly.** The best row is **chosen on validation**; its score is then **reported on the test
# split**, which no choice has seen (picking the maximum of many noisy validation scores is biased upwards —
# the test score is not).

# %%
best = table.loc[table["top1"].idxmax()]
print(f"chosen on validation: {best['ablation']} ({best['verdict']}); "
      f"test top-1 {best['test_top1']:.3f} (validation {best['top1']:.3f}; chance {1 / num_classes:.2f})")
print(f"test balanced accuracy {best['test_balanced_acc']:.3f}, macro-F1 {best['test_macro_f1']:.3f}")

# %% [markdown]
# ## 9. Against the source project
# What seed 002 reported on the **real** Tiny ImageNet (200 classes, ResNet-50, many epochs on a GPU) beside
# this run, each compared like with like: a row that changes one thing against the baseline, read against the
# paired 95 % bound. **Stand-in numbers are not Tiny ImageNet numbers**; the point of the quick run is the
# mechanics, the full run on the real data is where the seed's claims can be checked.

# %%
rows_by_name = table.set_index("ablation")
def vs_base(name, key="top1"):
    if name not in rows_by_name.index:
        return "not run"
    r = rows_by_name.loc[name]
    return f"{r['diff']:+.3f} ± {r['bound']:.3f} ({r['verdict']})" if key == "top1" else \
        f"{base_row[key]:+.3f} -> {r[key]:+.3f}"
seed_vs_this = pd.DataFrame([
    {"claim": "all techniques: top-1", "seed 002": "≈ 0.67",
     "this run": (f"{rows_by_name.loc['seed recipe (all on)', 'top1']:.3f}"
                  if "seed recipe (all on)" in rows_by_name.index else "not run")},
    {"claim": "MixUp/CutMix alone: top-1 vs baseline", "seed 002": "part of ≈ +0.10", "this run": vs_base("+mixup/cutmix")},
    {"claim": "progressive resizing alone: top-1 vs baseline", "seed 002": "part of ≈ +0.10",
     "this run": vs_base("+progressive")},
    {"claim": "stochastic depth alone: train-val gap", "seed 002": "much smaller",
     "this run": vs_base("+stochastic depth", "gap")},
    {"claim": "EMA on a short run: top-1 vs baseline", "seed 002": "0.005 (decay 0.9999, chance)",
     "this run": "EMA 0.999 + warm-up: " + vs_base("+EMA")},
])
print(f"data: {data_set.name}, synthetic stand-in: {data_set.synthetic}, {num_classes} classes "
      f"(chance {1 / num_classes:.3f}), {cfg.epochs} epochs, every row over the same {cfg.repeats} seeds")
print(seed_vs_this.to_string(index=False))
if data_set.synthetic:
    print("These are stand-in numbers: they are NOT Tiny ImageNet results and can neither confirm nor refute the seed's.")
earlier = results.load()
if not earlier.empty and "images_per_s" in earlier:
    print("\nthroughput of earlier labs' runs (images/s):")
    print(earlier.groupby("lab")["images_per_s"].last().round(0).to_string())

# %% [markdown]
# ## 10. Exercise 3 (open) — resume a run
# Your script writes `checkpoint.pt` every epoch and `--resume` continues from it. Stop a run after one epoch
# (add `--stop-after 1` to the section-4 launch), launch it again with `--resume`, and compare the final
# checkpoint with an uninterrupted run's. Why is `--epochs 1` not the same as stopping after epoch 1 (look at
# the scheduler's `total_steps`)? Why are the resumed weights the same, not just similar? (Hint: where does the
# script seed the augmentation of each epoch, and what does `set_epoch` do?) What would break if the seed were
# set once, before the loop? `run_script(..., resume=True)` does the same for the whole sweep.

# %% [markdown]
# ## 11. Save the run record
# One JSON record for the whole study: the parameters, the environment, the data, one row per epoch and
# ablation, the headline numbers of the best ablation and the `torchrun` script's run.

# %%
last_ddp = ddp_metrics["history"][-1]
record = results.RunRecord(
    lab=LAB, params={**{k: v for k, v in cfg.items()}, "precision": env.precision_name(amp_dtype)},
    env={**env.environment(dev, cfg.world_size), "precision": env.precision_name(amp_dtype)},
    data=data_set.describe(), epochs=[{"ablation": r["name"], "row": r["row"], "seed": r["seed"], **h}
                                      for r in runs for h in r["history"]],
    final={"best_ablation": best["ablation"], "chosen_on": "validation", "top1": float(best["test_top1"]),
           "val_top1": float(best["top1"]), "top5": float(rows_by_name.loc[best["ablation"], "top5"]),
           "acc": float(best["test_top1"]), "balanced_acc": float(best["test_balanced_acc"]),
           "macro_f1": float(best["test_macro_f1"]),
           "majority_rate": float(next(r for r in runs if r["row"] == best["ablation"])["final"]["test_majority_rate"]),
           "gap": float(best["gap"]), "ablations": len(table), "runs": len(runs), "repeats": cfg.repeats,
           "baseline_top1_mean": float(base_row["top1"]), "baseline_top1_spread": float(base_row["top1_spread"]),
           "rows": {r["ablation"]: {"top1_mean": r["top1"], "top1_spread": r["top1_spread"], "seeds": int(r["seeds"]),
                                    "test_top1_mean": r["test_top1"], "test_balanced_acc_mean": r["test_balanced_acc"],
                                    "test_macro_f1_mean": r["test_macro_f1"], "diff": r["diff"], "bound": r["bound"],
                                    "paired_seeds": int(r["paired_seeds"]), "verdict": r["verdict"],
                                    "seed_values": sorted({x["seed"] for x in runs if x["row"] == r["ablation"]})}
                    for r in table.to_dict("records")},
           "chance": 1 / num_classes,
           "seconds": sum(r["final"]["seconds"] for r in runs),
           "images_per_s": sum(r["final"]["images_per_s"] for r in runs) / len(runs),
           "suggested_lr": suggested, "precision": env.precision_name(amp_dtype),
           "torchrun_val_acc": last_ddp["val_acc"], "torchrun_val_balanced_acc": last_ddp["val_balanced_acc"]})
for name in ("samples.png", "mixup_cutmix.png", "onecycle.png", "ablations.png", "learning_curves.png",
             "ablations.csv", "lr_finder.png", "ddp_train.py", "ddp_run/run/metrics.json", "runs/runs.json"):
    if (out_dir / name).exists():
        record.add_artifact(out_dir / name)
print("saved", results.save(record))

# %% [markdown]
# ## Your exercises
# Each exercise's check above said ✔ or ✘; here they are together. When your notebook is graded (`labkit grade`),
# the same checks run again, with a few more the instructor keeps back.

# %%
from labkit.exercises import status_table
print(status_table())

# %% [markdown]
# ## Take-aways
# - A DDP job is one script run by N processes: `init_process_group`, a `DistributedSampler` with `set_epoch`,
#   the DDP wrapper (gradients all-reduced in `backward()`), metrics summed over ranks, a rank-0 checkpoint,
#   `destroy_process_group`. `torchrun` starts the processes and hands each its rank.
# - Start-up costs seconds per rank: run many short experiments in one process group.
# - Each recipe piece is a few lines of `torch`/`torchvision`: MixUp/CutMix make soft targets, stochastic depth
#   drops residual branches (and rescales the survivors), OneCycle is stepped per batch, an EMA averages over
#   `1 / (1 − decay)` steps — match the decay to the run, and warm it up.
# - An ablation is a measurement: change one thing per row, run every row with the same seeds, and call a
#   difference an effect only when 0 lies outside its paired 95 % bound (small effects need many seeds:
#   `n ≈ 8·σ_d²/d²`).
#   Choose on validation, report on a test split nothing was chosen on. The seed's single runs cannot separate
#   effects of a point or two; its ≈ 67 % with everything on came from long GPU runs on the real data.
# - BatchNorm statistics are buffers that DDP does not average: broadcast rank 0's (or use SyncBatchNorm) before
#   evaluating and checkpointing.
# - Next: Lab 04 trains a Vision Transformer on lung images with Lightning and MLflow.
