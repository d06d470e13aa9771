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
# # Lab 04 — A Vision Transformer for 9 lung classes: Lightning on Ray Train, tracked with MLflow
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/labs/04_lung_vit.ipynb)
#
# Nine classes from two kinds of pictures: five from chest X-rays (COVID-19, normal, opacity, viral pneumonia,
# tuberculosis) and four from OCT scans (CNV, DME, drusen, normal). A CNN looks at small neighbourhoods; a
# **Vision Transformer** lets every part of the image attend to every other part. Lab 02 put a plain loop under
# Ray Train; this lab trains a **PyTorch Lightning** module the same way (`ray.train.lightning`), keeps the
# **3 best checkpoints**, tests the best one and records everything in **MLflow** — the recipe of the source
# project, offline and in one notebook.
#
# **You will learn to**
# - build a ViT with a **convolutional stem** and explain, with numbers, why it shrinks the token sequence 16× and
#   the attention matrix 256×, and why **pre-LayerNorm** blocks train stably;
# - run a Lightning `Trainer` inside Ray Train (`RayDDPStrategy`, `RayLightningEnvironment`,
#   `RayTrainReportCallback`, `prepare_trainer`), writing the LightningModule's steps and the worker function
#   yourself, and choose the precision (`bf16-mixed` where the hardware runs bf16 natively, GPU or CPU);
# - keep the top-3 checkpoints by `val_loss` (and know why a fourth can stay on disk), validate every image exactly
#   once across workers, and score the test set with the best checkpoint against the majority-class rate;
# - track parameters, per-epoch and per-class metrics and the checkpoint in MLflow, and open them in the MLflow UI;
# - send the same training to a running Ray cluster with `ray job submit`.
#
# **Run time**: quick mode (`quick=True`: 8 epochs of a smaller ViT, 32 px, 540 training images) ≈ 2–3 min on 2 CPU cores (about a
# minute of it is Ray starting up, and the first run writes the stand-in data: ≈ 1 min); the full configuration
# (12 epochs, 128 px, 2 workers) takes hours on a CPU and ≈ 10 min with one GPU per worker.

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
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from labkit import distributed, env, metrics, plotting, results, train
from labkit.distributed import recovery
from labkit.labs.lung_vit import runner, tracking
from labkit.data.augment import batch_transform
from labkit.labs.lung_vit.lightning_module import ClassifierBase, cosine_warmup, decay_groups, no_decay_names
from labkit.models import vit
from labkit.models.cnn import AlzheimerCNN
from labkit.models.summary import count_parameters
from tqdm.auto import tqdm

# %% [markdown]
# ## 1. Parameters
# Every knob lives in the next cell (tagged `parameters`); run the lab headless with e.g.
# `papermill labs/04_lung_vit.ipynb out.ipynb -p quick True`. The defaults are the source project's run:
# 2 workers, 12 epochs, `bf16-mixed` where the hardware has it, a ViT of about 5 M parameters.
#
# - `depth`, `heads`, `dim`, `mlp_dim`: transformer blocks, attention heads per block, token width, MLP width
#   (`dim` must be divisible by `heads`: each head gets `dim / heads` features).
# - `image_size` must be divisible by 4 (the conv stem halves the resolution twice).
# - `precision`: `"auto"` = `"bf16-mixed"` where bf16 runs natively (recent GPUs, and CPUs with AVX512-BF16/AMX),
#   `"16-mixed"` on older GPUs, else `"32"`; or force `"32"`, `"bf16-mixed"`, `"16-mixed"` (GPU only).
# - `track`: log the run to MLflow (a local store in `results/04_lung_vit/`, or the server in `$MLFLOW_TRACKING_URI`).
# - `data_dir`: the dataset root (`train/ val/ test/`); the environment variable `DATA_PATH` is used when
#   `data_dir=None`. When the data is missing, a synthetic stand-in is written there.
# - `address`: a running Ray cluster; `None` starts a local one. (Lab 01's CNN, for the comparison, trains with the
#   ViT's `epochs`, batch, `lr`, `weight_decay` and schedule.)
# - `fail_at_epoch`: kill one worker once, halfway through that epoch, to watch Ray Train restart the workers and
#   Lightning resume from the latest checkpoint (as in Lab 02).

# %% tags=["parameters"]
workers = 2
epochs = 12
batch_size = 32               # per worker
lr = 5e-4
weight_decay = 0.05
image_size = 128
depth = 6
heads = 8
dim = 256
mlp_dim = 1024
dropout = 0.1
precision = "auto"            # "auto", "32", "bf16-mixed", "16-mixed"
track = True                  # MLflow
data = "auto"                 # "auto": the real data when present, else a synthetic stand-in
data_dir = None                # None: $DATA_PATH if set, else data/lung
device = "auto"
seed = 0
quick = False
address = None                # None: a local Ray cluster; or "ray://host:10001" / "host:6379"
fail_at_epoch = None          # e.g. 2: one worker crashes once at epoch 2; Ray restarts it from the last checkpoint

# %% [markdown]
# ## 2. Check the parameters
# `runner.check_params` is `labkit.params.check` with this lab's rules (`runner.RULES` for `depth`, `heads`,
# `dim`, `mlp_dim`, …, passed through its `rules=` argument) plus the one check that involves two parameters:
# `dim` divisible by `heads`. A bad value fails here, naming the parameter. `distributed.check_cluster` then checks
# that `workers` fit this machine (or that a cluster answers at `address`) and returns Ray's plan.

# %% tags=["nbval-check-output"]
cfg = runner.check_params(
    workers=workers, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, image_size=image_size,
    depth=depth, heads=heads, dim=dim, mlp_dim=mlp_dim, dropout=dropout, precision=precision, track=track, data=data,
    data_dir=data_dir, device=device, seed=seed, quick=quick, address=address,
    fail_at_epoch=fail_at_epoch)
plan = distributed.check_cluster(cfg)                   # None when joining the cluster at `address`
env.seed_everything(cfg.seed)
out_dir = results.lab_dir("04_lung_vit")

# %% [markdown]
# Ray's plan for this machine: how many workers, CPU (gloo) or one GPU each (NCCL), and the precision each
# worker will use. An impossible request (more workers than cores) already failed at the check, before Ray starts.
# With `bf16-mixed`, Lightning runs the forward pass under `torch.autocast` in bf16 (the stem's convolutions — stored
# `channels_last` — and the transformer's matrix products); weights, optimizer state, the loss and every metric stay
# in fp32. On this course's 2-core CPU (AVX512-BF16) that is about twice as fast as fp32.

# %%
if plan is not None:
    precision = runner.resolve_precision(cfg.precision, plan.use_gpu)
    print("plan:", plan.describe(), "| precision:", precision,
          "| channels_last:", runner.use_channels_last(precision, plan.use_gpu))
    if plan.notice:
        print(plan.notice)
else:
    print(f"Ray cluster at {distributed.resolve_address(cfg.address)}: the plan is made once connected.")

# %% [markdown]
# ## 3. The data
# The lung set's layout is `train/ val/ test/`, each with the nine class folders. Its files come in mixed sizes,
# modes (grayscale and RGB) and formats (PNG and JPEG); the loader decodes each file **once** (cached as a uint8
# tensor), converts it to grayscale and resizes it to `image_size`. Without the real data a synthetic stand-in
# is written in the same layout — generated pictures, **not medical images**.

# %%
ds = runner.load_data(cfg, progress=True)

# %% tags=["nbval-check-output"]
print(f"layout: {ds.layout}   synthetic stand-in: {ds.synthetic}   image tensor: {tuple(ds['train'].images.shape[1:])}")
print(ds.class_counts().to_string())

# %%
test_split = ds["test"]
first = [int(np.flatnonzero(test_split.labels.numpy() == k)[0]) for k in range(len(ds.classes))]
plotting.plot_samples(test_split.images[first], test_split.labels[first], ds.classes, out_dir / "samples.png",
                      n=len(first), title="one test image per class");

# %% [markdown]
# ## 4. The model: a ViT with a convolutional stem
# ```
# image [B,3,S,S] ─► conv stem: 3 × (3×3 conv–BN–ReLU), then two stride-2 3×3 convs ─► [B,64,S/4,S/4]
#                 ─► flatten the (S/4)² grid into tokens, Linear(64 → dim) ─► prepend [CLS], add position embedding
#                 ─► depth × pre-LN block:  x = x + Attn(LN(x));  x = x + MLP(LN(x))
#                 ─► LN ─► Linear(dim → 9) on the [CLS] token ─► logits
# ```
# **Why a stem.** Self-attention compares every token with every other: its cost grows with the *square* of the
# sequence length. One token per pixel would be hopeless; the stem's 3×3 convolutions first summarise small
# neighbourhoods (edges, textures, small lesions), and the two stride-2 convolutions shrink each side 4×. The
# numbers for this run's image size:

# %% tags=["nbval-check-output"]
s = vit.sequence_stats(cfg.image_size)
print(f"image {cfg.image_size}x{cfg.image_size}: {s['pixels']:,} pixels -> {s['tokens']:,} tokens after the stem "
      f"(+1 [CLS]): sequence {s['sequence_ratio']}x shorter")
print(f"attention matrix per head and block: {s['attention_pixels']:,} entries with one token per pixel, "
      f"{s['attention_tokens']:,} after the stem: {s['attention_ratio']}x smaller")

# %% [markdown]
# **Why pre-LayerNorm.** The original Transformer normalised *after* adding each sub-layer's output
# (`x = LN(x + Attn(x))`). A pre-LN block normalises the sub-layer's *input* and leaves the residual path alone,
# `x = x + Attn(LN(x))`: the identity path from the first block to the head carries gradients unchanged, so deep
# stacks train without careful warm-up. Attention itself runs through `F.scaled_dot_product_attention`, PyTorch's
# fused kernel (Flash attention on recent GPUs). The parameter count, and where the parameters sit:

# %% tags=["nbval-check-output"]
model = runner.build_model(cfg, num_classes=len(ds.classes))
n_params = count_parameters(model)
parts = {"conv stem": model.stem, "token projection": model.to_tokens, "transformer blocks": model.blocks,
         "head (LN + Linear)": torch.nn.ModuleList([model.norm, model.head])}
print(f"ViT(depth={cfg.depth}, heads={cfg.heads}, dim={cfg.dim}, mlp_dim={cfg.mlp_dim}) at {cfg.image_size} px: "
      f"{n_params:,} parameters ({n_params / 1e6:.2f} M, {4 * n_params / 2**20:.0f} MiB in fp32)")
for name, part in parts.items():
    print(f"  {name:<20} {count_parameters(part):>10,}")
print(f"  {'[CLS] + positions':<20} {model.cls_token.numel() + model.pos_embed.numel():>10,}")
x = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
print("stem output:", tuple(model.stem(x).shape), " tokens:", tuple(model.tokens(x)[0].shape),
      " logits:", tuple(model.eval()(x).shape))

# %% [markdown]
# ### Exercises on the model
# **Exercise 1 — tokens and attention cost.** A stem that shrinks each side `downsample`× turns an
# `image_size × image_size` image into how many tokens ([CLS] not counted)? And how many times smaller is the
# attention matrix than with one token per pixel? Return both.

# %%
def my_token_count(image_size, downsample):
    # BEGIN SOLUTION
    tokens = (image_size // downsample) ** 2
    return tokens, (image_size * image_size) ** 2 // tokens ** 2
    # END SOLUTION


# %% labkit={"points": 1, "question": "token_count"} tags=["nbval-check-output"]
from labkit.exercises import lab04, reported
with reported("token_count"):                       # ✔ or ✘ with a hint; Run All goes on either way
    lab04.check_token_count(my_token_count)

# %% labkit={"hidden": "token_count"} tags=["hidden-check"]
def _hidden_token_count():
    import torch
    import torch.nn.functional as F
    for size, down in ((30, 4), (50, 3), (40, 1), (7, 7)):     # sides that do not divide: the stem drops the rest
        tokens = F.max_pool2d(torch.zeros(1, 1, size, size), down).numel()
        got_tokens, got_ratio = (int(v) for v in my_token_count(size, down))
        assert got_tokens == tokens, (size, down, got_tokens, tokens)
        assert abs(got_ratio - (size * size) ** 2 / tokens ** 2) < 1, (size, down, got_ratio)


_hidden_token_count()


# %% [markdown]
# **Exercise 2 — a pre-LN block.** Write the forward pass of a pre-LayerNorm transformer block from its parts
# `block.norm1`, `block.attn`, `block.norm2`, `block.mlp` (see the diagram above). The check hands you the parts of a
# block (calling `block(x)` itself is not allowed), recomputes the block from its weights with `torch.nn.functional`,
# and tells a post-LN version apart.

# %%
def my_prenorm_block(x, block):
    # BEGIN SOLUTION
    x = x + block.attn(block.norm1(x))
    x = x + block.mlp(block.norm2(x))
    return x
    # END SOLUTION


# %% labkit={"points": 2, "question": "prenorm_block"} tags=["nbval-check-output"]
from labkit.exercises import lab04, reported
with reported("prenorm_block"):
    lab04.check_prenorm_block(my_prenorm_block)

# %% labkit={"hidden": "prenorm_block"} tags=["hidden-check"]
def _hidden_prenorm_block():
    import torch
    import torch.nn.functional as F
    from labkit.models.vit import Block
    torch.manual_seed(5)
    block = Block(dim=12, heads=3, mlp_dim=20).eval()
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, 7, 12) * 2 - 1).requires_grad_()      # the block trains: gradients must reach its input
    kept = x.detach().clone()
    out = my_prenorm_block(x, block)
    assert torch.equal(x.detach(), kept), "the input was changed in place"
    ln = lambda norm, t: F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # noqa: E731
    mid = kept + block.attn(ln(block.norm1, kept))
    want = mid + block.mlp(ln(block.norm2, mid))
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-4)
    assert out.requires_grad, "no gradient flows through the block (torch.no_grad() or .detach() inside?)"
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


_hidden_prenorm_block()

# %% [markdown]
# ## 5. The LightningModule: the steps, written here
# Lightning splits training into methods it calls for you: `training_step` returns the loss (Lightning does
# `backward`, the DDP gradient all-reduce and the optimizer step), `validation_step` scores a batch, and
# `configure_optimizers` says how to update. Everything else lives in `labkit.labs.lung_vit.lightning_module.ClassifierBase`:
# the model, the batch transform (uint8 → augmented, normalised floats **on the device**, `channels_last` when the
# precision wants it), the `torchmetrics` objects, the per-class logging and the test step that scores a checkpoint.
#
# Three details carry the lesson:
# - **Metrics in fp32.** Under `bf16-mixed` the logits come out of autocast in bf16; `.float()` before the loss and
#   the metrics keeps the numbers we compare honest.
# - **Every validation image counts once.** `val_loss` is a `torchmetrics.MeanMetric`: each worker adds up its
#   per-image losses and counts, and the sums of all workers are combined before dividing. (Logging a per-batch
#   mean with `sync_dist=True` would average the workers' means instead, and the default `DistributedSampler`
#   pads the validation set so a few images count twice — see the worker function below.) This `val_loss` decides
#   which checkpoints Ray keeps.
# - **Weight decay by kind.** AdamW shrinks weights towards zero; that regularises the weights of linear and conv
#   layers, but not biases, the scales and shifts of normalisation layers, or the position embedding and [CLS]
#   token (learned *values*, not feature detectors). `decay_groups` picks them **by what they are** — a bias,
#   a parameter of a `LayerNorm`/`BatchNorm`, or one the model lists in `no_weight_decay()` — never by a piece of
#   the name (`"token" in name` would also exempt `to_tokens.weight`, the token projection).

# %%
class LitViT(ClassifierBase):
    """The lab's LightningModule: ClassifierBase (labkit) holds model, transforms, metrics and the test step."""

    def training_step(self, batch, batch_idx):
        x, y = batch                                               # uint8 images [B, 1, S, S], labels [B]
        logits = self(self.prepare(x, train=True))                 # augment + normalise on the device
        loss = F.cross_entropy(logits.float(), y)                  # loss in fp32, also under bf16 autocast
        self.train_acc.update(logits.detach().float(), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)   # mean over the workers
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)
        return loss                                                # Lightning: backward, all-reduce, step

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(self.prepare(x, train=False)).float()
        self.val_loss.update(F.cross_entropy(logits, y, reduction="none"))   # per-image losses: sum and count
        self.val_metrics.update(logits, y)                         # per-class counts, summed over workers
        self.log("val_loss", self.val_loss, on_step=False, on_epoch=True)    # what Ray ranks checkpoints by

    def configure_optimizers(self):
        groups = decay_groups(self.model, self.weight_decay)       # decay / no decay, chosen by parameter kind
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        schedule = cosine_warmup(optimizer, self.trainer.max_epochs, self.warmup_epochs)   # per epoch
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


# %% [markdown]
# Which parameters go without weight decay? Everything that is a bias or belongs to a normalisation layer, plus the
# two the ViT declares; the token projection `to_tokens.weight` is an ordinary weight and decays.

# %% tags=["nbval-check-output"]
skip = no_decay_names(model)
n_decay = sum(p.numel() for n, p in model.named_parameters() if n not in skip)
print(f"decayed: {len(list(model.parameters())) - len(skip)} tensors ({n_decay:,} values); "
      f"not decayed: {len(skip)} tensors ({n_params - n_decay:,} values)")
print("not decayed, other than biases and norms:", [n for n in skip if not n.endswith(".bias") and "norm" not in n
                                                    and not n.startswith("stem.")])
print("to_tokens.weight decays:", "to_tokens.weight" not in skip)

# %% [markdown]
# ## 6. The Ray Train function: Lightning inside every worker
# Ray runs `train_func` in each worker process; Ray ships it — and the `LitViT` class above — to the workers by
# pickling them (`cloudpickle` handles functions and classes defined in a notebook). Four Ray pieces turn a
# Lightning `Trainer` into a distributed one:
# - `RayDDPStrategy()`: PyTorch DDP on the process group Ray set up (gloo on CPUs, NCCL on GPUs);
# - `RayLightningEnvironment()`: Lightning reads rank and world size from Ray instead of environment variables;
# - `RayTrainReportCallback()`: after every epoch, saves a Lightning checkpoint and reports it to Ray with the
#   logged metrics (`val_loss` among them);
# - `prepare_trainer(trainer)`: checks the pieces fit together.
#
# The worker also shards the data itself (`use_distributed_sampler=False`): a shuffling `DistributedSampler` for
# training — the same number of batches on every worker, which DDP's all-reduce needs — and `EvalShardSampler` for
# validation, which hands out every image exactly once (`DistributedSampler` would pad the last round by repeating
# images). Everything else is labkit's instrumentation, behind one name made once at the top: `runner.WorkerHook`
# sets quiet logs, this worker's CPU threads and the common seed, then rides along as the `Trainer`'s first callback
# (the per-epoch history and progress line, the `fail_at_epoch` crash demo, MLflow logging on rank 0);
# `labkit_hook.result(trainer)` is what rank 0 sends back to the driver.
#
# **Fault tolerance.** When a worker dies, Ray Train (with `FailureConfig(max_failures=1)`, next section) starts
# the worker group again and calls `train_func` anew. `ray.train.get_checkpoint()` then returns the latest
# reported checkpoint (`None` on the first start); handing its `checkpoint.ckpt` to `trainer.fit(ckpt_path=...)`
# makes Lightning restore the weights, the optimizer and LR schedule, the epoch counter and the callbacks' state
# (the epoch history travels inside every checkpoint), so training continues after the last finished epoch.

# %%
def train_func(config):
    """What every Ray Train worker runs; returns the epoch history on rank 0 (Result.return_value)."""
    import lightning.pytorch as pl
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
    from torch.utils.data import DistributedSampler

    from labkit.labs.lung_vit import lightning_module, runner

    labkit_hook = runner.WorkerHook(config)              # labkit: logs, threads, seed; history, crash demo, MLflow
    ctx = ray.train.get_context()                         # RAY: which worker am I, of how many?
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = runner.load_data(config)                       # the decoded cache the driver wrote
    module = LitViT(runner.build_model(config, len(data.classes)), data.classes, **runner.module_kwargs(config))
    trainer = pl.Trainer(
        max_epochs=config["epochs"], accelerator="gpu" if config["use_gpu"] else "cpu", devices="auto",
        strategy=RayDDPStrategy(),                        # DDP on Ray's process group
        plugins=[RayLightningEnvironment()],              # rank and world size from Ray
        callbacks=[labkit_hook, RayTrainReportCallback()],   # last: checkpoint + metrics to Ray every epoch
        precision=config["precision"],                    # "bf16-mixed", "16-mixed" or "32-true"
        use_distributed_sampler=False,                    # we shard the data ourselves, below
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tempfile.mkdtemp(prefix="labkit-lightning-"))
    trainer = prepare_trainer(trainer)
    train_sampler = DistributedSampler(range(len(data["train"])), world, rank, shuffle=True, seed=config["seed"])
    val_sampler = lightning_module.EvalShardSampler(range(len(data["val"])), world, rank)   # each image once
    checkpoint = ray.train.get_checkpoint()               # RAY: None at first; after a restart, the latest one
    with lightning_module.checkpoint_file(checkpoint) as ckpt_path:   # its checkpoint.ckpt (None: a fresh start)
        trainer.fit(module, data.loader("train", config["batch_size"], sampler=train_sampler),
                    data.loader("val", config["batch_size"], sampler=val_sampler),
                    ckpt_path=ckpt_path)                  # resume: weights, optimizer, schedule, epoch, history
    return labkit_hook.result(trainer)                    # rank 0: the epoch history


# %% [markdown]
# ## 7. Train: the driver
# This notebook is Ray's *driver*. It starts Ray, builds the `TorchTrainer` and waits for `fit()`. The line to
# notice is `CheckpointConfig(num_to_keep=3, checkpoint_score_attribute="val_loss", checkpoint_score_order="min")`:
# Ray ranks the reported checkpoints by `val_loss` and deletes the others as training goes.
# `FailureConfig(max_failures=1)` lets Ray restart the workers once after a crash (try `fail_at_epoch=2`: the dead
# worker's error is printed — expected — and training continues from the checkpoint of epoch 1). The MLflow run is
# created here; rank 0 logs each epoch into it, and it is marked FAILED if training fails.
#
# **Predict, then run.** The run trains `epochs` epochs and reports one checkpoint per epoch. Before you run the
# next cell, write down: how many `checkpoint_*` folders will be left on disk when `fit()` returns — always
# exactly 3? And will the best checkpoint be the one of the last epoch?

# %%
run_name = distributed.default_run_name()
run_dir = runner.run_dir_for(run_name)                   # results/04_lung_vit/ray/<run_name>
uri, mlflow_run_id = runner.start_tracking(cfg, ds, run_name)
try:
    with distributed.ray_cluster(cfg.address) as cluster:
        if plan is None:                                  # a remote cluster: plan with its resources
            plan = distributed.plan_scaling(cfg.workers, cfg.device, **distributed.cluster_resources())
        trainer = TorchTrainer(
            train_func,
            train_loop_config=runner.worker_config(cfg, plan, uri, mlflow_run_id, run_dir),
            scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                         resources_per_worker=plan.resources()),
            torch_config=TorchConfig(backend=plan.backend, timeout_s=300),
            run_config=RunConfig(
                name=run_name, storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=1),   # restart the workers once after a crash
                checkpoint_config=CheckpointConfig(num_to_keep=3, checkpoint_score_attribute="val_loss",
                                                   checkpoint_score_order="min"),
                logging_config=LoggingConfig(log_level=distributed.TRAIN_LOG_LEVEL)))
        tick = time.perf_counter()
        with recovery.notebook_interrupts():              # ■ stops the run cleanly
            result = trainer.fit()
        fit_seconds = time.perf_counter() - tick
    run = runner.collect(result, cfg, ds, plan, run_name=run_name, run_dir=run_dir, fit_seconds=fit_seconds,
                           uri=uri, mlflow_run_id=mlflow_run_id, cluster=cluster)
except BaseException:
    if mlflow_run_id:
        tracking.end_run(uri, mlflow_run_id, "FAILED")
    raise
print(f"{plan.describe()}, precision {run.precision}, channels_last {run.channels_last}; trainer.fit took "
      f"{run.fit_seconds:.0f} s (training itself {run.history['seconds'].sum():.0f} s)")

# %%
cols = ["epoch", "loss", "acc", "val_loss", "val_acc", "val_f1_macro", "lr", "seconds", "images_per_s", "attempt"]
display(run.history[cols].set_index("epoch").round(4))
plotting.plot_history(run.history, out_dir / "training_curves.png", title="Lab 04: ViT, Lightning on Ray Train");

# %% [markdown]
# ### What Ray kept
# Ray Train V2's `Result.best_checkpoints` lists the checkpoints still on disk with their metrics; the full history
# above came back as rank 0's return value (`Result.metrics_dataframe` only holds the epochs of kept checkpoints).

# %%
kept = run.kept[["epoch", "val_loss"]]
display(kept.round(4))
lowest3 = run.history.nsmallest(3, "val_loss")["epoch"].tolist()
print("checkpoint folders on disk:", len([p for p in run.run_dir.glob("checkpoint_*") if p.is_dir()]))
print("kept epochs:", sorted(kept["epoch"]), "| the 3 lowest val_loss epochs:", sorted(lowest3),
      "| last epoch:", int(run.history["epoch"].max()))
print(f"best: epoch {run.best['epoch']} (val_loss {run.best['val_loss']:.4f}) -> scored on the test set")
print("worker restarts:", run.history["attempt"].max() - 1, "| epochs in the history:", run.history["epoch"].tolist())

# %% [markdown]
# **What happened.** Three folders when the last epoch is among the three lowest `val_loss` values; **four** when it
# is not: Ray never deletes the *latest* checkpoint, because a restarted run resumes from it. The best checkpoint is
# the lowest `val_loss`, which is often — not always — the last epoch; with a noisy validation loss it can be an
# earlier one, and that is the checkpoint the test set sees.
#
# **Exercise 3 — which checkpoints stay?** Given each epoch's `val_loss` and `num_to_keep`, return the epochs
# (counted from 1, sorted) whose checkpoints are on disk after training with
# `CheckpointConfig(num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min")`. The check
# replays Ray's bookkeeping report by report; the cell after it applies your rule to this run.

# %%
def my_kept_epochs(val_losses, num_to_keep):
    # BEGIN SOLUTION
    epochs = range(1, len(val_losses) + 1)
    best = sorted(epochs, key=lambda e: val_losses[e - 1])[:num_to_keep]
    return sorted(set(best) | {len(val_losses)})
    # END SOLUTION


# %% labkit={"points": 1, "question": "kept_checkpoints"} tags=["nbval-check-output"]
from labkit.exercises import lab04, reported
with reported("kept_checkpoints"):
    lab04.check_kept_checkpoints(my_kept_epochs)

# %% labkit={"hidden": "kept_checkpoints"} tags=["hidden-check"]
def _hidden_kept_checkpoints():
    def replay(losses, keep):          # Ray's bookkeeping, one report at a time: the best `keep`, and the latest
        disk = []
        for epoch in range(1, len(losses) + 1):
            disk.append(epoch)
            best = sorted(disk, key=lambda e: (losses[e - 1], e))[:keep]
            disk = [e for e in disk if e in best or e == epoch]
        return disk


    for losses, keep in (([1.0, 0.8, 0.8, 0.9], 2), ([0.7], 1), ([0.6, 0.6, 0.9, 0.5, 0.7, 0.95, 0.8], 3),
                         ([1.3, 1.1, 0.9, 1.2, 1.0, 1.4, 1.5, 1.05], 4)):   # repeated losses: a plateau
        assert sorted(int(e) for e in my_kept_epochs(list(losses), keep)) == replay(losses, keep), (losses, keep)


_hidden_kept_checkpoints()

# %%
kept_rule = lab04.kept_epochs_for_run(my_kept_epochs)       # yours, or the reference while it is a stub
print("your rule on this run:", kept_rule(run.history["val_loss"].tolist(), 3),
      "| Ray kept:", sorted(run.kept["epoch"]))

# %% [markdown]
# ## 8. Evaluate the best checkpoint
# The best checkpoint, reloaded on the driver and scored on the test set in fp32. With 9 classes, chance is 1/9,
# but the honest baseline is the **majority-class rate**: the accuracy of always answering the most common
# training class. **Balanced accuracy** (the mean of the per-class recalls) is 1/9 for any constant answer, and
# **macro-F1** averages the classes' F1 without weighting by size. Then per-class precision (of the images called
# *X*, how many are *X*), recall (of the *X* images, how many were found), F1, and the confusion matrix. On the
# stand-in, X-ray vs OCT is easy; the mistakes sit *within* a modality, between classes whose lesions look alike.
#
# **In quick mode** (a few hundred 32 px images, eight short epochs) the first thing any model learns is which
# *modality* an image is: one class per modality gives a balanced accuracy of 2/9, twice chance. The quick run gets
# past that to some of the lesions within a modality, not all of them; the per-class story needs the full
# configuration — and real scans before it means anything medical. (With a ViT this small, *how* its linear layers
# start matters: at BERT's fixed init std of 0.02 the attention starts uniform and a short run never leaves the
# modality stage; `labkit.models.vit` keeps PyTorch's fan-in-scaled init for them.)

# %% tags=["nbval-check-output", "labkit-result"]
y_true, y_pred = run.outputs["y_true"], run.outputs["y_pred"]
summary = metrics.summarize(y_true, y_pred, len(ds.classes), train_labels=ds["train"].labels)
print("ViT, best checkpoint, test set: " + "   ".join(f"{k} {v:.2f}" for k, v in summary.items()))
print(f"balanced accuracy above the majority-class rate: {summary['balanced_acc'] > summary['majority_rate']}")

# %%
table = plotting.classification_table(y_true, y_pred, ds.classes)
display(table.round(2))
plotting.plot_confusion(y_true, y_pred, ds.classes, out_dir / "confusion_matrix.png");

# %% [markdown]
# ### Where does [CLS] look?
# The [CLS] token's attention in the last block, averaged over heads, drawn over a few test images. The fused
# attention kernel never stores these weights, so `ViT.cls_attention` recomputes the last block's attention
# explicitly for this picture. With the coarse grid (`image_size / 4` per side) and a short training run, expect
# blurry maps; on a well-trained model they concentrate on the lesions.

# %%
best_model = run.module.model.eval()
picks = [first[k] for k in (0, 2, 4, 5, 6, 7)]   # three X-ray and three OCT classes
images = test_split.images[picks]
with torch.no_grad():
    maps = best_model.cls_attention(batch_transform(train=False)(images)).mean(1, keepdim=True)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
fig, axes = plt.subplots(2, len(picks), figsize=(2.2 * len(picks), 4.6))
for i, k in enumerate(picks):
    axes[0, i].imshow(images[i, 0], cmap="gray")
    axes[0, i].set_title(ds.classes[int(test_split.labels[k])], fontsize=8)
    axes[1, i].imshow(images[i, 0], cmap="gray")
    axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.55)
    for ax in axes[:, i]:
        ax.axis("off")
fig.suptitle("[CLS] attention, last block (mean over heads)")
plotting.save_figure(fig, out_dir / "cls_attention.png");

# %% [markdown]
# ## 9. Compare with Lab 01's CNN on the same data
# Lab 01's `AlzheimerCNN`, built for 9 classes, trained in this process on exactly these images **with the ViT's
# recipe**: the same epochs and global batch (so the same number of optimizer steps), AdamW with the same decay
# groups, LR, warm-up and cosine schedule, the same precision, and the lowest-`val_loss` epoch kept, as Ray kept the
# ViT's best checkpoint. Both are timed the same way: the sum of the epochs (training + validation), measured where
# the training runs — for the ViT inside the workers, so Ray's start-up and `fit()`'s bookkeeping are left out.
# Transformers have no built-in notion of "nearby pixels" and usually need much more data (or pre-training) than a
# CNN; with a few hundred images and a few epochs, do not be surprised if the CNN wins.

# %%
dev = env.pick_device(cfg.device)
cnn_row = None
if cfg.image_size % 16:
    print(f"AlzheimerCNN needs image_size divisible by 16 (got {cfg.image_size}): comparison skipped.")
else:
    env.seed_everything(cfg.seed)
    cnn = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size).to(dev)
    amp = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(run.precision)     # the ViT's precision
    if env.use_channels_last(dev, amp):
        cnn = cnn.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(decay_groups(cnn, cfg.weight_decay), lr=cfg.lr)          # the ViT's optimizer
    schedule = cosine_warmup(optimizer, cfg.epochs, runner.module_kwargs(cfg)["warmup_epochs"])   # and schedule
    global_batch = cfg.batch_size * run.plan.workers                                       # the same steps per epoch
    augment, plain = batch_transform(train=True).to(dev), batch_transform(train=False).to(dev)
    scaler, best, cnn_seconds = env.grad_scaler(amp, dev), (float("inf"), None, 0), 0.0
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="CNN", unit="epoch"):
        tick = time.perf_counter()                         # timed like the ViT's epochs: training + validation
        train.train_one_epoch(cnn, ds.loader("train", global_batch, seed=cfg.seed + epoch), optimizer,
                              torch.nn.CrossEntropyLoss(), device=dev, transform=augment, amp_dtype=amp,
                              scaler=scaler, progress=False)
        val = train.evaluate(cnn, ds.loader("val", global_batch), device=dev, transform=plain, amp_dtype=amp)
        cnn_seconds += time.perf_counter() - tick
        schedule.step()                                    # per epoch, as Lightning steps the ViT's
        if val["loss"] < best[0]:                          # keep the best epoch, as Ray keeps the best checkpoint
            best = (val["loss"], copy.deepcopy(cnn.state_dict()), epoch)
    cnn.load_state_dict(best[1])
    cnn_test = train.evaluate(cnn, ds.loader("test", global_batch), device=dev, transform=plain, return_outputs=True)
    cnn_summary = metrics.summarize(cnn_test["y_true"], cnn_test["y_pred"], len(ds.classes),
                                    train_labels=ds["train"].labels)
    cnn_row = {"run": f"Lab 01 CNN, 1 process, {cfg.epochs} epochs (best: {best[2]})",
               "parameters": count_parameters(cnn), **{k: cnn_summary[k] for k in ("acc", "balanced_acc", "macro_f1")},
               "seconds": cnn_seconds}
vit_row = {"run": f"ViT, Ray {run.plan.workers} workers, {cfg.epochs} epochs (best: {run.best['epoch']})",
           "parameters": n_params, **{k: summary[k] for k in ("acc", "balanced_acc", "macro_f1")},
           "seconds": float(run.history["seconds"].sum())}
comparison = pd.DataFrame([vit_row] + ([cnn_row] if cnn_row else []))
display(comparison.set_index("run").round(3))
print(f"majority-class rate {summary['majority_rate']:.3f}, chance {summary['chance']:.3f}")
vs_cnn = None
if cnn_row and np.array_equal(np.asarray(cnn_test["y_true"]), np.asarray(y_true)):
    # Both models scored the same test images, so resample those images (a paired bootstrap) to see how far the
    # balanced-accuracy difference could move by the luck of the test sample alone.
    diff = vit_row["balanced_acc"] - cnn_row["balanced_acc"]
    low, high = metrics.paired_interval(y_true, y_pred, cnn_test["y_pred"])   # its 95 % interval
    agree = float((np.asarray(y_pred) == np.asarray(cnn_test["y_pred"])).mean())
    vs_cnn = {"balanced_acc_diff": diff, "low": low, "high": high, "noise": (high - low) / 2,
              "verdict": metrics.interval_verdict(low, high), "agreement": agree}
    print(f"balanced accuracy, ViT − CNN: {diff:+.3f}; 95 % test-sample interval [{low:+.3f}, {high:+.3f}] (paired "
          f"bootstrap, {len(y_true)} images) → {vs_cnn['verdict']} (beyond only when 0 lies outside it); the two "
          f"models give the same answer on {agree:.0%} of them")
plotting.plot_comparison(comparison, out_dir / "vit_vs_cnn.png", metrics=["acc", "balanced_acc", "macro_f1"],
                         title="ViT vs Lab 01's CNN, same data");

# %% [markdown]
# ## 10. The run in MLflow
# Rank 0 logged the parameters, the device, every epoch's metrics (loss, accuracy, per-class precision / recall /
# F1) into one MLflow run; the driver added the test metrics and the best checkpoint. The store is a SQLite file in
# `results/04_lung_vit/` with the artifacts beside it — not MLflow's default `./mlruns` — and nothing about your
# user name or host is recorded. Read it back through the MLflow client:

# %% tags=["nbval-check-output"]
if run.mlflow_run_id:
    logged = tracking.read_run(run.tracking_uri, run.mlflow_run_id)
    print("status:", logged["status"])
    print("parameters:", len(logged["params"]), "e.g.", {k: logged["params"][k] for k in ("depth", "heads", "dim")})
    print("epochs of val_loss logged:", len(logged["history"]["val_loss"]))
    print("per-class metrics per epoch:", len([k for k in logged["metrics"] if k.startswith("val_recall/")]), "recalls, e.g.",
          sorted(k for k in logged["metrics"] if k.startswith("val_recall/"))[0])
    print("artifacts:", logged["artifacts"])
else:
    print("track=False: nothing was logged to MLflow.")

# %% [markdown]
# To browse the runs, start the MLflow UI from the course folder and open http://127.0.0.1:5000 :
# ```bash
# mlflow ui --backend-store-uri sqlite:///results/04_lung_vit/mlflow.db --port 5000
# ```
# With a team tracking server, set `MLFLOW_TRACKING_URI` (in the shell, never in a committed file) and the same
# code logs there instead. The best checkpoint can be fetched back with
# `mlflow artifacts download --artifact-uri runs:/<run id>/best_checkpoint`.

# %%
if run.mlflow_run_id:
    print(tracking.ui_command(run.tracking_uri))
    print("run id:", run.mlflow_run_id)

# %% [markdown]
# ## 11. The same training on a Ray cluster: `ray job submit`
# The training is also a command, `python -m labkit.labs.lung_vit` (`--help` lists the options, which are the
# parameters above); it runs the same steps as the cells above (labkit keeps a copy of `LitViT` and `train_func`
# for it, on the same `ClassifierBase`). Seed 004 sent it to its GPU cluster with `ray job submit`: the working directory (this course
# folder) is uploaded, and the runtime environment file sets `DATA_PATH` for the nodes. On a machine with Ray,
# start a cluster and submit. The job server lives in Ray's dashboard process, so it needs `ray[default]` and a head
# started *with* the dashboard; new Ray clusters use token authentication, and the CLI sends `~/.ray/auth_token`
# when `RAY_AUTH_MODE=token`:
# ```bash
# ray start --head --port 6379 --dashboard-host 127.0.0.1   # job server on 127.0.0.1:8265; workers join with
#                                                           # `ray start --address HEAD:6379`
# export RAY_AUTH_MODE=token
# ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env labs/ray_runtime_env.yaml \
#     -- python -m labkit.labs.lung_vit --workers 2 --epochs 12
# ray stop                                                  # when done
# ```
# The job finds the cluster through `RAY_ADDRESS` (set by Ray for the job) and writes its record and MLflow run to
# `results/04_lung_vit/` **inside the job's working directory** on the head node: pass `--results-dir` with a shared
# path, or set `MLFLOW_TRACKING_URI` to a tracking server, to collect them. This run as a command, and the runtime
# environment:

# %%
flags = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k in ("workers", "epochs", "image_size", "depth", "heads", "dim",
                                                               "mlp_dim", "batch_size", "lr", "precision", "fail_at_epoch")
                 if cfg[k] is not None)
print("ray job submit --working-dir . --runtime-env labs/ray_runtime_env.yaml -- \\")
print(f"    python -m labkit.labs.lung_vit {flags}" + (" --quick" if cfg.quick else "") + ("" if cfg.track else " --no-track"))
print()
runtime_env = Path(runner.__file__).resolve().parents[1] / "labs" / "ray_runtime_env.yaml"
print(runtime_env.read_text() if runtime_env.is_file() else "(see labs/ray_runtime_env.yaml in the course folder)")


# %% [markdown]
# ## 12. Open exercises
# **Exercise 4 (open).** Re-run with `depth=2` and `depth=8` (same epochs). Does balanced accuracy follow the parameter
# count? Then try `image_size=64` with the quick settings: how do tokens, seconds per epoch and accuracy change?
# And `precision="32"`: how much slower is an epoch, and does the result move more than between two seeds?

# %% [markdown]
# ## 13. Save the run record
# The record keeps the parameters (a cluster address only as "set"), the environment (with the precision and
# `channels_last` the workers used), the data, every epoch, the test metrics of the best checkpoint — accuracy,
# balanced accuracy, macro-F1 beside the majority-class rate —, the comparison and where the checkpoints and the
# MLflow store are.

# %%
record = runner.record(run, cfg, ds)
record.final.update(parameters=n_params, comparison=comparison.to_dict(orient="records"), vs_cnn=vs_cnn)
for name in ("samples", "training_curves", "confusion_matrix", "cls_attention", "vit_vs_cnn"):
    record.add_artifact(out_dir / f"{name}.png")
if run.mlflow_run_id and tracking.is_local(run.tracking_uri):
    record.add_artifact(out_dir / tracking.STORE_FILE)
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
# - A **conv stem** gives the transformer tokens that already describe local texture, and shrinks the sequence
#   16× (attention 256×) — the difference between an impossible and a cheap model at 128 px.
# - **Pre-LN** blocks keep an identity path for gradients; attention goes through `F.scaled_dot_product_attention`.
# - A LightningModule is three methods you write — `training_step`, `validation_step`, `configure_optimizers` —
#   and it does not know about Ray. Lightning on Ray Train is four pieces in the worker function:
#   `RayDDPStrategy`, `RayLightningEnvironment`, `RayTrainReportCallback`, `prepare_trainer`.
# - Validation metrics that pick checkpoints must count every image once: shard without padding and sum counts
#   over workers (`torchmetrics`), instead of averaging per-worker means.
# - `CheckpointConfig(num_to_keep=3, checkpoint_score_attribute="val_loss", checkpoint_score_order="min")` keeps the best
#   three (plus the latest, until training ends); test with `Result.get_best_checkpoint`, not with the last epoch.
# - Weight decay belongs on weights: exempt biases, normalisation parameters and embeddings by their kind.
# - Judge a classifier against the majority-class rate and with balanced accuracy, not against 1/K.
# - `bf16-mixed` speeds up training wherever bf16 runs natively — recent GPUs and many recent CPUs — while the loss
#   and the metrics stay in fp32.
# - Track runs in MLflow from **one** process (rank 0), keep the store inside the project's results, and keep
#   addresses and credentials in environment variables, never in files.
# - The notebook's training is also a command, so `ray job submit` can run it on a real cluster unchanged.
