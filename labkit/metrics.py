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


# --------------------------------------------------------------------------- is a difference real?
def accuracy_noise(acc_a: float, n_a: int, acc_b: float, n_b: int, z: float = 2.0) -> float:
    """How far two accuracies measured on ``n_a`` and ``n_b`` test images can differ by the luck of the test
    sample alone: ``z`` standard errors of the difference (binomial; ``z=2`` ≈ a 95 % interval).

    This is a *lower bound* on the run-to-run spread: a different seed moves a result further (Lab 03 measures
    that spread by repeating runs). A difference smaller than this is not evidence of anything.
    """
    for name, acc, n in (("acc_a", acc_a, n_a), ("acc_b", acc_b, n_b)):
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"{name}={acc!r}: an accuracy lies in [0, 1].")
        if int(n) < 1:
            raise ValueError(f"n for {name} is {n!r}: need at least one test image.")
    return float(z * np.sqrt(acc_a * (1 - acc_a) / n_a + acc_b * (1 - acc_b) / n_b))


def balanced_accuracy(y_true, y_pred) -> float:
    """The mean recall over the classes present in ``y_true``: scikit-learn's ``balanced_accuracy_score`` without
    its input checks, fast enough to recompute a thousand times in :func:`paired_interval` (``metric=``)."""
    y, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    classes, index = np.unique(y, return_inverse=True)
    hits = np.bincount(index, weights=(y == p).astype(float), minlength=len(classes))
    return float(np.mean(hits / np.bincount(index, minlength=len(classes))))


def paired_interval(y_true, pred_a, pred_b, metric=balanced_accuracy_score, rounds: int = 1000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` (95 %) bootstrap interval of ``metric(pred_a) − metric(pred_b)`` when both models were scored
    on the *same* test images: resample the images (with replacement) ``rounds`` times and recompute the
    difference. Pairing removes the luck both models share, so this is tighter than :func:`accuracy_noise` —
    but it is still only test-sample noise, not seed-to-seed spread. Judge it with :func:`interval_verdict`."""
    y, a, b = _as_array(y_true, "y_true"), _as_array(pred_a, "pred_a"), _as_array(pred_b, "pred_b")
    if not y.shape == a.shape == b.shape:
        raise ValueError(f"y_true, pred_a and pred_b have {y.size}, {a.size} and {b.size} entries: one per test image.")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, y.size, y.size)
        diffs.append(metric(y[idx], a[idx]) - metric(y[idx], b[idx]))
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_noise(y_true, pred_a, pred_b, metric=balanced_accuracy_score, rounds: int = 1000,
                 seed: int = 0) -> float:
    """Half the width of :func:`paired_interval` (for a table column); the verdict asks whether 0 lies outside
    the interval itself (:func:`interval_verdict`), which need not be symmetric around the difference."""
    lo, hi = paired_interval(y_true, pred_a, pred_b, metric, rounds, seed)
    return float((hi - lo) / 2)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Is row ``a`` different from row ``b`` beyond seed noise, when run ``i`` of both used the same seed?

    The paired differences ``d_i = a_i − b_i`` remove what a seed does to both runs; their mean is judged
    against its two-sided ``level`` bound, Student's t at ``n − 1`` degrees of freedom times the standard
    error: ``bound = t · s_d / √n``. Under no real difference the verdict says "beyond noise" at the rate
    ``1 − level`` (5 %) — the rate a test of this module simulates. Returns ``n``, ``diff`` (mean),
    ``bound``, ``low``/``high`` and ``verdict``; with one seed there is no spread to judge against
    (``bound`` NaN, verdict "no spread measured").
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"a and b need one value per seed, the same seeds in both: got {x.size} and {y.size} values.")
    d = x - y
    n, mean = int(d.size), float(d.mean())
    if n < 2:
        return {"n": n, "diff": mean, "bound": float("nan"), "low": float("nan"), "high": float("nan"),
                "verdict": "no spread measured"}
    from scipy import stats  # here, not at the top: scipy.stats costs every lab ~1 s of import on 2 cores

    bound = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    return {"n": n, "diff": mean, "bound": bound, "low": mean - bound, "high": mean + bound,
            "verdict": interval_verdict(mean - bound, mean + bound)}


def interval_verdict(low: float, high: float) -> str:
    """The one rule every comparison in the course uses: ``"beyond noise"`` when 0 lies outside the interval
    ``[low, high]`` of a difference, else ``"within noise"`` (so no difference at all is never "beyond")."""
    return "within noise" if low <= 0.0 <= high else "beyond noise"


def verdict(difference: float, noise: float) -> str:
    """:func:`interval_verdict` for a symmetric interval ``difference ± noise`` (``|difference| <= noise`` is
    "within noise")."""
    return interval_verdict(difference - noise, difference + noise)
