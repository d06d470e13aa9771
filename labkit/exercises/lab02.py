"""Exercise checks for Lab 02 (Ray Train): the DistributedSampler shard, the weighted metric all-reduce, LR scaling."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from labkit.exercises import answer_or_reference, call_student, ok


def _reference_scale_lr(lr: float, world_size: int, rule: str = "none") -> float:
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    raise ValueError(f"rule={rule!r}: use 'none', 'linear' or 'sqrt'.")


def lr_rule_for_run(fn: Callable[[float, int, str], float]) -> Callable[[float, int, str], float]:
    """The LR rule Lab 02's workers use: the student's ``fn(lr, world_size, rule)`` — a wrong answer changes the
    learning rate they train with — or, while the exercise is the untouched stub, the reference (with a notice)."""
    return answer_or_reference(fn, _reference_scale_lr, (1e-3, 2, "linear"), what="my_scale_lr (exercise 3)")


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


def check_sampler_shard(indices: Sequence[int] | Callable[[int, int, int], Sequence[int]], dataset_len: int,
                        world_size: int, rank: int) -> None:
    """Check the dataset indices that rank ``rank`` of ``world_size`` reads from
    ``torch.utils.data.DistributedSampler(dataset, shuffle=False)`` (``drop_last=False``).

    The sampler gives every rank the same number of samples, ``ceil(dataset_len / world_size)``:
    it pads the index list by repeating its first indices, then rank ``r`` takes
    ``padded[r::world_size]``. So ranks see interleaved, not contiguous, slices. ``indices`` is the
    answer, or the student's function ``fn(dataset_len, world_size, rank)`` (called here).
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size.")
    if not isinstance(dataset_len, int) or dataset_len < 1:
        raise ValueError(f"dataset_len={dataset_len!r}: need a positive number of samples.")
    if callable(indices):
        indices = call_student(indices, dataset_len, world_size, rank, what="your shard function")
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


def _shards(seed: int = 0) -> list[list[float]]:
    """Per-worker losses of a few images each: uneven shards, one of them empty (seeded, so repeatable)."""
    g = torch.Generator().manual_seed(seed)
    sizes = (3, 1, 2, 0)
    return [(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.5 * i).tolist() for i, n in enumerate(sizes)]


def check_global_mean(fn: Callable[[list[tuple[float, int]]], float]) -> None:
    """Check ``fn(pairs)``: the mean over all images from per-worker ``(sum, count)`` pairs.

    The reference is the brute-force mean over every image's value (what one process holding the
    whole test set would compute); the wrong answer it explains is the mean of per-worker means,
    which weighs a 1-image shard like a 3-image one.
    """
    cases = [_shards(0), _shards(1), [[1.0, 1.0, 1.0], [4.0]], [[2.0, 4.0]]]
    worst = 0.0
    for values in cases:
        pairs = [(float(sum(v)), len(v)) for v in values]
        got = call_student(fn, pairs, what="your global mean")
        shown = [(round(s, 3), n) for s, n in pairs]
        flat = [x for v in values for x in v]
        want = float(torch.tensor(flat, dtype=torch.float64).mean())
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise AssertionError(f"my_global_mean({shown}) returned {got!r} ({type(got).__name__}); return one number.")
        means = [s / n for s, n in pairs if n]
        mean_of_means = sum(means) / len(means)
        worst = max(worst, abs(mean_of_means - want))
        if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            hint = ("you averaged the workers' means: a worker with 1 image then counts as much as one with 3. "
                    "Add up all sums and all counts, then divide once"
                    if math.isclose(got, mean_of_means, rel_tol=1e-9) else
                    "the mean over all images is (sum of all sums) / (sum of all counts); a worker with count 0 "
                    "adds nothing")
            raise AssertionError(f"my_global_mean({shown}) returned {got:.4f}, expected {want:.4f} "
                                 f"(the mean of all {len(flat)} values): {hint}.")
    ok(f"weighted all-reduce: matches the mean over every image for uneven shards "
       f"(the mean of per-worker means would be off by up to {worst:.2f})")
