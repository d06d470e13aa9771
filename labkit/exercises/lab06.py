"""Exercise checks for Lab 06 (streaming data, lean inference): the top-k + confidence-threshold step,
and the data- vs compute-bound verdict against all workers.

The top-k reference is ``torch.topk`` on the probabilities (an independent implementation; the student
writes theirs with NumPy or torch), with the threshold applied to the top-1 probability. The verdict's
reference compares seconds per global step instead of rates.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from labkit.exercises import answer_or_reference, call_student, ok


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


# --------------------------------------------------------------------------- data- or compute-bound
def reference_bound_verdict(data_ips: float, compute_ips: float, world_size: int) -> dict[str, Any]:
    """Seconds per global step: the pipeline needs ``world_size`` batches' worth of images per step, the
    workers need one batch's time; data-bound when the pipeline's time is the longer (a tie: compute-bound)."""
    batch = 1.0                                            # any batch size: it cancels
    data_s = world_size * batch / data_ips                 # the pipeline makes one batch for every worker
    compute_s = batch / compute_ips                        # the workers train theirs side by side
    return {"verdict": "data-bound" if data_s > compute_s else "compute-bound",
            "demand_ips": world_size * batch / compute_s, "workers_fed": compute_s / (batch / data_ips)}


#: (data_ips, compute_ips per worker, world_size): the cases the check runs; one where a single worker's
#: compute is below the pipeline but all workers' is above, one exact tie, and the reverse.
VERDICT_CASES = ((850.0, 110.0, 1), (850.0, 110.0, 8), (300.0, 200.0, 2), (400.0, 200.0, 2), (90.0, 120.0, 1),
                 (1000.0, 40.0, 4))


def check_bound_verdict(fn: Callable[[float, float, int], dict]) -> None:
    """Check ``fn(data_ips, compute_ips, world_size)`` → ``{"verdict", "demand_ips", "workers_fed"}``:
    data-bound when the pipeline's rate is below ``compute_ips × world_size`` (a tie is compute-bound),
    ``demand_ips`` that product, ``workers_fed`` = ``data_ips / compute_ips``."""
    for data_ips, compute_ips, world in VERDICT_CASES:
        got = call_student(fn, data_ips, compute_ips, world, what="your verdict function")
        want = reference_bound_verdict(data_ips, compute_ips, world)
        if not isinstance(got, dict) or not {"verdict", "demand_ips", "workers_fed"} <= set(got):
            have = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise AssertionError(f"return a dict with keys 'verdict', 'demand_ips' and 'workers_fed'; got {have}.")
        case = f"pipeline {data_ips:g} img/s, {world} worker(s) at {compute_ips:g} img/s each"
        if not np.isclose(float(got["demand_ips"]), want["demand_ips"]):
            hint = (" — that is one worker's rate: all the workers draw from the one pipeline, multiply by world_size"
                    if np.isclose(float(got["demand_ips"]), compute_ips) and world > 1 else "")
            raise AssertionError(f"{case}: demand_ips should be {want['demand_ips']:g}, got {got['demand_ips']}{hint}.")
        if got["verdict"] != want["verdict"]:
            tie = " (a tie: the pipeline keeps up, so compute-bound)" if np.isclose(data_ips, want["demand_ips"]) else ""
            raise AssertionError(f"{case}: the run is {want['verdict']}{tie}; your function says {got['verdict']!r}.")
        if not np.isclose(float(got["workers_fed"]), want["workers_fed"]):
            raise AssertionError(f"{case}: the pipeline could feed {want['workers_fed']:.3g} such workers "
                                 f"(data_ips / compute_ips); got {got['workers_fed']}.")
    ok(f"data- vs compute-bound against all workers' demand ({len(VERDICT_CASES)} cases, a tie included)")


def top_k_for_run(fn: Callable[[np.ndarray, int, float], dict]) -> Callable[[np.ndarray, int, float], dict]:
    """What Lab 06's inference actors call: the student's ``fn(probs, k, threshold)``, or, while the exercise is the
    untouched stub, :func:`reference_top_k` (with a notice), so a student copy runs to the end."""
    probe = (np.array([[0.6, 0.4]], dtype=np.float32), 1, 0.5)
    return answer_or_reference(fn, reference_top_k, probe, what="top_k_filter (section 4)")


def bound_verdict_for_run(fn: Callable[[float, float, int], dict]) -> Callable[[float, float, int], dict]:
    """The verdict Lab 06's throughput table uses: the student's ``fn``, or :func:`reference_bound_verdict` while the
    exercise is the untouched stub (with a notice)."""
    return answer_or_reference(fn, reference_bound_verdict, (100.0, 50.0, 1), what="bound_verdict")
