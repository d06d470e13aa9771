"""Lab 07's bookkeeping for the Tune search: a leak-aware validation split and a sweep key that changes
whenever what the search depends on changes.

The trainable, the search space, the scheduler and the ``Tuner`` are written in the notebook; this
module keeps what any search repeats:

- :func:`lookalike_groups` — groups of images that look alike (k-means on small thumbnails), to keep
  neighbouring slices of one brain on one side of a split when the files carry no subject ids.
- :func:`describe_space` / :func:`fingerprint` / :func:`sweep_name` — a stable, JSON-ready
  description of a Tune search space (ranges, choices, samplers), a content hash of tensors, and the
  folder name derived from both: edit a range or the data and the next run starts a new search
  instead of silently reading back the old one.
- :func:`best_epoch` — the epoch at which a trial reached its best score (what a re-training repeats).
"""
from __future__ import annotations

import hashlib
import json
import math
import types
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


def lookalike_groups(images: torch.Tensor, per_group: int = 8, thumb: int = 16, components: int = 32,
                     seed: int = 0) -> np.ndarray:
    """One group id per image: k-means clusters of about ``per_group`` images each.

    Each uint8 image ``[C, H, W]`` is shrunk to ``thumb × thumb`` (area average), standardised (its own
    mean and spread, so contrast does not decide), projected on its first ``components`` principal
    axes, and clustered into ``len(images) // per_group`` groups. Slices of one brain look more
    alike than slices of two brains, so they tend to share a group; splitting by group keeps them
    on one side. It is a guard, not a proof: two brains may share a group (harmless: the split only
    gets stricter), and one brain's slices may still fall into two groups.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"lookalike_groups: need images [N, C, H, W] with N >= 2, got shape {tuple(images.shape)}.")
    if per_group < 1 or thumb < 2:
        raise ValueError(f"lookalike_groups: per_group={per_group} must be >= 1 and thumb={thumb} >= 2.")
    small = torch.cat([F.adaptive_avg_pool2d(chunk.float().mean(1, keepdim=True), thumb).flatten(1)
                       for chunk in images.split(1024)]).numpy()      # in chunks: 5000 floats images are 300+ MB
    small = (small - small.mean(1, keepdims=True)) / (small.std(1, keepdims=True) + 1e-6)
    k = max(2, min(len(small), len(small) // per_group))
    dims = max(1, min(components, small.shape[1], len(small) - 1))
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(small)
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(reduced).astype(np.int64)


def _describe(value: Any) -> Any:
    """A JSON-ready, run-independent description of one search-space entry."""
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    if hasattr(value, "__dict__"):                     # a Tune domain (Float, Categorical ...) and its sampler
        return {"type": type(value).__qualname__, **{k: _describe(v) for k, v in sorted(vars(value).items())}}
    return repr(value)


def describe_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """A stable, JSON-ready description of a Tune ``param_space``: every domain with its kind, bounds,
    categories and sampler (``tune.loguniform(1e-4, 3e-3)`` → ``{"type": "Float", "lower": 0.0001,
    "upper": 0.003, "sampler": {"type": "Float._LogUniform"}}``), fixed values as they are. Functions
    (``tune.sample_from``) are named by module and name only: an edit inside one is not seen."""
    if not isinstance(space, Mapping):
        raise TypeError(f"describe_space: need the search space as a dict, got {type(space).__name__}.")
    return _describe(space)


def fingerprint(*tensors: torch.Tensor | np.ndarray) -> str:
    """SHA-1 (hex) of the shapes, dtypes and bytes of ``tensors``: changes when any image or label does."""
    digest = hashlib.sha1()
    for t in tensors:
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
        digest.update(f"{arr.dtype}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def sweep_name(key: Mapping[str, Any], prefix: str = "sweep-") -> str:
    """The folder name of a search: ``prefix`` + the first 8 hex digits of the SHA-1 of ``key`` (as JSON)."""
    text = json.dumps(_describe(key), sort_keys=True)
    return prefix + hashlib.sha1(text.encode()).hexdigest()[:8]


def best_epoch(history: pd.DataFrame, metric: str, mode: str = "max") -> tuple[int, float]:
    """``(epoch, score)`` of a trial's best report on ``metric`` (the first such epoch on a tie)."""
    if history is None or history.empty or metric not in history or "epoch" not in history:
        raise ValueError(f"best_epoch: need a history with 'epoch' and {metric!r} columns.")
    if mode not in ("max", "min"):
        raise ValueError(f"best_epoch: mode={mode!r} must be 'max' or 'min'.")
    row = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
    return int(history.loc[row, "epoch"]), float(history.loc[row, metric])


__all__ = ["lookalike_groups", "describe_space", "fingerprint", "sweep_name", "best_epoch"]
