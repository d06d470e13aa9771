"""Exercise checks for Lab 06 (streaming data, lean inference): the top-k + confidence-threshold step.

The reference is ``torch.topk`` on the probabilities (an independent implementation; the student
writes theirs with NumPy or torch), with the threshold applied to the top-1 probability.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from labkit.exercises import call_student, ok


def _probabilities(rows: int = 64, classes: int = 6, seed: int = 0) -> np.ndarray:
    """Softmax outputs with no ties, and a class order that differs from row to row; some rows sure
    (top-1 ≥ 0.8), most not."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, (rows, classes)) * rng.uniform(0.5, 4.0, (rows, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return (probs / probs.sum(1, keepdims=True)).astype(np.float32)


def reference_top_k(probs: np.ndarray, k: int, threshold: float) -> dict[str, np.ndarray]:
    """``torch.topk``: the k most probable classes per row (most probable first), their probabilities,
    and whether the top-1 probability reaches ``threshold``."""
    values, indices = torch.topk(torch.as_tensor(probs), k, dim=1, largest=True, sorted=True)
    return {"classes": indices.numpy(), "probs": values.numpy(), "confident": values[:, 0].numpy() >= threshold}


def _array(out: Any, key: str) -> np.ndarray:
    if not isinstance(out, dict) or key not in out:
        have = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise AssertionError(f"return a dict with keys 'classes', 'probs' and 'confident'; got {have}.")
    value = out[key]
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def check_top_k(fn: Callable[[np.ndarray, int, float], dict], k: int = 3, threshold: float = 0.8) -> None:
    """Check ``fn(probs, k, threshold)`` → ``{"classes": int [N, k], "probs": float [N, k],
    "confident": bool [N]}``: per row the ``k`` most probable classes, most probable first, their
    probabilities, and ``confident`` = top-1 probability ≥ ``threshold``. ``probs`` must not change."""
    probs = _probabilities()
    original = probs.copy()
    for kk, thr in ((k, threshold), (1, 0.5), (probs.shape[1], threshold)):
        got = call_student(fn, probs, kk, thr, what="your top-k function")
        want = reference_top_k(original, kk, thr)
        if not np.array_equal(probs, original):
            raise AssertionError("your function changed the probabilities in place; sort a copy (np.argsort "
                                 "returns indices and leaves the array alone).")
        classes, values, confident = (_array(got, key) for key in ("classes", "probs", "confident"))
        if classes.shape != want["classes"].shape or values.shape != want["probs"].shape:
            raise AssertionError(f"k={kk}: expected 'classes' and 'probs' of shape {want['classes'].shape} (rows × k); "
                                 f"got {classes.shape} and {values.shape}.")
        if not np.issubdtype(classes.dtype, np.integer):
            raise AssertionError(f"'classes' should hold class indices (integers), not {classes.dtype}.")
        if np.array_equal(classes, want["classes"][:, ::-1]) and kk > 1:
            raise AssertionError(f"k={kk}: your classes come least probable first; reverse the order "
                                 "(np.argsort sorts ascending: sort -probs, or take [:, ::-1]).")
        if not np.array_equal(np.sort(classes, 1), np.sort(want["classes"], 1)):
            raise AssertionError(f"k={kk}: row 0 should hold the classes {want['classes'][0].tolist()}, got "
                                 f"{classes[0].tolist()}: take the k largest probabilities of each row (axis=1).")
        if not np.array_equal(classes, want["classes"]):
            raise AssertionError(f"k={kk}: the right classes, in the wrong order (row 0: {classes[0].tolist()}, "
                                 f"expected {want['classes'][0].tolist()}): most probable first.")
        if not np.allclose(values, want["probs"], atol=1e-6):
            raise AssertionError(f"k={kk}: 'probs' must be the probabilities of those classes, in the same order "
                                 f"(row 0: expected {np.round(want['probs'][0], 4).tolist()}).")
        if confident.shape != want["confident"].shape or confident.dtype != bool:
            raise AssertionError(f"'confident' should be a bool array with one entry per row; got "
                                 f"{confident.dtype} of shape {confident.shape}.")
        if not np.array_equal(confident, want["confident"]):
            wrong = int(np.flatnonzero(confident != want["confident"])[0])
            raise AssertionError(f"threshold={thr}: row {wrong} has top-1 probability {original[wrong].max():.4f}, so "
                                 f"'confident' should be {bool(want['confident'][wrong])} (top-1 >= threshold).")
    ok(f"top-{k} classes and probabilities, most probable first; confident = top-1 >= {threshold} "
       f"({int(want['confident'].sum())} of {len(probs)} test rows)")
