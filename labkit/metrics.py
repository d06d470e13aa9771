"""Headline metrics every lab reports, the same way: accuracy beside what a model that learned
nothing would score.

On imbalanced data accuracy alone flatters: a model that always answers the most common class
scores the **majority-class rate**. So every record carries accuracy, **balanced accuracy** (the
mean of per-class recalls: 1/K for any constant answer) and **macro-F1**, next to the majority
rate and chance (1/K). Computed in fp32/int64 from labels, with scikit-learn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def _as_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values.cpu() if hasattr(values, "cpu") else values).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty: evaluate on at least one sample.")
    return arr.astype(np.int64)


def majority_rate(y_true, reference=None) -> float:
    """Accuracy of always answering the majority class of ``reference`` (the training labels,
    when given: a model cannot know the test split's majority) on ``y_true``."""
    y = _as_array(y_true, "y_true")
    ref = y if reference is None else _as_array(reference, "reference")
    majority = np.bincount(ref).argmax()
    return float((y == majority).mean())


def summarize(y_true, y_pred, num_classes: int | None = None, train_labels=None) -> dict[str, float]:
    """``acc``, ``balanced_acc``, ``macro_f1``, ``majority_rate`` and ``chance`` (1/K) of a prediction.

    ``num_classes`` defaults to the classes seen in either array; ``train_labels`` picks the
    majority class from the training split (recommended), else from ``y_true``.
    """
    y, p = _as_array(y_true, "y_true"), _as_array(y_pred, "y_pred")
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} labels but y_pred {p.size}: pass one prediction per sample.")
    k = int(num_classes or max(int(y.max()), int(p.max())) + 1)
    labels: Sequence[int] = list(range(k))
    return {
        "acc": float(accuracy_score(y, p)),
        "balanced_acc": float(balanced_accuracy_score(y, p)),
        "macro_f1": float(f1_score(y, p, labels=labels, average="macro", zero_division=0)),
        "majority_rate": majority_rate(y, train_labels),
        "chance": 1.0 / k,
    }
