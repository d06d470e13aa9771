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
# DistributedDataParallel (DDP)**, the machinery Ray Train (and Lightning, and `torchrun`) drive underneath.
# With it we replay the ablation study of the source project (seed 002): a ResNet-50 on Tiny ImageNet
# with one training technique switched on after another.
#
# **You will learn to**
# - start DDP ranks yourself (`torch.multiprocessing` spawn, a process group over gloo or NCCL, a free port,
#   a timeout), shard the data with `DistributedSampler`, reduce metrics across ranks, checkpoint on rank 0 and resume;
# - read what each technique of a modern ImageNet recipe does: ResNet variants, MixUp/CutMix, label smoothing,
#   OneCycleLR + AdamW, progressive resizing, stochastic depth, BlurPool, EMA of the weights;
# - run an **ablation study** and read it honestly (one seed, a short run, a stand-in dataset);
# - understand why the source project's EMA with decay 0.9999 gave 0.5 % accuracy.
#
# **Run time**: quick mode (`quick=True`) ≈ 2–3 min on 2 CPU cores (7 ablations, 2 ranks); the full
# configuration (ResNet-50, 30 epochs × 7 ablations on Tiny ImageNet) is a multi-GPU job — hours on 2–4 GPUs.
# The same training runs from a terminal: `python -m labkit.imagenet --help`.

# %% [markdown]
# ## 0. Setup
# In Colab this cell installs labkit; anywhere else the course's `make course` / `make setup` already did.

# %%
import sys
if "google.colab" in sys.modules:  # Colab only: fetch the course and install labkit (elsewhere `make course` did it)
    # !git clone -q https://github.com/labkit-course/labkit /content/labkit 2>/dev/null || true
    # %pip install -q -e /content/labkit
    # %cd /content/labkit

import math

import matplotlib.pyplot as plt
import pandas as pd
import torch

from labkit import ddp, env, imagenet, params, plotting, recipe, results
from labkit.exercises import lab02 as exercises
from labkit.data.imagenet import load_imagenet
from labkit.models.resnet import BlurPool, resnet
from labkit.models.summary import count_parameters
from labkit.files import write_text
from torchvision.ops import StochasticDepth

# %% [markdown]
# ## 1. Parameters
# Every knob lives in the next cell (tagged `parameters`): run the lab headless with e.g.
# `papermill labs/03_imagenet_ddp_ablations.ipynb out.ipynb -p world_size 4 -p epochs 50`.
#
# `ablations` is the study itself: a list of named configs, each a dict of **switches** over the shared
# settings above it (`python -m labkit.imagenet --help` explains every switch). The list below follows the
# seed: three architectures, then the techniques added one by one. Add, remove or edit rows freely; a
# misspelt switch is refused with its name and the list of known switches.
#
# `quick=True` (or `LABKIT_QUICK=1`) keeps every ablation but shrinks the work: 2 epochs, 32 px, 1,000 / 300
# images, a ResNet-18 at a quarter of the width.

# %% tags=["parameters"]
world_size = 2                 # DDP processes (ranks): one model replica each, one GPU each on a GPU machine
epochs = 30                    # per ablation
model = "resnet50"             # resnet18 | resnet34 | resnet50
width = 1.0                    # channel multiplier (quick mode: 0.25)
image_size = 64                # final image size (Tiny ImageNet is 64 px)
progressive_sizes = None       # None: the seed's 64:128:224 ratios of image_size, e.g. [16, 40, 64]
batch_size = 128               # per rank, in the first progressive phase (halved in each later phase)
lr = 1e-3                      # OneCycleLR peak for one rank, scaled by lr_scaling (seed: 3e-4 at batch 256)
lr_scaling = "sqrt"            # none | linear | sqrt: how the lr grows with world_size
amp = "auto"                   # mixed precision on a GPU ("auto", "bf16", "fp16", False)
data = "auto"                  # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/tiny-imagenet"
layout = "auto"                # auto | tiny-imagenet | ilsvrc | plain
standin_classes = 10           # classes of the stand-in (the real Tiny ImageNet has 200)
lr_finder_steps = 100          # batches of the LR range test (0 skips it)
quick = False
device = "auto"
seed = 0
ablations = [
    {"name": "baseline", "variant": "basic", "mixup": 0, "cutmix": 0, "label_smoothing": 0, "progressive": False},
    {"name": "preact", "variant": "preact", "mixup": 0, "cutmix": 0, "label_smoothing": 0, "progressive": False},
    {"name": "conv head", "variant": "convhead", "mixup": 0, "cutmix": 0, "label_smoothing": 0, "progressive": False},
    {"name": "+mixup/cutmix", "variant": "convhead", "progressive": False},
    {"name": "+progressive", "variant": "convhead"},
    {"name": "+droppath/blur", "variant": "convhead", "drop_path_rate": 0.2, "use_blurpool": True},
    {"name": "+EMA", "variant": "convhead", "drop_path_rate": 0.2, "use_blurpool": True, "ema_decay": 0.999},
]

# %% [markdown]
# ## 2. Check the parameters
# `labkit.params.check` validates every parameter (`-p world_size 0` stops here, naming `world_size`) and
# applies quick mode; `imagenet.prepare` turns the `ablations` list into one validated config per row (an
# unknown switch stops here, naming it). The echo shows what will run.

# %% tags=["nbval-check-output"]
LAB = "03_imagenet_ddp_ablations"
cfg = params.check(LAB, rules=imagenet.LAB_RULES, show=False,
                   world_size=world_size, epochs=epochs, model=model, width=width, image_size=image_size,
                   progressive_sizes=progressive_sizes, batch_size=batch_size, lr=lr, lr_scaling=lr_scaling,
                   amp=amp, data=data, data_dir=data_dir, layout=layout, standin_classes=standin_classes,
                   lr_finder_steps=lr_finder_steps, quick=quick, device=device, seed=seed, ablations=ablations)
configs = imagenet.prepare(cfg)
cfg.show()
env.seed_everything(cfg.seed)
dev = env.pick_device(cfg.device)
out_dir = results.lab_dir(LAB)

# %%
print(f"device: {dev} ({env.environment(dev)['device_name']}), {torch.cuda.device_count()} GPU(s), "
      f"mixed precision: {env.amp_dtype(cfg.amp, dev)}")

# %% [markdown]
# ## 3. DDP in one cell
# `ddp.launch(fn, world_size)` is a short, readable launcher (open `labkit/ddp.py`). It
#
# 1. finds a **free port** by binding port 0 (the seed hard-coded `MASTER_PORT=12355` and hung when an old
#    run still held it);
# 2. **spawns** `world_size` fresh Python processes. Each joins the **process group** with
#    `dist.init_process_group(backend, rank, world_size, timeout=…)`: **gloo** on CPUs, **NCCL** with one GPU
#    per rank. The timeout turns a missing peer into an error instead of an endless wait;
# 3. runs `fn(rank, world_size, device, …)` in every rank. `fn` must live in an importable module: spawn
#    sends functions *by name*, and a function defined in this notebook cannot be found by the new processes;
# 4. returns rank 0's result — or, when any rank raises, stops every rank and raises a `DDPError` that
#    names the rank and carries its traceback. Nothing is left running, also after Ctrl-C.
#
# The toy `ddp.hello` all-reduces the rank numbers: every rank ends up with 0 + 1 + … + (world_size − 1).

# %% tags=["nbval-check-output"]
print(ddp.launch(ddp.hello, cfg.world_size, device=cfg.device))

# %% [markdown]
# Now let rank 1 fail on purpose while rank 0 waits for it inside `all_reduce`. The error reaches us with
# the rank's own traceback, and rank 0 is not left hanging:

# %%
try:
    ddp.launch(ddp.hello, 2, (1,), device="cpu", timeout_s=60)   # fail_rank=1
except ddp.DDPError as err:
    print(str(err).splitlines()[0])
    print("ranks still running:", ddp.running())

# %% [markdown]
# ## 4. The data
# Tiny ImageNet has 200 classes of 64×64 pictures (100,000 for training, 10,000 for validation). labkit finds
# it in its real layout under `data_dir` (`tiny-imagenet-200/`; also ILSVRC's `Data/CLS-LOC/` and plain
# `train/ val/` folders). When it is absent, labkit writes a **synthetic stand-in in the same layout** —
# coloured shapes and textures, learnable but not trivial — and says so loudly. Numbers on the stand-in are
# **not** Tiny ImageNet numbers.

# %%
data_set = load_imagenet(cfg.data, cfg.data_dir, layout=cfg.layout, image_size=cfg.image_size,
                         max_train=cfg.max_train, max_val=cfg.max_test, standin_classes=cfg.standin_classes,
                         seed=cfg.seed)
fig = plotting.plot_samples(data_set["train"].images[:16], data_set["train"].labels[:16], data_set.classes,
                            out_dir / "samples.png")
fig

# %% tags=["nbval-check-output"]
print(f"{data_set.name}: layout {data_set.layout}, synthetic stand-in: {data_set.synthetic}, "
      f"{len(data_set.classes)} classes, images {tuple(data_set['train'].images.shape[1:])}")
print(data_set.class_counts().to_string())

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
# (`drop_path_rate`, `torchvision.ops.StochasticDepth`: during training each residual branch is skipped
# for some samples, deeper blocks more often) and **BlurPool** (`use_blurpool`: a fixed low-pass filter
# before every stride-2 step, so small shifts of the input change the output less).

# %% tags=["nbval-check-output"]
rows = []
for c in configs:
    m = resnet(imagenet.MODELS[c.model], len(data_set.classes), c.variant, c.drop_path_rate, c.use_blurpool,
               c.width, small_input=c.image_size < 128)
    rows.append({"ablation": c.name, "model": c.model, "variant": c.variant, "parameters": count_parameters(m),
                 "drop-path blocks": sum(isinstance(x, StochasticDepth) for x in m.modules()),
                 "blur pools": sum(isinstance(x, BlurPool) for x in m.modules())})
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# ## 6. The recipe, piece by piece
# Each piece below is a small function in `labkit/recipe.py` that plugs into the one training loop of the
# course, `labkit.train.train_one_epoch` (as `transform`, `batch_transform`, `scheduler`, `ema`, …).
#
# **Augmentation.** Each image gets its own random-resized crop and horizontal flip, computed for the whole
# batch at once on the device (`torchvision.ops.roi_align`). **MixUp** blends two images and their labels
# (`λ ~ Beta(0.2, 0.2)`); **CutMix** pastes a box of one image into another and mixes the labels by the box
# area (`λ ~ Beta(1, 1)`). Each batch gets one of the two (`torchvision.transforms.v2.RandomChoice`); the
# targets become *soft labels* — two classes whose weights sum to 1 (one λ per batch; with α = 0.2 it is
# usually close to 0 or 1, so most MixUp images are only lightly mixed). **Label smoothing 0.1** then moves 10 %
# of every target's mass evenly over all classes. All three keep the network from becoming over-confident.

# %%
torch.manual_seed(cfg.seed)
x, y = next(iter(data_set.loader("train", 8, shuffle=True, seed=cfg.seed)))
x = recipe.RGBTransform(cfg.image_size, train=True)(x)       # per-image crop + flip, then normalise
mean, std = torch.tensor(recipe.IMAGENET_MEAN)[:, None, None], torch.tensor(recipe.IMAGENET_STD)[:, None, None]
fig, axes = plt.subplots(2, 8, figsize=(16, 4.8), layout="constrained")
for row, (name, mix) in zip(axes, [("MixUp α=0.2", recipe.mixup_cutmix(len(data_set.classes), 0.2, 0)),
                                   ("CutMix α=1", recipe.mixup_cutmix(len(data_set.classes), 0, 1.0))]):
    xm, ym = mix(x, y)
    for ax, img, soft in zip(row, xm, ym):
        w, k = soft.topk(2)
        ax.imshow((img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(f"{w[0]:.2f}·class {k[0]} + {w[1]:.2f}·class {k[1]}", fontsize=8)
        ax.axis("off")
    row[0].text(-0.15, 0.5, name, transform=row[0].transAxes, rotation=90, va="center", ha="right")
plotting.save_figure(fig, out_dir / "mixup_cutmix.png")
plt.close(fig)
fig

# %% [markdown]
# **Progressive resizing.** The seed trained ImageNet at 64 px for epochs 1–30 (batch 256), 128 px for 31–50
# (batch 128) and 224 px for 51–90 (batch 64): small images early are cheap, and the network sees the full
# size at the end. `labkit.recipe.progressive_schedule` scales that plan to any run length (the last epoch is
# always at full size) and `progressive_sizes` scales 64 : 128 : 224 to our `image_size`.
# **OneCycleLR** (AdamW, weight decay 1e-4) warms the learning rate up for 30 % of the *steps* and anneals it
# with a cosine; since the batch size changes per phase, the total step count is summed over the plan.
# Every step also **clips the gradient norm to 1.0** (one bad batch cannot throw the weights far), and on a
# GPU runs in **mixed precision** (bf16 where supported, else fp16 with a `GradScaler`) with `channels_last`
# memory layout — both switched on by `labkit.train.train_one_epoch`, off on a CPU where they do not help.

# %% tags=["nbval-check-output"]
prog = next((c for c in configs if c.progressive), configs[0])
plan = imagenet.schedule(prog)
print(f"{prog.name}: {prog.epochs} epochs")
print(pd.DataFrame(plan, columns=["image_size", "batch_per_rank"], index=pd.RangeIndex(1, len(plan) + 1, name="epoch")).to_string())
print("seed's plan on 90 epochs:", sorted(set(recipe.progressive_schedule(90)), reverse=False))

# %% [markdown]
# **The LR scaling rule.** With `world_size` ranks each taking a batch of `B`, one optimizer step sees
# `world_size × B` images, so the learning rate may grow: ×`world_size` (*linear*, Goyal et al. 2017) or
# ×√`world_size` (*sqrt*, gentler; the seed's advice for AdamW). `labkit.train.scale_lr` applies the rule.

# %% tags=["nbval-check-output"]
for rule in ("none", "sqrt", "linear"):
    print(f"{rule:>6}: lr {cfg.lr:g} on 1 rank -> {imagenet.peak_lr(imagenet.make_config(lr=cfg.lr, lr_scaling=rule), cfg.world_size):.3g} "
          f"on {cfg.world_size} ranks (global batch {cfg.world_size} x {cfg.batch_size})")

# %% [markdown]
# **EMA of the weights — and why the seed's EMA failed.** An exponential moving average keeps a second copy
# of the weights, `ema ← d · ema + (1 − d) · weights`, after every step, and validates with it: the noise of
# the last steps averages out. It averages over roughly `1 / (1 − d)` steps. With the seed's `d = 0.9999`
# that is **10,000 steps** — more than a short run has. After `N` steps the randomly initialised weights
# still make up `d^N` of the average: a short run's EMA is mostly the *untrained* network, which guesses —
# **0.5 % is exactly chance on 200 classes**, the number the seed saw. Two fixes: a decay that fits the run
# (`0.999` ≈ 1,000 steps), and a **warm-up** (timm/TensorFlow): use `min(d, (1 + n) / (10 + n))` at update
# `n`, so the EMA follows the model closely at first. `labkit.recipe.make_ema` wraps
# `torch.optim.swa_utils.AveragedModel` (BatchNorm statistics averaged too) with that warm-up.

# %% tags=["nbval-check-output"]
per_rank = math.ceil(len(data_set["train"]) / cfg.world_size)
steps = sum(per_rank // bs for _, bs in imagenet.schedule(configs[-1]))
seed_steps = 100_000 // 256 * 5   # the seed: 5 epochs of Tiny ImageNet at batch 256
rows = []
for d in (0.9999, 0.999, 0.99):
    for n in (steps, seed_steps):
        warm = math.prod(recipe.ema_decay_at(i, d) for i in range(1, n + 1))
        rows.append({"decay": d, "horizon (steps)": round(1 / (1 - d)), "steps": n,
                     "init weight, no warm-up": f"{d ** n:.3f}", "init weight, warm-up": f"{warm:.1e}"})
print(pd.DataFrame(rows).to_string(index=False))

# %% [markdown]
# **LR range test.** Before training, the seed looked for a learning rate with an *LR finder*: raise the
# learning rate exponentially, one batch at a time, and watch the loss. It falls while the rate is useful and
# explodes when it is too large; a common pick is a tenth of the rate at the lowest loss. The test runs in this
# process on one model and restores the weights and the optimizer afterwards.

# %%
if cfg.quick and dev.type == "cpu":
    # a quarter-width ResNet-18 at 32 px gains nothing from a second thread, and two threads stall
    # badly when other processes compete for the cores (each parallel region waits for both)
    torch.set_num_threads(1)
if cfg.lr_finder_steps:
    c = configs[-1]
    net = resnet(imagenet.MODELS[c.model], len(data_set.classes), c.variant, width=c.width,
                 small_input=c.image_size < 128).to(dev)
    finder = recipe.lr_finder(net, data_set.loader("train", min(c.batch_size, 64)), recipe.loss_fn(c.label_smoothing),
                              device=dev, transform=recipe.RGBTransform(c.image_size, train=True),
                              start_lr=1e-6, end_lr=1.0, steps=cfg.lr_finder_steps)
    suggested = recipe.suggest_lr(finder)
    print(f"suggested peak lr: {suggested:.1e} (this run uses {cfg.lr:g} per rank)")
    fig = recipe.plot_lr_finder(finder, out_dir / "lr_finder.png", suggested)
else:
    finder, suggested, fig = None, None, None
fig

# %% [markdown]
# ## 7. Run the ablations
# All ablations run in **one** process group: spawning ranks and importing PyTorch costs seconds per rank,
# so `imagenet.run_ablations` pays it once and trains the configs one after another. In every rank:
# `DistributedSampler` (with `set_epoch`, so each epoch is shuffled differently but identically on all ranks)
# gives the rank its shard; DDP all-reduces the gradients during `backward()`; metrics are summed over
# ranks with `all_reduce`; rank 0 writes a checkpoint every epoch (`results/03_ablations/checkpoints/<name>/last.pt`)
# and reports the epoch to this notebook. Validation uses the EMA weights when EMA is on. The *gap* is the
# clean (un-augmented) top-1 on training images minus the validation top-1 — the overfitting the seed
# watched shrink with stochastic depth.

# %%
runs = imagenet.run_ablations(configs, data_set, world_size=cfg.world_size, device=cfg.device,
                              save_dir=out_dir / "checkpoints")

# %% [markdown]
# ## 8. Results
# One row per ablation: validation top-1 and top-5, the train–val gap, the wall-clock seconds (training +
# validation, all epochs) and the training throughput (images per second over all ranks).

# %%
table = imagenet.ablation_table(runs)
write_text(out_dir / "ablations.csv", table.to_csv(index=False))
print(table.round(3).to_string(index=False))
fig = plotting.plot_comparison(table, out_dir / "ablations.png", ["top1", "top5", "gap", "images_per_s"],
                               label_col="ablation", title="Lab 03 ablations")
fig

# %%
fig = imagenet.plot_curves(runs, out_dir / "learning_curves.png")
fig

# %% [markdown]
# ## 9. Against the source project
# What seed 002 reported on the **real** Tiny ImageNet (200 classes, ResNet-50, many epochs on a GPU) beside
# this run. Read the right column with care: a stand-in (if the notice above said so), a few epochs, one seed
# — differences of a few points are noise here. **Stand-in numbers are not Tiny ImageNet numbers**; the point
# of the quick run is the mechanics, the full run on the real data is where the seed's claims can be checked.

# %%
by_name = {r["name"]: r["final"] for r in runs}
get = lambda name, key: by_name[name][key] if name in by_name else float("nan")
seed_vs_this = pd.DataFrame([
    {"claim": "all techniques: top-1", "seed 002": "≈ 0.67", "this run": f"{get('+EMA', 'top1'):.3f}"},
    {"claim": "progressive + MixUp/CutMix: top-1 gain", "seed 002": "≈ +0.10",
     "this run": f"{get('+progressive', 'top1') - get('conv head', 'top1'):+.3f}"},
    {"claim": "stochastic depth: train-val gap", "seed 002": "much smaller",
     "this run": f"{get('+progressive', 'gap'):+.3f} -> {get('+droppath/blur', 'gap'):+.3f}"},
    {"claim": "EMA 0.9999 on a short run: top-1", "seed 002": "0.005 (chance)",
     "this run": f"EMA 0.999 + warm-up: {get('+EMA', 'top1'):.3f}"},
])
print(f"data: {data_set.name}, synthetic stand-in: {data_set.synthetic}, {len(data_set.classes)} classes, "
      f"{cfg.epochs} epochs")
print(seed_vs_this.to_string(index=False))
if data_set.synthetic:
    print("These are stand-in numbers: they are NOT Tiny ImageNet results and can neither confirm nor refute the seed's.")
earlier = results.load()
if not earlier.empty and "images_per_s" in earlier:
    print("\nthroughput of earlier labs' runs (images/s):")
    print(earlier.groupby("lab")["images_per_s"].last().round(0).to_string())


# %% [markdown]
# ## 10. Exercises
# **1. Which images does a rank read?** `DistributedSampler(dataset, num_replicas, rank, shuffle=False)`
# pads the index list so that every rank gets the same number of samples (DDP needs equal step counts:
# a rank with one batch more would wait forever in `all_reduce`), then hands rank `r` every
# `world_size`-th index starting at `r`. Write the indices rank `rank` reads.

# %%
def my_shard(dataset_len, world_size, rank):
    # BEGIN SOLUTION
    per_rank = math.ceil(dataset_len / world_size)
    padded = list(range(dataset_len))
    padded += padded[: per_rank * world_size - dataset_len]   # repeat the first indices
    return padded[rank::world_size]
    # END SOLUTION


# %% tags=["nbval-check-output"]
exercises.check_sampler_shard(my_shard(10, 4, 3), 10, 4, 3)


# %% [markdown]
# **2. The LR scaling rule.** Write `my_scale_lr(lr, world_size, rule)` for the rules `"none"`, `"linear"`
# and `"sqrt"` (section 6). Then try: which rule keeps the seed's 4-GPU advice (3e-4 → 6e-4)?

# %%
def my_scale_lr(lr, world_size, rule):
    # BEGIN SOLUTION
    return {"none": lr, "linear": lr * world_size, "sqrt": lr * math.sqrt(world_size)}[rule]
    # END SOLUTION


# %% tags=["nbval-check-output"]
exercises.check_lr_scaling(my_scale_lr)

# %% [markdown]
# **3. (open)** Resume a run: `python -m labkit.imagenet --quick --stop-after 1 --name try` stops after one
# epoch; `python -m labkit.imagenet --resume results/03_ablations/checkpoints/try/last.pt` continues at epoch 2
# with the same settings, data, optimizer, scheduler and EMA state. Compare the final checkpoint with an
# uninterrupted run (`--quick --name straight`): why are the weights the same, not just similar?
# (Hint: where does `labkit.imagenet` seed the random generators, and what does `set_epoch` do?)

# %% [markdown]
# ## 11. Save the run record
# One JSON record for the whole study: the parameters, the environment, the data, one row per epoch and
# ablation, and the headline numbers of the best ablation.

# %%
best = max(runs, key=lambda r: r["final"]["top1"])
record = results.RunRecord(
    lab=LAB, params={k: v for k, v in cfg.items()}, env=env.environment(dev, cfg.world_size),
    data=data_set.describe(), epochs=[{"ablation": r["name"], **h} for r in runs for h in r["history"]],
    final={"best_ablation": best["name"], "top1": best["final"]["top1"], "top5": best["final"]["top5"],
           "gap": best["final"]["gap"], "ablations": len(runs),
           "seconds": sum(r["final"]["seconds"] for r in runs),
           "images_per_s": sum(r["final"]["images_per_s"] for r in runs) / len(runs),
           "suggested_lr": suggested})
for name in ("samples.png", "mixup_cutmix.png", "ablations.png", "learning_curves.png", "ablations.csv",
             "lr_finder.png"):
    if (out_dir / name).exists():
        record.add_artifact(out_dir / name)
print("saved", results.save(record))

# %% [markdown]
# ## Take-aways
# - DDP is a few explicit steps: spawn ranks, join a process group (free port, timeout), shard the data
#   with `DistributedSampler.set_epoch`, wrap the model, all-reduce what you report, checkpoint on rank 0.
#   A launcher must also *fail well*: the failing rank's traceback reaches you and no process is left behind.
# - Run many short experiments in one process group: start-up costs seconds per rank.
# - An ablation on a few epochs and one seed measures the mechanics, not the technique; the seed's numbers
#   (≈ 67 % with everything on) came from long GPU runs on the real data.
# - An EMA averages over `1 / (1 − decay)` steps: match the decay to the run, and warm it up.
# - Next: Lab 04 trains a Vision Transformer on lung images with Lightning and MLflow.
