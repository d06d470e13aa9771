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
#   weighted by sample counts with **pooled BatchNorm statistics** (or keep BatchNorm local: FedBN) — and
#   survive a client that fails or hangs (`ray.wait` with a timeout);
# - see what splitting the data by hospital (unequal sizes, each with its own stain) does to FedAvg, next to
#   IID clients and centralized training — and score the global model **per hospital**;
# - compare what FedAvg sends per round with what DDP would all-reduce for the same training;
# - evaluate honestly: one model scored on held-out patches of patients it has seen and on new patients.
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
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import ray
import torch
from sklearn.model_selection import train_test_split

from labkit import distributed, env, metrics, params, plotting, results
from labkit.labs import federated
from labkit.data.breast import has_patient_ids, load_breast, saved_split
from labkit.files import atomic_path
from labkit.models.breast import BreastCancerCNN
from labkit.models.summary import count_parameters
from labkit.params import Rule

# %% [markdown]
# ## 1. Parameters
# The defaults are the source project's configuration (3 workers, 10 rounds, Adam 1e-3, 128 px) with a
# batch of 32 (the seed used 2). `split` decides who holds which patches: `"iid"` (a random share each),
# `"dirichlet"` (label-skewed, concentration `alpha`: smaller = more skewed) or `"hospital"` (one client per
# hospital, hospitals of unequal size — the realistic one). `fail_client_at_round=N` makes the last client
# fail in round N: with `fail_mode="error"` it raises, with `"hang"` it answers two `client_timeout`s late (a
# straggler), and the server waits at most `client_timeout` seconds for a round's clients. `quick=True` (or `LABKIT_QUICK=1`) shrinks
# data, image size and rounds.

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
fail_mode = "error"           # how it fails: "error" (raises) or "hang" (never answers: a straggler)
client_timeout = 600.0        # seconds the server waits for a round's clients (try 20 with fail_mode "hang")
amp = "auto"                  # precision: "auto" (bf16 where the CPU runs it natively), "bf16", False

# %% [markdown]
# ## 2. Check the parameters
# Lab 05's own parameters get their rules here (`rules=`); the shared ones come from `labkit.params` and, for the
# Ray `address`, `labkit.distributed.RULES` (`check_cluster` sees that a cluster answers there). One rule needs
# the data: `split="hospital"` needs patient ids, which the seed's `0/ 1/` layout lacks — checked here, before
# anything trains, by looking at the folders (nothing is decoded).

# %% tags=["nbval-check-output"]
LAB_RULES = {
    "clients": Rule(int, 1, 64, help="federated clients (Ray actors), e.g. hospitals"),
    "rounds": Rule(int, 1, 1000, help="FedAvg rounds: broadcast, local training, average"),
    "local_epochs": Rule(int, 1, 100, help="passes over its own data each client makes per round"),
    "split": Rule(str, choices=federated.SPLITS, help="who holds which training patches"),
    "alpha": Rule(float, 0, 1e4, open_low=True, help="Dirichlet concentration for split='dirichlet'"),
    "fail_client_at_round": Rule(int, 1, 1000, optional=True, help="the last client fails in this round"),
    "fail_mode": Rule(str, choices=("error", "hang"), help="how that client fails"),
    "client_timeout": Rule(float, 0, 86400, open_low=True, help="seconds the server waits for a round's clients"),
}
cfg = params.check("05_federated", rules={**distributed.RULES, **LAB_RULES}, clients=clients, rounds=rounds, local_epochs=local_epochs,
                   split=split, alpha=alpha, image_size=image_size, batch_size=batch_size, lr=lr, data=data,
                   data_dir=data_dir, quick=quick, seed=seed, address=address,
                   fail_client_at_round=fail_client_at_round, fail_mode=fail_mode, client_timeout=client_timeout,
                   amp=amp)
if cfg.split == "hospital" and not has_patient_ids(cfg.data, cfg.data_dir):
    raise params.ParameterError(f"05_federated: parameter 'split' = 'hospital' needs patient ids, and {cfg.data_dir} "
                                f"holds the seed's 0/ 1/ layout (no patients); use split='iid' or 'dirichlet', or "
                                f"the IDC layout (<patient_id>/0/, <patient_id>/1/).")
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
# ## 3. The data: patches, patients, hospitals, and a split made once
# The public IDC set holds 50×50 H&E patches of breast tissue, one folder per **patient**
# (`<patient_id>/0/` benign, `<patient_id>/1/` invasive ductal carcinoma, about 28 % positive); the seed
# project's data was just `0/` and `1/`. labkit reads both, and reads the public archive as it unzips: its
# second copy of the patient folders is used once (a notice says what was skipped), border patches smaller
# than 50×50 are padded, not stretched. When neither is there it writes a **synthetic stand-in in the IDC
# layout** and says so loudly: generated pictures with stained tissue and nuclei — not medical images.
#
# **Hospitals.** The stand-in's patients come from three hospitals of unequal size (about 50 / 30 / 20 % of the
# patients), each staining with **its own tint**; `sites.csv` says which patient came from where. The real IDC
# set names no hospitals: there whole patients are grouped into `clients` hospitals of unequal size
# (`federated.assign_hospitals`). Every patient, train or test, belongs to one hospital, so each hospital's
# validation and test patients can be scored on their own.
#
# The split into train / validation / test is made **once, by patient, within each hospital** (stratified by
# positive rate) and saved as JSON next to the cache: every run and every client sees the same one. A tenth of
# the training patients' patches is kept aside too (**seen-patient holdout**, never trained on): section 9
# scores one model on those and on unseen patients.

# %%
ds = load_breast(data=cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size,
                 max_patches=cfg.get("max_patches"), seed=cfg.seed)
level = "patient" if ds.patients is not None else "patch"
if level == "patch":
    print(f"NOTE: {ds.root} ({ds.layout} layout) has no patient ids: the split is by patch, and patients may sit "
          "on both sides of it (see section 9); there are no hospitals to score.")
    hospital, hospital_names = None, []
else:
    hospital, hospital_names = federated.assign_hospitals(ds.patients, cfg.clients, sites=ds.sites, seed=cfg.seed)
    if ds.sites is not None and len(set(ds.sites)) != cfg.clients:
        print(f"NOTE: the data names {len(set(ds.sites))} hospitals but clients={cfg.clients}: patients are grouped "
              f"into {cfg.clients} hospitals of unequal size instead (the stain tints then mix within a client).")
parts = saved_split(ds, level, seed=cfg.seed, groups=hospital)
patients = np.asarray(ds.patients) if ds.patients is not None else None
train_idx, seen_idx = train_test_split(parts["train"], test_size=0.1, stratify=ds.labels[parts["train"]].numpy(),
                                       random_state=cfg.seed)
train_idx, seen_idx = np.sort(train_idx), np.sort(seen_idx)
train_x, train_y = ds.images[train_idx], ds.labels[train_idx]
val_x, val_y = ds.images[parts["val"]], ds.labels[parts["val"]]
test_x, test_y = ds.images[parts["test"]], ds.labels[parts["test"]]
site_of = {s: None if hospital is None else hospital[idx] for s, idx in
           {"train": train_idx, "seen": seen_idx, "val": parts["val"], "test": parts["test"]}.items()}

# %% tags=["nbval-check-output"]
rows = {"train": train_idx, "seen-patient holdout": seen_idx, "val": parts["val"], "test": parts["test"]}
summary = pd.DataFrame([{"split": s, "patches": len(idx), "IDC": int(ds.labels[idx].sum()),
                         "IDC %": round(100 * float(ds.labels[idx].float().mean()), 1),
                         "patients": len(set(patients[idx])) if patients is not None else "?"}
                        for s, idx in rows.items()]).set_index("split")
print(f"layout: {ds.layout}   synthetic stand-in: {ds.synthetic}   split by: {level}   "
      f"image tensor: {tuple(ds.images.shape[1:])}")
print(summary.to_string())
if hospital is not None:
    sites = pd.DataFrame([{"hospital": name, **{f"{s} patches": int((hospital[idx] == k).sum()) for s, idx in rows.items()},
                           "patients": len(set(patients[hospital == k])),
                           "IDC %": round(100 * float(ds.labels[torch.from_numpy(hospital == k)].float().mean()), 1)}
                          for k, name in enumerate(hospital_names)]).set_index("hospital")
    print(sites.to_string())

# %%
display(ds.patient_table().describe().round(1))
plotting.plot_samples(train_x, train_y, list(ds.classes), out_dir / "samples.png");

# %% [markdown]
# ## 4. The model
# The seed's `BreastCancerCNN`: conv 128 → pool → BatchNorm → dropout; conv 64 → pool → BatchNorm → dropout;
# conv 32 (2×2) → BatchNorm; dense 64 → 16 → **1 logit**, trained with `BCEWithLogitsLoss`.
# Look at its `state_dict`: besides weights and biases, each BatchNorm layer holds `running_mean`,
# `running_var` and an integer `num_batches_tracked`. FedAvg must aggregate those too.

# %% tags=["nbval-check-output"]
def new_model() -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = BreastCancerCNN(cfg.image_size)
    return model.to(memory_format=torch.channels_last) if channels_last else model


model = new_model()
state = model.state_dict()
BN_KEYS = federated.bn_keys(model)
print(f"BreastCancerCNN at {cfg.image_size} px: {count_parameters(model):,} parameters; state_dict: "
      f"{len(state)} tensors ({len(BN_KEYS)} of them BatchNorm's), {federated.state_bytes(state) / 1e6:.2f} MB")
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
# | optimizer state | one, carried through training | each client starts a **fresh Adam** every round |
#
# Only in a special case do the two coincide: with plain SGD (no momentum), IID shards and one local step per
# round, averaging the clients' weights equals one step of synchronous SGD on the clients' combined batch.
# This lab's clients use Adam and build a new one every round (`FedClient.fit`), so even one local step is
# Adam's *first* step — moments reset to zero, a step of size ≈ `lr` in each weight whatever the gradient's
# size — which is not a step of synchronous Adam. With many local steps on non-IID shards (hospitals) the
# clients also drift towards their own data, and the average is a compromise.
#
# ## 6. Exercise — the server's aggregation, BatchNorm included
# Given the clients' `state_dict`s and their sample counts `n_k` (weights `w_k = n_k / n`), return the new
# global `state_dict`:
# - every weight, bias and `running_mean`: the weighted average `sum_k w_k * x_k` (in the input dtype; the
#   integer `num_batches_tracked` averaged the same way and rounded);
# - every `running_var`: the **pooled** variance. Averaging the clients' variances leaves out how far apart
#   their means are: the variance of all the hospitals' activations together is
#   `sum_k w_k var_k + sum_k w_k (mean_k - mean)**2`, and the second term is exactly what differs between
#   hospitals that stain differently. Compute it as the average second moment minus the pooled mean squared:
#   `sum_k w_k (var_k + mean_k**2) - mean**2`.
#
# Do not change the clients' tensors in place. (BatchNorm's running statistics are moving averages over a
# client's training batches, so the pooled ones approximate what one BatchNorm on the pooled data would hold.)
# The check compares your answer with the statistics of the check clients' activations concatenated.

# %%
def fedavg(states: list[dict[str, torch.Tensor]], num_samples: list[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted average of the clients' state_dicts; BatchNorm variances pooled."""
    # BEGIN SOLUTION
    total = float(sum(num_samples))
    out = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, n in zip(states, num_samples):
            value = state[key].to(torch.float64)
            if key.endswith("running_var"):              # the client's second moment E[x²] = var + mean²
                value = value + state[key[:-3] + "mean"].to(torch.float64) ** 2
            acc += value * (n / total)
        if key.endswith("running_var"):                  # pooled variance = pooled E[x²] − (pooled mean)²
            mean = sum(s[key[:-3] + "mean"].to(torch.float64) * (n / total) for s, n in zip(states, num_samples))
            acc = acc - mean ** 2
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return out
    # END SOLUTION


# %% labkit={"points": 2, "question": "fedavg"} tags=["nbval-check-output"]
from labkit.exercises import lab05, reported
with reported("fedavg"):                       # ✔ or ✘ with a hint; Run All goes on either way
    lab05.check_fedavg(fedavg)

# %% labkit={"hidden": "fedavg"} tags=["hidden-check"]
def _hidden_fedavg():
    import numpy as np
    import torch
    from torch import nn
    # Two clients of a float64 model with two BatchNorm layers; their statistics are those of drawn activations.
    rng, sizes = np.random.default_rng(3), [250, 750]
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2)).double()
    states, acts = [], {}
    for k, (n, shift) in enumerate(zip(sizes, (-1.0, 2.0))):
        state = {}
        for key, value in model.state_dict().items():
            layer = key.rsplit(".", 1)[0]
            if key.endswith("running_mean"):
                acts.setdefault(layer, []).append(rng.normal(shift, 1.0 + k, (n, value.numel())))
                state[key] = torch.from_numpy(acts[layer][-1].mean(0))
            elif key.endswith("running_var"):
                state[key] = torch.from_numpy(acts[layer][-1].var(0))
            elif value.is_floating_point():
                state[key] = torch.from_numpy(rng.normal(0, 1, tuple(value.shape)))
            else:
                state[key] = torch.tensor(10 + 7 * k)
        states.append(state)
    kept = [{key: v.clone() for key, v in s.items()} for s in states]
    got = fedavg(states, sizes)
    assert all(torch.equal(s[key], o[key]) for s, o in zip(states, kept) for key in o), "a client's state changed"
    assert set(got) == set(kept[0])
    for key, first in kept[0].items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(("running_mean", "running_var")):
            pooled = np.concatenate(acts[layer])
            want = pooled.mean(0) if key.endswith("running_mean") else pooled.var(0)
        else:
            want = np.average(np.stack([s[key].numpy() for s in kept]), axis=0, weights=sizes)
        assert got[key].dtype == first.dtype, (key, got[key].dtype)     # float64 stays float64
        if first.is_floating_point():
            assert np.allclose(got[key].numpy(), want, rtol=1e-6, atol=1e-8), key
        else:
            assert int(got[key]) == round(float(want)), key


_hidden_fedavg()

# %% [markdown]
# **FedBN, the named alternative** (Li et al., 2021): do not average BatchNorm at all. Each client keeps its own
# BatchNorm layers (scale, shift and running statistics) and the server averages everything else; a hospital's
# patches are then always normalised with that hospital's own statistics — its stain, its scanner. Section 8 runs
# it as a fourth row of the comparison; its price is that a *new* hospital has no BatchNorm of its own.

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
                                  fail_at_round=cfg.fail_client_at_round, fail_mode=cfg.fail_mode,
                                  hang_seconds=2 * cfg.client_timeout)     # a straggler: late by a whole round
print(f"Ray {cluster['ray']}: {cluster['cpus']} CPU(s), started in {cluster['init_seconds']:.1f} s; "
      f"{len(actors)} client actors")

# %% [markdown]
# ## 8. The FedAvg round, on Ray
# Read this cell: it is the whole algorithm.
# 1. `ray.put(global_state)` serialises the global weights into the object store **once**; every client gets
#    the reference and reads it from there (each client deserialises its own copy: Ray copies torch tensors
#    out of the store by default — only NumPy arrays are read in place on one machine).
# 2. `actor.fit.remote(...)` starts local training on every client at once and returns futures.
# 3. `ray.wait(..., timeout=client_timeout)` waits for the round's clients, **but not forever**: a client that
#    has not answered by then (a straggler, a hung machine) is left out of this round, and sent no new work
#    until it has finished the old. `federated.collect_updates` fetches the answers; a client that raised is
#    **left out** too, with a warning naming it — the round completes with the others.
# 4. `fedavg` (your exercise) aggregates what came back, weighted by each client's sample count. With FedBN the
#    BatchNorm entries stay with the clients: the server sends and averages the rest.
# 5. The server scores the new global model on the validation patches — overall and **per hospital** (is the
#    model fair to the small hospital?) — appends one row to `results/05_federated/metrics.csv`, and keeps the
#    best round's weights.

# %%
csv_path = out_dir / "metrics.csv"
csv_path.unlink(missing_ok=True)      # one file per run of the lab; the run record keeps them all too
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
eval_net = new_model()                # the server's copy for scoring: every entry is loaded before use


def evaluate(state: dict, images: torch.Tensor, labels: torch.Tensor, sites, local: dict | None = None) -> dict:
    """Metrics of the global ``state`` on these patches, overall and per hospital (``sites``: each patch's
    hospital). FedBN (``local``: each hospital's own BatchNorm entries): a hospital's patches go through the
    global weights with that hospital's BatchNorm."""
    net = eval_net
    if local is None:
        net.load_state_dict(state)
        logits = federated.predict_logits(net, images, dtype=dtype, channels_last=channels_last)
    else:
        logits = torch.empty(len(labels))
        for k in range(cfg.clients):
            mask = torch.from_numpy(sites == k)
            if mask.any():
                net.load_state_dict({**state, **local.get(k, {})})
                logits[mask] = federated.predict_logits(net, images[mask], dtype=dtype, channels_last=channels_last)
    m = federated.binary_metrics(labels, logits)
    if sites is not None:
        m.update(federated.group_metrics(m["y_true"], m["y_pred"], sites, hospital_names))
    return m


def log_round(experiment: str, round_: int, m: dict, extra: dict) -> dict:
    per_site = {f"val_{h}_{k}": m[f"{h}_{k}"] for h in hospital_names for k in federated.GROUP_METRICS}
    row = {"experiment": experiment, "round": round_, **extra, **{f"val_{k}": m[k] for k in federated.METRICS},
           **per_site}
    federated.append_csv(csv_path, row)
    return row


aggregate = lab05.fedavg_for_run(fedavg)     # your fedavg (right or wrong), or the reference while it is a stub


def run_fedavg(name: str, shards: list[np.ndarray], local_bn: bool = False):
    """FedAvg with one client per shard (indices into the training split); ``local_bn``: FedBN. Returns the
    best round's global state, the clients' own BatchNorm entries (FedBN, else None) and the history."""
    ray.get([a.load_shard.remote(train_x[idx], train_y[idx]) for a, idx in zip(actors, shards)])
    names = hospital_names if name in ("hospital", "fedbn") else [f"client {k}" for k in range(len(shards))]
    global_model, history, local, busy = new_model(), [], {}, {}
    best = (-1.0, 0, None, None)
    for r in range(1, cfg.rounds + 1):
        tick = time.perf_counter()
        global_state = {k: v.contiguous() for k, v in global_model.state_dict().items()}
        sent = global_state if not local_bn or r == 1 else {k: v for k, v in global_state.items() if k not in BN_KEYS}
        ref = ray.put(sent)                                                                  # 1. broadcast once
        futures = {k: a.fit.remote(ref, r, cfg.local_epochs, cfg.lr)                         # 2. train everywhere
                   for k, a in enumerate(actors) if k not in busy}                           #    (not the busy)
        skipped = [f"{names[k]} (busy)" for k in busy]
        ready, late = ray.wait(list(futures.values()), num_returns=len(futures),            # 3. wait, not forever
                               timeout=cfg.client_timeout) if futures else ([], [])
        done = set(ready)
        updates, failed = federated.collect_updates([f for f in futures.values() if f in done],
                                                    [names[k] for k, f in futures.items() if f in done])
        failed += skipped
        busy = {k: f for k, f in {**busy, **futures}.items() if f not in done and not ray.wait([f], timeout=0)[0]}
        if late:
            warnings.warn(f"{[names[k] for k, f in futures.items() if f not in done]} did not answer within "
                          f"client_timeout={cfg.client_timeout:g} s: left out of round {r}", stacklevel=1)
            failed += [names[k] for k, f in futures.items() if f not in done]
        if updates:                                                                          # 4. aggregate
            keep = (lambda k: k not in BN_KEYS) if local_bn else (lambda k: True)
            new_state = aggregate([{k: v for k, v in u["state"].items() if keep(k)} for u in updates],
                                  [u["num_samples"] for u in updates])
            global_model.load_state_dict(new_state, strict=not local_bn)
            if local_bn:
                local.update({u["cid"]: {k: u["state"][k] for k in BN_KEYS} for u in updates})
        m = evaluate(global_model.state_dict(), val_x, val_y, site_of["val"], local if local_bn else None)  # 5.
        steps = cfg.local_epochs * -(-len(train_y) // (cfg.batch_size * len(actors)))
        row = log_round(name, r, m, {
            "clients_ok": len(updates), "failed": ";".join(failed),
            "train_loss": float(np.mean([u["loss"] for u in updates])) if updates else float("nan"),
            "bytes_sent": federated.state_bytes(sent) * (len(futures) + len(updates)),   # out to all, back from ok
            "ddp_bytes": federated.ddp_allreduce_bytes(param_bytes, len(actors), steps),
            "seconds": time.perf_counter() - tick})
        history.append(row)
        print(f"{name:>9} round {r}: val loss {m['loss']:.3f}  bal. acc {m['balanced_acc']:.3f}  "
              f"AUC {m['roc_auc']:.3f}  clients {len(updates)}/{len(actors)}  {row['seconds']:.1f} s")
        if m["balanced_acc"] > best[0]:
            best = (m["balanced_acc"], r, copy.deepcopy(global_model.state_dict()), copy.deepcopy(local) or None)
    with atomic_path(out_dir / f"best_{name}.pt") as tmp:
        torch.save({"round": best[1], "state_dict": best[2], "local_bn": best[3]}, tmp)
    print(f"{name}: best round {best[1]} (val balanced accuracy {best[0]:.3f}), weights kept")
    return best[2], best[3], history


# %% [markdown]
# ### Centralized first: the reference
# One model trained on the pooled training patches for as many epochs as a client trains in all rounds
# (`rounds × local_epochs`): what FedAvg would reach if the hospitals *could* share their data. It is ordinary
# training: **one** Adam for all its epochs (its moment estimates carry on), where each FedAvg client starts a
# fresh Adam every round — one of the differences FedAvg pays for.

# %%
def run_centralized(name: str, images: torch.Tensor, labels: torch.Tensor):
    model, history, best = new_model(), [], (-1.0, None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)          # one optimizer across all epochs
    for epoch in range(1, cfg.rounds * cfg.local_epochs + 1):
        tick = time.perf_counter()
        loss = federated.train_epochs(model, images, labels, epochs=1, lr=cfg.lr, batch_size=cfg.batch_size,
                                      dtype=dtype, channels_last=channels_last, augment=federated.augmentation(),
                                      seed=cfg.seed + epoch, optimizer=opt)
        m = evaluate(model.state_dict(), val_x, val_y, site_of["val"])
        history.append(log_round(name, epoch, m, {"clients_ok": 1, "failed": "", "train_loss": loss, "bytes_sent": 0,
                                                  "ddp_bytes": 0, "seconds": time.perf_counter() - tick}))
        if m["balanced_acc"] > best[0]:
            best = (m["balanced_acc"], copy.deepcopy(model.state_dict()))
    print(f"{name}: {len(history)} epochs, best val balanced accuracy {best[0]:.3f}")
    return best[1], history


torch.manual_seed(cfg.seed)
central_state, central_hist = run_centralized("central", train_x, train_y)

# %% [markdown]
# ### FedAvg with IID clients, with clients split by hospital, and FedBN
# Same data, same rounds. First each client gets a random third of the training patches (IID); then the split
# chosen by `split` (default `"hospital"`: client *k* is hospital *k* — unequal sizes, its own stain tint and
# positive rate); then, for the hospital split, **FedBN** (BatchNorm kept local). Look at each client's size and
# label mix below: with unequal hospitals, weighting by sample count matters.

# %%
shards = {"iid": federated.split_clients(train_y.numpy(), cfg.clients, "iid", seed=cfg.seed)}
shards[cfg.split] = federated.split_clients(
    train_y.numpy(), cfg.clients, cfg.split, alpha=cfg.alpha, seed=cfg.seed,
    patients=None if patients is None else list(patients[train_idx]), hospitals=site_of["train"])
runs = {name: {"shards": shard, "local_bn": False} for name, shard in shards.items()}
if cfg.split == "hospital":
    runs["fedbn"] = {"shards": shards["hospital"], "local_bn": True}
else:
    print("FedBN runs with split='hospital' only (a client's BatchNorm is its hospital's).")
fed = {}
for name, run in runs.items():
    state, local, hist = run_fedavg(name, run["shards"], local_bn=run["local_bn"])
    fed[name] = {"state": state, "local": local, "history": hist}

# %% tags=["nbval-check-output"]
mix = pd.DataFrame([{"split": name, "client": names_k, "patches": len(idx), "IDC": int(train_y[idx].sum()),
                     "IDC %": round(100 * float(train_y[idx].float().mean()), 1),
                     "patients": len(set(patients[train_idx][idx])) if patients is not None else None}
                    for name, shard in shards.items()
                    for names_k, idx in zip(hospital_names if name == "hospital" else range(len(shard)), shard)])
print(mix.to_string(index=False))
client_sizes = [len(idx) for idx in shards[cfg.split]]
print(f"{cfg.split} clients: largest / smallest = {max(client_sizes) / min(client_sizes):.1f}x")

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
# ### Fair to every hospital?
# The same rounds, the global model's validation balanced accuracy **per hospital** (FedBN: each hospital
# with its own BatchNorm). A model can look good on average while failing the small hospital, whose patches
# weigh least in the average. Saved as `results/05_federated/per_hospital.png`.

# %%
if hospital_names:
    names = list(curves["experiment"].unique())
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), layout="constrained", sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        part = curves[curves["experiment"] == name]
        for h in hospital_names:
            ax.plot(part["round"], part[f"val_{h}_balanced_acc"], marker="o", label=h)
        ax.axhline(0.5, color="grey", ls=":")
        ax.set(title=name, xlabel="round (epoch for central)", ylim=(0.3, 1.0))
    np.atleast_1d(axes)[0].set(ylabel="validation balanced accuracy")
    np.atleast_1d(axes)[0].legend()
    plotting.save_figure(fig, out_dir / "per_hospital.png")
else:
    print("no hospitals without patient ids")

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
# `2 × clients × model size` (FedBN a little less: BatchNorm stays home). DDP all-reduces the gradients at
# **every step**: each worker sends about `2 (K−1)/K × model size` per step, and a round of local training is
# many steps — so DDP moves more data by roughly the number of steps per round. FedAvg buys that saving with
# accuracy: clients drift apart between averages, the more so the more their data differ (compare IID with
# hospital above).

# %% [markdown]
# ## 9. Honest evaluation: one model, scored on seen and on unseen patients
# Patches from one patient share the stain, the tissue and the tumour's look. The centralized model is scored
# twice: on the **seen-patient holdout** (patches it never trained on, but from patients it trained on — what a
# patch-level split would test) and on the **test patients** (patients it never saw, as in a clinic). One model,
# two test sets: the difference is what a patch-level split flatters. Read it with its noise in mind: quick
# mode tests on a handful of patients, so one easy or hard patient moves the unseen-patient score a lot.

# %%
seen_test = evaluate(central_state, ds.images[seen_idx], ds.labels[seen_idx], None)
unseen_test = evaluate(central_state, test_x, test_y, None)
honesty = pd.DataFrame({"seen patients (held-out patches)": seen_test, "unseen patients (test)": unseen_test}).loc[
    ["balanced_acc", "roc_auc", "macro_f1"]].astype(float)
honesty.loc["patches"] = [len(seen_idx), len(test_y)]
if patients is not None:
    honesty.loc["patients"] = [len(set(patients[seen_idx])), len(set(patients[parts["test"]]))]
inflation = float(seen_test["balanced_acc"] - unseen_test["balanced_acc"])
display(honesty.round(3))
print(f"balanced accuracy of the same model, seen minus unseen patients: {inflation:+.3f}")

# %% [markdown]
# ## 10. Evaluate on the test patients
# The best round's FedAvg model of the chosen split, scored once on the held-out test patients, next to
# the majority-class rate (always answering "no IDC") and the other runs — overall and per hospital.
# Two F1 scores, named by kind: **macro-F1** (both classes' F1 averaged) and **F1 (IDC)** (class 1's alone).

# %% tags=["nbval-check-output", "labkit-result"]
scores = {"central": evaluate(central_state, test_x, test_y, site_of["test"])}
scores.update({name: evaluate(f["state"], test_x, test_y, site_of["test"], f["local"]) for name, f in fed.items()})
test = scores[cfg.split]
final = {**metrics.summarize(test["y_true"], test["y_pred"], 2, train_labels=train_y), "roc_auc": test["roc_auc"]}
print(f"FedAvg ({cfg.split}) on the test patients: accuracy {final['acc']:.2f}, balanced accuracy "
      f"{final['balanced_acc']:.2f}, macro-F1 {final['macro_f1']:.2f}, F1 (IDC) {test['f1_idc']:.2f}, "
      f"majority-class rate {final['majority_rate']:.2f}")

# %%
rows_shown = [*federated.METRICS, *(f"{h}_{k}" for h in hospital_names for k in federated.GROUP_METRICS)]
display(pd.DataFrame({name: {k: m[k] for k in rows_shown} for name, m in scores.items()}).round(3))
print(f"ROC-AUC of FedAvg ({cfg.split}): {final['roc_auc']:.3f}")

# %% [markdown]
# ## 11. Save the run record and shut Ray down
# The record holds every round of every run (also in `metrics.csv`, per hospital too), the final test metrics,
# the clients' sizes, the two scores of the leakage lesson and the traffic.

# %%
record = results.RunRecord(lab="05_federated", params={**dict(cfg), "precision": env.precision_name(dtype)},
                           env={**env.environment(dev, world_size=cfg.clients), "precision": env.precision_name(dtype)},
                           data={**ds.describe(), "split_level": level,
                                 "split_sizes": {**{s: len(v) for s, v in parts.items()}, "train": len(train_idx),
                                                 "seen_holdout": len(seen_idx)},
                                 "client_sizes": {name: [len(i) for i in s] for name, s in shards.items()},
                                 "hospitals": hospital_names},
                           epochs=curves.to_dict("records"))
record.final = {"test_acc": final["acc"], "balanced_acc": final["balanced_acc"], "macro_f1": final["macro_f1"],
                "f1_idc": test["f1_idc"], "majority_rate": final["majority_rate"], "roc_auc": final["roc_auc"],
                **{f"{name}_balanced_acc": m["balanced_acc"] for name, m in scores.items() if name != cfg.split},
                "per_hospital": {name: {h: {k: m[f"{h}_{k}"] for k in ("n", *federated.GROUP_METRICS)}
                                        for h in hospital_names} for name, m in scores.items()},
                "client_size_ratio": max(client_sizes) / min(client_sizes),
                "leakage": {"model": "central", "seen_patients_balanced_acc": seen_test["balanced_acc"],
                            "unseen_patients_balanced_acc": unseen_test["balanced_acc"], "difference": inflation},
                "fedavg_mb_per_round": float(traffic["FedAvg MB / round"].loc[cfg.split]),
                "ddp_mb_per_round": float(traffic["DDP MB / round"].loc[cfg.split]),
                "precision": env.precision_name(dtype), "total_seconds": float(curves["seconds"].sum())}
for path in [out_dir / "samples.png", out_dir / "fedavg.png", out_dir / "per_hospital.png", csv_path,
             *(out_dir / f"best_{n}.pt" for n in runs)]:
    if path.exists():
        record.add_artifact(path)
print("saved", results.save(record))
ray_stack.close()      # ray.shutdown()

# %% [markdown]
# ## Your exercises
# Each exercise's check above said ✔ or ✘; here they are together. When your notebook is graded (`labkit grade`),
# the same checks run again, with a few more the instructor keeps back.

# %%
from labkit.exercises import status_table
print(status_table())

# %% [markdown]
# ## Take-aways
# - FedAvg moves **weights once per round**, DDP moves **gradients every step**: far less traffic, paid for
#   with client drift when the clients' data differ (hospitals), and with optimizers that restart each round.
# - Aggregate **everything** in the `state_dict`, weighted by sample counts — and pool BatchNorm's variance
#   (second moment minus the mean squared): averaging variances hides the spread between hospitals. Or keep
#   BatchNorm local (FedBN).
# - Score the global model **per hospital**: an average can hide the site it fails.
# - A federated server must expect clients to fail or hang: wait with a timeout, leave them out, carry on.
# - Split medical data **by patient**. The same model scores higher on held-out patches of patients it has
#   seen than on new patients: a patch-level split reports a number no clinic will see.
