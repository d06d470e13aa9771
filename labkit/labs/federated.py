"""Plumbing for Lab 05 (federated averaging on Ray): client splits, the client, bytes, metrics, CSV.

The lesson itself — one FedAvg round (send the global weights through the object store, train on
every client, average weighted by sample counts, skip a failed client) — is code in the notebook.
This module holds what that code stands on:

- :func:`assign_hospitals` / :func:`split_clients` — which hospital each patient belongs to (the
  stand-in's ``sites.csv``, else patients grouped into hospitals of unequal size) and which training
  patches each client holds: ``iid``, ``dirichlet`` (label skew, concentration ``alpha``) or
  ``hospital`` (one client per hospital);
- :class:`FedClient` — one client: its shard, its own online augmentation (torchvision v2), local
  training in the run's precision; :func:`remote_clients` turns it into Ray actors;
- :func:`train_epochs` / :func:`evaluate_binary` / :func:`group_metrics` — the plain local loop (Lab
  01's) and the validation metrics (loss, accuracy, balanced accuracy, precision, recall, class-1 F1
  ``f1_idc``, ``macro_f1``, ROC-AUC), overall and per hospital; :func:`bn_keys` for FedBN;
- :func:`state_bytes` / :func:`ddp_allreduce_bytes` — what FedAvg sends vs what DDP would all-reduce;
- :func:`append_csv` — one row per round, the file rewritten atomically each time.
"""
from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from torch import nn
from torchvision.transforms import v2

from labkit import env
from labkit.files import atomic_path
from labkit.models.breast import BreastCancerCNN

SPLITS = ("iid", "dirichlet", "hospital")
#: ``f1_idc`` is the F1 of class 1 (IDC) alone; ``macro_f1`` the mean of both classes' F1.
METRICS = ("loss", "acc", "balanced_acc", "precision", "recall", "f1_idc", "macro_f1", "roc_auc")
#: what each hospital's share of the validation patches is scored on, every round
GROUP_METRICS = ("acc", "balanced_acc")


def assign_hospitals(patients: Sequence[str], clients: int, *, sites: Sequence[str] | None = None, seed: int = 0,
                     ratio: float = 2.5) -> tuple[np.ndarray, list[str]]:
    """Each patch's hospital (``0..clients-1``, hospital 0 the largest) and the hospitals' names.

    With ``sites`` (each patch's site, e.g. from the stand-in's ``sites.csv``) naming exactly ``clients``
    sites, those are the hospitals. Otherwise whole patients are grouped into ``clients`` hospitals of
    unequal size: target shares fall geometrically from the largest to the smallest, ``ratio`` times
    smaller (largest patient first to the hospital furthest below its target)."""
    patients = np.asarray(patients)
    ids, per = np.unique(patients, return_inverse=True)
    if len(ids) < clients:
        raise ValueError(f"{clients} hospitals need at least {clients} patients; there are {len(ids)}")
    if sites is not None and len(set(sites)) == clients:
        names, owner = np.unique(np.asarray(sites), return_inverse=True)
        order = np.argsort(-np.bincount(owner, minlength=clients), kind="stable")
        rank = np.empty(clients, np.int64)
        rank[order] = np.arange(clients)
        return rank[owner], [str(names[k]) for k in order]
    sizes = np.bincount(per)
    rng = np.random.default_rng(seed)
    target = ratio ** (-np.arange(clients) / max(clients - 1, 1))
    target = target / target.sum() * sizes.sum()
    load, owner = np.zeros(clients), np.empty(len(ids), np.int64)
    for p in sorted(rng.permutation(len(ids)), key=lambda p: -sizes[p]):
        k = int(np.argmax(target - load))
        owner[p], load[k] = k, load[k] + sizes[p]
    return owner[per], [f"hospital-{chr(65 + k)}" if k < 26 else f"hospital-{k}" for k in range(clients)]


# --------------------------------------------------------------------------- who holds what
def split_clients(labels: Sequence[int], clients: int, how: str = "iid", *, alpha: float = 0.5,
                  patients: Sequence[str] | None = None, hospitals: Sequence[int] | None = None, seed: int = 0,
                  min_size: int = 2) -> list[np.ndarray]:
    """Indices (into ``labels``) each of ``clients`` clients holds; every index exactly once.

    ``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet``: per class, the shares of the
    clients are drawn from Dirichlet(``alpha``) — small alpha, strong label skew (redrawn until every
    client has ``min_size`` samples). ``hospital``: client ``k`` holds hospital ``k``'s patches —
    ``hospitals`` (one entry per sample, from :func:`assign_hospitals`) or, without it, ``patients``
    grouped by :func:`assign_hospitals`: disjoint patient groups of unequal size.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if how not in SPLITS:
        raise ValueError(f"split={how!r}: use one of {SPLITS}")
    if not isinstance(clients, int) or clients < 1 or clients > n:
        raise ValueError(f"clients={clients!r}: need an integer between 1 and the {n} training samples")
    rng = np.random.default_rng(seed)
    if how == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    if how == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r}: the Dirichlet concentration must be > 0")
        for _ in range(100):
            parts: list[list[int]] = [[] for _ in range(clients)]
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
                for k, chunk in enumerate(np.split(idx, cuts)):
                    parts[k] += chunk.tolist()
            if min(len(p) for p in parts) >= min(min_size, n // clients):
                return [np.sort(np.asarray(p, np.int64)) for p in parts]
        raise ValueError(f"alpha={alpha}: could not give each of {clients} clients {min_size} samples in 100 draws; "
                         f"use a larger alpha or fewer clients")
    if hospitals is None:
        if patients is None:
            raise ValueError("split='hospital' needs patient ids, and this dataset has none (the seed's 0/ 1/ "
                             "layout); use split='iid' or 'dirichlet'.")
        if len(patients) != n:
            raise ValueError(f"{len(patients)} patient ids for {n} labels")
        if len(set(patients)) < clients:
            raise ValueError(f"split='hospital' with {clients} clients needs at least {clients} training patients; "
                             f"there are {len(set(patients))}")
        hospitals = assign_hospitals(patients, clients, seed=seed)[0]
    hospitals = np.asarray(hospitals)
    if len(hospitals) != n:
        raise ValueError(f"{len(hospitals)} hospital entries for {n} labels")
    shards = [np.flatnonzero(hospitals == k) for k in range(clients)]
    if any(len(s) == 0 for s in shards):
        raise ValueError(f"split='hospital': hospital(s) {[k for k, s in enumerate(shards) if not len(s)]} hold no "
                         f"training patches; use fewer clients")
    return shards


# --------------------------------------------------------------------------- training and metrics
def augmentation() -> v2.Compose:
    """A client's online augmentation for H&E patches (uint8 CHW in, uint8 out): flips, 90° turns
    and a little colour jitter (stains differ from lab to lab)."""
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                       v2.RandomApply([v2.RandomRotation((90, 90))], p=0.5),
                       v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)])


def to_input(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``[B,3,S,S]`` → float in [-1, 1] (mean 0.5, std 0.5), optionally ``channels_last``."""
    x = x.float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_epochs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int, dtype: torch.dtype | None = None, channels_last: bool = False,
                 augment: v2.Transform | None = None, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None) -> float:
    """Train ``model`` (on the CPU) for ``epochs`` passes with ``BCEWithLogitsLoss``; return the mean
    training loss. ``optimizer``: one to keep using across calls (its Adam moments carry on); without
    it a fresh Adam(``lr``) starts, as a FedAvg client's does each round. ``augment`` is applied per
    patch to the uint8 batch."""
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = images[idx]
            if augment is not None:
                x = torch.stack([augment(img) for img in x])
            x, y = to_input(x, channels_last), labels[idx].float()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
    return total / max(seen, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256, dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """The model's fp32 logits ``[N]`` for uint8 ``images`` (eval mode, batches of ``batch_size``)."""
    model.eval()
    logits = [torch.empty(0)]
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits.append(model(x).float())
    return torch.cat(logits)


def binary_metrics(labels: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """:data:`METRICS` of 1-logit predictions (class 1 = IDC): ``loss`` (BCE), ``acc``, ``balanced_acc``,
    ``precision``, ``recall``, ``f1_idc`` (F1 of class 1), ``macro_f1`` (mean F1 of both classes),
    ``roc_auc`` (NaN when one class is missing; so is balanced accuracy), plus ``y_true``, ``y_prob``
    and ``y_pred`` arrays."""
    z, y = logits.float(), labels.float()
    prob = torch.sigmoid(z).numpy()
    y_true, y_pred = labels.numpy().astype(int), (prob >= 0.5).astype(int)
    both = len(np.unique(y_true)) == 2
    return {"loss": float(nn.functional.binary_cross_entropy_with_logits(z, y)),
            "acc": float(accuracy_score(y_true, y_pred)),
            "balanced_acc": float(balanced_accuracy_score(y_true, y_pred)) if both else float("nan"),
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "f1_idc": float(f1_score(y_true, y_pred, zero_division=0)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=[0, 1], average="macro", zero_division=0)),
            "roc_auc": float(roc_auc_score(y_true, prob)) if both else float("nan"),
            "y_true": y_true, "y_prob": prob, "y_pred": y_pred}


def evaluate_binary(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256,
                    dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, Any]:
    """:func:`binary_metrics` of ``model`` on ``images`` (logits turned to fp32 before any metric)."""
    return binary_metrics(labels, predict_logits(model, images, batch_size=batch_size, dtype=dtype,
                                                 channels_last=channels_last))


def group_metrics(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, names: Sequence[str]) -> dict:
    """``{f"{name}_{metric}": value}`` for each group (e.g. hospital ``k`` = ``names[k]``) and
    :data:`GROUP_METRICS`, plus ``{name}_n`` (patches); balanced accuracy is NaN for a one-class group."""
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        mask = np.asarray(groups) == k
        yt, yp = np.asarray(y_true)[mask], np.asarray(y_pred)[mask]
        out[f"{name}_n"] = int(mask.sum())
        out[f"{name}_acc"] = float(accuracy_score(yt, yp)) if mask.any() else float("nan")
        out[f"{name}_balanced_acc"] = (float(balanced_accuracy_score(yt, yp)) if len(np.unique(yt)) == 2
                                       else float("nan"))
    return out


def bn_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of every BatchNorm layer (weight, bias, running statistics, counter): what
    FedBN (Li et al., 2021) keeps local to each client."""
    return {f"{name}.{key}" if name else key for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) for key in module.state_dict()}


# --------------------------------------------------------------------------- the client
class FedClient:
    """One federated client: holds only its own shard and trains the weights it is sent.

    Plain Python (testable without Ray); :func:`remote_clients` makes Ray actors of it. ``fail_at_round``
    makes :meth:`fit` raise in that round (a hospital whose machine goes down; ``fail_mode="error"``) or
    hang for ``hang_seconds`` (``fail_mode="hang"``, a straggler), to show that the server leaves a failed
    or late client out of the average and carries on.
    """

    def __init__(self, cid: int, image_size: int, *, amp: Any = "auto", batch_size: int = 32, seed: int = 0,
                 threads: int | None = 1, fail_at_round: int | None = None, fail_mode: str = "error",
                 hang_seconds: float = 3600.0) -> None:
        if fail_mode not in ("error", "hang"):
            raise ValueError(f"fail_mode={fail_mode!r}: use 'error' or 'hang'")
        self.fail_mode, self.hang_seconds = fail_mode, hang_seconds
        if threads:
            torch.set_num_threads(threads)
        self.cid, self.batch_size, self.seed, self.fail_at_round = cid, batch_size, seed, fail_at_round
        self.dtype = env.amp_dtype(amp, torch.device("cpu"))
        self.channels_last = env.use_channels_last(torch.device("cpu"), self.dtype)
        self.model = BreastCancerCNN(image_size)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augment = augmentation()
        self.images = torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
        self.labels = torch.empty(0, dtype=torch.int64)

    def load_shard(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """Keep ``images``/``labels`` as this client's data (replacing any earlier shard); returns its size."""
        self.images, self.labels = images.clone(), labels.clone()
        return len(self.labels)

    def fit(self, global_state: Mapping[str, torch.Tensor], round_: int, local_epochs: int, lr: float) -> dict:
        """Load the global weights, train ``local_epochs`` on the shard (a fresh Adam: its moments start
        from zero every round), return ``state`` (the new state_dict, parameters **and** buffers),
        ``num_samples``, ``loss`` and ``seconds``. ``global_state`` may leave keys out (FedBN sends no
        BatchNorm entries): the client keeps its own for those."""
        if self.fail_at_round is not None and round_ == self.fail_at_round:
            if self.fail_mode == "hang":
                time.sleep(self.hang_seconds)
            else:
                raise RuntimeError(f"client {self.cid}: simulated failure in round {round_} (fail_client_at_round)")
        if len(self.labels) == 0:
            raise RuntimeError(f"client {self.cid} holds no data; call load_shard first")
        tick = time.perf_counter()
        missing, unexpected = self.model.load_state_dict(global_state, strict=False)
        if unexpected:
            raise KeyError(f"client {self.cid}: the global state has keys the model lacks: {unexpected[:5]}")
        torch.manual_seed(self.seed * 1_000 + self.cid * 97 + round_)   # its own augmentation stream
        loss = train_epochs(self.model, self.images, self.labels, epochs=local_epochs, lr=lr,
                            batch_size=self.batch_size, dtype=self.dtype, channels_last=self.channels_last,
                            augment=self.augment, seed=self.seed + 7919 * self.cid + round_)
        state = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        return {"cid": self.cid, "state": state, "num_samples": len(self.labels), "loss": loss,
                "seconds": time.perf_counter() - tick}


def remote_clients(count: int, image_size: int, *, fail_client: int | None = None,
                   fail_at_round: int | None = None, **kwargs: Any) -> list:
    """``count`` :class:`FedClient` Ray actors (Ray must be running). They share the cluster's CPU
    cores (fractional ``num_cpus``), one torch thread each; client ``fail_client`` fails in round
    ``fail_at_round``."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actor = ray.remote(num_cpus=min(1.0, cpus / count))(FedClient)
    return [actor.remote(k, image_size, fail_at_round=fail_at_round if k == fail_client else None,
                                            **kwargs) for k in range(count)]


def collect_updates(futures: Sequence[Any], names: Sequence[str], get: Any = None) -> tuple[list[dict], list[str]]:
    """Wait for every client's ``fit`` result; a client whose call raised is left out, with a warning
    naming it and why. Returns ``(updates, failed names)``. ``get`` defaults to ``ray.get``."""
    import warnings

    if get is None:
        import ray
        get = ray.get
    updates, failed = [], []
    for future, name in zip(futures, names):
        try:
            updates.append(get(future))
        except Exception as exc:  # noqa: BLE001 - any client failure: leave it out of this round
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"{name} failed and is left out of this round's average: {cause}", stacklevel=2)
            failed.append(name)
    return updates, failed


# --------------------------------------------------------------------------- communication
def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of every tensor in a state_dict (parameters and buffers)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def ddp_allreduce_bytes(param_bytes: int, workers: int, steps: int) -> int:
    """Bytes all workers together send when DDP ring-all-reduces the gradients ``steps`` times:
    each of ``workers`` sends ``2 (workers - 1) / workers`` of the gradient bytes per step."""
    if workers <= 1:
        return 0
    return int(round(steps * workers * 2 * (workers - 1) / workers * param_bytes))


# --------------------------------------------------------------------------- the metrics file
def append_csv(path: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Append ``row`` to the CSV at ``path`` (header written with the first row). The whole file is
    rewritten atomically, so a reader never sees half a row; a row with other columns than the file's
    header raises ``ValueError`` naming the file."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    columns = list(row)
    if old:
        header = next(csv.reader(io.StringIO(old)))
        if header != columns:
            raise ValueError(f"{path} has columns {header}, the new row {columns}; delete the file to start afresh.")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(old + buf.getvalue())
    return path


__all__ = ["FedClient", "GROUP_METRICS", "METRICS", "SPLITS", "append_csv", "assign_hospitals", "augmentation", "bn_keys",
           "binary_metrics", "collect_updates", "ddp_allreduce_bytes", "evaluate_binary", "group_metrics",
           "predict_logits", "remote_clients",
           "split_clients", "state_bytes", "to_input", "train_epochs"]
