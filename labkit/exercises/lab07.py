"""Exercise checks for Lab 07 (tune, compress, serve): the endpoint's top-k answer."""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from labkit.exercises import call_student, ok

CLASSES = ["MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"]


def reference_top_k(probs: Sequence[float], classes: Sequence[str], k: int) -> dict[str, Any]:
    """The answer built with plain Python: indices sorted by (−probability, index), the first
    ``min(k, len(classes))`` kept, probabilities as Python floats."""
    values = [float(p) for p in (probs.tolist() if hasattr(probs, "tolist") else probs)]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:min(k, len(values))]
    return {"class": classes[order[0]], "top_k": [{"class": classes[i], "probability": values[i]} for i in order]}


def _cases() -> list[tuple[Any, list[str], int, str]]:
    """(probs, classes, k, what) — a list, a NumPy float32 array, a torch tensor, a tie, k too large."""
    return [
        ([0.1, 0.2, 0.6, 0.1], CLASSES, 2, "a list"),
        (np.array([0.05, 0.15, 0.3, 0.5], dtype=np.float32), CLASSES, 3, "a NumPy float32 array"),
        (torch.tensor([0.7, 0.1, 0.1, 0.1]), CLASSES, 4, "a torch tensor"),
        ([0.3, 0.3, 0.2, 0.2], CLASSES, 3, "a tie (0.3, 0.3): the lower class index comes first"),
        ([0.25, 0.5, 0.25], ["a", "b", "c"], 5, "k larger than the number of classes"),
    ]


def check_top_k(fn: Callable[[Any, Sequence[str], int], dict]) -> None:
    """Check ``fn(probs, classes, k)``: the endpoint's JSON answer for one image.

    ``probs`` holds one probability per class (a list, NumPy array or torch tensor). The answer is
    a dict ``{"class": <most likely class name>, "top_k": [{"class": name, "probability": p}, ...]}``
    with the ``min(k, number of classes)`` most likely classes, most likely first (ties: the lower
    class index first), probabilities as plain Python floats, so that ``json.dumps`` accepts it.
    """
    for probs, classes, k, what in _cases():
        got = call_student(fn, probs, classes, k, what="your top-k answer builder")
        want = reference_top_k(probs, classes, k)
        try:
            json.dumps(got)
        except TypeError as exc:
            raise AssertionError(f"for {what}: json.dumps cannot encode your answer ({exc}); convert NumPy/torch "
                                 f"numbers with float(...) (or .tolist()) before building the dict.") from None
        if not isinstance(got, dict) or set(got) != {"class", "top_k"}:
            raise AssertionError(f'for {what}: return a dict with exactly the keys "class" and "top_k"; got '
                                 f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        entries = got["top_k"]
        if not isinstance(entries, list) or len(entries) != len(want["top_k"]):
            n = len(entries) if isinstance(entries, list) else type(entries).__name__
            hint = " (never more than there are classes)" if k > len(classes) else ""
            raise AssertionError(f'for {what}: "top_k" should list {len(want["top_k"])} entries{hint}; got {n}.')
        names = [e.get("class") if isinstance(e, dict) else None for e in entries]
        if names != [e["class"] for e in want["top_k"]]:
            lowest = reference_top_k([-float(p) for p in np.asarray(probs)], classes, k)["top_k"]
            ascending = names == [e["class"] for e in lowest]
            hint = "most likely first: sort in descending order" if ascending else (
                "sort by probability, highest first; on a tie keep the lower class index first "
                "(a stable sort of the indices)")
            raise AssertionError(f"for {what} (probs {np.round(np.asarray(probs, dtype=float), 3).tolist()}, k={k}): "
                                 f"classes {names}, expected {[e['class'] for e in want['top_k']]}: {hint}.")
        for e, w in zip(entries, want["top_k"]):
            p = e.get("probability")
            if not isinstance(p, float) or not math.isclose(p, w["probability"], rel_tol=1e-6, abs_tol=1e-7):
                raise AssertionError(f"for {what}: {e['class']!r} has probability {p!r}, expected "
                                     f"{w['probability']:.6f} as a Python float.")
        if got["class"] != want["class"]:
            raise AssertionError(f'for {what}: "class" is {got["class"]!r}, expected the most likely class '
                                 f"{want['class']!r}.")
    ok("top-k answer: most likely first, ties by class index, k clipped, JSON-ready floats")


__all__ = ["check_top_k", "reference_top_k"]
