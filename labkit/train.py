"""One training path for every lab: :func:`train_one_epoch`, :func:`evaluate` and :func:`fit`.

The same functions run in a notebook, inside a Ray Train worker, on a DDP rank and in a federated
client: nothing here knows about Ray or process groups. A DDP-wrapped model and a loader with a
``DistributedSampler`` work unchanged (metrics are then those of the local shard; aggregate them
across ranks yourself, and pass ``progress=False`` on all ranks but rank 0).

Per batch (see :func:`train_one_epoch`)::

    x, y  -> device (non_blocking)           # uint8 images, int64 labels
    x     = transform(x)                     # e.g. BatchAugment: flip/rotate + normalise, on the device
    x     = channels_last(x)                 # where env.use_channels_last(device, amp_dtype): GPU, bf16 on a CPU
    x, y  = batch_transform(x, y)            # optional MixUp/CutMix: y becomes soft targets [B, K]
    with autocast(amp_dtype): loss = loss_fn(model(x), y)
    backward (GradScaler for fp16) -> clip -> optimizer.step() -> scheduler.step() -> ema.update_parameters()

Lab 01 writes this loop in notebook cells and checks that both end an epoch with the same weights.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from labkit.env import amp_dtype as resolve_amp_dtype
from labkit.env import grad_scaler, pick_device, use_channels_last
from labkit.timing import sync, throughput

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = (None, "cosine", "plateau", "onecycle")
LR_RULES = ("none", "linear", "sqrt")
_POSTFIX_EVERY_S = 0.5  # refresh the bar's loss / img/s at most this often (each refresh syncs the GPU)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Default transform: uint8 images → float in [-1, 1] (mean 0.5, std 0.5); float input passes through."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def _to_device(x, y, device: torch.device, transform: Callable | None, channels_last: bool):
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    x = transform(x) if transform is not None else to_float(x)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _hard(y: torch.Tensor) -> torch.Tensor:
    """Class indices from hard labels [B] or soft targets [B, K]."""
    return y.argmax(1) if y.dim() > 1 else y


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                    device, transform: Callable | None = None, batch_transform: Callable | None = None,
                    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    scheduler=None, grad_clip: float | None = None, ema=None,
                    progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` for one pass over ``loader``.

    ``transform`` maps the uint8 batch (already on ``device``) to normalised floats (default
    :func:`to_float`), then ``channels_last`` where :func:`labkit.env.use_channels_last` says so
    (put the model in that layout too, as :func:`fit` does). ``amp_dtype``/``scaler``: from
    :func:`labkit.env.amp_dtype` / :func:`labkit.env.grad_scaler`. ``batch_transform(x, y)`` may
    return soft targets ``[B, K]`` (accuracy then compares with ``targets.argmax(1)``). ``scheduler`` is stepped
    after every batch; ``ema`` (a ``torch.optim.swa_utils.AveragedModel``) is updated after every optimizer step.

    Returns ``loss`` (mean over images), ``acc``, ``images``, ``seconds``, ``images_per_s``,
    ``data_s`` (time spent waiting for the loader) and ``compute_s`` (the rest).
    """
    device = pick_device(device)
    if amp_dtype == torch.float16 and scaler is None:
        warnings.warn("train_one_epoch: fp16 autocast without a GradScaler can underflow gradients; "
                      "pass scaler=labkit.env.grad_scaler(amp_dtype, device) or use bf16.", stacklevel=2)
    channels_last = use_channels_last(device, amp_dtype)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    images, data_s = 0, 0.0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, dynamic_ncols=True)
    sync(device)
    start = last_postfix = tick = time.perf_counter()
    for x, y in bar:
        data_s += time.perf_counter() - tick
        x, y = _to_device(x, y, device, transform, channels_last)
        if batch_transform is not None:
            x, y = batch_transform(x, y)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)

        n = y.shape[0]
        images += n
        loss_sum += loss.detach().float() * n
        correct += (logits.detach().argmax(1) == _hard(y)).sum()
        now = time.perf_counter()
        if progress and now - last_postfix >= _POSTFIX_EVERY_S:
            bar.set_postfix(loss=f"{loss_sum.item() / images:.3f}", img_s=f"{images / (now - start):.0f}")
            last_postfix = now
        tick = time.perf_counter()
    sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    if images == 0:
        raise ValueError("train_one_epoch: the loader yielded no batches (empty split, or drop_last=True "
                         "with fewer images than batch_size); check max_train and batch_size.")
    return {"loss": loss_sum.item() / images, "acc": correct.item() / images, "images": images,
            "seconds": seconds, "images_per_s": throughput(images, seconds),
            "data_s": data_s, "compute_s": max(seconds - data_s, 0.0)}


def evaluate(model: nn.Module, loader, loss_fn: Callable | None = None, *, device,
             transform: Callable | None = None, amp_dtype: torch.dtype | None = None,
             progress: bool = False, return_outputs: bool = False, topk: Sequence[int] = (1,)) -> dict:
    """Loss and accuracy of ``model`` on ``loader`` (eval mode, ``torch.inference_mode``).

    Returns ``loss``, ``acc``, ``images``, ``seconds`` and ``images_per_s``; ``top<k>`` for each
    ``k > 1`` in ``topk`` (e.g. ``top5``); with ``return_outputs`` also NumPy arrays ``y_true``,
    ``y_pred`` and ``probs`` ``[N, K]``, all computed in fp32 from the logits. The model's
    train/eval mode is restored afterwards.
    """
    device = pick_device(device)
    channels_last = use_channels_last(device, amp_dtype)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    ks = sorted({int(k) for k in topk} | {1})
    loss_sum = torch.zeros((), device=device)
    correct = {k: torch.zeros((), device=device, dtype=torch.long) for k in ks}
    images, y_true, probs = 0, [], []
    was_training = model.training
    model.eval()
    sync(device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for x, y in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress):
                x, y = _to_device(x, y, device, transform, channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                logits = logits.float()
                n, hard = y.shape[0], _hard(y)
                images += n
                loss_sum += loss_fn(logits, y).float() * n
                top = logits.topk(min(ks[-1], logits.shape[1]), dim=1).indices
                hits = top == hard[:, None]
                for k in ks:
                    correct[k] += hits[:, :k].any(1).sum()
                if return_outputs:
                    y_true.append(hard.cpu())
                    probs.append(logits.softmax(1).cpu())
    finally:
        model.train(was_training)
    sync(device)
    seconds = time.perf_counter() - start
    if images == 0:
        raise ValueError("evaluate: the loader yielded no batches (empty split?); check max_test and the data folder.")
    out = {"loss": loss_sum.item() / images, "acc": correct[1].item() / images, "images": images,
           "seconds": seconds, "images_per_s": throughput(images, seconds)}
    out.update({f"top{k}": correct[k].item() / images for k in ks if k > 1})
    if return_outputs:
        p = torch.cat(probs).numpy()
        out.update(y_true=torch.cat(y_true).numpy(), y_pred=p.argmax(1), probs=p)
    return out


def scale_lr(lr: float, world_size: int, rule: str = "none") -> float:
    """Learning rate for ``world_size`` workers whose global batch is ``world_size`` × the per-worker batch.

    ``"none"`` keeps ``lr``; ``"linear"`` multiplies by ``world_size`` (Goyal et al. 2017);
    ``"sqrt"`` by ``sqrt(world_size)`` (often better for Adam).
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"scale_lr: world_size={world_size!r} must be an integer >= 1.")
    if rule == "none":
        return float(lr)
    if rule == "linear":
        return float(lr) * world_size
    if rule == "sqrt":
        return float(lr) * math.sqrt(world_size)
    raise ValueError(f"scale_lr: rule={rule!r} is unknown; use one of {LR_RULES}.")


def class_weights_from_counts(counts) -> torch.Tensor:
    """Inverse-frequency class weights with mean 1 over the classes present.

    ``counts`` is a sequence / array / tensor / pandas Series of per-class image counts. A class
    with no images gets weight 0 (it never appears as a target anyway). Use with
    ``nn.CrossEntropyLoss(weight=...)`` so rare classes count as much as common ones.
    """
    if isinstance(counts, dict):
        counts = list(counts.values())
    c = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"class_weights_from_counts: counts must be a 1-D list of per-class counts, got shape {tuple(c.shape)}.")
    if (c < 0).any() or not torch.isfinite(c).all():
        raise ValueError(f"class_weights_from_counts: counts={c.tolist()} must be finite and >= 0.")
    present = c > 0
    if not present.any():
        raise ValueError("class_weights_from_counts: every count is 0; the training split holds no labels.")
    w = torch.where(present, 1.0 / c.clamp(min=1), torch.zeros_like(c))
    return (w * present.sum() / w.sum()).float()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / AveragedModel / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(model, attr, None), nn.Module):
            model = getattr(model, attr)
    return model


def shard_indices(indices: int | Sequence[int] | torch.Tensor, rank: int, world_size: int) -> list[int]:
    """Every ``world_size``-th of ``indices`` (or of ``range(indices)``) from ``rank``: an exact split
    (no padding, unlike ``DistributedSampler``) for evaluating on several ranks; the shards of all
    ranks cover every index once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: rank={rank} must be in [0, world_size={world_size}).")
    items = range(indices) if isinstance(indices, int) else indices
    picked = items[rank::world_size]
    return picked.tolist() if isinstance(picked, torch.Tensor) else list(picked)


def _num_outputs(model: nn.Module) -> int | None:
    m = unwrap(model)
    if isinstance(getattr(m, "num_classes", None), int):
        return m.num_classes
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    return linears[-1].out_features if linears else None


def _loader_labels(loader) -> torch.Tensor:
    """All labels of a loader's dataset (the whole dataset, also under a DistributedSampler)."""
    ds, index = loader.dataset, None
    while isinstance(ds, torch.utils.data.Subset):
        index = torch.as_tensor(ds.indices) if index is None else torch.as_tensor(ds.indices)[index]
        ds = ds.dataset
    labels = None
    if isinstance(ds, torch.utils.data.TensorDataset):
        labels = ds.tensors[1]
    elif hasattr(ds, "targets"):
        labels = torch.as_tensor(ds.targets)
    if labels is None:  # generic dataset: one pass over the loader
        return torch.cat([_hard(torch.as_tensor(y)).cpu() for _, y in loader]).long()
    labels = _hard(labels.cpu()).long()
    return labels[index] if index is not None else labels


def _class_weights(class_weights, train_loader, model: nn.Module, device: torch.device) -> torch.Tensor | None:
    if class_weights is None or class_weights is False:
        return None
    k = _num_outputs(model)
    if class_weights is True:
        labels = _loader_labels(train_loader)
        w = class_weights_from_counts(torch.bincount(labels, minlength=k or 0))
    else:
        w = torch.as_tensor(class_weights, dtype=torch.float32)
    if w.dim() != 1 or (k is not None and w.numel() != k):
        raise ValueError(f"fit: class_weights has {w.numel()} entries but the model outputs {k} classes; "
                         "pass one weight per class, or class_weights=True to compute them from the labels.")
    return w.to(device)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov) over the model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"fit: optimizer={name!r} is unknown; use one of {OPTIMIZERS} or pass a torch.optim.Optimizer.")


def _check_fit_args(epochs, lr, lr_schedule, early_stopping, val_loader) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"fit: epochs={epochs!r} must be an integer >= 1.")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"fit: lr={lr!r} must be a number > 0 (e.g. 1e-3).")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"fit: lr_schedule={lr_schedule!r} is unknown; use one of {LR_SCHEDULES}.")
    if early_stopping is not None and (not isinstance(early_stopping, int) or isinstance(early_stopping, bool)
                                       or early_stopping < 1):
        raise ValueError(f"fit: early_stopping={early_stopping!r} must be None or a patience in epochs >= 1.")
    if val_loader is None and (early_stopping is not None or lr_schedule == "plateau"):
        raise ValueError("fit: early_stopping and lr_schedule='plateau' watch val_loss; pass a val_loader.")


def fit(model: nn.Module, train_loader, val_loader, *, epochs: int, lr: float, device="auto",
        optimizer: str | torch.optim.Optimizer = "adam", weight_decay: float = 0.0, class_weights=None,
        amp="auto", lr_schedule: str | None = None, early_stopping: int | None = None,
        transform_train: Callable | None = None, transform_eval: Callable | None = None,
        progress: bool = True, on_epoch: Callable[[dict], None] | None = None,
        batch_transform: Callable | None = None, ema=None, grad_clip: float | None = None) -> list[dict]:
    """Train ``model`` for ``epochs`` and validate after each; returns one dict per epoch.

    Each record: ``epoch``, ``loss``, ``acc`` (train), ``val_loss``, ``val_acc`` (when
    ``val_loader``), ``lr`` (at the start of the epoch), ``seconds`` and ``images_per_s`` (training
    only), ``data_s``, ``compute_s``, ``val_seconds``; with ``ema`` also ``ema_val_loss``/``ema_val_acc``.

    - ``optimizer``: ``"adam"``/``"adamw"``/``"sgd"`` or a ready optimizer (then ``lr`` and
      ``weight_decay`` are not applied).
    - ``class_weights``: ``True`` computes inverse-frequency weights from the training labels
      (:func:`class_weights_from_counts`), or pass one weight per class. The weighted loss is used
      for training and validation.
    - ``amp``: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``False`` (fp32, no autocast), resolved by
      :func:`labkit.env.amp_dtype`; model and batches go ``channels_last`` where it pays.
    - ``lr_schedule``: ``None``, ``"cosine"`` (per batch to 0), ``"onecycle"`` (per batch, peak ``lr``)
      or ``"plateau"`` (halve the lr when ``val_loss`` did not improve for an epoch).
    - ``early_stopping=patience``: stop after ``patience`` epochs without a better ``val_loss``,
      restore the best weights; the last record then holds ``stopped_early`` and ``best_epoch``.
    - ``batch_transform`` (MixUp/CutMix), ``grad_clip`` and ``ema`` go to :func:`train_one_epoch`;
      the EMA model is validated too (``ema_val_loss``/``ema_val_acc``). Modules among the
      transforms and ``ema`` are moved to ``device``.
    - ``on_epoch(record)`` is called after each epoch (log to MLflow, report to Ray, …).
    """
    _check_fit_args(epochs, lr, lr_schedule, early_stopping, val_loader)
    device = pick_device(device)
    dtype = resolve_amp_dtype(amp, device)
    model.to(device)
    if use_channels_last(device, dtype):
        model.to(memory_format=torch.channels_last)
    for part in (transform_train, transform_eval, batch_transform, ema):
        if isinstance(part, nn.Module):  # e.g. BatchAugment's buffers, the EMA copy: same device as the data
            part.to(device)
    scaler = grad_scaler(dtype, device)
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(model, optimizer, lr, weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(class_weights, train_loader, model, device))

    batch_sched = epoch_sched = None
    if lr_schedule in ("cosine", "onecycle"):
        try:
            total = epochs * len(train_loader)
        except TypeError:
            raise ValueError(f"fit: lr_schedule={lr_schedule!r} steps per batch and needs a train_loader with len().") from None
        batch_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if lr_schedule == "cosine"
                       else torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total))
    elif lr_schedule == "plateau":
        epoch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1)

    history: list[dict] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    bar = tqdm(range(1, epochs + 1), desc="epochs", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            sampler.set_epoch(epoch)
        record = {"epoch": epoch}
        lr_now = opt.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_loader, opt, loss_fn, device=device, transform=transform_train,
                                batch_transform=batch_transform, amp_dtype=dtype, scaler=scaler,
                                scheduler=batch_sched, grad_clip=grad_clip, ema=ema, progress=progress,
                                desc=f"epoch {epoch}/{epochs}")
        record.update(loss=stats["loss"], acc=stats["acc"])
        if val_loader is not None:
            val = evaluate(model, val_loader, loss_fn, device=device, transform=transform_eval, amp_dtype=dtype)
            record.update(val_loss=val["loss"], val_acc=val["acc"])
            if ema is not None:
                ema_val = evaluate(ema, val_loader, loss_fn, device=device, transform=transform_eval, amp_dtype=dtype)
                record.update(ema_val_loss=ema_val["loss"], ema_val_acc=ema_val["acc"])
        record.update(lr=lr_now, seconds=stats["seconds"], images_per_s=stats["images_per_s"],
                      data_s=stats["data_s"], compute_s=stats["compute_s"])
        if val_loader is not None:
            record["val_seconds"] = val["seconds"]
        if epoch_sched is not None:
            epoch_sched.step(record["val_loss"])

        stop = False
        if early_stopping is not None:
            if record["val_loss"] < best_loss:  # NaN never counts as better
                best_loss, best_epoch = record["val_loss"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stop = epoch - best_epoch >= early_stopping
            if stop or epoch == epochs:
                record.update(stopped_early=stop and epoch < epochs, best_epoch=best_epoch)
        history.append(record)
        bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "val_loss", "val_acc") if k in record})
        if on_epoch is not None:
            on_epoch(record)
        if stop:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
