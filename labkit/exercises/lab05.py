"""Exercise checks for Lab 05 (federated averaging): the FedAvg weighted average of one round."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from labkit.exercises import call_student, ok

#: Samples per client in the check, and each client's ``num_batches_tracked``: the weighted mean
#: (37*600 + 5*100 + 13*300) / 1000 = 26.6 rounds to 27, while truncating would give 26.
SIZES = [600, 100, 300]
COUNTERS = [37, 5, 13]


def _client_states(seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Three clients' state_dicts of a small conv → BatchNorm → linear model: weights, biases, BN
    running mean/var (float buffers) and ``num_batches_tracked`` (an int64 counter)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    states = []
    for counter in COUNTERS:
        state = {}
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=gen)
                state[key] = (value + noise).abs() + 0.1 if key.endswith("running_var") else value + noise
            else:
                state[key] = torch.tensor(counter, dtype=value.dtype)
        states.append(state)
    return states, list(SIZES)


def reference_fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al., 2017), computed with NumPy: ``np.average(..., weights=n_k)`` per key in
    float64; float tensors keep their dtype, integer counters are rounded to the nearest integer."""
    out = {}
    for key, first in states[0].items():
        stack = np.stack([s[key].detach().cpu().double().numpy() for s in states])
        mean = np.average(stack, axis=0, weights=np.asarray(num_samples, dtype=np.float64))
        if not first.is_floating_point():
            mean = np.rint(mean)
        out[key] = torch.from_numpy(np.asarray(mean)).to(first.dtype).reshape(first.shape)
    return out


def check_fedavg(fn: Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[int]], Mapping[str, torch.Tensor]]) -> None:
    """Check ``fn(client_states, num_samples)``: the new global model of one FedAvg round.

    ``client_states`` is a list of ``state_dict()``s (same keys and shapes, BatchNorm buffers
    included), ``num_samples`` the number of training samples of each client. The result must be a
    dict with the same keys where every tensor is the average of the clients' tensors weighted by
    their sample counts, ``sum_k n_k * w_k / sum_k n_k``, in the input dtype — integer counters
    such as ``num_batches_tracked`` rounded to the nearest integer — and the inputs left unchanged.
    """
    states, sizes = _client_states()
    originals = [{k: v.clone() for k, v in s.items()} for s in states]
    got = call_student(fn, states, sizes, what="your FedAvg function")
    want = reference_fedavg(originals, sizes)
    if any(not torch.equal(s[k], o[k]) for s, o in zip(states, originals) for k in o):
        raise AssertionError("your function changed a client's state_dict in place; build new tensors "
                             "(e.g. torch.zeros_like, then add) so the clients keep their own weights.")
    if not isinstance(got, Mapping) or set(got) != set(want):
        keys = sorted(got) if isinstance(got, Mapping) else type(got).__name__
        missing = sorted(set(want) - set(got)) if isinstance(got, Mapping) else []
        hint = (" — the BatchNorm buffers (running_mean, running_var, num_batches_tracked) are part of the model "
                "too: average every entry of the state_dict, not only the parameters" if any(
                    "running" in k or "num_batches" in k for k in missing) else "")
        raise AssertionError(f"return a dict with the clients' keys {sorted(want)}; got {keys}{hint}.")
    plain = {k: torch.stack([s[k].double() for s in originals]).mean(0) for k in want}
    for key, value in want.items():
        out = got[key]
        if not isinstance(out, torch.Tensor) or out.shape != value.shape:
            raise AssertionError(f"{key!r}: expected a tensor of shape {tuple(value.shape)}, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}.")
        if out.dtype != value.dtype:
            raise AssertionError(f"{key!r}: dtype {out.dtype}, expected {value.dtype} (keep the clients' dtype; "
                                 f"integer counters such as num_batches_tracked stay integers).")
        if value.is_floating_point():
            if not torch.allclose(out, value, rtol=1e-5, atol=1e-6):
                hint = ("this is the plain mean; weight each client by its number of samples"
                        if torch.allclose(out.double(), plain[key], rtol=1e-5, atol=1e-6)
                        else "compute sum_k n_k * w_k / sum_k n_k")
                raise AssertionError(f"{key!r} differs from the weighted average (clients with {sizes} samples): "
                                     f"{hint}.")
        elif not torch.equal(out, value):
            exact = sum(c * n for c, n in zip(COUNTERS, sizes)) / sum(sizes)
            hint = (f"the weighted mean is {exact:.1f}: round it (torch.round) before casting back, do not truncate"
                    if int(out.item()) == int(exact) else
                    f"average it like the weights (weighted by sample count: {exact:.1f}), then round to an integer")
            raise AssertionError(f"{key!r} (an integer counter; clients hold {COUNTERS}) is {out.item()}, expected "
                                 f"{value.item()}: {hint}.")
    single = call_student(fn, [originals[1]], [sizes[1]], what="your FedAvg function")
    if not all(torch.equal(single[k], originals[1][k]) if not originals[1][k].is_floating_point()
               else torch.allclose(single[k], originals[1][k]) for k in want):
        raise AssertionError("with a single client, FedAvg must return that client's weights unchanged.")
    ok(f"FedAvg: weighted average of {len(states)} clients by sample count ({sizes}), "
       f"BatchNorm buffers and the integer counter included")
