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
# # Lab 05 — Federated averaging on Ray: hospitals as clients
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/labkit-course/labkit/blob/main/labs/05_federated.ipynb)
#
# Hospitals rarely may pool patient images in one place. **Federated learning** trains one model anyway:
# the *model* travels to the data. Each client (a hospital) trains the current global model on its own
# patches for a while; a server averages the clients' weights into the next global model; repeat.
# That is **FedAvg** (McMahan et al., 2017). The source project ran it over Celery workers and Redis;
# here the clients are **Ray actors** and the weights travel through Ray's **object store**.
#
# **You will learn to**
# - write one FedAvg round yourself: broadcast with `ray.put`, train on every client, average the weights
#   **and the BatchNorm buffers**, weighted by sample counts — and survive a client that fails;
# - see what splitting the data by hospital (non-IID clients) does to FedAvg, next to IID clients and
#   centralized training;
# - compare what FedAvg sends per round with what DDP would all-reduce for the same training;
# - evaluate honestly: split by **patient**, not by patch — and measure how much a patch split flatters.
#
# **Run time**: quick mode (`quick=True`) ≈ 2 min on 2 CPU cores; the full configuration (10 rounds, 128 px)
# ≈ 30 min on 2 CPU cores.

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
import contextlib
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import ray
import torch

from labkit import distributed, env, metrics, params, plotting, results
from labkit.labs import federated
from labkit.data.breast import load_breast, saved_split
from labkit.files import atomic_path
from labkit.models.breast import BreastCancerCNN
from labkit.models.summary import count_parameters
from labkit.params import Rule

# %% [markdown]
# ## 1. Parameters
# The defaults are the source project's configuration (3 workers, 10 rounds, Adam 1e-3, 128 px) with a
# batch of 32 (the seed used 2). `split` decides who holds which patches: `"iid"` (a random share each),
# `"dirichlet"` (label-skewed, concentration `alpha`: smaller = more skewed) or `"hospital"` (disjoint groups
# of patients — the realistic one). `fail_client_at_round=N` makes the last client fail in round N.
# `quick=True` (or `LABKIT_QUICK=1`) shrinks data, image size and rounds.

# %% tags=["parameters"]
clients = 3
rounds = 10
local_epochs = 1
split = "hospital"            # "iid" | "dirichlet" | "hospital"
alpha = 0.5                   # Dirichlet concentration, used when split is dirichlet
image_size = 128
batch_size = 32
lr = 1e-3
data = "auto"                 # "auto": the real dataset when present, else a synthetic stand-in
data_dir = "data/breast"
quick = False
seed = 0
address = None                # a running Ray cluster, e.g. "ray://head:10001"; None starts a local one
fail_client_at_round = None   # e.g. 2: the last client fails in round 2
amp = "auto"                  # precision: "auto" (bf16 where the CPU runs it natively), "bf16", False

# %% [markdown]
# ## 2. Check the parameters
# Lab 05's own parameters get their rules here (`rules=`); the shared ones come from `labkit.params` and, for the
# Ray `address`, `labkit.distributed.RULES` (`check_cluster` sees that a cluster answers there).

# %% tags=["nbval-check-output"]
LAB_RULES = {
    "clients": Rule(int, 1, 64, help="federated clients (Ray actors), e.g. hospitals"),
    "rounds": Rule(int, 1, 1000, help="FedAvg rounds: broadcast, local training, average"),
    "local_epochs": Rule(int, 1, 100, help="passes over its own data each client makes per round"),
    "split": Rule(str, choices=federated.SPLITS, help="who holds which training patches"),
    "alpha": Rule(float, 0, 1e4, open_low=True, help="Dirichlet concentration for split='dirichlet'"),
    "fail_client_at_round": Rule(int, 1, 1000, optional=True, help="the last client fails in this round"),
}
cfg = params.check("05_federated", rules={**distributed.RULES, **LAB_RULES}, clients=clients, rounds=rounds, local_epochs=local_epochs,
                   split=split, alpha=alpha, image_size=image_size, batch_size=batch_size, lr=lr, data=data,
                   data_dir=data_dir, quick=quick, seed=seed, address=address,
                   fail_client_at_round=fail_client_at_round, amp=amp)
distributed.check_cluster(cfg)
env.seed_everything(cfg.seed)
dev = torch.device("cpu")            # the clients are CPU actors; so is the server's evaluation
dtype = env.amp_dtype(cfg.amp, dev)
channels_last = env.use_channels_last(dev, dtype)
out_dir = results.lab_dir("05_federated")

# %%
print(f"precision: {env.precision_name(dtype)} (forward passes under autocast on the CPU; weights, losses and "
      f"metrics in fp32), channels_last: {channels_last}")

# %% [markdown]
# ## 3. The data: patches, patients, and a split made once
# The public IDC set holds 50×50 H&E patches of breast tissue, one folder per **patient**
# (`<patient_id>/0/` benign, `<patient_id>/1/` invasive ductal carcinoma, about 28 % positive); the seed
# project's data was just `0/` and `1/`. labkit reads both. When neither is there it writes a **synthetic
# stand-in in the IDC layout** and says so loudly: generated pictures with stained tissue and nuclei, each
# patient with its own stain tint and positive rate — not medical images.
#
# The split into train / validation / test is made **once, by patient** (stratified by positive rate) and
# saved as JSON next to the cache: every run and every client sees the same one.

# %%
ds = load_breast(data=cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size,
                 max_patches=cfg.get("max_patches"), seed=cfg.seed)
level = "patient" if ds.patients is not None else "patch"
if level == "patch":
    print(f"NOTE: {ds.root} ({ds.layout} layout) has no patient ids: the split is by patch, and patients may sit "
          "on both sides of it (see section 9). split='hospital' needs patient ids.")
parts = saved_split(ds, level, seed=cfg.seed)
patients = np.asarray(ds.patients) if ds.patients is not None else None
train_x, train_y = ds.images[parts["train"]], ds.labels[parts["train"]]
val_x, val_y = ds.images[parts["val"]], ds.labels[parts["val"]]
test_x, test_y = ds.images[parts["test"]], ds.labels[parts["test"]]

# %% tags=["nbval-check-output"]
summary = pd.DataFrame([{"split": s, "patches": len(parts[s]), "IDC": int(ds.labels[parts[s]].sum()),
                         "IDC %": round(100 * float(ds.labels[parts[s]].float().mean()), 1),
                         "patients": len(set(patients[parts[s]])) if patients is not None else "?"}
                        for s in ("train", "val", "test")]).set_index("split")
print(f"layout: {ds.layout}   synthetic stand-in: {ds.synthetic}   split by: {level}   "
      f"image tensor: {tuple(ds.images.shape[1:])}")
print(summary.to_string())

# %%
display(ds.patient_table().describe().round(1))
plotting.plot_samples(train_x, train_y, list(ds.classes), out_dir / "samples.png");

# %% [markdown]
# ## 4. The model
# The seed's `BreastCancerCNN`: conv 128 → pool → BatchNorm → dropout; conv 64 → pool → BatchNorm → dropout;
# conv 32 (2×2) → BatchNorm; dense 64 → 16 → **1 logit**, trained with `BCEWithLogitsLoss`.
# Look at its `state_dict`: besides weights and biases, each BatchNorm layer holds `running_mean`,
# `running_var` and an **integer** `num_batches_tracked`. FedAvg must average those too.

# %% tags=["nbval-check-output"]
def new_model() -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = BreastCancerCNN(cfg.image_size)
    return model.to(memory_format=torch.channels_last) if channels_last else model


model = new_model()
state = model.state_dict()
print(f"BreastCancerCNN at {cfg.image_size} px: {count_parameters(model):,} parameters; state_dict: "
      f"{len(state)} tensors, {federated.state_bytes(state) / 1e6:.2f} MB")
print(pd.DataFrame([{"key": k, "shape": tuple(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in state.items() if k.startswith("features.3.")]).to_string(index=False))

# %% [markdown]
# ## 5. FedAvg vs DDP
# | | DDP (Labs 02–03) | FedAvg (this lab) |
# |---|---|---|
# | what travels | **gradients**, every step (all-reduce) | **weights**, once per round |
# | how often | every batch | after `local_epochs` of local training |
# | data | any worker may read any sample | each client only ever sees its own shard |
# | replicas | identical after every step | drift apart during a round, averaged at its end |
#
# With IID shards and one step per round FedAvg *is* synchronous SGD; with many local steps on
# non-IID shards (hospitals) the clients drift towards their own data and the average is a compromise.
#
# ## 6. Exercise — the FedAvg average
# Write the server's aggregation: given the clients' `state_dict`s and their sample counts `n_k`, return
# the new global `state_dict` with every entry equal to `sum_k n_k * w_k / sum_k n_k`. Every entry: the
# BatchNorm buffers too. `num_batches_tracked` is an integer: average it as well, round, and keep its dtype.
# Do not change the clients' tensors in place.

# %%
def fedavg(states: list[dict[str, torch.Tensor]], num_samples: list[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted average of the clients' state_dicts (parameters and buffers)."""
    # BEGIN SOLUTION
    total = float(sum(num_samples))
    out = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, n in zip(states, num_samples):
            acc += state[key].to(torch.float64) * (n / total)
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return out
    # END SOLUTION


# %% tags=["nbval-check-output"]
from labkit.exercises.lab05 import check_fedavg
check_fedavg(fedavg)

# %% [markdown]
# ## 7. Start Ray and the clients
# One Ray start for the whole lab (`labkit.distributed.ray_cluster`: a local cluster sized to this machine,
# or `address`; shut down in the last cell, and when the kernel exits). Each client is a **Ray actor**: a
# process of its own that keeps its shard and its model between calls — `labkit.labs.federated.FedClient`,
# with its own torchvision v2 augmentation (flips, 90° turns, colour jitter) and the precision above.

# %%
ray_stack = contextlib.ExitStack()
cluster = ray_stack.enter_context(distributed.ray_cluster(cfg.address))
actors = federated.remote_clients(cfg.clients, cfg.image_size, amp=cfg.amp, batch_size=cfg.batch_size,
                                  seed=cfg.seed, fail_client=cfg.clients - 1,
                                  fail_at_round=cfg.fail_client_at_round)
print(f"Ray {cluster['ray']}: {cluster['cpus']} CPU(s), started in {cluster['init_seconds']:.1f} s; "
      f"{len(actors)} client actors")

# %% [markdown]
# ## 8. The FedAvg round, on Ray
# Read this cell: it is the whole algorithm.
# 1. `ray.put(global_state)` puts the global weights into the object store **once**; every client gets the
#    reference and reads the same copy (on one machine without copying it at all).
# 2. `actor.fit.remote(...)` starts local training on every client at once and returns futures.
# 3. `federated.collect_updates` waits for them; a client that raised is **left out of this round** with a
#    warning naming it — the round still completes with the others, and nothing averaged before is lost.
# 4. `fedavg` (your exercise) averages what came back, weighted by each client's sample count.
# 5. The server scores the new global model on the validation patches, appends one row to
#    `results/05_federated/metrics.csv`, and keeps the best round's weights.

# %%
csv_path = out_dir / "metrics.csv"
csv_path.unlink(missing_ok=True)      # one file per run of the lab; the run record keeps them all too
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())


def score(model, images, labels) -> dict:
    return federated.evaluate_binary(model, images, labels, dtype=dtype, channels_last=channels_last)


def log_round(experiment: str, round_: int, m: dict, extra: dict) -> dict:
    row = {"experiment": experiment, "round": round_, **extra, **{f"val_{k}": m[k] for k in federated.METRICS}}
    federated.append_csv(csv_path, row)
    return row


def run_fedavg(name: str, shards: list[np.ndarray]) -> tuple[torch.nn.Module, list[dict]]:
    """FedAvg with one client per shard (indices into the training split); returns the best round's model."""
    ray.get([a.load_shard.remote(train_x[idx], train_y[idx]) for a, idx in zip(actors, shards)])
    names = [f"client {k}" for k in range(len(shards))]
    global_model, history = new_model(), []
    best = (-1.0, 0, None)
    for r in range(1, cfg.rounds + 1):
        tick = time.perf_counter()
        global_state = {k: v.contiguous() for k, v in global_model.state_dict().items()}
        ref = ray.put(global_state)                                                     # 1. broadcast once
        futures = [a.fit.remote(ref, r, cfg.local_epochs, cfg.lr) for a in actors]      # 2. train everywhere
        updates, failed = federated.collect_updates(futures, names)                     # 3. skip failures
        if updates:
            new_state = fedavg([u["state"] for u in updates], [u["num_samples"] for u in updates])   # 4.
            global_model.load_state_dict(new_state)
        m = score(global_model, val_x, val_y)                                           # 5. validate, log
        sent = federated.state_bytes(global_state) * (len(actors) + len(updates))       # out to all, back from ok
        steps = cfg.local_epochs * -(-len(train_y) // (cfg.batch_size * len(actors)))
        row = log_round(name, r, m, {
            "clients_ok": len(updates), "failed": ";".join(failed),
            "train_loss": float(np.mean([u["loss"] for u in updates])) if updates else float("nan"),
            "bytes_sent": sent, "ddp_bytes": federated.ddp_allreduce_bytes(param_bytes, len(actors), steps),
            "seconds": time.perf_counter() - tick})
        history.append(row)
        print(f"{name:>9} round {r}: val loss {m['loss']:.3f}  bal. acc {m['balanced_acc']:.3f}  "
              f"AUC {m['roc_auc']:.3f}  clients {len(updates)}/{len(actors)}  {row['seconds']:.1f} s")
        if m["balanced_acc"] > best[0]:
            best = (m["balanced_acc"], r, copy.deepcopy(global_model.state_dict()))
    global_model.load_state_dict(best[2])
    with atomic_path(out_dir / f"best_{name}.pt") as tmp:
        torch.save({"round": best[1], "state_dict": best[2]}, tmp)
    print(f"{name}: best round {best[1]} (val balanced accuracy {best[0]:.3f}), weights kept")
    return global_model, history


# %% [markdown]
# ### Centralized first: the reference
# One model trained on the pooled training patches for as many epochs as a client trains in all rounds
# (`rounds × local_epochs`): what FedAvg would reach if the hospitals *could* share their data.

# %%
def run_centralized(name: str, images: torch.Tensor, labels: torch.Tensor, val=(val_x, val_y)):
    model, history, best = new_model(), [], (-1.0, None)
    for epoch in range(1, cfg.rounds * cfg.local_epochs + 1):
        tick = time.perf_counter()
        loss = federated.train_epochs(model, images, labels, epochs=1, lr=cfg.lr, batch_size=cfg.batch_size,
                                      dtype=dtype, channels_last=channels_last, augment=federated.augmentation(),
                                      seed=cfg.seed + epoch)
        m = score(model, *val)
        history.append(log_round(name, epoch, m, {"clients_ok": 1, "failed": "", "train_loss": loss, "bytes_sent": 0,
                                                  "ddp_bytes": 0, "seconds": time.perf_counter() - tick}))
        if m["balanced_acc"] > best[0]:
            best = (m["balanced_acc"], copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[1])
    print(f"{name}: {len(history)} epochs, best val balanced accuracy {best[0]:.3f}")
    return model, history


torch.manual_seed(cfg.seed)
central_model, central_hist = run_centralized("central", train_x, train_y)

# %% [markdown]
# ### FedAvg with IID clients, then with clients split by hospital
# Same data, same rounds. First each client gets a random third of the training patches (IID); then
# the split chosen by `split` (default `"hospital"`: each client holds whole patients, with their own
# stain tint and positive rate). Look at each client's label mix in the histogram below.

# %%
shards = {"iid": federated.split_clients(train_y.numpy(), cfg.clients, "iid", seed=cfg.seed)}
shards[cfg.split] = federated.split_clients(
    train_y.numpy(), cfg.clients, cfg.split, alpha=cfg.alpha, seed=cfg.seed,
    patients=None if patients is None else list(patients[parts["train"]]))
fed_models, fed_hist = {}, {}
for name, shard in shards.items():
    fed_models[name], fed_hist[name] = run_fedavg(name, shard)

# %% tags=["nbval-check-output"]
mix = pd.DataFrame([{"split": name, "client": k, "patches": len(idx), "IDC": int(train_y[idx].sum()),
                     "IDC %": round(100 * float(train_y[idx].float().mean()), 1),
                     "patients": len(set(patients[parts["train"]][idx])) if patients is not None else None}
                    for name, shard in shards.items() for k, idx in enumerate(shard)])
print(mix.to_string(index=False))

# %% [markdown]
# ### Compare
# Validation balanced accuracy and ROC-AUC per round (an epoch, for centralized training), and each
# client's label histogram. The figure is saved as `results/05_federated/fedavg.png`.

# %%
curves = pd.read_csv(csv_path)
fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
for name, part in curves.groupby("experiment", sort=False):
    axes[0].plot(part["round"], part["val_balanced_acc"], marker="o", label=name)
    axes[1].plot(part["round"], part["val_roc_auc"], marker="o", label=name)
axes[0].set(title="validation balanced accuracy", xlabel="round (epoch for central)", ylim=(0.4, 1.0))
axes[1].set(title="validation ROC-AUC", xlabel="round (epoch for central)", ylim=(0.4, 1.0))
axes[0].axhline(0.5, color="grey", ls=":", label="chance")
axes[0].legend()
labels_per_client = mix.assign(benign=mix["patches"] - mix["IDC"]).set_index(["split", "client"])[["benign", "IDC"]]
labels_per_client.plot.bar(stacked=True, ax=axes[2], color=["tab:pink", "tab:purple"])
axes[2].set(title="each client's labels", xlabel="(split, client)", ylabel="patches")
plotting.save_figure(fig, out_dir / "fedavg.png");

# %% [markdown]
# ## Predict, then run — what does FedAvg send?
# **Predict** before running the next cell: per round, does FedAvg send more or fewer bytes than DDP
# would all-reduce for the same local training (one all-reduce of all gradients per step)? By how much?

# %%
fed_rows = curves[curves["experiment"] != "central"]
traffic = fed_rows.groupby("experiment", sort=False)[["bytes_sent", "ddp_bytes"]].mean() / 1e6
traffic.columns = ["FedAvg MB / round", "DDP MB / round"]
traffic["DDP / FedAvg"] = traffic["DDP MB / round"] / traffic["FedAvg MB / round"]
display(traffic.round(2))

# %% [markdown]
# **Discussion.** FedAvg sends the whole `state_dict` out to every client and back once per round: about
# `2 × clients × model size`. DDP all-reduces the gradients at **every step**: each worker sends about
# `2 (K−1)/K × model size` per step, and a round of local training is many steps — so DDP moves more data
# by roughly the number of steps per round. FedAvg buys that saving with accuracy: clients drift apart
# between averages, the more so the more their data differ (compare IID with hospital above).

# %% [markdown]
# ## 9. Honest evaluation: split by patch, or by patient?
# Patches from one patient share the stain, the tissue and the tumour's look. Split **by patch** and the
# test set holds patients the model trained on; split **by patient** and it meets new patients, as it
# would in a clinic. We train the same centralized model on a patch-level split and score both.
# Read the difference with its noise in mind: quick mode tests on only a handful of patients, so one easy
# or hard patient moves the patient-level score a lot. With more patients (the full configuration, or the
# real IDC set's 279) the patch-level score is the higher one: it is partly a memory of the patients.

# %%
if patients is not None:
    patch_parts = saved_split(ds, "patch", seed=cfg.seed)
    shared = set(patients[patch_parts["train"]]) & set(patients[patch_parts["test"]])
    patch_model, _ = run_centralized("central-patch", ds.images[patch_parts["train"]], ds.labels[patch_parts["train"]],
                                     val=(ds.images[patch_parts["val"]], ds.labels[patch_parts["val"]]))
    patch_test = score(patch_model, ds.images[patch_parts["test"]], ds.labels[patch_parts["test"]])
    patient_test = score(central_model, test_x, test_y)
    honesty = pd.DataFrame({"patch-level split": patch_test, "patient-level split": patient_test}).loc[
        ["balanced_acc", "roc_auc", "f1"]].astype(float)
    honesty.loc["patients in train and test"] = [len(shared), 0]
    inflation = float(patch_test["balanced_acc"] - patient_test["balanced_acc"])
    display(honesty.round(3))
    print(f"balanced accuracy, patch-level minus patient-level split: {inflation:+.3f} "
          f"({len(set(patients[parts['test']]))} test patients: a small test set is noisy, see below)")
else:
    inflation = None
    print("no patient ids in this dataset: the patch-versus-patient comparison needs the IDC layout.")

# %% [markdown]
# ## 10. Evaluate on the test patients
# The best round's FedAvg model of the chosen split, scored once on the held-out test patients, next to
# the majority-class rate (always answering "no IDC") and the other two runs.

# %% tags=["nbval-check-output", "labkit-result"]
final_model = fed_models[cfg.split]
test = score(final_model, test_x, test_y)
final = {**metrics.summarize(test["y_true"], test["y_pred"], 2, train_labels=train_y), "roc_auc": test["roc_auc"]}
print(f"FedAvg ({cfg.split}) on the test patients: accuracy {final['acc']:.2f}, balanced accuracy "
      f"{final['balanced_acc']:.2f}, macro-F1 {final['macro_f1']:.2f}, majority-class rate {final['majority_rate']:.2f}")

# %%
others = {"central": score(central_model, test_x, test_y), "iid": score(fed_models["iid"], test_x, test_y)}
display(pd.DataFrame({name: {k: m[k] for k in federated.METRICS} for name, m in
                      {**others, f"fedavg-{cfg.split}": test}.items()}).round(3))
print(f"ROC-AUC of FedAvg ({cfg.split}): {final['roc_auc']:.3f}")

# %% [markdown]
# ## 11. Save the run record and shut Ray down
# The record holds every round of every run (also in `metrics.csv`), the final test metrics and the traffic.

# %%
record = results.RunRecord(lab="05_federated", params={**dict(cfg), "precision": env.precision_name(dtype)},
                           env={**env.environment(dev, world_size=cfg.clients), "precision": env.precision_name(dtype)},
                           data={**ds.describe(), "split_level": level,
                                 "split_sizes": {s: len(v) for s, v in parts.items()}},
                           epochs=curves.to_dict("records"))
record.final = {"test_acc": final["acc"], "balanced_acc": final["balanced_acc"], "macro_f1": final["macro_f1"],
                "majority_rate": final["majority_rate"], "roc_auc": final["roc_auc"],
                "central_balanced_acc": others["central"]["balanced_acc"],
                "iid_balanced_acc": others["iid"]["balanced_acc"], "patch_split_inflation": inflation,
                "fedavg_mb_per_round": float(traffic["FedAvg MB / round"].iloc[-1]),
                "ddp_mb_per_round": float(traffic["DDP MB / round"].iloc[-1]),
                "precision": env.precision_name(dtype), "total_seconds": float(curves["seconds"].sum())}
for path in [out_dir / "samples.png", out_dir / "fedavg.png", csv_path, *(out_dir / f"best_{n}.pt" for n in shards)]:
    record.add_artifact(path)
print("saved", results.save(record))
ray_stack.close()      # ray.shutdown()

# %% [markdown]
# ## Take-aways
# - FedAvg moves **weights once per round**, DDP moves **gradients every step**: far less traffic, paid for
#   with client drift when the clients' data differ (hospitals).
# - Average **everything** in the `state_dict`, weighted by sample counts: BatchNorm's running statistics
#   and its integer counter are part of the model.
# - A federated server must expect clients to fail: leave them out of that round and carry on.
# - Split medical data **by patient**. A patch-level split lets the model meet the same patients at test
#   time and reports a number no clinic will see.
