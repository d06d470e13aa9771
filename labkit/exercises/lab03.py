"""Exercise checks for Lab 03 (DDP ablations): the shuffled DistributedSampler order after
``set_epoch``, and MixUp's soft targets.

Each check compares with an independent reference: PyTorch's own ``DistributedSampler`` and
torchvision's own ``transforms.v2.MixUp``, never labkit's code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

from labkit.exercises import call_student, ok


def _as_list(value, what: str) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    try:
        return [int(i) for i in value]
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{what} returned {value!r}; return a list of dataset indices.") from exc


def sampler_order(dataset_len: int, world_size: int, rank: int, epoch: int, seed: int = 0) -> list[int]:
    """What rank ``rank`` reads in epoch ``epoch`` from ``DistributedSampler(shuffle=True, seed=seed)``
    after ``set_epoch(epoch)``: torch's own sampler, the truth the check compares with."""
    sampler = DistributedSampler(range(dataset_len), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return [int(i) for i in sampler]


def check_epoch_order(fn: Callable[[int, int, int, int, int], list[int]]) -> None:
    """Check ``fn(dataset_len, world_size, rank, epoch, seed)``: the indices rank ``rank`` reads in
    epoch ``epoch`` from ``DistributedSampler(dataset, shuffle=True, seed=seed)`` after
    ``sampler.set_epoch(epoch)``.

    The sampler draws ``torch.randperm(dataset_len)`` from a generator seeded with ``seed + epoch``
    (the same on every rank, so the shards never overlap), pads the permutation by repeating its
    first indices to a multiple of ``world_size``, and gives rank ``r`` every ``world_size``-th
    entry from ``r``. Without ``set_epoch`` the epoch stays 0: every epoch repeats the same order.
    """
    cases = [(10, 4, 3, 0, 0), (10, 4, 3, 1, 0), (12, 3, 0, 2, 0), (7, 2, 1, 5, 42), (100, 4, 2, 3, 7)]
    for n, world, rank, epoch, seed in cases:
        got = _as_list(call_student(fn, n, world, rank, epoch, seed, what="your epoch order function"),
                       "your epoch order function")
        want = sampler_order(n, world, rank, epoch, seed)
        if got == want:
            continue
        call = f"fn({n}, world_size={world}, rank={rank}, epoch={epoch}, seed={seed})"
        unshuffled = [int(i) for i in DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)]
        if got in (unshuffled, list(range(rank, n, world))):
            hint = ("that is the unshuffled order: draw the permutation with torch.randperm(dataset_len, "
                    "generator=g), g seeded with seed + epoch")
        elif got == sampler_order(n, world, rank, 0, seed) and epoch != 0:
            hint = "it is epoch 0's order: seed the generator with seed + epoch (that is what set_epoch changes)"
        elif sorted(got) == list(range(n)) and world > 1:
            hint = "that is the whole permutation: rank r keeps every world_size-th entry from r"
        elif len(got) != len(want):
            hint = (f"every rank gets ceil({n}/{world}) = {len(want)} indices: pad the permutation by "
                    "repeating its first entries")
        elif sorted(got) == sorted(want):
            hint = "the right indices in the wrong order: keep the permutation's order"
        else:
            hint = ("draw the permutation with torch.randperm(dataset_len, generator=g) where "
                    "g = torch.Generator(); g.manual_seed(seed + epoch)")
        raise AssertionError(f"{call} returned {got[:8]}{'...' if len(got) > 8 else ''}, "
                             f"expected {want[:8]}{'...' if len(want) > 8 else ''}: {hint}.")
    ok("epoch order: matches torch's DistributedSampler after set_epoch for 5 cases (ranks, epochs, seeds)")


def check_mixup_targets(fn: Callable[[torch.Tensor, torch.Tensor, float, int], tuple]) -> None:
    """Check ``fn(x, y, lam, num_classes) -> (x_mixed, soft_targets)`` against
    ``torchvision.transforms.v2.MixUp`` on the same batch and the same λ.

    torchvision pairs image ``i`` with image ``i - 1`` (the batch rolled by one) and returns
    ``lam * x + (1 - lam) * x_rolled`` and ``lam * one_hot(y) + (1 - lam) * one_hot(y_rolled)``.
    """
    num_classes = 6
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        x = torch.rand(6, 3, 4, 4)
        y = torch.randperm(num_classes)  # distinct labels: λ can be read off the reference targets
        x_ref, y_ref = v2.MixUp(alpha=1.0, num_classes=num_classes)(x, y)
        lam = float(y_ref[0, y[0]])
        out = call_student(fn, x.clone(), y.clone(), lam, num_classes, what="your MixUp function")
        if not (isinstance(out, tuple) and len(out) == 2):
            raise AssertionError(f"your MixUp function returned {type(out).__name__}; return (x_mixed, soft_targets).")
        xm, ym = (torch.as_tensor(t, dtype=torch.float32) for t in out)
        if ym.shape != y_ref.shape:
            raise AssertionError(f"soft targets have shape {tuple(ym.shape)}, expected {tuple(y_ref.shape)} "
                                 "= [batch, num_classes] (one row of class weights per image).")
        if not torch.allclose(ym.sum(1), torch.ones(len(y)), atol=1e-5):
            raise AssertionError("each row of soft targets must sum to 1: lam for the image's own class and "
                                 "1 - lam for its partner's.")
        if not torch.allclose(ym, y_ref, atol=1e-5):
            one_hot = lambda labels: torch.nn.functional.one_hot(labels, num_classes).float()  # noqa: E731
            if torch.allclose(ym, lam * one_hot(y) + (1 - lam) * one_hot(y.roll(-1)), atol=1e-5):
                hint = "the partner of image i is image i - 1: y.roll(1, 0), not y.roll(-1, 0)"
            elif torch.allclose(ym, (1 - lam) * one_hot(y) + lam * one_hot(y.roll(1)), atol=1e-5):
                hint = "lam is the weight of the image's own label, 1 - lam its partner's"
            else:
                hint = "soft = lam * one_hot(y) + (1 - lam) * one_hot(y.roll(1, 0))"
            raise AssertionError(f"soft targets differ from torchvision's (λ = {lam:.3f}); first row "
                                 f"{[round(v, 3) for v in ym[0].tolist()]} vs {[round(v, 3) for v in y_ref[0].tolist()]}: "
                                 f"{hint}.")
        if xm.shape != x_ref.shape or not torch.allclose(xm, x_ref, atol=1e-5):
            raise AssertionError(f"mixed images differ from torchvision's (λ = {lam:.3f}): "
                                 "x_mixed = lam * x + (1 - lam) * x.roll(1, 0).")
    ok("MixUp: images and soft targets match torchvision.transforms.v2.MixUp for 3 batches")
