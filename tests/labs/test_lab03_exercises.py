"""Lab 03 exercise checks: right answers pass with one ✓ line, typical mistakes fail with a hint,
stubs fail with "not implemented yet"."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from labcells import LABS, assert_hidden_check_earns_its_place

from labkit.exercises import lab03


def _stub(*args):
    raise NotImplementedError("Exercise: complete this cell")


# --------------------------------------------------------------------------- DistributedSampler after set_epoch
def _order(n, world, rank, epoch, seed):
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    perm += perm[: total - n]
    return perm[rank::world]


def test_epoch_order_right_answer_passes(capsys):
    lab03.check_epoch_order(_order)
    out = capsys.readouterr().out
    assert out.count("✓") == 1 and "set_epoch" in out


@pytest.mark.parametrize("wrong, hint", [
    (lambda n, w, r, e, s: _order(n, w, r, 0, s), "set_epoch"),                  # forgot set_epoch
    (lambda n, w, r, e, s: _order(n, 1, 0, e, s)[:n], "every world_size-th"),        # no sharding
    (lambda n, w, r, e, s: _order(n, w, r, e, s)[: n // w], "ceil"),                 # no padding
    (lambda n, w, r, e, s: sorted(_order(n, w, r, e, s)), "order"),                  # sorted shard
    (lambda n, w, r, e, s: list(range(r, n, w)), "unshuffled"),                      # no shuffle
])
def test_epoch_order_typical_mistakes_fail_with_a_hint(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        lab03.check_epoch_order(wrong)


def test_epoch_order_stub_says_not_implemented():
    with pytest.raises(AssertionError, match="not implemented yet"):
        lab03.check_epoch_order(_stub)


# --------------------------------------------------------------------------- MixUp soft targets
def _mixup(x, y, lam, k):
    return lam * x + (1 - lam) * x.roll(1, 0), lam * F.one_hot(y, k) + (1 - lam) * F.one_hot(y.roll(1, 0), k)


def test_mixup_right_answer_passes(capsys):
    lab03.check_mixup_targets(_mixup)
    assert capsys.readouterr().out.count("✓") == 1


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, y, lam, k: (lam * x + (1 - lam) * x.roll(-1, 0),
                           lam * F.one_hot(y, k) + (1 - lam) * F.one_hot(y.roll(-1, 0), k)), "roll"),
    (lambda x, y, lam, k: (lam * x + (1 - lam) * x.roll(1, 0),
                           (1 - lam) * F.one_hot(y, k) + lam * F.one_hot(y.roll(1, 0), k)), "own label"),
    (lambda x, y, lam, k: (lam * x + (1 - lam) * x.roll(1, 0), F.one_hot(y, k).float()), "differ"),
    (lambda x, y, lam, k: (x, lam * F.one_hot(y, k) + (1 - lam) * F.one_hot(y.roll(1, 0), k)), "mixed images"),
    (lambda x, y, lam, k: (lam * x + (1 - lam) * x.roll(1, 0), lam * F.one_hot(y, k)), "sum to 1"),
    (lambda x, y, lam, k: lam * x, "return \\(x_mixed"),
])
def test_mixup_typical_mistakes_fail_with_a_hint(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        lab03.check_mixup_targets(wrong)


def test_mixup_stub_says_not_implemented():
    with pytest.raises(AssertionError, match="not implemented yet"):
        lab03.check_mixup_targets(_stub)


# --------------------------------------------------------------------------- hidden checks (labkit grade)
LAB = next(p for p in LABS if p.name.startswith("03_"))
SOLUTION = {'epoch_order': ['my_epoch_order'], 'mixup_targets': ['my_mixup']}
#: For each question, a plausible wrong answer that its public check lets through.
WRONG = {
    "epoch_order": """
def my_epoch_order(dataset_len, world_size, rank, epoch, seed=0):
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(dataset_len, generator=g).tolist()
    padded = order + order[: dataset_len % world_size]       # pads by the remainder, not up to a multiple
    return padded[rank::world_size]
""",
    "mixup_targets": """
def my_mixup(x, y, lam, num_classes):
    one_hot = nn.functional.one_hot(y).float()                # as many classes as the batch happens to hold
    return lam * x + (1 - lam) * x.roll(1, 0), lam * one_hot + (1 - lam) * one_hot.roll(1, 0)
""",
}


@pytest.mark.parametrize("question", sorted(SOLUTION))
def test_hidden_checks_pass_the_solution_and_fail_a_wrong_answer_the_public_check_misses(question):
    assert_hidden_check_earns_its_place(LAB, question, SOLUTION[question], WRONG[question])
