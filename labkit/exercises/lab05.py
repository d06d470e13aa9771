"""Exercise checks for Lab 05 (federated averaging): one FedAvg round."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from labkit.exercises import call_student, ok

def _client_states(seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (2, 4), "fc.bias": (2,)}
    states = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    return states, [600, 100, 300]


def reference_fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al., 2017): ``sum_k n_k * w_k / sum_k n_k`` for every tensor."""
    total = float(sum(num_samples))
    return {k: sum(s[k].double() * (n / total) for s, n in zip(states, num_samples)).to(states[0][k].dtype)
            for k in states[0]}


def check_fedavg(fn: Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[int]], Mapping[str, torch.Tensor]]) -> None:
    """Check ``fn(client_states, num_samples)``: the new global model of one FedAvg round.

    ``client_states`` is a list of ``state_dict()``s (same keys and shapes), ``num_samples`` the
    number of training samples of each client. The result must be a dict with the same keys
    where every tensor is the average of the clients' tensors weighted by their sample counts,
    ``sum_k n_k * w_k / sum_k n_k``, with the input dtypes, and the inputs left unchanged.
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
        raise AssertionError(f"return a dict with the clients' keys {sorted(want)}; got {keys}.")
    plain = {k: torch.stack([s[k] for s in originals]).mean(0) for k in want}
    for key, value in want.items():
        out = got[key]
        if not isinstance(out, torch.Tensor) or out.shape != value.shape:
            raise AssertionError(f"{key!r}: expected a tensor of shape {tuple(value.shape)}, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}.")
        if out.dtype != value.dtype:
            raise AssertionError(f"{key!r}: dtype {out.dtype}, expected {value.dtype} (keep the clients' dtype).")
        if not torch.allclose(out, value, rtol=1e-5, atol=1e-6):
            hint = ("this is the plain mean; weight each client by its number of samples"
                    if torch.allclose(out, plain[key], rtol=1e-5, atol=1e-6)
                    else "compute sum_k n_k * w_k / sum_k n_k")
            raise AssertionError(f"{key!r} differs from the weighted average (clients with {sizes} samples): {hint}.")
    single = call_student(fn, [originals[1]], [sizes[1]], what="your FedAvg function")
    if not all(torch.allclose(single[k], originals[1][k]) for k in want):
        raise AssertionError("with a single client, FedAvg must return that client's weights unchanged.")
    ok(f"FedAvg: weighted average of {len(states)} clients by sample count ({sizes})")
