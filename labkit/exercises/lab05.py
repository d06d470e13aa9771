"""Exercise checks for Lab 05 (federated averaging): the server's aggregation of one FedAvg round,
with BatchNorm statistics pooled as if the clients' activations had been pooled.

The reference is independent of the formula the students use: each check client's BatchNorm
``running_mean`` / ``running_var`` are the mean and variance of activations drawn for it (hospitals
with shifted means), and the reference statistics are those of all clients' activations
concatenated (NumPy), the parameters ``np.average`` weighted by sample count.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from labkit.exercises import answer_or_reference, call_student, ok

#: Samples per client in the check, and each client's ``num_batches_tracked``: the weighted mean
#: (37*600 + 5*100 + 13*300) / 1000 = 26.6 rounds to 27.
SIZES = [600, 100, 300]
COUNTERS = [37, 5, 13]
#: Each check client's activations per BatchNorm channel are shifted by this much: hospitals that
#: stain differently see different means, so pooling must add the spread between them.
SHIFTS = [0.0, 2.5, -1.5]


def _client_states(seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[int], list[np.ndarray]]:
    """Three clients' state_dicts of a small conv → BatchNorm → linear model, their sample counts, and
    the activations (``[n_k, channels]``) their BatchNorm statistics were computed from."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    states, activations = [], []
    for counter, n, shift in zip(COUNTERS, SIZES, SHIFTS):
        x = rng.normal(shift + rng.normal(0, 0.5, 4), rng.uniform(0.5, 2.0, 4), (n, 4))
        activations.append(x)
        state = {}
        for key, value in model.state_dict().items():
            if key.endswith("running_mean"):
                state[key] = torch.from_numpy(x.mean(0)).float()
            elif key.endswith("running_var"):
                state[key] = torch.from_numpy(x.var(0)).float()
            elif value.is_floating_point():
                state[key] = value + torch.randn(value.shape, generator=gen)
            else:
                state[key] = torch.tensor(counter, dtype=value.dtype)
        states.append(state)
    return states, list(SIZES), activations


def reference_fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_samples: Sequence[int],
                     activations: Sequence[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al., 2017) in NumPy float64: ``np.average(..., weights=n_k)`` per key; integer
    counters rounded to the nearest integer. With ``activations`` (each client's ``[n_k, C]``), every
    ``running_mean`` / ``running_var`` is instead the mean / variance of all activations concatenated
    (what one BatchNorm would have measured on the pooled data)."""
    out = {}
    pooled = np.concatenate(activations) if activations is not None else None
    for key, first in states[0].items():
        if pooled is not None and key.endswith(("running_mean", "running_var")):
            mean = pooled.mean(0) if key.endswith("running_mean") else pooled.var(0)
        else:
            stack = np.stack([s[key].detach().cpu().double().numpy() for s in states])
            mean = np.average(stack, axis=0, weights=np.asarray(num_samples, dtype=np.float64))
            if not first.is_floating_point():
                mean = np.rint(mean)
        out[key] = torch.from_numpy(np.asarray(mean)).to(first.dtype).reshape(first.shape)
    return out


def _close(a: torch.Tensor, b) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64).reshape(a.shape), rtol=1e-4, atol=1e-5)


def check_fedavg(fn: Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[int]], Mapping[str, torch.Tensor]]) -> None:
    """Check ``fn(client_states, num_samples)``: the new global ``state_dict`` of one FedAvg round.

    Every entry is the clients' average weighted by sample count, ``sum_k n_k * w_k / sum_k n_k``, in the
    input dtype (integer counters such as ``num_batches_tracked`` rounded), except each BatchNorm
    ``running_var``: the **pooled** variance ``sum_k w_k (var_k + mean_k**2) - mean**2`` with
    ``w_k = n_k / n`` and ``mean`` the pooled ``running_mean`` of the same layer — the variance of all
    clients' activations together, spread between the clients' means included. Inputs stay unchanged.
    """
    states, sizes, acts = _client_states()
    originals = [{k: v.clone() for k, v in s.items()} for s in states]
    got = call_student(fn, states, sizes, what="your FedAvg function")
    want = reference_fedavg(originals, sizes, acts)
    if any(not torch.equal(s[k], o[k]) for s, o in zip(states, originals) for k in o):
        raise AssertionError("your function changed a client's state_dict in place; build new tensors "
                             "(e.g. torch.zeros_like, then add) so the clients keep their own weights.")
    if not isinstance(got, Mapping) or set(got) != set(want):
        keys = sorted(got) if isinstance(got, Mapping) else type(got).__name__
        missing = sorted(set(want) - set(got)) if isinstance(got, Mapping) else []
        hint = (" — the BatchNorm buffers (running_mean, running_var, num_batches_tracked) are part of the model "
                "too: aggregate every entry of the state_dict, not only the parameters" if any(
                    "running" in k or "num_batches" in k for k in missing) else "")
        raise AssertionError(f"return a dict with the clients' keys {sorted(want)}; got {keys}{hint}.")
    w = np.asarray(sizes, np.float64) / sum(sizes)
    for key, value in want.items():
        out = got[key]
        if not isinstance(out, torch.Tensor) or out.shape != value.shape:
            raise AssertionError(f"{key!r}: expected a tensor of shape {tuple(value.shape)}, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}.")
        if out.dtype != value.dtype:
            raise AssertionError(f"{key!r}: dtype {out.dtype}, expected {value.dtype} (keep the clients' dtype; "
                                 f"integer counters such as num_batches_tracked stay integers).")
        stack = np.stack([o[key].double().numpy() for o in originals])
        if value.is_floating_point():
            if _close(out, value):
                continue
            if key.endswith("running_var") and _close(out, np.tensordot(w, stack, 1)):
                raise AssertionError(f"{key!r} is the weighted average of the clients' variances: that leaves out "
                                     f"the spread between their means, sum_k w_k (mean_k - mean)**2 — exactly what "
                                     f"differs between hospitals that stain differently. Pool it: average "
                                     f"E[x**2] = var_k + mean_k**2, then subtract the pooled mean**2.")
            hint = ("this is the plain mean; weight each client by its number of samples"
                    if _close(out, stack.mean(0)) else
                    "pool the variance: sum_k w_k (var_k + mean_k**2) - mean**2" if key.endswith("running_var")
                    else "compute sum_k n_k * w_k / sum_k n_k")
            raise AssertionError(f"{key!r} differs from the expected value (clients with {sizes} samples): {hint}.")
        if not torch.equal(out, value):
            exact = float(np.dot(w, COUNTERS))
            raise AssertionError(f"{key!r} (an integer counter; clients hold {COUNTERS}) is {out.item()}, expected "
                                 f"{value.item()}: average it like the weights ({exact:.1f}) and round "
                                 f"(torch.round) before casting back.")
    single = call_student(fn, [originals[1]], [sizes[1]], what="your FedAvg function")
    if not all(torch.equal(single[k], originals[1][k]) if not originals[1][k].is_floating_point()
               else _close(single[k], originals[1][k]) for k in want):
        raise AssertionError("with a single client, FedAvg must return that client's state unchanged.")
    ok(f"FedAvg: weighted average of {len(states)} clients by sample count ({sizes}); BatchNorm statistics pooled "
       f"(the variance of all clients' activations together, checked against the pooled data)")


def _pooled_fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """The aggregation the exercise asks for, from the clients' states alone (no activations): weighted averages in
    float64, BatchNorm variances pooled as ``sum_k w_k (var_k + mean_k**2) - mean**2``, counters rounded."""
    w = torch.as_tensor(num_samples, dtype=torch.float64) / float(sum(num_samples))

    def avg(key: str, square: bool = False) -> torch.Tensor:
        return sum(wk * (s[key].double() ** 2 if square else s[key].double()) for wk, s in zip(w, states))

    out = {}
    for key, first in states[0].items():
        value = avg(key)
        if key.endswith("running_var") and key[:-3] + "mean" in states[0]:
            mean_key = key[:-3] + "mean"
            value = value + avg(mean_key, square=True) - avg(mean_key) ** 2
        out[key] = value.to(first.dtype) if first.is_floating_point() else value.round().to(first.dtype)
    return out


def fedavg_for_run(fn: Callable) -> Callable:
    """The aggregation Lab 05's rounds use: the student's ``fn(states, num_samples)`` — a wrong answer changes what
    the server averages — or, while the exercise is the untouched stub, the reference (with a notice)."""
    return answer_or_reference(fn, _pooled_fedavg, ([{"w": torch.zeros(1)}], [1]), what="fedavg (section 6)")
