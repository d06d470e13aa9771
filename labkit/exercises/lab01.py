"""Exercise checks for Lab 01 (the baseline): inverse-frequency class weights.

The reference is scikit-learn's ``compute_class_weight("balanced")`` (``n / (K · n_c)``, also
proportional to 1 / count), rescaled to mean 1: an independent implementation, not labkit's.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

from labkit.exercises import answer_or_reference, call_student, ok


def _as_counts(counts: Sequence[int] | Mapping[Any, int] | Any) -> torch.Tensor:
    if isinstance(counts, Mapping):
        counts = list(counts.values())
    elif hasattr(counts, "tolist"):
        counts = counts.tolist()
    return torch.as_tensor(counts, dtype=torch.float64).flatten()


def _reference_weights(n: torch.Tensor) -> torch.Tensor:
    """scikit-learn's "balanced" weights rescaled to mean 1 over the classes present (0 for absent ones)."""
    if n.numel() == 0 or bool((n < 0).any()) or not bool((n > 0).any()) or not bool(torch.isfinite(n).all()):
        raise ValueError(f"counts={n.tolist()}: need one non-negative count per class, at least one above 0.")
    present = n > 0
    classes = np.flatnonzero(present.numpy())
    labels = np.repeat(classes, n[present].round().long().numpy())          # one label per training image
    balanced = torch.as_tensor(compute_class_weight("balanced", classes=classes, y=labels), dtype=torch.float64)
    want = torch.zeros_like(n)
    want[present] = balanced / balanced.mean()
    return want


def class_weights_for_run(weights: Callable, counts: Sequence[int] | Mapping[Any, int]) -> torch.Tensor:
    """The class weights Lab 01's loss uses: the student's ``weights(counts)`` as a float32 tensor — a wrong answer
    changes what trains — or, while the exercise is the untouched stub, the reference weights (with a notice)."""
    n = _as_counts(counts)
    plain = [int(c) for c in n.round().long().tolist()]
    fn = answer_or_reference(weights, lambda c: _reference_weights(_as_counts(c)).tolist(), (plain,),
                             what="inverse_frequency_weights")
    got = fn(plain)
    got = torch.as_tensor(got.tolist() if hasattr(got, "tolist") else list(got), dtype=torch.float32).flatten()
    if got.numel() != n.numel():
        raise ValueError(f"inverse_frequency_weights returned {got.numel()} weights for {n.numel()} classes: "
                         "return one weight per class (the check above says what is wrong).")
    return got


def check_class_weights(weights: Callable | Sequence[float] | torch.Tensor,
                        counts: Sequence[int] | Mapping[Any, int]) -> None:
    """Check inverse-frequency class weights (Lab 01): ``w_c ∝ 1 / n_c``, normalised to mean 1.

    ``weights`` is the student's function (called with the counts as a list of ints) or its result.

    ``counts`` are the training images per class (a list, dict, pandas Series or tensor, in class
    order). Rare classes get weights above 1, common ones below 1; equal counts give all ones.
    ``torch.nn.CrossEntropyLoss(weight=weights)`` then uses them. A class without images gets weight 0 and the
    mean is taken over the classes that have images.
    """
    n = _as_counts(counts)
    want = _reference_weights(n)
    present = n > 0
    if callable(weights):
        weights = call_student(weights, [int(c) for c in n.round().long().tolist()], what="inverse_frequency_weights")
    try:
        got = torch.as_tensor(weights.tolist() if hasattr(weights, "tolist") else list(weights), dtype=torch.float64).flatten()
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"weights={weights!r} is not a list or tensor of numbers.") from exc
    if got.shape != want.shape:
        raise AssertionError(f"{got.numel()} weights for {want.numel()} classes: return one weight per class.")
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
        scaled = got[present] / got[present].mean() if got[present].mean() != 0 else got[present]
        hint = (f"the weights are proportional to 1/count but their mean is {got[present].mean().item():.3f}: "
                "divide by their mean" if torch.allclose(scaled, want[present], rtol=1e-4)
                else "use 1 / count per class, then divide by the mean of those values")
        raise AssertionError(f"weights {[round(x, 4) for x in got.tolist()]} != expected {[round(x, 4) for x in want.tolist()]}; "
                             f"{hint}.")
    ok(f"class weights: inverse frequency with mean 1 for {int(present.sum())} classes "
        f"(largest {want.max().item():.2f} for the rarest class)")
