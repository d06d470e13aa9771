"""Lightning plumbing for the labs: a base module that holds everything except the lesson.

Lab 04 writes ``training_step``, ``validation_step`` and ``configure_optimizers`` itself, in a
subclass of :class:`ClassifierBase` defined in the notebook. The base class keeps what every
classifier repeats: the model, the batch transform (uint8 → normalised floats **on the device**,
``channels_last`` when asked), per-class metrics from ``torchmetrics`` (they sum their counts over
all DDP processes before computing, so every image counts once), the test step that scores a
checkpoint, and the helpers the optimizer needs (:func:`decay_groups`, :func:`cosine_warmup`).

Logged names: ``val_acc``, ``val_f1_macro``, ``val_precision/<class>``, ``val_recall/<class>``,
``val_f1/<class>`` (by :meth:`ClassifierBase.on_validation_epoch_end`); the same with ``test_``
after :meth:`Trainer.test`, plus ``test_loss``. The subclass logs ``train_loss``, ``val_loss`` …
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from labkit.distributed import worker
from labkit.env import environment
from labkit.labs.lung_vit import tracking
from labkit.train import to_float

#: The Lightning checkpoint file inside each Ray checkpoint (``RayTrainReportCallback.CHECKPOINT_NAME``).
CHECKPOINT_NAME = "checkpoint.ckpt"
#: Module kinds whose weights are scales/shifts of a normalisation, not feature detectors: no decay.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def class_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, macro-F1 and per-class precision / recall / F1 (summed over processes when computed)."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        "precision": MulticlassPrecision(num_classes, average=None),
        "recall": MulticlassRecall(num_classes, average=None),
        "f1": MulticlassF1Score(num_classes, average=None),
    })


class ClassifierBase(pl.LightningModule):
    """Everything around the steps for ``model`` (logits ``[B, K]``) on batches ``(x uint8, y int64)``.

    Subclasses write ``training_step``, ``validation_step`` (update :attr:`val_loss` and
    :attr:`val_metrics`) and ``configure_optimizers``. ``channels_last`` stores the model and
    every batch NHWC (fast convolutions on GPUs and on CPUs with bf16). After
    :meth:`Trainer.test`, :attr:`test_outputs` holds ``y_true``, ``y_pred`` and ``probs`` (NumPy).
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], lr: float = 3e-4, weight_decay: float = 0.05,
                 transform_train: Callable | None = None, transform_eval: Callable | None = None,
                 warmup_epochs: int = 0, channels_last: bool = False) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: lr={lr!r} must be > 0 and weight_decay={weight_decay!r} >= 0.")
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.classes = list(classes)
        self.lr, self.weight_decay, self.warmup_epochs = lr, weight_decay, warmup_epochs
        self.channels_last = channels_last
        self.transform_train = transform_train or to_float
        self.transform_eval = transform_eval or to_float
        k = len(self.classes)
        self.train_acc = MulticlassAccuracy(k, average="micro")
        self.val_loss = MeanMetric()          # sum of losses / number of images, over all processes
        self.val_metrics = class_metrics(k)
        self.test_loss = MeanMetric()
        self.test_metrics = class_metrics(k)
        self.test_outputs: dict[str, np.ndarray] = {}
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def prepare(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """The uint8 batch as the model's float input, on the batch's device (augmented when ``train``)."""
        x = (self.transform_train if train else self.transform_eval)(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def log_class_metrics(self, stage: str, metrics: MetricCollection) -> None:
        """Log ``metrics`` (already summed over processes) as ``<stage>_acc``, ``<stage>_recall/<class>`` …"""
        for name, value in metrics.compute().items():
            if value.ndim == 0:
                self.log(f"{stage}_{name}", value, sync_dist=True, prog_bar=name == "acc")
            else:
                for cls, v in zip(self.classes, value):
                    self.log(f"{stage}_{name}/{cls}", v, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_class_metrics("val", self.val_metrics)

    # ----------------------------------------------------------------- scoring a checkpoint
    def on_test_epoch_start(self) -> None:
        self._test_batches = []

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(self.prepare(x, train=False)).float()   # metrics in fp32 from the logits
        self.test_loss.update(F.cross_entropy(logits, y, reduction="none"))
        self.test_metrics.update(logits, y)
        self._test_batches.append((y.detach().cpu(), logits.detach().softmax(1).cpu()))

    def on_test_epoch_end(self) -> None:
        self.log("test_loss", self.test_loss.compute())
        self.test_loss.reset()
        self.log_class_metrics("test", self.test_metrics)
        if self._test_batches:
            y = torch.cat([b[0] for b in self._test_batches]).numpy()
            probs = torch.cat([b[1] for b in self._test_batches]).numpy()
            self.test_outputs = {"y_true": y, "y_pred": probs.argmax(1), "probs": probs}
        self._test_batches = []


# --------------------------------------------------------------------------- optimizer helpers
def no_decay_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get no weight decay, chosen by **kind**, never by name:
    every bias, the weights of normalisation layers (:data:`NORM_TYPES`), and the parameters the
    model lists in ``model.no_weight_decay()`` (timm's convention; the ViT lists its position
    embedding and [CLS] token)."""
    declared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if pname == "bias" or isinstance(module, NORM_TYPES) or full in declared:
                names.append(full)
    unknown = declared - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"{type(model).__name__}.no_weight_decay() names {sorted(unknown)}, which are not parameters.")
    return sorted(names)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: weights with ``weight_decay``, and :func:`no_decay_names` with 0."""
    skip = set(no_decay_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if n not in skip], "weight_decay": weight_decay},
            {"params": [p for n, p in params if n in skip], "weight_decay": 0.0}]


def cosine_warmup(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                  floor: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch schedule: linear warm-up for ``warmup_epochs``, then cosine decay to ``floor`` × LR."""
    epochs = max(1, int(epochs))
    warm = min(warmup_epochs, epochs - 1)

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        t = (epoch - warm) / max(1, epochs - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- validation shards
class EvalShardSampler(DistributedSampler):
    """Each rank reads ``rank, rank + world, rank + 2·world, …``: every image exactly once over all
    ranks. ``DistributedSampler`` instead pads the index list so all ranks get the same count, and
    the padded images count twice in validation metrics. Ranks may differ by one image; that is
    fine for evaluation (no gradient all-reduce), and the metrics sum counts over ranks.

    It subclasses ``DistributedSampler`` so Lightning leaves it in place."""

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


# --------------------------------------------------------------------------- MLflow and checkpoints
class MlflowEpochLogger(pl.Callback):
    """After each training epoch (validation included), rank 0 logs ``trainer.callback_metrics``
    into an existing MLflow run with ``step`` = the epoch number (1, 2, …); at the start of fitting it
    logs ``params`` and the worker's device information (precision included). Other ranks do nothing."""

    def __init__(self, uri: str, run_id: str, params: dict | None = None, device_info: dict | None = None) -> None:
        super().__init__()
        self.uri, self.run_id = uri, run_id
        self.params, self.device_info = params or {}, device_info or {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        if self.params:
            tracking.log_params(self.uri, self.run_id, self.params)
        info = {**self.device_info, "world_size": trainer.world_size, "precision": str(trainer.precision),
                "accelerator": type(trainer.accelerator).__name__}
        tracking.log_dict(self.uri, self.run_id, info, "device.json")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        tracking.log_metrics(self.uri, self.run_id, metrics, step=trainer.current_epoch + 1)


# --------------------------------------------------------------------------- Ray workers' callbacks
class EpochHistory(pl.Callback):
    """Rank 0 keeps every epoch's metrics (Ray's Result keeps only those of kept checkpoints)
    and prints one progress line per epoch (Ray streams it to the notebook). The rows travel inside
    every Lightning checkpoint (``state_dict``), so a run resumed after a crash still has the
    epochs finished before it; ``attempt`` (1, 2, …) marks which start of the workers ran each epoch.
    ``images_per_s`` divides ``n_train`` (by default the images the workers trained on that epoch:
    this rank's batches × world size) by the epoch's training time, validation left out."""

    def __init__(self, epochs: int, n_train: int | None = None, show: bool = False, attempt: int = 1) -> None:
        self.rows: list[dict] = []
        self.epochs, self.n_train, self.show, self.attempt = epochs, n_train, show, attempt
        self.seen = 0

    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_train_epoch_start(self, trainer, module) -> None:
        self.tick, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.seen += len(batch[1]) * trainer.world_size

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.train_s = time.perf_counter() - self.tick

    def on_train_epoch_end(self, trainer, module) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        seconds = time.perf_counter() - self.tick
        row = {"epoch": trainer.current_epoch + 1, "loss": m.pop("train_loss", None),
               "acc": m.pop("train_acc", None), "val_loss": m.pop("val_loss", None),
               "val_acc": m.pop("val_acc", None), **m, "seconds": seconds,
               "images_per_s": (self.n_train or self.seen) / max(getattr(self, "train_s", seconds), 1e-9),
               "attempt": self.attempt}
        self.rows.append(row)
        if self.show:
            # sys.stdout, not print: Ray Train V2 also routes print() into its logger (twice on screen)
            sys.stdout.write(f"epoch {row['epoch']}/{self.epochs}: loss {row['loss']:.3f} acc {row['acc']:.3f} | "
                             f"val_loss {row['val_loss']:.3f} val_acc {row['val_acc']:.3f} | {seconds:.1f}s "
                             f"({row['images_per_s']:.0f} img/s)\n")
            sys.stdout.flush()


class CrashAtEpoch(pl.Callback):
    """The fault-tolerance demo: the last rank kills its process halfway through epoch ``fail_at_epoch``
    (counted from 1), once per run — :func:`labkit.distributed.worker.should_crash` and ``crash``, as in Lab 02."""

    def __init__(self, fail_at_epoch: int | None, run_dir: str | os.PathLike) -> None:
        self.fail_at_epoch, self.run_dir = fail_at_epoch, run_dir

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:

        epoch = trainer.current_epoch + 1
        if batch_idx == int(trainer.num_training_batches) // 2 and worker.should_crash(
                self.fail_at_epoch, epoch, trainer.global_rank, trainer.world_size, self.run_dir):
            worker.crash(epoch, trainer.global_rank, self.run_dir)


def worker_callbacks(config: dict, rank: int, n_train: int | None = None) -> tuple[list, Any]:
    """The lab's own callbacks for a worker — the epoch history (returned too, for rank 0's
    return value), with ``fail_at_epoch`` the one-time crash, with tracking the MLflow logger. Rank 0
    counts the starts of the worker group in ``run_dir`` (Lab 02's ``attempts.log``). Add
    ``RayTrainReportCallback()`` after them."""

    run_dir = config.get("run_dir")
    attempt = worker.record_attempt(run_dir) if run_dir and rank == 0 else 1
    history = EpochHistory(config["epochs"], n_train, show=rank == 0 and config.get("progress", True),
                           attempt=attempt)
    if attempt > 1 and history.show:
        worker.say(f"attempt {attempt}: the workers restarted; Lightning resumes from the latest checkpoint")
    callbacks = [history]
    if config.get("fail_at_epoch") and run_dir:
        callbacks.append(CrashAtEpoch(config["fail_at_epoch"], run_dir))
    if config.get("mlflow_run_id"):

        uri = config.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        callbacks.append(MlflowEpochLogger(uri, config["mlflow_run_id"], params=config["params"],
                                           device_info=environment("auto") if rank == 0 else None))
    return callbacks, history


def worker_result(trainer, history, rank: int) -> dict | None:
    """What rank 0 returns to the driver (``Result.return_value``): every epoch and the precision used."""
    if rank != 0:
        return None
    module = trainer.lightning_module
    return {"history": history.rows, "precision": str(trainer.precision),
            "channels_last": bool(getattr(module, "channels_last", False))}


@contextmanager
def checkpoint_file(checkpoint) -> Iterator[str | None]:
    """The Lightning file inside a ``ray.train.Checkpoint`` written by ``RayTrainReportCallback``
    (``checkpoint.ckpt``), for ``trainer.fit(..., ckpt_path=...)``; ``None`` when ``checkpoint`` is
    ``None`` (a fresh start). The path stays valid inside the ``with`` block."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint_file: no {CHECKPOINT_NAME} in {folder}; was the checkpoint written "
                                    f"by RayTrainReportCallback?")
        yield str(path)


def load_weights(module: pl.LightningModule, checkpoint_path, map_location="cpu") -> dict:
    """Load the ``state_dict`` of a Lightning checkpoint file into ``module``; returns the checkpoint's
    other entries (``epoch``, ``global_step`` …). Read with ``weights_only=True``: a Lightning checkpoint
    holds only tensors, dicts, lists, numbers and strings, so a file that would need more (an object
    that could run code while it is unpickled) is refused with a ``ValueError`` naming it."""
    try:
        ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 — name the file whatever went wrong
        why = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), exc)
        raise ValueError(f"checkpoint {checkpoint_path} was not loaded ({type(exc).__name__}: {why}); it is damaged, "
                         "not a Lightning checkpoint, or holds objects that could run code.") from None
    module.load_state_dict(ckpt["state_dict"])
    return {k: v for k, v in ckpt.items() if k in ("epoch", "global_step", "pytorch-lightning_version")}
