"""Checks for the labs' exercises.

Each check runs a student's answer against a reference on a few cases, raises an
``AssertionError`` that says what is wrong and gives a hint, and prints one ``✓ ...`` line when
the answer is right. In a lab, the exercise cell holds the solution between ``# BEGIN SOLUTION``
and ``# END SOLUTION`` (the student copy has a ``raise NotImplementedError`` there) and the
next cell, tagged ``nbval-check-output``, calls the check::

    def my_scale_lr(lr, world_size, rule):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

    labkit.exercises.check_lr_scaling(my_scale_lr)

Write exercises as functions, as above: then the student copy still defines the name and the
check cell reports "not implemented yet" instead of a ``NameError``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch


def _ok(message: str) -> None:
    print(f"✓ {message}")


def _call(fn: Callable, *args: Any, what: str) -> Any:
    """Call the student's function; a stub's NotImplementedError becomes a clear AssertionError."""
    try:
        return fn(*args)
    except NotImplementedError as exc:
        raise AssertionError(f"{what} is not implemented yet: complete the exercise cell above "
                             f"(replace the `raise NotImplementedError` line) and run it again.") from exc


def _reference_scale_lr(lr: float, world_size: int, rule: str = "none") -> float:
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    raise ValueError(f"rule={rule!r}: use 'none', 'linear' or 'sqrt'.")


def _scale_lr_reference() -> Callable[[float, int, str], float]:
    try:
        from labkit.train import scale_lr
    except ImportError:
        return _reference_scale_lr
    return scale_lr


def check_lr_scaling(fn: Callable[[float, int, str], float]) -> None:
    """Check ``fn(lr, world_size, rule)`` for the rules ``"none"``, ``"linear"`` and ``"sqrt"``.

    With ``world_size`` workers each taking a batch of ``B`` images, one optimizer step sees
    ``world_size * B`` images. The *linear* rule (Goyal et al., 2017) multiplies the learning
    rate by ``world_size``; the *sqrt* rule by ``sqrt(world_size)`` (gentler, common with Adam);
    ``"none"`` keeps it. The reference is :func:`labkit.train.scale_lr`.
    """
    reference = _scale_lr_reference()
    hints = {"none": "'none' returns the learning rate unchanged",
             "linear": "'linear' multiplies the learning rate by world_size",
             "sqrt": "'sqrt' multiplies the learning rate by math.sqrt(world_size)"}
    for rule in ("none", "linear", "sqrt"):
        for lr in (0.1, 3e-4):
            for world_size in (1, 2, 4, 8):
                got = _call(fn, lr, world_size, rule, what="your LR scaling function")
                want = reference(lr, world_size, rule)
                if not isinstance(got, (int, float)) or isinstance(got, bool):
                    raise AssertionError(f"fn({lr}, {world_size}, {rule!r}) returned {got!r} "
                                         f"({type(got).__name__}); return a float learning rate.")
                if not math.isclose(got, want, rel_tol=1e-6):
                    raise AssertionError(f"fn({lr}, {world_size}, {rule!r}) returned {got!r}, expected {want!r}: "
                                         f"{hints[rule]}.")
    _ok("LR scaling: 'none', 'linear' and 'sqrt' match the reference for 1-8 workers")


def sampler_shard(dataset_len: int, world_size: int, rank: int) -> list[int]:
    """The indices rank ``rank`` reads from ``DistributedSampler(shuffle=False)`` (the truth the
    check compares with): pad to a multiple of ``world_size``, then every ``world_size``-th index."""
    dataset = range(dataset_len)  # only len() is used by the sampler
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return [int(i) for i in sampler]


def check_sampler_shard(indices: Sequence[int], dataset_len: int, world_size: int, rank: int) -> None:
    """Check the dataset indices that rank ``rank`` of ``world_size`` reads from
    ``torch.utils.data.DistributedSampler(dataset, shuffle=False)`` (``drop_last=False``).

    The sampler gives every rank the same number of samples, ``ceil(dataset_len / world_size)``:
    it pads the index list by repeating its first indices, then rank ``r`` takes
    ``padded[r::world_size]``. So ranks see interleaved, not contiguous, slices.
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size.")
    if not isinstance(dataset_len, int) or dataset_len < 1:
        raise ValueError(f"dataset_len={dataset_len!r}: need a positive number of samples.")
    got = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    want = sampler_shard(dataset_len, world_size, rank)
    per_rank = math.ceil(dataset_len / world_size)
    if len(got) != len(want):
        raise AssertionError(f"rank {rank} of {world_size} gets {len(want)} indices of {dataset_len}, you have {len(got)}: "
                             f"DistributedSampler pads the dataset so every rank gets ceil({dataset_len}/{world_size}) "
                             f"= {per_rank} samples (repeating the first indices).")
    if got != want:
        first = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        hint = ("the sampler interleaves: rank r takes indices r, r + world_size, r + 2*world_size, ... "
                "(not a contiguous block)" if sorted(got) != sorted(want) else "keep the sampler's order")
        raise AssertionError(f"rank {rank} of {world_size}: position {first} is {got[first]}, expected {want[first]} "
                             f"(expected {want[:8]}{'...' if len(want) > 8 else ''}); {hint}.")
    _ok(f"DistributedSampler shard: rank {rank} of {world_size} reads {len(want)} of {dataset_len} samples")


def _as_counts(counts: Sequence[int] | Mapping[Any, int] | Any) -> torch.Tensor:
    if isinstance(counts, Mapping):
        counts = list(counts.values())
    elif hasattr(counts, "tolist"):
        counts = counts.tolist()
    return torch.as_tensor(counts, dtype=torch.float64).flatten()


def check_class_weights(weights: Sequence[float] | torch.Tensor, counts: Sequence[int] | Mapping[Any, int]) -> None:
    """Check inverse-frequency class weights (Lab 01): ``w_c ∝ 1 / n_c``, normalised to mean 1.

    ``counts`` are the training images per class (a list, dict, pandas Series or tensor, in class
    order). Rare classes get weights above 1, common ones below 1; equal counts give all ones.
    ``torch.nn.CrossEntropyLoss(weight=weights)`` then uses them. As in
    :func:`labkit.train.class_weights_from_counts`, a class without images gets weight 0 and the
    mean is taken over the classes that have images.
    """
    n = _as_counts(counts)
    if n.numel() == 0 or bool((n < 0).any()) or not bool((n > 0).any()) or not bool(torch.isfinite(n).all()):
        raise ValueError(f"counts={n.tolist()}: need one non-negative count per class, at least one above 0.")
    present = n > 0
    inverse = torch.where(present, 1.0 / n.clamp(min=1e-12), torch.zeros_like(n))
    want = inverse / inverse[present].mean()
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
    _ok(f"class weights: inverse frequency with mean 1 for {int(present.sum())} classes "
        f"(largest {want.max().item():.2f} for the rarest class)")


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
    got = _call(fn, states, sizes, what="your FedAvg function")
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
    single = _call(fn, [originals[1]], [sizes[1]], what="your FedAvg function")
    if not all(torch.allclose(single[k], originals[1][k]) for k in want):
        raise AssertionError("with a single client, FedAvg must return that client's weights unchanged.")
    _ok(f"FedAvg: weighted average of {len(states)} clients by sample count ({sizes})")
