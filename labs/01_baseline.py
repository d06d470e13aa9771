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
# # Lab 01 — A baseline CNN on brain MRI, on one device
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/labs/01_baseline.ipynb)
#
# Before we distribute anything we need a **baseline**: one model, one device, one plain training loop,
# measured honestly. Every later lab is compared with this one.
#
# **You will learn to**
# - load an image dataset from its real folder layout, and see why decoding once and caching beats decoding every epoch;
# - train a small CNN with a plain PyTorch loop (`labkit.train`), on a GPU when there is one (mixed precision, `channels_last`);
# - read a class-imbalanced result properly: accuracy against the majority-class rate, the confusion matrix, per-class recall;
# - keep a **run record** so the next labs can compare against this run.
#
# **Run time**: quick mode (`quick=True`) ≈ 1 min on 2 CPU cores; the full configuration (5 epochs, 128 px,
# 6,400 images) ≈ 15 min on 2 CPU cores, about a minute on a T4-class GPU.

# %% [markdown]
# ## 0. Setup
# In Colab this cell installs labkit; anywhere else the course's `make course` / `make setup` already did.

# %%
import sys
if "google.colab" in sys.modules:  # Colab only: fetch the course and install labkit (elsewhere `make course` did it)
    # !git clone -q https://github.com/labkit-course/labkit /content/labkit 2>/dev/null || true
    # %pip install -q -e /content/labkit
    # %cd /content/labkit

import torch
import labkit
from labkit import env, params, results, plotting, train
from labkit.data.alzheimer import load_alzheimer
from labkit.data.augment import batch_transform
from labkit.models.cnn import AlzheimerCNN
from labkit.models.summary import count_parameters, model_summary

# %% [markdown]
# ## 1. Parameters
# Every knob of the lab lives in the next cell (tagged `parameters`), so you can run the lab headless and
# change any of them: `papermill labs/01_baseline.ipynb out.ipynb -p epochs 10 -p lr 3e-4`.
# The defaults are the configuration of the source project (5 epochs, batch 32, Adam 1e-3, 128 px).
# `quick=True` (or `LABKIT_QUICK=1`) shrinks data, image size and epochs so the lab finishes in about a minute on a CPU.

# %% tags=["parameters"]
epochs = 5
batch_size = 32
lr = 1e-3
image_size = 128
device = "auto"
data = "auto"                 # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/alzheimer"
quick = False
seed = 0
class_weights = False         # weight the loss by inverse class frequency
amp = "auto"                  # mixed precision on a GPU ("auto", "bf16", "fp16", False)

# %% [markdown]
# ## 2. Check the parameters
# A typo in a parameter should fail *here*, with a message naming it — not twenty minutes later deep inside
# PyTorch. `labkit.params.check` validates types and ranges, applies quick mode and prints the configuration.
# Then we pick the device (`"auto"`: CUDA, then Apple MPS, then CPU) and seed every random generator.

# %% tags=["nbval-check-output"]
cfg = params.check("01_baseline", epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                   device=device, data=data, data_dir=data_dir, quick=quick, seed=seed,
                   class_weights=class_weights, amp=amp)
env.seed_everything(cfg.seed)
dev = env.pick_device(cfg.device)
amp_dtype = env.amp_dtype(cfg.amp, dev)
out_dir = results.lab_dir("01_baseline")

# %%
print(f"device: {dev}  ({env.environment(dev)['device_name']}), mixed precision: {amp_dtype}")

# %% [markdown]
# ## 3. The data
# The Kaggle *Alzheimer's Dataset (4 class of images)* holds axial brain-MRI slices in four classes of
# dementia severity. labkit finds it in its real folder layout (`Alzheimer_s Dataset/{train,test}/<class>/`,
# a plain `{train,test}/<class>/`, or the downloaded zip). When it is not there, labkit writes a **synthetic
# stand-in in the same layout** and says so loudly: those are generated pictures for learning the mechanics,
# not medical images, and nothing trained on them says anything about dementia.
#
# Each JPEG is decoded **once** into a cached `uint8` tensor; later epochs (and later labs) read the cache.
# Look at the class counts: the classes are far from balanced — remember that when you read the accuracy.

# %%
ds = load_alzheimer(data=cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size,
                    max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed)

# %% tags=["nbval-check-output"]
counts = ds.class_counts()
print(f"layout: {ds.layout}   synthetic stand-in: {ds.synthetic}   image tensor: {tuple(ds.splits['train'].images.shape[1:])}")
print(counts.to_string())

# %%
plotting.plot_class_distribution(counts, out_dir / "class_distribution.png")
plotting.plot_samples(ds.splits["train"].images, ds.splits["train"].labels, ds.classes, out_dir / "samples.png");

# %% [markdown]
# ## 4. The model
# `AlzheimerCNN` is the source project's network: four conv3×3–BatchNorm–ReLU–maxpool blocks (32, 64, 128,
# 256 channels), then fully connected layers of 512 and 128 units with dropout 0.5 and 0.3, and 4 outputs.
# Count its parameters yourself: almost all of them sit in the first fully connected layer, whose input
# is 256 × (size/16)². The source project reported "~16.7 M"; at 128 px the architecture it describes has
# about **8.8 M** — always count, never copy a number.

# %% tags=["nbval-check-output"]
model = AlzheimerCNN(num_classes=len(ds.classes), image_size=cfg.image_size)
n_params = count_parameters(model)
print(f"AlzheimerCNN at {cfg.image_size} px: {n_params:,} parameters ({n_params / 1e6:.2f} M)")
print(model_summary(model, (1, 3, cfg.image_size, cfg.image_size)).to_string())

# %% [markdown]
# ## 5. Train
# One straight loop (`labkit.train.fit` calls `train_one_epoch` and `evaluate`; read them in `labkit/train.py`).
# Batches arrive as cached `uint8` tensors; `batch_transform` moves the augmentation (random flip, ±10°
# rotation) and normalisation (mean 0.5, std 0.5) **onto the device**, one batch at a time. On a GPU the
# loop also uses mixed precision and `channels_last` memory layout.
#
# As in the source project there are only train and test splits, so the test split doubles as the
# validation set here; that is why learning-rate schedules and early stopping (which would tune on it) are
# off in this baseline.

# %%
train_loader = ds.loader("train", batch_size=cfg.batch_size, seed=cfg.seed)
test_loader = ds.loader("test", batch_size=cfg.batch_size)
history = train.fit(model, train_loader, test_loader, epochs=cfg.epochs, lr=cfg.lr, device=dev,
                    class_weights=cfg.class_weights, amp=cfg.amp,
                    transform_train=batch_transform(train=True), transform_eval=batch_transform(train=False))

# %% [markdown]
# The per-epoch table: losses and accuracies, and the time and throughput of each epoch (images per second
# of training). Timings vary from run to run; the rest is reproducible for a given seed on one machine.

# %%
import pandas as pd
table = pd.DataFrame(history).set_index("epoch")
display(table.round(3))
plotting.plot_history(history, out_dir / "training_curves.png", title="Lab 01 baseline");

# %% [markdown]
# ## 6. Evaluate
# Accuracy alone hides what an imbalanced dataset does to a model: a network that always answers
# *NonDemented* scores about 50 %. So we print the **majority-class rate** beside the test accuracy,
# then the confusion matrix and per-class precision, recall and F1 (scikit-learn).

# %% tags=["nbval-check-output"]
final = train.evaluate(model, test_loader, device=dev, transform=batch_transform(train=False),
                       amp_dtype=amp_dtype, return_outputs=True)
y_true, y_pred = final["y_true"], final["y_pred"]
majority = float((y_true == pd.Series(y_true).mode()[0]).mean())
print(f"test accuracy       {final['acc']:.2f}")
print(f"majority-class rate {majority:.2f}")
print(plotting.classification_table(y_true, y_pred, ds.classes).round(2).to_string())

# %%
plotting.plot_confusion(y_true, y_pred, ds.classes, out_dir / "confusion_matrix.png");


# %% [markdown]
# ## 7. Exercise — class weights
# The rarest class has about 1 % of the images. One remedy (on the source project's own list of
# improvements) is to weight the loss: each class gets a weight proportional to **1 / its frequency**,
# normalised so the weights average to 1. Compute them from the training counts below; the check cell
# compares your answer with the rule. Then re-run the lab with `class_weights=True` and compare the
# recall of the rare classes.

# %%
def inverse_frequency_weights(counts: list[int]) -> list[float]:
    """One weight per class, proportional to 1 / count, averaging 1 over the classes."""
    # BEGIN SOLUTION
    inverse = [1.0 / c for c in counts]
    return [w * len(inverse) / sum(inverse) for w in inverse]
    # END SOLUTION


# %% tags=["nbval-check-output"]
from labkit.exercises.lab01 import check_class_weights
train_counts = [int(c) for c in counts["train"]]
check_class_weights(inverse_frequency_weights(train_counts), train_counts)

# %% [markdown]
# ## 8. Save the run record
# One JSON file under `results/01_baseline/` holds the parameters, the environment, the data description,
# every epoch and the final metrics. Lab 02 reads it to compare Ray Train with this baseline, and
# `labkit summary` puts all labs side by side.

# %%
record = results.RunRecord(lab="01_baseline", params=dict(cfg), env=env.environment(dev), data=ds.describe(),
                           epochs=history)
record.final = {"test_acc": final["acc"], "test_loss": final["loss"], "majority_rate": majority,
                "parameters": n_params, "total_seconds": sum(e["seconds"] for e in history),
                "seconds_per_epoch": sum(e["seconds"] for e in history) / len(history)}
for name in ("class_distribution", "samples", "training_curves", "confusion_matrix"):
    record.add_artifact(out_dir / f"{name}.png")
path = results.save(record)
print("saved", path)

# %% [markdown]
# ## Take-aways
# - A baseline is a measurement: time per epoch, throughput, accuracy **next to the majority-class rate**.
# - Decode once, augment on the device: the input pipeline should never be what the model waits for.
# - On imbalanced data, read per-class recall and the confusion matrix, not accuracy alone.
# - Next, Lab 02 runs this same loop under Ray Train with several workers and compares against this record.
