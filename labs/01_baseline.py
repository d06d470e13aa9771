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
# - write the training loop yourself — forward, loss, backward, optimizer step — with mixed precision and the
#   `channels_last` memory layout where the hardware gains from them (GPUs, and CPUs that run bf16 natively);
# - read a class-imbalanced result properly: accuracy beside balanced accuracy, macro-F1 and the majority-class
#   rate, the confusion matrix, per-class recall — and ask what the split itself may be hiding;
# - keep a **run record** so the next labs can compare against this run.
#
# **Run time**: quick mode (`quick=True`) ≈ 1 min on 2 CPU cores; the full configuration (5 epochs, 128 px,
# 6,400 images) ≈ 15 min on 2 CPU cores, about a minute on a T4-class GPU.

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
import itertools
import time

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from labkit import env, metrics, params, plotting, results, train
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
amp = "auto"                  # mixed precision: "auto", "bf16", "fp16" (GPU) or False (fp32)

# %% [markdown]
# ## 2. Check the parameters
# A typo in a parameter should fail *here*, with a message naming it — not twenty minutes later deep inside
# PyTorch. `labkit.params.check` validates types and ranges, applies quick mode and prints the configuration.
# Then we pick the device (`"auto"`: CUDA, then Apple MPS, then CPU), seed every random generator and choose the
# precision: `amp="auto"` means bf16 autocast on GPUs and CPUs that run bf16 natively (AVX512-BF16/AMX), fp16 with
# a gradient scaler on older GPUs, fp32 elsewhere; `amp=False` forces fp32. On a GPU, and on a CPU running bf16,
# images and convolution weights are also stored `channels_last` (NHWC), the layout fast convolution kernels want.

# %% tags=["nbval-check-output"]
cfg = params.check("01_baseline", epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                   device=device, data=data, data_dir=data_dir, quick=quick, seed=seed,
                   class_weights=class_weights, amp=amp)
env.seed_everything(cfg.seed)
dev = env.pick_device(cfg.device)
amp_dtype = env.amp_dtype(cfg.amp, dev)                # torch.bfloat16, torch.float16 or None (fp32)
channels_last = env.use_channels_last(dev, amp_dtype)  # NHWC images and weights: GPUs, and bf16 on a CPU
precision = env.precision_name(amp_dtype)
out_dir = results.lab_dir("01_baseline")

# %%
print(f"device: {dev}  ({env.environment(dev)['device_name']}), precision: {precision}, channels_last: {channels_last}")

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
#
# Look also at what the files do **not** say: the Kaggle slices carry no subject ids, and each brain contributes
# many neighbouring slices. Nothing stops a split from putting slices of one brain on both sides; section 6
# comes back to what that does to a reported accuracy.

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

# %%
model = model.to(dev)
if channels_last:
    model = model.to(memory_format=torch.channels_last)  # conv weights in NHWC, like the batches

# %% [markdown]
# ## 5. Train
# This is the heart of the lab, and it is plain PyTorch, in the next cells, for you to read and change.
#
# Batches arrive as cached `uint8` tensors. `augment` (from labkit) moves the augmentation — random flip,
# ±10° rotation — and the normalisation (mean 0.5, std 0.5) **onto the device**, one whole batch at a time;
# `normalise` does only the normalisation, for evaluation. The loss is cross-entropy, the optimizer Adam,
# as in the source project. With `class_weights=True` the loss weights each class by 1 / its frequency in the
# training split — with the weights **you** compute in the exercise below.
#
# As in the source project there are only train and test splits, so the test split doubles as the
# validation set here; that is why learning-rate schedules and early stopping (which would tune on it) are
# off in this baseline.

# %% [markdown]
# **Exercise — class weights.** The rarest class has about 1 % of the images. One remedy (on the source project's
# own list of improvements) is to weight the loss: each class gets a weight proportional to **1 / its frequency**,
# normalised so the weights average to 1. Compute them from the training counts; the check cell compares your
# answer with the rule. With `class_weights=True` **the loss below uses your function** (a wrong answer changes what
# trains; an untouched exercise falls back to the reference with a one-line notice). Re-run the lab with
# `class_weights=True` and compare the recall of the rare classes and the balanced accuracy.

# %%
def inverse_frequency_weights(counts: list[int]) -> list[float]:
    """One weight per class, proportional to 1 / count, averaging 1 over the classes."""
    # BEGIN SOLUTION
    inverse = [1.0 / c for c in counts]
    return [w * len(inverse) / sum(inverse) for w in inverse]
    # END SOLUTION


# %% labkit={"points": 2, "question": "class_weights"} tags=["nbval-check-output"]
from labkit.exercises import reported
from labkit.exercises.lab01 import check_class_weights, class_weights_for_run
train_counts = [int(c) for c in counts["train"]]
with reported("class_weights"):                     # ✔ or ✘ with a hint; Run All goes on either way
    check_class_weights(inverse_frequency_weights, train_counts)

# %% labkit={"hidden": "class_weights"} tags=["hidden-check"]
import numpy as np
for hidden_counts in ([7, 70, 700, 3], [1, 1, 1, 1], [250, 5]):
    got = np.asarray(inverse_frequency_weights(list(hidden_counts)), dtype=float)
    want = 1 / np.asarray(hidden_counts, dtype=float)
    assert got.shape == want.shape and np.allclose(got, want / want.mean(), rtol=1e-4), hidden_counts

# %% [markdown]
# The loaders, the loss (weighted by your function when `class_weights=True`), the optimizer and — for fp16 only —
# the gradient scaler.

# %%
weight = class_weights_for_run(inverse_frequency_weights, train_counts) if cfg.class_weights else None
loss_fn = nn.CrossEntropyLoss(weight=weight.to(dev) if weight is not None else None)

# %%
train_loader = ds.loader("train", batch_size=cfg.batch_size, seed=cfg.seed)  # shuffled anew every epoch
test_loader = ds.loader("test", batch_size=cfg.batch_size)
augment = batch_transform(train=True).to(dev)       # uint8 → flip/rotate → float, normalised; on the device
normalise = batch_transform(train=False).to(dev)    # uint8 → float, normalised
train_labels = ds.splits["train"].labels
optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
scaler = env.grad_scaler(amp_dtype, dev)            # a GradScaler for fp16 only; None for bf16 and fp32

# %% [markdown]
# **One epoch.** For every batch: move it to the device, augment it, run the model (the *forward* pass), compute
# the loss, compute the gradient of the loss for every weight (*backward*), and let the optimizer change the
# weights (*step*). `torch.autocast` runs the convolutions and matrix products in bf16/fp16 when `amp_dtype`
# says so, and keeps precision-sensitive operations (the loss, reductions) and the weights themselves in fp32.
# fp16 has few exponent bits, so small gradients would round to zero: the `GradScaler` multiplies the loss
# before `backward` and divides the gradients again before the step. bf16 has fp32's range and needs no scaler.
#
# **Evaluation** switches the model to `eval()` mode (dropout off, BatchNorm uses its running statistics), turns
# gradients off (`torch.inference_mode`), and computes the loss and the predictions from fp32 logits.

# %%
def train_epoch(model, loader, optimizer, loss_fn, scaler=None, desc="train", progress=True):
    """One pass over `loader`: forward, loss, backward and an optimizer step for every batch."""
    model.train()                                      # dropout on; BatchNorm updates its running statistics
    loss_sum, correct, images = 0.0, 0, 0
    start = time.perf_counter()
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x = augment(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)                          # forward
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:                         # fp16: scale the loss, unscale the gradients
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()                            # backward: d loss / d weight for every weight
            optimizer.step()                           # step: Adam changes the weights
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        images += len(y)
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / images, "acc": correct / images, "seconds": seconds, "images_per_s": images / seconds}


@torch.inference_mode()
def evaluate(model, loader, loss_fn):
    """Mean loss, true labels and predictions of `model` over `loader` (eval mode, no gradients)."""
    model.eval()
    loss_sum, y_true, y_pred = 0.0, [], []
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x = normalise(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()                        # metrics in fp32, whatever the forward pass ran in
        loss_sum += loss_fn(logits, y).item() * len(y)
        y_true.append(y.cpu())
        y_pred.append(logits.argmax(1).cpu())
    y_true, y_pred = torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()
    return {"loss": loss_sum / len(y_true), "acc": float((y_true == y_pred).mean()), "y_true": y_true, "y_pred": y_pred}


# %% [markdown]
# **Your loop and the course's loop must not drift apart.** Labs 02 and 03 run this same loop from
# `labkit.train.train_one_epoch` inside Ray workers and DDP processes. The next cell trains two copies of the
# model, from the same weights and random seed, on the same few batches: one with `train_epoch` above, one
# with `labkit.train.train_one_epoch`. The weights must end up the same. If you change `train_epoch` (a
# different step, another transform), this check tells you whether the later labs still train what you train here.

# %% tags=["nbval-check-output"]
few_batches = list(itertools.islice(ds.loader("train", batch_size=cfg.batch_size, seed=cfg.seed), 3))


def after_one_epoch(run_epoch):
    """A copy of `model` after `run_epoch(copy, optimizer, scaler)` from a fixed seed."""
    twin = copy.deepcopy(model)
    torch.manual_seed(cfg.seed)                        # the same augmentation and dropout draws for both
    run_epoch(twin, torch.optim.Adam(twin.parameters(), lr=cfg.lr), env.grad_scaler(amp_dtype, dev))
    return twin


with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # GPUs: no run-to-run noise
    ours = after_one_epoch(lambda m, opt, sc: train_epoch(m, few_batches, opt, loss_fn, sc, progress=False))
    theirs = after_one_epoch(lambda m, opt, sc: train.train_one_epoch(
        m, few_batches, opt, loss_fn, device=dev, transform=augment, amp_dtype=amp_dtype, scaler=sc, progress=False))
agree = all(torch.allclose(a.float(), b.float()) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
moved = not all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), model.state_dict().values()))
print(f"notebook loop and labkit.train agree: {agree} (after {len(few_batches)} batches; weights changed: {moved})")

# %% [markdown]
# **The epochs.** Train, then evaluate on the test split after every epoch; keep one row per epoch.

# %%
history = []
for epoch in tqdm(range(1, cfg.epochs + 1), desc="epochs", unit="epoch"):
    stats = train_epoch(model, train_loader, optimizer, loss_fn, scaler, desc=f"epoch {epoch}/{cfg.epochs}")
    val = evaluate(model, test_loader, loss_fn)
    history.append({"epoch": epoch, "loss": stats["loss"], "acc": stats["acc"], "val_loss": val["loss"],
                    "val_acc": val["acc"], "seconds": stats["seconds"], "images_per_s": stats["images_per_s"]})

# %%
if amp_dtype is None:
    print(f"precision: fp32 — everything ran in fp32{' (channels_last)' if channels_last else ''}")
else:
    print(f"precision: {precision} — the forward and backward passes (convolutions, linear layers) ran in {precision} "
          f"autocast{', channels_last' if channels_last else ''}; weights, optimizer, loss and metrics in fp32")

# %% [markdown]
# The per-epoch table: losses and accuracies, and the time and throughput of each epoch (images per second
# of training). Timings vary from run to run; the rest is reproducible for a given seed on one machine.

# %%
table = pd.DataFrame(history).set_index("epoch")
display(table.round(3))
plotting.plot_history(history, out_dir / "training_curves.png", title="Lab 01 baseline");

# %% [markdown]
# ## 6. Evaluate
# Accuracy alone hides what an imbalanced dataset does to a model.
#
# **Predict, then run.** Before you run the next cell, look at the class counts in section 3 and write down
# your prediction: what test accuracy would a "model" get that ignores the image and always answers the most
# common class of the training split? And what balanced accuracy (the mean of the per-class recalls)?
#
# The next cell prints the trained model's accuracy, **balanced accuracy** and **macro-F1** beside that
# **majority-class rate** and chance (1 / number of classes), then per-class precision, recall and F1 (scikit-learn).
#
# First one detail of BatchNorm. In `eval()` mode it normalises with *running* statistics, averaged during training
# over batches seen with *earlier* weights; after the last steps they can trail the final weights (in a short run
# that alone can cost many points of test accuracy). `torch.optim.swa_utils.update_bn` recomputes them with
# the final weights in one pass over the training images (no gradients, no test data involved).

# %% tags=["nbval-check-output", "labkit-result"]
torch.optim.swa_utils.update_bn((normalise(x.to(dev)) for x, _ in train_loader), model)  # BatchNorm statistics
final = evaluate(model, test_loader, loss_fn)
y_true, y_pred = final["y_true"], final["y_pred"]
scores = metrics.summarize(y_true, y_pred, num_classes=len(ds.classes), train_labels=train_labels)
for name in ("acc", "balanced_acc", "macro_f1", "majority_rate", "chance"):
    print(f"{name:<14} {scores[name]:.2f}")
print(plotting.classification_table(y_true, y_pred, ds.classes).round(2).to_string())

# %%
plotting.plot_confusion(y_true, y_pred, ds.classes, out_dir / "confusion_matrix.png");

# %% [markdown]
# **The answer.** Always answering *NonDemented* scores the share of that class in the test split, about 50 %
# — a model has to beat that, not 25 %, before its accuracy means anything. Its balanced accuracy is exactly
# 1/4 (recall 1 for one class, 0 for the other three), whatever the class shares: that is why balanced accuracy
# and macro-F1 are the numbers to compare on imbalanced data. Look at the recall of the rarest class above.
#
# **What the split may be hiding.** A good test score still need not carry over to new patients. The Kaggle
# slices carry no subject ids, so a random split can put slices of the same brain in both the training and the
# test split, and the model can score by recognising the brain rather than the disease. Yagis et al. (*Effect of
# data leakage in brain MRI classification using 2D convolutional neural networks*, Scientific Reports 11,
# 22544, 2021) trained the same networks with slice-level and with subject-level splits: slice-level splits
# inflated accuracy by up to about 30 points, and even with **random labels** slice-level splits still scored
# high. With this dataset you cannot rule that out; with data that has subject ids, split by subject.


# %% [markdown]
# ## 7. Save the run record
# One JSON file under `results/01_baseline/` holds the parameters, the environment, the data description,
# every epoch and the final metrics (with the precision the run used), and the test predictions image by image
# (file, label, prediction). Lab 02 reads it to compare Ray Train with this baseline **on the same test images**,
# and `labkit summary` puts all labs side by side.

# %%
record = results.RunRecord(lab="01_baseline", params=dict(cfg), data=ds.describe(), epochs=history,
                           env={**env.environment(dev), "precision": precision, "channels_last": channels_last})
record.final = {"test_acc": scores["acc"], "test_loss": final["loss"], **scores, "precision": precision,
                "parameters": n_params, "total_seconds": sum(e["seconds"] for e in history),
                "seconds_per_epoch": sum(e["seconds"] for e in history) / len(history),
                "test_predictions": {"files": list(ds.splits["test"].files), "y_true": y_true.tolist(),
                                     "y_pred": y_pred.tolist()}}     # for paired comparisons (Lab 02)
for name in ("class_distribution", "samples", "training_curves", "confusion_matrix"):
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
# - A training loop is four lines per batch: forward, loss, backward, optimizer step. Mixed precision
#   (`torch.autocast`, a `GradScaler` for fp16) and `channels_last` make it faster without changing those lines.
# - A baseline is a measurement: time per epoch, throughput, accuracy **next to the majority-class rate**.
# - Decode once, augment on the device: the input pipeline should never be what the model waits for.
# - On imbalanced data, read balanced accuracy, macro-F1, per-class recall and the confusion matrix, not
#   accuracy alone; and ask whether the split kept each patient on one side.
# - Next, Lab 02 runs this same loop under Ray Train with several workers and compares against this record.
