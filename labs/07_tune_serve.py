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
# # Lab 07 — Tune, compress, serve: where a trained model goes next
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/labs/07_tune_serve.ipynb)
#
# Labs 01–05 trained models. This one takes Lab 01's CNN on the Alzheimer MRI slices the rest of the way:
# **search** its hyperparameters with **Ray Tune**, **compress** the best model to int8, and **serve** it
# behind an HTTP endpoint with **Ray Serve** — then measure what the endpoint does under load.
#
# **You will learn to**
# - cut a validation split that does not leak (slices that look alike stay on one side), write a Tune
#   *trainable* that reports validation balanced accuracy and checkpoints every epoch — and restores itself
#   exactly (the exercise) —, a search space, and let **ASHA** stop weak trials early; resume an interrupted
#   search with `Tuner.restore`; re-train the chosen trial for the epochs at which it was chosen;
# - quantize a model to int8 with PyTorch's own tooling (torchao) and export it with `torch.export`, and
#   *measure* size, CPU latency at the batch sizes the endpoint serves, and accuracy instead of assuming them;
# - write a Ray Serve deployment with `@serve.batch` request batching and replicas, a client, and an
#   **open-loop** load test (requests on a schedule; p50/p95/p99 latency, requests/s, the batch sizes that
#   formed); answer bad requests with a 4xx and keep serving.
#
# **Run time**: quick mode (`quick=True`: 4 trials × ≤ 4 epochs at 48 px, 1000 training images, 60 requests per
# load test) ≈ 1.5 min on 2 CPU cores; the full configuration (12 trials × up to 10 epochs at 128 px, 400 requests
# per load test) ≈ 1 h on 2 CPU cores, minutes on a GPU.

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
import asyncio
import contextlib
import copy
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import ray
import torch
from ray import serve, tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from starlette.requests import Request
from starlette.responses import JSONResponse
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from labkit import distributed, env, metrics, params, plotting, results, train
from labkit.labs import tune_serve
from labkit.labs.tune_serve import compress, search, serving
from labkit.data import batch_transform
from labkit.data.alzheimer import load_alzheimer
from labkit.files import atomic_path
from labkit.models.cnn import AlzheimerCNN
from labkit.params import ParameterError

# %% [markdown]
# ## 1. Parameters
# `num_samples` hyperparameter configurations are tried, each for at most `max_epochs` epochs; ASHA lets
# every trial train `grace_period` epochs before it may stop it. The endpoint runs `replicas` copies of the
# model; `@serve.batch` groups up to `max_batch_size` requests, waiting at most `batch_wait_timeout_s` for
# them. The load test sends `load_requests` requests per configuration on a schedule (p99 needs at least 200 to
# mean something). `quick=True` (or `LABKIT_QUICK=1`) shrinks data, image size, trials and requests.

# %% tags=["parameters"]
num_samples = 12
max_epochs = 10
grace_period = 2
replicas = 2
max_batch_size = 16
batch_wait_timeout_s = 0.01
load_requests = 400           # per configuration of the load test (200 or more for a p99 that means something)
quantize = True               # int8 (torchao) next to fp32
image_size = 128
device = "auto"               # for the Tune trials and the re-training; the endpoint serves on CPU replicas
data = "auto"                 # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/alzheimer"
quick = False
seed = 0
address = None                # a running Ray cluster, e.g. "ray://head:10001"; None starts a local one

# %% [markdown]
# ## 2. Check the parameters
# The rules of this lab's own knobs (the sweep, the endpoint, int8) live in `labkit.labs.tune_serve.RULES`, the
# Ray `address` in `labkit.distributed.RULES`; `check_cluster` sees that a cluster answers at `address`.

# %% tags=["nbval-check-output"]
cfg = params.check("07_tune_serve", rules={**distributed.RULES, **tune_serve.RULES}, num_samples=num_samples, max_epochs=max_epochs, grace_period=grace_period,
                   replicas=replicas, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                   load_requests=load_requests, quantize=quantize, image_size=image_size, device=device, data=data,
                   data_dir=data_dir, quick=quick, seed=seed, address=address)
distributed.check_cluster(cfg)
if cfg.grace_period > cfg.max_epochs:
    raise ParameterError(f"07_tune_serve: parameter 'grace_period' = {cfg.grace_period} is larger than max_epochs = "
                         f"{cfg.max_epochs}; ASHA needs grace_period <= max_epochs.")
env.seed_everything(cfg.seed)
dev = env.pick_device(cfg.device)
amp_dtype = env.amp_dtype("auto", dev)
out_dir = results.lab_dir("07_tune_serve")

# %% [markdown]
# ## 3. The data: train, validation, test
# The Alzheimer slices of Lab 01 (the real Kaggle layout when it is in `data/alzheimer`, else the
# **synthetic stand-in** — generated pictures, not medical images). A search must never look at the test
# split: it picks the configuration with the best **validation** score, so we cut a validation set out of
# the training split. The test split is used once, at the end, on the re-trained chosen model.
#
# **A validation split that does not leak.** Lab 01 showed why a random split by *slice* flatters a model:
# neighbouring slices of one brain are near-copies, and a model that recognises the brain scores on its
# twin. A search that selects on such a validation set selects for memorising. The Kaggle files carry no
# subject ids, so we group **slices that look alike** (`labkit.labs.tune_serve.search.lookalike_groups`:
# k-means on 16 × 16 thumbnails, about 8 slices per group) and split **by group** with scikit-learn's
# `StratifiedGroupKFold` (one fold of five is the validation set, class shares kept as far as groups
# allow): no group has slices on both sides. It is a guard, not a proof — with data that has subject ids,
# pass those as `groups` instead. (The test split is the dataset's own; nothing here can regroup it.)

# %%
ds = load_alzheimer(data=cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size,
                    max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed)
classes = list(ds.classes)
all_x, all_y = ds["train"].images, ds["train"].labels
groups = search.lookalike_groups(all_x, per_group=8, seed=cfg.seed)
folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=cfg.seed)
fit_idx, val_idx = next(folds.split(np.zeros(len(all_y)), all_y.numpy(), groups))
on_both_sides = set(groups[fit_idx]) & set(groups[val_idx])
assert not on_both_sides, f"look-alike groups on both sides of the split: {sorted(on_both_sides)[:5]}"
fit_x, fit_y, val_x, val_y = all_x[fit_idx], all_y[fit_idx], all_x[val_idx], all_y[val_idx]
test_x, test_y = ds["test"].images, ds["test"].labels
validation_split = f"by look-alike group (k-means on 16 px thumbnails, {len(set(groups))} groups), StratifiedGroupKFold 1 of 5"

# %% tags=["nbval-check-output"]
split_counts = pd.DataFrame({name: np.bincount(y.numpy(), minlength=len(classes))
                             for name, y in (("tune-train", fit_y), ("validation", val_y), ("test", test_y))},
                            index=pd.Index(classes, name="class"))
print(f"layout: {ds.layout}   synthetic stand-in: {ds.synthetic}   image tensor: {tuple(all_x.shape[1:])}")
print(f"validation split {validation_split}: {len(set(groups[val_idx]))} groups held out, none on both sides")
print(split_counts.to_string())

# %% [markdown]
# ## 4. What the endpoint will answer — exercise
# At the end of this lab a client sends an image and the endpoint answers with JSON: the most likely class
# and the `k` most likely classes with their probabilities. Write that answer builder now; the deployment
# in section 9 calls it for every image.
#
# **Exercise.** `top_k_answer(probs, classes, k)` gets one probability per class (a list, a NumPy array or a
# torch tensor) and returns `{"class": name, "top_k": [{"class": name, "probability": p}, ...]}`: the
# `min(k, len(classes))` most likely classes, most likely first; on a tie the lower class index first.
# The probabilities must be plain Python floats — `json.dumps` cannot encode a NumPy `float32`.

# %%
def top_k_answer(probs, classes: list[str], k: int = 3) -> dict:
    """The JSON-ready answer for one image: the most likely class and the top-k classes with probabilities."""
    # BEGIN SOLUTION
    values = [float(p) for p in (probs.tolist() if hasattr(probs, "tolist") else probs)]
    order = sorted(range(len(values)), key=lambda i: -values[i])[:k]     # sorted() is stable: ties keep index order
    return {"class": classes[order[0]],
            "top_k": [{"class": classes[i], "probability": values[i]} for i in order]}
    # END SOLUTION


# %% labkit={"points": 1, "question": "top_k_answer"} tags=["nbval-check-output"]
from labkit.exercises import lab07, reported
with reported("top_k_answer"):                       # ✔ or ✘ with a hint; Run All goes on either way
    lab07.check_top_k(top_k_answer)

# %% labkit={"hidden": "top_k_answer"} tags=["hidden-check"]
def _hidden_top_k_answer():
    import json
    import numpy as np
    names = ["a", "b", "c", "d", "e"]
    for probs, k, want in ((list(np.array([0.1, 0.2, 0.4, 0.2, 0.1], dtype=np.float32)), 3, ["c", "b", "d"]),  # NumPy scalars
                           (np.array([0.4, 0.15, 0.15, 0.15, 0.15]), 2, ["a", "b"]),      # a tie for second place
                           ([0.2, 0.2, 0.2, 0.2, 0.2], 5, names)):
        answer = top_k_answer(probs, names, k)
        json.dumps(answer)                                        # JSON-ready: plain Python floats
        assert answer["class"] == want[0] and [e["class"] for e in answer["top_k"]] == want, (k, answer)
        assert all(abs(e["probability"] - float(probs[names.index(e["class"])])) < 1e-6 for e in answer["top_k"])


_hidden_top_k_answer()

# %% [markdown]
# ## 5. Start Ray
# One Ray start for the whole lab (`labkit.distributed.ray_cluster`: a local cluster sized to this machine,
# or `address`), closed in the last cell. Tune runs its trials as Ray actors; Serve its replicas.

# %%
ray_stack = contextlib.ExitStack()
cluster = ray_stack.enter_context(distributed.ray_cluster(cfg.address))
print(f"Ray {cluster['ray']}: {cluster['cpus']} CPU(s), started in {cluster['init_seconds']:.1f} s")

# %% [markdown]
# ## 6. The search
# ### Exercise — a trial that can be resumed
# A search of many trials runs for a long time, and long runs get interrupted: a closed laptop, a killed
# kernel, a lost worker. Tune can resume a trial only from what the trial itself saved. After every epoch
# the trainable writes a **checkpoint** into a folder; Tune keeps that folder and hands it back to the
# restarted trial (`tune.get_checkpoint()`).
#
# **Exercise.** Write `save_trial(folder, model, optimizer, scheduler, epoch)`, which saves into `folder`
# everything the next epoch depends on, and `restore_trial(folder, model, optimizer, scheduler)`, which loads
# it into freshly built objects and returns the **first epoch still to train**. A resumed trial must end with
# exactly the weights of a trial that never stopped — think about what changes while a model trains besides
# its weights (AdamW keeps two running averages per weight; the learning-rate schedule has a position). Save
# only tensors and plain values (`state_dict()`s): `torch.load(..., weights_only=True)` then reads the file
# without running any code from it. The check trains a small model with and without an interruption and
# compares the two.

# %%
def save_trial(folder, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, epoch: int) -> None:
    """Save what the next epoch of this trial depends on into `folder` (a directory that exists)."""
    # BEGIN SOLUTION
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch}, Path(folder) / "state.pt")
    # END SOLUTION


def restore_trial(folder, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Load what `save_trial` saved into `model`, `optimizer`, `scheduler`; return the first epoch to train."""
    # BEGIN SOLUTION
    state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)  # tensors only: no code runs
    model.load_state_dict(state["model"])               # copies into the model's own device
    optimizer.load_state_dict(state["optimizer"])       # moves AdamW's moments to the parameters' device
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1
    # END SOLUTION


# %% labkit={"points": 2, "question": "resume"} tags=["nbval-check-output"]
from labkit.exercises import lab07, reported
with reported("resume"):
    lab07.check_resume(save_trial, restore_trial)

# %% labkit={"hidden": "resume"} tags=["hidden-check"]
def _hidden_resume():
    import math
    import shutil
    import tempfile
    from pathlib import Path
    import torch
    from torch import nn
    # The lab's pair: SGD with momentum (a buffer per weight) and a cosine schedule, interrupted after epoch 1 of 3.
    def build(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return net, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)


    def epoch_of(net, opt, sched, epoch):
        g = torch.Generator().manual_seed(epoch)
        x = torch.randn(32, 4, generator=g)
        y = (x[:, 0] * x[:, 1] > 0).long()
        for idx in torch.randperm(32, generator=g).view(4, 8):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()


    ref = build(0)
    for e in (1, 2, 3):
        epoch_of(*ref, e)
    run = build(0)
    epoch_of(*run, 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a").mkdir()
        save_trial(Path(tmp) / "a", *run, 1)
        shutil.move(Path(tmp) / "a", Path(tmp) / "b")
        run = build(7)
        first = restore_trial(Path(tmp) / "b", *run)
    assert first == 2, first
    for e in range(first, 4):
        epoch_of(*run, e)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(run[0].state_dict().values(), ref[0].state_dict().values()))
    assert math.isclose(run[2].get_last_lr()[0], ref[2].get_last_lr()[0], rel_tol=1e-9, abs_tol=1e-12)


_hidden_resume()

# %% [markdown]
# ### The trainable
# A Tune *trainable* is a plain function of one `config` dict. It trains Lab 01's `AlzheimerCNN` with the
# config's hyperparameters and, after every epoch, calls `tune.report(metrics, checkpoint=...)`: the
# metrics go to the scheduler (ASHA decides on them), the checkpoint (your `save_trial`) makes the trial
# resumable. When Tune restarts a trial, `tune.get_checkpoint()` hands the last one back, your
# `restore_trial` loads it and the loop continues where it stopped. The learning rate follows a cosine from
# `lr` down to 0 over `max_epochs` (per step); each epoch draws its data order, augmentation and dropout
# from seeds fixed per epoch, so a resumed trial makes the same draws as one that never stopped.
#
# Every score the trial reports is on the **validation** split, and named so (`val_…`).
#
# The images reach the trials through the **object store**: `tune.with_parameters` puts them there once
# (`ray.put`), and every trial fetches that one stored copy instead of decoding the JPEGs again (each trial
# still deserialises its own copy of the tensors: Ray does not share torch tensors without copying by default).

# %%
save_checkpoint, restore_checkpoint = lab07.resume_for_run(save_trial, restore_trial)  # yours, or the reference pair


def train_trial(config: dict, data: tuple) -> None:
    """One Tune trial: train AlzheimerCNN with `config`, report validation scores and a checkpoint every epoch."""
    torch.set_num_threads(config["threads"])
    logging.getLogger("ray.train").setLevel(logging.WARNING)   # no "checkpoint created" line every epoch
    x_fit, y_fit, x_val, y_val = data
    trial_dev = env.pick_device(config["device"])
    trial_amp = env.amp_dtype("auto", trial_dev)
    torch.manual_seed(config["seed"])
    model = AlzheimerCNN(num_classes=len(config["classes"]), image_size=config["image_size"]).to(trial_dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    steps_per_epoch = math.ceil(len(y_fit) / config["batch_size"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["max_epochs"] * steps_per_epoch)
    first_epoch = 1
    checkpoint = tune.get_checkpoint()                  # set when Tune resumes this trial
    if checkpoint:
        with checkpoint.as_directory() as folder:
            first_epoch = restore_checkpoint(folder, model, optimizer, scheduler)
    counts = torch.bincount(y_fit, minlength=len(config["classes"]))
    weight = train.class_weights_from_counts(counts).to(trial_dev) if config["class_weights"] else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    augment = batch_transform(train=config["augment"] > 0, flip=config["augment"] > 0,
                              degrees=float(config["augment"])).to(trial_dev)
    normalise = batch_transform(train=False).to(trial_dev)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=128)
    scaler = env.grad_scaler(trial_amp, trial_dev)      # fp16 GPUs only; None elsewhere
    for epoch in range(first_epoch, config["max_epochs"] + 1):
        torch.manual_seed(config["seed"] * 1000 + epoch)    # augmentation and dropout: the same draws after a resume
        loader = DataLoader(TensorDataset(x_fit, y_fit), batch_size=config["batch_size"], shuffle=True,
                            generator=torch.Generator().manual_seed(config["seed"] + epoch))
        stats = train.train_one_epoch(model, loader, optimizer, loss_fn, device=trial_dev, transform=augment,
                                      amp_dtype=trial_amp, scaler=scaler, scheduler=scheduler, progress=False)
        val = train.evaluate(model, val_loader, loss_fn, device=trial_dev, transform=normalise,
                             amp_dtype=trial_amp, return_outputs=True)
        scores = {"epoch": epoch, "loss": stats["loss"], "val_loss": val["loss"], "val_acc": val["acc"],
                  "val_balanced_acc": float(balanced_accuracy_score(val["y_true"], val["y_pred"])),
                  "seconds": stats["seconds"]}
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, model, optimizer, scheduler, epoch)
            tune.report(scores, checkpoint=tune.Checkpoint.from_directory(folder))


# %% [markdown]
# ### The search space and the scheduler
# Five hyperparameters: the learning rate on a **log scale** (1e-4 and 1e-3 are as far apart as 1e-3 and
# 1e-2), the batch size, AdamW's weight decay (log scale too), class weights in the loss on or off, and the
# augmentation strength (the largest rotation in degrees, with random flips; 0 = none). The rest of the
# config is fixed and travels with every trial.
#
# **ASHA** (asynchronous successive halving) lets every trial train `grace_period` epochs, then, at each
# *rung* (epoch `grace_period`, `2·grace_period`, `4·grace_period`, …), stops a trial whose validation
# balanced accuracy (`val_balanced_acc`) is not in the top half of what trials reached at that rung. Good trials get the epochs;
# bad ones stop early. Each trial takes one CPU (and a share of the GPU, when there is one), so on two cores
# two trials run at once.

# %%
search_space = {
    "lr": tune.loguniform(1e-4, 3e-3),
    "batch_size": tune.choice([16, 32, 64]),
    "weight_decay": tune.loguniform(1e-6, 1e-2),
    "class_weights": tune.choice([False, True]),
    "augment": tune.choice([0, 10, 20]),
    # fixed for every trial
    "max_epochs": cfg.max_epochs, "image_size": cfg.image_size, "classes": classes, "seed": cfg.seed,
    "device": str(dev), "threads": 1,
}
concurrent = max(1, min(cfg.num_samples, int(ray.cluster_resources().get("CPU", 1))))
resources = {"cpu": 1, "gpu": 1 / concurrent if dev.type == "cuda" else 0}
trainable = tune.with_resources(tune.with_parameters(train_trial, data=(fit_x, fit_y, val_x, val_y)), resources)
scheduler = ASHAScheduler(max_t=cfg.max_epochs, grace_period=cfg.grace_period, reduction_factor=2)

# %% [markdown]
# ### Run it — or resume it
# The search lives in `results/07_serve/tune/sweep-<key>/`. The key is a hash of everything the search
# depends on: the **search space** as written above (every range, choice and sampler, and the fixed values —
# `max_epochs`, `image_size`, the **device**), a fingerprint of the **data** (the bytes of the tune-train and
# validation images and labels, so another `data_dir`, image size or split gives another key), the data
# folder, ASHA's settings and `num_samples`. If a run with the same key was interrupted (a closed laptop, a
# killed kernel), `Tuner.restore` picks it up: finished trials are kept, not re-run; unfinished ones continue
# from their last checkpoint. Run this cell twice and the second time it only reads the finished search
# back; edit a range and it starts a new search. The key does not see edits to the *code* of `train_trial`:
# after changing it, delete that sweep's folder (the key is written beside it as JSON).

# %%
sweep_key = {"space": search.describe_space(search_space), "data": search.fingerprint(fit_x, fit_y, val_x, val_y),
             "data_dir": str(ds.root), "validation_split": validation_split, "num_samples": cfg.num_samples,
             "asha": {"max_t": cfg.max_epochs, "grace_period": cfg.grace_period, "reduction_factor": 2}}
sweep_path = out_dir / "tune" / search.sweep_name(sweep_key)
sweep_path.parent.mkdir(parents=True, exist_ok=True)
with atomic_path(sweep_path.with_suffix(".json")) as tmp:
    tmp.write_text(json.dumps(sweep_key, indent=1, default=str))
if tune.Tuner.can_restore(str(sweep_path)):
    print(f"resuming the search in {sweep_path.name}: finished trials are kept, unfinished ones continue")
    tuner = tune.Tuner.restore(str(sweep_path), trainable, resume_errored=True, param_space=search_space)
else:
    tuner = tune.Tuner(
        trainable, param_space=search_space,
        tune_config=tune.TuneConfig(metric="val_balanced_acc", mode="max", num_samples=cfg.num_samples,
                                    scheduler=scheduler, max_concurrent_trials=concurrent,
                                    search_alg=BasicVariantGenerator(random_state=cfg.seed)),
        run_config=tune.RunConfig(storage_path=str(sweep_path.parent), name=sweep_path.name, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
tick = time.perf_counter()
grid = tuner.fit()
tune_seconds = time.perf_counter() - tick
print(f"{sweep_path.name}: {len(grid)} trials in {tune_seconds:.0f} s; errors: {grid.num_errors}")

# %% [markdown]
# ### The trials table
# One row per trial: its hyperparameters, how many epochs it trained (`epochs`: fewer than `max_epochs`
# means ASHA stopped it), its last and best validation balanced accuracy and the epoch of the best. Saved as
# `results/07_serve/trials.csv`.

# %%
hyper = ["lr", "batch_size", "weight_decay", "class_weights", "augment"]
rows, curves = [], {}
for i, res in enumerate(grid):
    hist = res.metrics_dataframe
    if res.error is not None or hist is None or hist.empty:
        print(f"trial {i} failed: {res.error}")
        continue
    curves[i] = hist
    top_epoch, top_score = search.best_epoch(hist, "val_balanced_acc")
    rows.append({"trial": i, **{h: res.config[h] for h in hyper}, "epochs": int(hist["epoch"].max()),
                 "stopped_early": int(hist["epoch"].max()) < cfg.max_epochs,
                 "last_val_balanced_acc": float(hist["val_balanced_acc"].iloc[-1]),
                 "best_val_balanced_acc": top_score, "best_epoch": top_epoch,
                 "seconds": float(hist["seconds"].sum())})
trials = pd.DataFrame(rows).set_index("trial").sort_values("best_val_balanced_acc", ascending=False)
trials_csv = out_dir / "trials.csv"
with atomic_path(trials_csv) as tmp:
    trials.to_csv(tmp)
display(trials.round({"lr": 5, "weight_decay": 6, "last_val_balanced_acc": 3, "best_val_balanced_acc": 3, "seconds": 1}))

# %% [markdown]
# ### Each trial's curve
# Validation balanced accuracy per epoch; a cross marks where ASHA stopped a trial. The dotted line is
# what any constant answer scores (1 / number of classes).

# %%
fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
for i, hist in curves.items():
    line, = ax.plot(hist["epoch"], hist["val_balanced_acc"], marker="o", ms=3, label=f"trial {i}")
    if trials.loc[i, "stopped_early"]:
        ax.plot(hist["epoch"].iloc[-1], hist["val_balanced_acc"].iloc[-1], "x", ms=12, mew=2.5, color=line.get_color())
ax.axhline(1 / len(classes), color="grey", ls=":", label="chance")
ax.set(xlabel="epoch", ylabel="validation balanced accuracy", title="Tune trials (× = stopped by ASHA)")
ax.legend(fontsize=7, ncol=2)
plotting.save_figure(fig, out_dir / "trials.png");

# %% [markdown]
# ## 7. Re-train the chosen trial, score it on test
# The chosen trial is the one with the best validation balanced accuracy at **any** epoch
# (`get_best_result(scope="all")`), and it was chosen **at that epoch**: re-training it for `max_epochs`
# would be another model than the one chosen. So its hyperparameters are re-trained for exactly that many
# epochs — the same cosine schedule over `max_epochs`, stopped where the chosen trial stood — on the
# **whole** training split (tune-train + validation, a quarter more images per epoch), then scored on the
# test split, once.
#
# **The selection score is optimistic.** It is the maximum over all trials × epochs of a noisy score on a few
# hundred validation images: chosen *because* it came out high, it overstates what the configuration does on
# new images (the winner's curse). The honest estimate is the test score below.

# %%
best = grid.get_best_result(metric="val_balanced_acc", mode="max", scope="all")
best_config = {h: best.config[h] for h in hyper}
chosen_epoch, selection_score = search.best_epoch(best.metrics_dataframe, "val_balanced_acc")
print("chosen configuration:", best_config)
print(f"chosen at epoch {chosen_epoch} of {cfg.max_epochs}: validation balanced accuracy {selection_score:.3f} — "
      f"optimistic (the maximum over {len(trials)} trials × up to {cfg.max_epochs} epochs on {len(val_y)} images)")

torch.manual_seed(cfg.seed)
model = AlzheimerCNN(num_classes=len(classes), image_size=cfg.image_size).to(dev)
optimizer = torch.optim.AdamW(model.parameters(), lr=best_config["lr"], weight_decay=best_config["weight_decay"])
steps_per_epoch = math.ceil(len(all_y) / best_config["batch_size"])
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs * steps_per_epoch)
weight = (train.class_weights_from_counts(torch.bincount(all_y, minlength=len(classes))).to(dev)
          if best_config["class_weights"] else None)
loss_fn = nn.CrossEntropyLoss(weight=weight)
augment = batch_transform(train=best_config["augment"] > 0, flip=best_config["augment"] > 0,
                          degrees=float(best_config["augment"])).to(dev)
normalise = batch_transform(train=False).to(dev)
history, scaler = [], env.grad_scaler(amp_dtype, dev)
for epoch in range(1, chosen_epoch + 1):
    torch.manual_seed(cfg.seed * 1000 + epoch)
    loader = ds.loader("train", batch_size=best_config["batch_size"], seed=cfg.seed + epoch)
    stats = train.train_one_epoch(model, loader, optimizer, loss_fn, device=dev, transform=augment, amp_dtype=amp_dtype,
                                  scaler=scaler, scheduler=scheduler, desc=f"epoch {epoch}/{chosen_epoch}")
    history.append({"epoch": epoch, "loss": stats["loss"], "acc": stats["acc"], "seconds": stats["seconds"],
                    "images_per_s": stats["images_per_s"], "lr": scheduler.get_last_lr()[0]})
model = model.cpu().eval()
state_fp32 = {k: v.detach().clone() for k, v in model.state_dict().items()}

# %% tags=["nbval-check-output", "labkit-result"]
pred_fp32, probs_fp32 = compress.predict(model, test_x, normalise.cpu())
final = metrics.summarize(test_y, pred_fp32, num_classes=len(classes), train_labels=all_y)
print(f"chosen configuration re-trained ({chosen_epoch} epochs), on test: accuracy {final['acc']:.2f}, balanced accuracy "
      f"{final['balanced_acc']:.2f}, macro-F1 {final['macro_f1']:.2f}, majority-class rate {final['majority_rate']:.2f}")

# %% [markdown]
# ## 8. Compress: int8 and `torch.export`
# **Which layers does int8 touch?** torchao's `Int8DynamicActivationInt8WeightConfig` quantizes the
# **linear** layers: their weights are stored as int8 (one scale per output row), and at run time each
# activation batch is quantized to int8 on the fly, multiplied in integers, and scaled back. The
# convolutions stay fp32. The next cell counts where the parameters sit: in this CNN most *bytes* are in the
# first linear layer (256·(S/16)² × 512 weights), but most *compute* is in the convolutions — so expect the
# file to shrink a lot and the latency to move little (or even grow: quantizing activations costs time too).
# Measure it.
#
# `torch.export` captures the fp32 model as a graph (an `ExportedProgram`, saved as `.pt2`) that runs without
# the Python class — what a serving runtime or an ahead-of-time compiler takes. It is not smaller; it is
# portable. Latency: median of a few timed calls after warm-up, one thread, per image, **at the batch sizes the
# endpoint will run** — `@serve.batch` forms batches of 1 up to `max_batch_size` images, so we time 1, 4, 16, …,
# `max_batch_size`.

# %%
print(pd.Series(compress.layer_kinds(model), name="parameters").to_string())
variants = {"fp32": model}
if cfg.quantize:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    model_int8 = copy.deepcopy(model)
    quantize_(model_int8, Int8DynamicActivationInt8WeightConfig())
    variants["int8 (torchao, linear layers)"] = model_int8
example = normalise.cpu()(test_x[:2])
exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))

files = {"fp32": out_dir / "model_fp32.pt", "int8 (torchao, linear layers)": out_dir / "model_int8.pt",
         "fp32 (torch.export)": out_dir / "model_fp32.pt2"}
served_sizes = sorted({1, cfg.max_batch_size, *(4 ** i for i in range(1, 6) if 4 ** i < cfg.max_batch_size)})
timing_batch = normalise.cpu()(test_x[:cfg.max_batch_size].repeat(-(-cfg.max_batch_size // len(test_x)), 1, 1, 1)
                               [:cfg.max_batch_size])
rows, preds = [], {}
for name, fn in [*variants.items(), ("fp32 (torch.export)", exported.module())]:
    size = (compress.size_on_disk(exported, files[name], save=torch.export.save) if name.endswith("export)")
            else compress.size_on_disk(fn.state_dict(), files[name]))
    preds[name], _ = compress.predict(fn, test_x, normalise.cpu())
    rows.append({"model": name, "size MB": size,
                 **{f"ms / image, batch {b}": compress.latency_ms(fn, timing_batch[:b], repeats=10 if b == 1 else 5)
                    for b in served_sizes},
                 "test balanced acc": balanced_accuracy_score(test_y.numpy(), preds[name]),
                 "agrees with fp32": compress.agreement(preds[name], pred_fp32)})
quant_table = pd.DataFrame(rows).set_index("model")
quant_csv = out_dir / "quantization.csv"
with atomic_path(quant_csv) as tmp:
    quant_table.to_csv(tmp)
display(quant_table.round(3))

# %% [markdown]
# **Read the table.** The int8 file is smaller by about the share of parameters in linear layers times ¾.
# Latency on a CPU depends on whether it has fast int8 instructions (VNNI/AMX): on one without them the extra
# quantize/dequantize steps can make int8 *slower*. The agreement column says how often int8 and fp32 predict
# the same class on the test images; test balanced accuracy says whether that matters.
#
# **The model we serve**: int8 only if it is faster per image at **every** batch size the endpoint can form
# (1 … `max_batch_size`: which ones it forms depends on the load, unknown until section 10 measures it) and
# agrees with fp32 on at least 95 % of the test images; otherwise fp32. Section 10 checks the decision again
# at the batch sizes that actually formed.

# %%
int8_name = "int8 (torchao, linear layers)"
timing_cols = [f"ms / image, batch {b}" for b in served_sizes]
if cfg.quantize:
    speedup = quant_table.loc["fp32", timing_cols] / quant_table.loc[int8_name, timing_cols]
    print("int8 speed-up per image (fp32 time / int8 time): "
          + ", ".join(f"batch {b} ×{v:.2f}" for b, v in zip(served_sizes, speedup)))
serve_int8 = bool(cfg.quantize and (speedup > 1).all() and quant_table.loc[int8_name, "agrees with fp32"] >= 0.95)
print(f"serving: {'int8' if serve_int8 else 'fp32'}")

# %% [markdown]
# ## 9. Serve
# ### The deployment
# A Ray Serve *deployment* is a class; Serve runs `num_replicas` copies of it (each a Ray actor) behind one
# HTTP proxy. `__call__` gets each HTTP request: it decodes and validates the body with
# `labkit.labs.tune_serve.serving.decode_request`, which raises a `RequestError` with a 4xx status and a message naming the
# problem (empty body, body over the size limit, not JSON, not an image, wrong size) — the replica answers
# with that status and carries on.
#
# `@serve.batch` turns `predict` into a batching point: calls from concurrent requests wait up to
# `batch_wait_timeout_s` in a queue, and `predict` gets a **list** of up to `max_batch_size` images and
# runs them as **one** forward pass. `set_max_batch_size` changes the limit per deployment, so the same class
# serves with batching and (with a limit of 1) without. Each answer also says the size of the batch each of
# its images rode in (`batch_sizes`): the load test reads them to show which batches actually formed.

# %%
endpoint_answer = lab07.top_k_answer_for_run(top_k_answer)     # yours, or the reference while it is a stub


@serve.deployment
class AlzheimerClassifier:
    def __init__(self, state: dict, image_size: int, classes: list[str], int8: bool, max_batch_size: int,
                 batch_wait_timeout_s: float, k: int = 3, max_bytes: int = serving.MAX_BODY_BYTES):
        torch.set_num_threads(1)
        self.model = AlzheimerCNN(num_classes=len(classes), image_size=image_size)
        self.model.load_state_dict(state)
        self.model.eval()
        if int8:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            quantize_(self.model, Int8DynamicActivationInt8WeightConfig())
        self.normalise = batch_transform(train=False)
        self.image_size, self.classes, self.k, self.max_bytes = image_size, classes, k, max_bytes
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict(self, images: list[torch.Tensor]) -> list[tuple[list[float], int]]:
        with torch.inference_mode():
            probs = self.model(self.normalise(torch.stack(images))).float().softmax(1)
        return [(p, len(images)) for p in probs.tolist()]     # one answer per call, in order; and the batch size

    async def __call__(self, request: Request):
        body = await request.body()
        try:
            images = serving.decode_request(body, self.image_size, self.max_bytes)
        except serving.RequestError as err:
            return JSONResponse(err.answer(), status_code=err.status)
        answers = await asyncio.gather(*(self.predict(image) for image in images))
        return {"predictions": [endpoint_answer(p, self.classes, self.k) for p, _ in answers],
                "batch_sizes": [size for _, size in answers]}


# %% [markdown]
# ### Start Serve on 127.0.0.1 and deploy
# HTTP listens on the loopback address only, on a free port. One Serve *application* per configuration we
# will compare — `replicas` replicas with batching on and off (does batching help?), and 1 replica with
# batching (does a second replica help?) — all deployed at once with `serve.run_many`, each on its own route;
# `/classify` is the one with `replicas` replicas and batching. A replica may hold `max_ongoing_requests`
# requests at a time: 2 × `max_batch_size`, so a batch can fill while the previous one runs. Replicas reserve
# a share of a CPU each: only one configuration is under load at a time.

# %%
port = serving.free_port()
quiet = {"log_level": "WARNING", "enable_access_log": False}     # no log line per request
serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
ray_stack.callback(serve.shutdown)          # closed before Ray itself, in the last cell
base = f"http://127.0.0.1:{port}"
configs = list(dict.fromkeys([(cfg.replicas, True), (cfg.replicas, False), (1, True)]))   # (replicas, batching)
cpus = ray.cluster_resources().get("CPU", 1)
replica_cpus = min(1.0, cpus / (2 * sum(n for n, _ in configs)))   # a reservation, not a limit: leaves room


def app_for(num_replicas: int, batch: bool):
    """The classifier application with `num_replicas` replicas, batching on or off."""
    return AlzheimerClassifier.options(
        num_replicas=num_replicas, max_ongoing_requests=2 * cfg.max_batch_size,
        ray_actor_options={"num_cpus": replica_cpus},
    ).bind(state_fp32, cfg.image_size, classes, serve_int8, cfg.max_batch_size if batch else 1,
           cfg.batch_wait_timeout_s if batch else 0.0)


def route(num_replicas: int, batch: bool) -> str:
    """The URL path of one configuration's application."""
    return "/classify" if (num_replicas, batch) == (cfg.replicas, True) else f"/r{num_replicas}-{'batch' if batch else 'single'}"


tick = time.perf_counter()
serve.run_many([serve.RunTarget(app_for(n, b), name=route(n, b).strip("/"), route_prefix=route(n, b), logging_config=quiet)
                for n, b in configs])
url = base + "/classify"
print(f"{len(configs)} applications, {sum(n for n, _ in configs)} replicas up in {time.perf_counter() - tick:.1f} s; "
      f"the endpoint: {url}")

# %% [markdown]
# ### The client
# A client sends real test images as base64 PNG in JSON and reads the answer. First one image per request,
# then three in one request.

# %%
for i in range(3):
    status, answer = serving.post(url, serving.request_body([test_x[i]]))
    top = answer["predictions"][0]
    print(f"HTTP {status}  true: {classes[int(test_y[i])]:<17} answered: {top['class']:<17} "
          + ", ".join(f"{e['class']} {e['probability']:.2f}" for e in top["top_k"]))
status, answer = serving.post(url, serving.request_body(list(test_x[:3])))
print(f"one request, three images: HTTP {status}, classes {[p['class'] for p in answer['predictions']]}, "
      f"batch sizes {answer['batch_sizes']}")

# %% [markdown]
# ### Bad requests
# A server that falls over on one malformed request is down for everyone. Each of these gets a 4xx answer
# with a message saying what was wrong — and the last line shows the endpoint still answers.

# %%
wrong_size = torch.zeros(1, cfg.image_size // 2, cfg.image_size // 2, dtype=torch.uint8)
bad = {"not an image": json.dumps({"image": "aGVsbG8gd29ybGQ="}).encode(),
       "wrong size": serving.request_body([wrong_size]),
       "empty body": b"",
       "not JSON": b"hello",
       f"huge body (> {serving.MAX_BODY_BYTES // 2**20} MiB)": b"x" * (serving.MAX_BODY_BYTES + 1)}
for what, body in bad.items():
    status, answer = serving.post(url, body)
    print(f"{what:<22} HTTP {status}: {answer.get('error')}")
status, answer = serving.post(url, serving.request_body([test_x[0]]))
print(f"{'a good one afterwards':<22} HTTP {status}: {answer['predictions'][0]['class']}")

# %% [markdown]
# ## 10. Load test: replicas and batching
# **Predict, then run.** Requests arrive faster than one replica answers them one by one: does `@serve.batch`
# raise the requests/s the endpoint sustains, and what does it do to latency? Does a second replica help, on a
# machine with two cores?
#
# **Open loop.** A load test with N clients that each wait for an answer before sending again (a *closed*
# loop) slows down with the server: when answers take long, fewer requests are sent, and the slow moments are
# under-sampled (*coordinated omission*). Users do not wait for each other. `labkit.labs.tune_serve.serving.load_test`
# sends `load_requests` requests at times drawn in advance — Poisson arrivals, as independent users make —
# whatever the server does, and measures each latency from the request's **scheduled** time. Up to
# `2 × replicas × max_batch_size` requests may be open at once (at least `replicas × max_batch_size`, so every
# replica's batches can fill). Requests whose turn comes after the time cap are not sent, and the table says how
# many (`cut`); nothing is hidden in an `ok/requests` ratio.
#
# **Two measurements per configuration**, after a few warm-up requests. A **burst** (`replicas × max_batch_size`
# requests at once) measures its *capacity*: the most answers per second it gives. Then the open-loop
# run offers every configuration the **same** rate — 80 % of the capacity of `/classify` (batching, `replicas`
# replicas), the first one measured — and measures latency. A configuration that cannot keep up with that rate
# answers fewer requests per second than offered, and its latencies grow while the run lasts.

# %%
bodies = [serving.request_body([img]) for img in test_x[:32]]
in_flight = 2 * cfg.replicas * cfg.max_batch_size
load_rows, formed, rate = [], [], None
for n, batch in configs:                      # /classify first: its capacity sets the rate offered to all
    target = base + route(n, batch)
    serving.load_test(target, bodies, requests=8, rate_per_s=math.inf, max_in_flight=8)          # warm-up
    burst = serving.load_test(target, bodies, requests=cfg.replicas * cfg.max_batch_size, rate_per_s=math.inf,
                              max_in_flight=in_flight)
    if rate is None:
        rate = 0.8 * burst.requests_per_s
        time_cap = max(30.0, 3 * cfg.load_requests / rate)
        print(f"offered to every configuration: {rate:.0f} requests/s (Poisson), at most {in_flight} in flight, "
              f"time cap {time_cap:.0f} s")
    res = serving.load_test(target, bodies, requests=cfg.load_requests, rate_per_s=rate, seed=cfg.seed,
                            max_in_flight=in_flight, time_limit_s=time_cap)
    load_rows.append(res.row(replicas=n, batching=batch, capacity_per_s=burst.requests_per_s))
    formed += [{"replicas": n, "batching": batch, "batch_size": b} for b in res.batch_sizes]
    cut = f", {res.cut} cut by the time cap" if res.cut else ""
    print(f"{n} replica(s), batching {'on ' if batch else 'off'}: capacity {burst.requests_per_s:.0f} req/s; at the "
          f"offered rate {res.ok}/{res.requests} answered{cut}, p50 {res.p50_ms:.0f} ms, p95 {res.p95_ms:.0f} ms, "
          f"p99 {res.p99_ms:.0f} ms, {res.requests_per_s:.1f} req/s; batch size a request rode in: mean "
          f"{res.mean_batch_size:.1f}, largest {res.max_batch_formed}")
if cfg.load_requests < 200:
    print(f"only {cfg.load_requests} requests per configuration: p99 is about the slowest one or two of them, not a "
          f"percentile that means something (the full configuration sends 400)")
latency = pd.DataFrame(load_rows)
batch_sizes = pd.DataFrame(formed, columns=["replicas", "batching", "batch_size"]).value_counts().rename("requests").reset_index()
latency_csv, batch_csv = out_dir / "latency.csv", out_dir / "batch_sizes.csv"
for table, path in ((latency, latency_csv), (batch_sizes, batch_csv)):
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)

# %% [markdown]
# Latency percentiles at the offered rate, each configuration's capacity (burst) and what it answered per second
# against the rate offered to all, and the batches that formed: the share of requests that rode in a batch of
# each size.

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4), layout="constrained")
label = latency.apply(lambda r: f"{r.replicas} rep., {'batch' if r.batching else 'no batch'}", axis=1)
latency.assign(config=label).set_index("config")[["p50_ms", "p95_ms", "p99_ms"]].plot.bar(ax=axes[0], rot=0)
axes[0].set(ylabel="latency per request (ms)", title=f"latency percentiles ({cfg.load_requests} requests each)", xlabel="")
latency.assign(config=label).set_index("config").rename(columns={"capacity_per_s": "capacity (burst)",
    "requests_per_s": "at the offered rate"})[["capacity (burst)", "at the offered rate"]].plot.bar(ax=axes[1], rot=0)
axes[1].axhline(rate, color="black", ls="--", label=f"offered: {rate:.0f} req/s (Poisson)")
axes[1].set(ylabel="answered requests / s", title="throughput (loopback)", xlabel="")
axes[1].legend(fontsize=8)
for n, batch in configs:
    sizes = batch_sizes[(batch_sizes.replicas == n) & (batch_sizes.batching == batch)]
    if batch and len(sizes):
        axes[2].bar(sizes.batch_size + (0.2 if n == 1 else -0.2), sizes.requests / sizes.requests.sum(), width=0.4,
                    label=f"{n} rep., batch")
axes[2].set(xlabel="batch size formed", ylabel="share of requests", title=f"batches formed (max_batch_size {cfg.max_batch_size})")
axes[2].legend(fontsize=8)
plotting.save_figure(fig, out_dir / "latency.png");

# %% [markdown]
# **What the measurement says.** The next cell reads the table: capacity and latency with batching on and off
# at `replicas` replicas, and one replica against `replicas`. Then it checks the int8 decision of
# section 8 at the batch sizes `/classify` actually formed: model time per request, each request charged its
# batch's time per image (interpolated between the timed batch sizes).
#
# Batching pays off when one forward pass over *b* images costs much less than *b* passes; on a CPU with a
# small model, HTTP handling (JSON, base64, PNG decoding) can cost more than the model, and then batching
# changes little. It costs latency when the load is light (a request may wait `batch_wait_timeout_s` for
# company). A second replica helps only when there is a free core for it: on two cores the HTTP proxy, the
# load-test client and the replicas compete for the same CPUs.

# %%
def config_row(n: int, batch: bool) -> pd.Series:
    """The load-test row of one configuration."""
    return latency[(latency.replicas == n) & (latency.batching == batch)].iloc[0]


on, off = config_row(cfg.replicas, True), config_row(cfg.replicas, False)
print(f"batching at {cfg.replicas} replica(s), on vs off: capacity {on.capacity_per_s:.0f} vs {off.capacity_per_s:.0f} "
      f"req/s; at {rate:.0f} req/s offered: p50 {on.p50_ms:.0f} vs {off.p50_ms:.0f} ms, p99 {on.p99_ms:.0f} vs "
      f"{off.p99_ms:.0f} ms; {on.mean_batch_per_pass:.1f} images per forward pass on average")
if cfg.replicas != 1:
    one = config_row(1, True)
    print(f"{cfg.replicas} replicas vs 1 (batching on): capacity {on.capacity_per_s:.0f} vs {one.capacity_per_s:.0f} "
          f"req/s; p99 {on.p99_ms:.0f} vs {one.p99_ms:.0f} ms at the offered rate")
served_mix = batch_sizes[(batch_sizes.replicas == cfg.replicas) & batch_sizes.batching]
if cfg.quantize and len(served_mix):
    per_request = {name: np.average(np.interp(np.log2(served_mix.batch_size), np.log2(served_sizes),
                                              quant_table.loc[name, timing_cols].to_numpy(float)),
                                    weights=served_mix.requests)
                   for name in ("fp32", int8_name)}
    faster = "int8" if per_request[int8_name] < per_request["fp32"] else "fp32"
    print(f"model time per request at the batch sizes /classify formed: fp32 {per_request['fp32']:.2f} ms, int8 "
          f"{per_request[int8_name]:.2f} ms -> {faster} is faster there; served: {'int8' if serve_int8 else 'fp32'} "
          f"({'the decision holds' if (faster == 'int8') == serve_int8 else 'int8 would win at this mix, but was not faster at every batch size'})")
else:
    per_request = {}

# %% [markdown]
# ## 11. Save the run record, shut down Serve and Ray

# %%
record = results.RunRecord(lab="07_tune_serve", params={**dict(cfg), "precision": env.precision_name(amp_dtype)},
                           env={**env.environment(dev), "precision": env.precision_name(amp_dtype)},
                           data={**ds.describe(), "validation_images": len(val_y), "validation_split": validation_split}, epochs=history)
record.final = {"acc": final["acc"], "balanced_acc": final["balanced_acc"], "macro_f1": final["macro_f1"],
                "majority_rate": final["majority_rate"], "best_config": best_config,
                "selection_val_balanced_acc": selection_score, "selection_is_optimistic": True,
                "chosen_epoch": chosen_epoch, "validation_split": validation_split, "trials": len(trials),
                "stopped_early": int(trials["stopped_early"].sum()), "tune_seconds": tune_seconds,
                "served": "int8" if serve_int8 else "fp32",
                "quantization": quant_table.reset_index().to_dict("records"),
                "offered_rate_per_s": rate, "model_ms_per_request_at_served_mix": per_request,
                "latency": latency.to_dict("records")}
for path in [trials_csv, out_dir / "trials.png", quant_csv, latency_csv, batch_csv, out_dir / "latency.png",
             sweep_path.with_suffix(".json"), *files.values()]:
    if path.exists():
        record.add_artifact(path)
print("saved", results.save(record))
ray_stack.close()      # serve.shutdown(), then ray.shutdown()

# %% [markdown]
# ## Your exercises
# Each exercise's check above said ✔ or ✘; here they are together. When your notebook is graded (`labkit grade`),
# the same checks run again, with a few more the instructor keeps back.

# %%
from labkit.exercises import status_table
print(status_table())

# %% [markdown]
# ## Take-aways
# - A Tune trainable is your training loop plus `tune.report(metrics, checkpoint=...)`; the checkpoint is what
#   makes a trial resumable and a search restorable (`Tuner.restore`) after an interruption.
# - A checkpoint holds everything the next epoch depends on (weights, optimizer moments, schedule position,
#   epoch); then a resumed trial is the same trial.
# - Tune on a **validation** split that does not leak (split by subject, or by look-alike group when there
#   are no subject ids); re-train the chosen trial for the epochs at which it was chosen and score it on
#   test once. The selection score is optimistic — the maximum of many noisy scores.
# - ASHA spends epochs on promising trials and stops the rest early — the cheapest speed-up of a search.
# - Key a resumable search on everything it depends on (space, data, device), or an edit silently reads
#   back old results.
# - int8 quantization shrinks what it touches (here the linear layers); whether it is *faster* depends on
#   the hardware. Measure size, latency and agreement before you ship it.
# - A served model needs request validation with clear 4xx answers, batching where the model benefits, and an
#   open-loop load test (a schedule the server cannot slow down) that reports tail latency (p95/p99) from
#   enough requests, what was cut, and the batch sizes that actually formed.
