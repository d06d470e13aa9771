"""Lab 07's measuring tape for compressed models: size on disk, CPU latency per image, agreement.

The lab quantizes (torchao) and exports (``torch.export``) in its own cells; these helpers measure
the results the same way for every variant::

    size_mb = compress.size_on_disk(model.state_dict(), out_dir / "fp32.pt")
    ms = compress.latency_ms(model, images[:32], repeats=5)         # median ms per image, batch 32
    share = compress.agreement(pred_fp32, pred_int8)
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from labkit.files import atomic_path


def size_on_disk(obj: Any, path: str | os.PathLike, save: Callable[[Any, Path], None] | None = None) -> float:
    """Save ``obj`` to ``path`` (atomically; ``torch.save`` unless ``save(obj, path)`` is given) and return
    the file's size in MB (10⁶ bytes), read back with ``stat``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if save is None:
            torch.save(obj, tmp)
        else:                                  # e.g. torch.export.save wants its own suffix (.pt2)
            named = tmp.with_name(tmp.name + path.suffix)
            save(obj, named)
            os.replace(named, tmp)
    return path.stat().st_size / 1e6


def latency_ms(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, repeats: int = 5,
               warmup: int = 2, threads: int | None = 1) -> float:
    """Median wall time per **image** in milliseconds of ``model(batch)`` on the CPU.

    ``warmup`` calls first (allocations, lazy kernels), then ``repeats`` timed calls; the median
    of those, divided by the batch size. ``threads`` pins ``torch.set_num_threads`` for the
    measurement (1 by default: comparable numbers on a shared machine; ``None`` keeps the setting).
    """
    if batch.ndim != 4 or batch.shape[0] < 1:
        raise ValueError(f"latency_ms: need a batch [B, C, H, W] with B >= 1, got shape {tuple(batch.shape)}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency_ms: repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                tick = time.perf_counter()
                model(batch)
                if i >= warmup:
                    times.append(time.perf_counter() - tick)
    finally:
        torch.set_num_threads(before)
    return float(np.median(times)) * 1000 / batch.shape[0]


@torch.inference_mode()
def predict(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, transform: Callable,
            batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and softmax probabilities ``[N, K]`` for uint8 ``images`` (``transform``
    turns a uint8 batch into the model's float input)."""
    if isinstance(model, torch.nn.Module):
        try:
            model.eval()
        except NotImplementedError:      # a torch.export module: captured in eval mode already
            pass
    probs = [model(transform(images[i:i + batch_size])).float().softmax(1) for i in range(0, len(images), batch_size)]
    p = torch.cat(probs).numpy()
    return p.argmax(1), p


def agreement(pred_a, pred_b) -> float:
    """Share of samples on which two models predict the same class."""
    a, b = np.asarray(pred_a).ravel(), np.asarray(pred_b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"agreement: need two non-empty prediction arrays of the same length, got {a.size} and {b.size}.")
    return float((a == b).mean())


def layer_kinds(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per layer kind (``Conv2d``, ``Linear``, ``BatchNorm2d`` ...): where the bytes sit."""
    counts: dict[str, int] = {}
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + own
    return counts


__all__ = ["size_on_disk", "latency_ms", "predict", "agreement", "layer_kinds"]
