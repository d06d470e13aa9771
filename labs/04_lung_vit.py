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
#   `RayTrainReportCallback`, `prepare_trainer`) and choose the precision (`bf16-mixed` on a GPU, 32-bit on CPU);
# - keep the top-3 checkpoints by `val_loss` and score the test set with the best one;
# - track parameters, per-epoch and per-class metrics and the checkpoint in MLflow, and open them in the MLflow UI;
# - send the same training to a running Ray cluster with `ray job submit`.
#
# **Run time**: quick mode (`quick=True`: 3 epochs, 32 px, 540 training images) ≈ 3–5 min on 2 CPU cores (about a
# minute of it is Ray starting up, and the first run writes the stand-in data: ≈ 1 min); the full configuration (12 epochs, 128 px, 2 workers) takes hours on a CPU
# and ≈ 10 min with one GPU per worker.

# %% [markdown]
# ## 0. Setup
# In Colab this cell installs labkit; anywhere else the course's `make course` / `make setup` already did.

# %%
import sys
if "google.colab" in sys.modules:  # Colab: fetch the course and install labkit (elsewhere: `make course` did it)
    # !git clone -q https://github.com/labkit-course/labkit /content/labkit 2>/dev/null || true
    # %pip install -q -e /content/labkit
    # %cd /content/labkit

import inspect
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from labkit import distributed, env, lung_vit, params, plotting, results, tracking, train
from labkit.data.augment import batch_transform
from labkit.models import vit
from labkit.models.cnn import AlzheimerCNN
from labkit.models.summary import count_parameters

# %% [markdown]
# ## 1. Parameters
# Every knob lives in the next cell (tagged `parameters`); run the lab headless with e.g.
# `papermill labs/04_lung_vit.ipynb out.ipynb -p quick True`. The defaults are the source project's run:
# 2 workers, 12 epochs, `bf16-mixed` where the hardware has it, a ViT of about 5 M parameters.
#
# - `depth`, `heads`, `dim`, `mlp_dim`: transformer blocks, attention heads per block, token width, MLP width
#   (`dim` must be divisible by `heads`: each head gets `dim / heads` features).
# - `image_size` must be divisible by 4 (the conv stem halves the resolution twice).
# - `precision`: `"auto"` = `"bf16-mixed"` on a GPU that supports it, else `"32"`; or force `"32"`, `"bf16-mixed"`,
#   `"16-mixed"` (GPU only).
# - `track`: log the run to MLflow (a local store in `results/04_lung_vit/`, or the server in `$MLFLOW_TRACKING_URI`).
# - `data_dir`: the dataset root (`train/ val/ test/`); the environment variable `DATA_PATH` is used when
#   `data_dir=None`. When the data is missing, a synthetic stand-in is written there.
# - `address`: a running Ray cluster; `None` starts a local one. `cnn_epochs`: epochs of Lab 01's CNN for the comparison.

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
data_dir = "data/lung"
device = "auto"
seed = 0
quick = False
address = None                # None: a local Ray cluster; or "ray://host:10001" / "host:6379"
cnn_epochs = 3                # Lab 01's CNN on the same data, for comparison

# %% [markdown]
# ## 2. Check the parameters
# `lung_vit.check_params` is `labkit.params.check` with this lab's rules (`lung_vit.RULES` for `depth`, `heads`,
# `dim`, `mlp_dim`, …, passed through its `rules=` argument) plus the one check that involves two parameters:
# `dim` divisible by `heads`. A bad value fails here, naming the parameter.

# %% tags=["nbval-check-output"]
cfg = lung_vit.check_params(
    rules={"cnn_epochs": params.Rule(int, 1, 100, help="epochs of Lab 01's CNN for the comparison")},
    workers=workers, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, image_size=image_size,
    depth=depth, heads=heads, dim=dim, mlp_dim=mlp_dim, dropout=dropout, precision=precision, track=track, data=data,
    data_dir=data_dir, device=device, seed=seed, quick=quick, address=address, cnn_epochs=cnn_epochs)
env.seed_everything(cfg.seed)
out_dir = results.lab_dir("04_lung_vit")

# %% [markdown]
# Ray's plan for this machine: how many workers, CPU (gloo) or one GPU each (NCCL), and the precision each
# worker will use. An impossible request (more workers than cores) fails here, before Ray starts.

# %%
if distributed.resolve_address(cfg.address) is None:
    plan = distributed.plan_scaling(cfg.workers, cfg.device, **distributed.machine_resources())
    print("plan:", plan.describe(), "| precision:", lung_vit.resolve_precision(cfg.precision, plan.use_gpu))
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
ds = lung_vit.load_data(cfg, progress=True)

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
model = lung_vit.build_model(cfg, num_classes=len(ds.classes))
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
# ## 5. Lightning inside Ray Train
# The model is a plain `nn.Module`; `labkit.lightning_module.LitClassifier` wraps any labkit model with the training,
# validation and test steps, AdamW with a cosine schedule, and per-class precision/recall/F1 from `torchmetrics`.
# `val_loss` is logged with `sync_dist=True`: averaged over all workers before Ray reads it. Every Ray worker runs
# the function below: a Lightning `Trainer` with Ray's DDP strategy and cluster environment, and
# `RayTrainReportCallback`, which saves a checkpoint after every epoch and reports it to Ray with the metrics.

# %%
print(inspect.getsource(lung_vit.train_func))

# %% [markdown]
# On the driver (this notebook), `lung_vit.train` starts Ray, builds the `TorchTrainer` and — the line to
# notice — `CheckpointConfig(num_to_keep=3, checkpoint_score_attribute="val_loss", checkpoint_score_order="min")`:
# Ray keeps only the three checkpoints with the lowest validation loss and deletes the others as training goes.
# Afterwards `Result.get_best_checkpoint(metric="val_loss", mode="min")` is reloaded here to score the test set.

# %%
print(inspect.getsource(lung_vit.checkpoint_config))

# %% [markdown]
# ## 6. Train
# Ray starts (about a minute on 2 CPU cores), the workers load the cached data and train; rank 0 prints one line per
# epoch and, with `track=True`, logs each epoch to MLflow.

# %%
run = lung_vit.train(cfg, data=ds)
print(f"{run.plan.describe()}, precision {run.precision}; trainer.fit took {run.fit_seconds:.0f} s "
      f"(training itself {run.history['seconds'].sum():.0f} s)")

# %%
cols = ["epoch", "loss", "acc", "val_loss", "val_acc", "val_f1_macro", "lr", "seconds", "images_per_s"]
display(run.history[cols].set_index("epoch").round(4))
plotting.plot_history(run.history, out_dir / "training_curves.png", title="Lab 04: ViT, Lightning on Ray Train");

# %% [markdown]
# ### What Ray kept
# Three checkpoints — the three lowest `val_loss` values of the run, whatever their epoch — and the best of them is
# the one we test. Ray Train V2's `Result.metrics_dataframe` only holds the epochs of kept checkpoints; the full
# history above came back as the training function's return value.

# %%
kept = run.kept[["epoch", "val_loss"]]
display(kept.round(4))
lowest3 = run.history.nsmallest(3, "val_loss")["epoch"].tolist()
print("checkpoint folders on disk:", len([p for p in run.run_dir.glob("checkpoint_*") if p.is_dir()]))
print("kept epochs:", sorted(kept["epoch"]), "| the 3 lowest val_loss epochs:", sorted(lowest3))
print(f"best: epoch {run.best['epoch']} (val_loss {run.best['val_loss']:.4f}) -> scored on the test set")

# %% [markdown]
# ## 7. Evaluate the best checkpoint
# Per-class precision (of the images called *X*, how many are *X*), recall (of the *X* images, how many were found)
# and F1, then the confusion matrix. On the stand-in, X-ray vs OCT is easy; the mistakes sit *within* a modality,
# between classes whose lesions look alike or are faint.
#
# **In quick mode** (3 epochs of ~8 steps each at 32 px) neither the ViT nor the CNN below gets far past telling
# the modalities apart: expect an accuracy near 2/9 and many zero rows in the table. That run shows the
# mechanics; the per-class story needs the full configuration (a CNN on this stand-in reaches ~0.44 validation
# accuracy after 8 epochs at 32 px, measured on 2 CPU cores) — and real scans before it means anything medical.

# %%
y_true, y_pred = run.outputs["y_true"], run.outputs["y_pred"]
print(f"test accuracy {run.test['test_acc']:.2f}   macro F1 {run.test['test_f1_macro']:.2f}   "
      f"(chance {1 / len(ds.classes):.2f})")
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
# ## 8. Compare with Lab 01's CNN on the same data
# Lab 01's `AlzheimerCNN`, built for 9 classes, trained `cnn_epochs` epochs in this process with Lab 01's plain loop
# on exactly these images. Transformers have no built-in notion of "nearby pixels" and usually need much more data
# (or pre-training) than a CNN; with a few hundred images and a few epochs, do not be surprised if the CNN wins.

# %%
dev = env.pick_device(cfg.device)
cnn_row = None
if cfg.image_size % 16:
    print(f"AlzheimerCNN needs image_size divisible by 16 (got {cfg.image_size}): comparison skipped.")
else:
    env.seed_everything(cfg.seed)
    cnn = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)
    tick = time.perf_counter()
    cnn_history = train.fit(cnn, ds.loader("train", cfg.batch_size, seed=cfg.seed), ds.loader("val", cfg.batch_size),
                            epochs=cfg.cnn_epochs, lr=1e-3, device=dev, transform_train=batch_transform(train=True),
                            transform_eval=batch_transform(train=False))
    cnn_seconds = time.perf_counter() - tick
    cnn_test = train.evaluate(cnn, ds.loader("test", cfg.batch_size), device=dev,
                              transform=batch_transform(train=False), return_outputs=True)
    cnn_row = {"run": f"Lab 01 CNN, 1 process, {cfg.cnn_epochs} epochs", "parameters": count_parameters(cnn),
               "test_acc": cnn_test["acc"], "test_f1_macro": f1_score(cnn_test["y_true"], cnn_test["y_pred"],
                                                                      average="macro"), "seconds": cnn_seconds}
vit_row = {"run": f"ViT, Ray {cfg.workers} workers, {cfg.epochs} epochs", "parameters": n_params,
           "test_acc": run.test["test_acc"], "test_f1_macro": run.test["test_f1_macro"], "seconds": run.fit_seconds}
comparison = pd.DataFrame([vit_row] + ([cnn_row] if cnn_row else []))
display(comparison.set_index("run").round(3))
plotting.plot_comparison(comparison, out_dir / "vit_vs_cnn.png", metrics=["test_acc", "test_f1_macro"],
                         title="ViT vs Lab 01's CNN, same data");

# %% [markdown]
# ## 9. The run in MLflow
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
# ## 10. The same training on a Ray cluster: `ray job submit`
# The training is also a command, `python -m labkit.lung_vit` (`--help` lists the options, which are the
# parameters above). Seed 004 sent it to its GPU cluster with `ray job submit`: the working directory (this course
# folder) is uploaded, and the runtime environment file sets `DATA_PATH` for the nodes. On a machine with Ray,
# start a cluster and submit. The job server lives in Ray's dashboard process, so it needs `ray[default]` and a head
# started *with* the dashboard; new Ray clusters use token authentication, and the CLI sends `~/.ray/auth_token`
# when `RAY_AUTH_MODE=token`:
# ```bash
# ray start --head --port 6379 --dashboard-host 127.0.0.1   # job server on 127.0.0.1:8265; workers join with
#                                                           # `ray start --address HEAD:6379`
# export RAY_AUTH_MODE=token
# ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env labs/ray_runtime_env.yaml \
#     -- python -m labkit.lung_vit --workers 2 --epochs 12
# ray stop                                                  # when done
# ```
# The job finds the cluster through `RAY_ADDRESS` (set by Ray for the job) and writes its record and MLflow run to
# `results/04_lung_vit/` **inside the job's working directory** on the head node: pass `--results-dir` with a shared
# path, or set `MLFLOW_TRACKING_URI` to a tracking server, to collect them. This run as a command, and the runtime
# environment:

# %%
flags = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k in ("workers", "epochs", "image_size", "depth", "heads", "dim",
                                                               "mlp_dim", "batch_size", "lr", "precision"))
print("ray job submit --working-dir . --runtime-env labs/ray_runtime_env.yaml -- \\")
print(f"    python -m labkit.lung_vit {flags}" + (" --quick" if cfg.quick else "") + ("" if cfg.track else " --no-track"))
print()
runtime_env = Path(lung_vit.__file__).resolve().parents[1] / "labs" / "ray_runtime_env.yaml"
print(runtime_env.read_text() if runtime_env.is_file() else "(see labs/ray_runtime_env.yaml in the course folder)")


# %% [markdown]
# ## 11. Exercises
# **Exercise 1 — tokens and attention cost.** A stem that shrinks each side `downsample`× turns an
# `image_size × image_size` image into how many tokens ([CLS] not counted)? And how many times smaller is the
# attention matrix than with one token per pixel? Return both.

# %%
def my_token_count(image_size, downsample):
    # BEGIN SOLUTION
    tokens = (image_size // downsample) ** 2
    return tokens, (image_size * image_size) ** 2 // tokens ** 2
    # END SOLUTION


# %% tags=["nbval-check-output"]
vit.check_token_count(my_token_count)


# %% [markdown]
# **Exercise 2 — a pre-LN block.** Write the forward pass of a pre-LayerNorm transformer block from its parts
# `block.norm1`, `block.attn`, `block.norm2`, `block.mlp` (see section 4). The check compares it with
# `labkit.models.vit.Block` and tells a post-LN version apart.

# %%
def my_prenorm_block(x, block):
    # BEGIN SOLUTION
    x = x + block.attn(block.norm1(x))
    x = x + block.mlp(block.norm2(x))
    return x
    # END SOLUTION


# %% tags=["nbval-check-output"]
vit.check_prenorm_block(my_prenorm_block)

# %% [markdown]
# **Exercise 3 (open).** Re-run with `depth=2` and `depth=8` (same epochs). Does test accuracy follow the parameter
# count? Then try `image_size=64` with the quick settings: how do tokens, seconds per epoch and accuracy change?

# %% [markdown]
# ## 12. Save the run record
# The record keeps the parameters (a cluster address only as "set"), the environment, the data, every epoch, the test
# metrics of the best checkpoint, the comparison and where the checkpoints and the MLflow store are.

# %%
record = lung_vit.record(run, cfg, ds)
record.final.update(parameters=n_params, comparison=comparison.to_dict(orient="records"))
for name in ("samples", "training_curves", "confusion_matrix", "cls_attention", "vit_vs_cnn"):
    record.add_artifact(out_dir / f"{name}.png")
if run.mlflow_run_id and tracking.is_local(run.tracking_uri):
    record.add_artifact(out_dir / tracking.STORE_FILE)
path = results.save(record)
print("saved", path)

# %% [markdown]
# ## Take-aways
# - A **conv stem** gives the transformer tokens that already describe local texture, and shrinks the sequence
#   16× (attention 256×) — the difference between an impossible and a cheap model at 128 px.
# - **Pre-LN** blocks keep an identity path for gradients; attention goes through `F.scaled_dot_product_attention`.
# - Lightning on Ray Train is four pieces: `RayDDPStrategy`, `RayLightningEnvironment`, `RayTrainReportCallback`,
#   `prepare_trainer` — the LightningModule itself does not know about Ray.
# - `CheckpointConfig(num_to_keep=3, checkpoint_score_attribute="val_loss", checkpoint_score_order="min")` keeps the best
#   three; test with `Result.get_best_checkpoint`, not with the last epoch.
# - Track runs in MLflow from **one** process (rank 0), keep the store inside the project's results, and keep
#   addresses and credentials in environment variables, never in files.
# - The notebook's training is also a command, so `ray job submit` can run it on a real cluster unchanged.
