"""Exercise checks for Lab 02 (Ray Train): LR scaling, the DistributedSampler shard."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from labkit.exercises import call_student, ok

def _reference_scale_lr(lr: float, world_size: int, rule: str = "none") -> float:
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    raise ValueError(f"rule={rule!r}: use 'none', 'linear' or 'sqrt'.")


def check_lr_scaling(fn: Callable[[float, int, str], float]) -> None:
    """Check ``fn(lr, world_size, rule)`` for the rules ``"none"``, ``"linear"`` and ``"sqrt"``.

    With ``world_size`` workers each taking a batch of ``B`` images, one optimizer step sees
    ``world_size * B`` images. The *linear* rule (Goyal et al., 2017) multiplies the learning
    rate by ``world_size``; the *sqrt* rule by ``sqrt(world_size)`` (gentler, common with Adam);
    ``"none"`` keeps it. The reference is written out here, independently of labkit.
    """
    reference = _reference_scale_lr
    hints = {"none": "'none' returns the learning rate unchanged",
             "linear": "'linear' multiplies the learning rate by world_size",
             "sqrt": "'sqrt' multiplies the learning rate by math.sqrt(world_size)"}
    for rule in ("none", "linear", "sqrt"):
        for lr in (0.1, 3e-4):
            for world_size in (1, 2, 4, 8):
                got = call_student(fn, lr, world_size, rule, what="your LR scaling function")
                want = reference(lr, world_size, rule)
                if not isinstance(got, (int, float)) or isinstance(got, bool):
                    raise AssertionError(f"fn({lr}, {world_size}, {rule!r}) returned {got!r} "
                                         f"({type(got).__name__}); return a float learning rate.")
                if not math.isclose(got, want, rel_tol=1e-6):
                    raise AssertionError(f"fn({lr}, {world_size}, {rule!r}) returned {got!r}, expected {want!r}: "
                                         f"{hints[rule]}.")
    ok("LR scaling: 'none', 'linear' and 'sqrt' match the reference for 1-8 workers")


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
    ok(f"DistributedSampler shard: rank {rank} of {world_size} reads {len(want)} of {dataset_len} samples")
