"""A Lightning module that trains any labkit classifier, and a callback that logs epochs to MLflow.

:class:`LitClassifier` wraps a plain ``nn.Module`` (``labkit.models.vit.ViT``, ``AlzheimerCNN``,
a ResNet …): cross-entropy, AdamW with a cosine schedule, accuracy and per-class precision /
recall / F1 from ``torchmetrics`` (which sum their counts over all DDP processes before computing).
Batches arrive as uint8 images; the transform (e.g. ``labkit.data.augment.BatchAugment``) turns
them into normalised floats **on the device**, so augmentation runs on the GPU when there is one.

Logged names (``self.log``): ``train_loss``, ``train_acc``, ``val_loss`` (mean over all processes:
``sync_dist=True``), ``val_acc``, ``val_f1_macro``, ``val_precision/<class>``, ``val_recall/<class>``,
``val_f1/<class>``, ``lr``; the same with ``test_`` in :meth:`test_step`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from labkit.train import to_float


def _metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        "precision": MulticlassPrecision(num_classes, average=None),
        "recall": MulticlassRecall(num_classes, average=None),
        "f1": MulticlassF1Score(num_classes, average=None),
    })


class LitClassifier(pl.LightningModule):
    """Train/validate/test ``model`` (logits ``[B, K]``) on batches ``(x uint8 [B,C,H,W], y int64 [B])``.

    ``transform_train`` / ``transform_eval`` map the uint8 batch to the model's float input on the
    device (default: scale to [-1, 1]). After :meth:`Trainer.test`, :attr:`test_outputs` holds
    ``y_true``, ``y_pred`` and ``probs`` (NumPy) for confusion matrices and tables.
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], lr: float = 3e-4, weight_decay: float = 0.05,
                 transform_train: Callable | None = None, transform_eval: Callable | None = None,
                 label_smoothing: float = 0.0, warmup_epochs: int = 0) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"LitClassifier: lr={lr!r} must be > 0 and weight_decay={weight_decay!r} >= 0.")
        self.model = model
        self.classes = list(classes)
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.warmup_epochs = warmup_epochs
        self.transform_train = transform_train or to_float
        self.transform_eval = transform_eval or to_float
        k = len(self.classes)
        self.train_acc = MulticlassAccuracy(k, average="micro")
        self.val_metrics = _metrics(k)
        self.test_metrics = _metrics(k)
        self.test_outputs: dict[str, np.ndarray] = {}
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _prepare(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        x = (self.transform_train if train else self.transform_eval)(x)
        if x.is_cuda and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(self._prepare(x, train=True))
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc.update(logits.detach(), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _eval_step(self, batch, stage: str, metrics: MetricCollection) -> torch.Tensor:
        x, y = batch
        logits = self(self._prepare(x, train=False))
        loss = F.cross_entropy(logits, y)
        metrics.update(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
        return logits

    def _log_epoch(self, stage: str, metrics: MetricCollection) -> None:
        values = metrics.compute()  # torchmetrics sums the counts of all processes first
        for name, value in values.items():
            if value.ndim == 0:
                self.log(f"{stage}_{name}", value, sync_dist=True, prog_bar=name == "acc")
            else:
                for cls, v in zip(self.classes, value):
                    self.log(f"{stage}_{name}/{cls}", v, sync_dist=True)
        metrics.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self._test_batches = []

    def test_step(self, batch, batch_idx: int) -> None:
        logits = self._eval_step(batch, "test", self.test_metrics)
        self._test_batches.append((batch[1].detach().cpu(), logits.detach().float().softmax(1).cpu()))

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)
        if self._test_batches:
            y = torch.cat([b[0] for b in self._test_batches]).numpy()
            probs = torch.cat([b[1] for b in self._test_batches]).numpy()
            self.test_outputs = {"y_true": y, "y_pred": probs.argmax(1), "probs": probs}
        self._test_batches = []

    def configure_optimizers(self):
        """AdamW (no weight decay on biases, norms, embeddings) + per-epoch cosine decay with
        optional linear warm-up."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
        warm = min(self.warmup_epochs, epochs - 1)

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            t = (epoch - warm) / max(1, epochs - warm)
            return 0.5 * (1 + np.cos(np.pi * t)) * 0.95 + 0.05

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class MlflowEpochLogger(pl.Callback):
    """After each training epoch (validation included), rank 0 logs ``trainer.callback_metrics``
    into an existing MLflow run with ``step`` = the epoch number (1, 2, …); at the start of fitting it logs ``params`` and
    the worker's device information. Other ranks do nothing."""

    def __init__(self, uri: str, run_id: str, params: dict | None = None, device_info: dict | None = None) -> None:
        super().__init__()
        self.uri, self.run_id = uri, run_id
        self.params, self.device_info = params or {}, device_info or {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        from labkit import tracking

        if self.params:
            tracking.log_params(self.uri, self.run_id, self.params)
        info = {**self.device_info, "world_size": trainer.world_size, "precision": str(trainer.precision),
                "accelerator": type(trainer.accelerator).__name__}
        tracking.log_dict(self.uri, self.run_id, info, "device.json")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        from labkit import tracking

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        tracking.log_metrics(self.uri, self.run_id, metrics, step=trainer.current_epoch + 1)


def load_weights(module: pl.LightningModule, checkpoint_path, map_location="cpu") -> dict:
    """Load the ``state_dict`` of a Lightning checkpoint file into ``module``; returns the checkpoint's
    other entries (``epoch``, ``global_step`` …). The file is our own, so it is unpickled in full."""
    ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    module.load_state_dict(ckpt["state_dict"])
    return {k: v for k, v in ckpt.items() if k in ("epoch", "global_step", "pytorch-lightning_version")}
