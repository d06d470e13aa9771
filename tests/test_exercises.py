"""labkit.exercises: each check passes a right answer (printing one ✓ line) and explains a wrong one."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from labkit import exercises


def _good_scale_lr(lr, world_size, rule):
    return {"none": lr, "linear": lr * world_size, "sqrt": lr * math.sqrt(world_size)}[rule]


def _stub(*args):
    raise NotImplementedError("Exercise: complete this cell")


def _one_check_line(capsys) -> str:
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ "), out
    return out


def test_lr_scaling_right_and_wrong(capsys):
    exercises.check_lr_scaling(_good_scale_lr)
    assert "LR scaling" in _one_check_line(capsys)
    swapped = lambda lr, ws, rule: _good_scale_lr(lr, ws, {"linear": "sqrt", "sqrt": "linear"}.get(rule, rule))
    with pytest.raises(AssertionError, match="'linear' multiplies the learning rate by world_size"):
        exercises.check_lr_scaling(swapped)
    with pytest.raises(AssertionError, match="return a float"):
        exercises.check_lr_scaling(lambda lr, ws, rule: str(lr))
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_lr_scaling(_stub)
    assert capsys.readouterr().out == ""


def test_lr_scaling_reference_is_labkit_train():
    from labkit.train import scale_lr

    assert exercises._scale_lr_reference() is scale_lr
    for ws in (1, 3, 8):
        assert exercises._reference_scale_lr(0.1, ws, "sqrt") == pytest.approx(scale_lr(0.1, ws, "sqrt"))


def test_sampler_shard_truth_pads_and_interleaves():
    # 10 samples on 4 ranks: ceil(10/4) = 3 each; the padded list repeats indices 0 and 1.
    assert exercises.sampler_shard(10, 4, 1) == [1, 5, 9]
    assert exercises.sampler_shard(10, 4, 3) == [3, 7, 1]
    assert exercises.sampler_shard(8, 2, 0) == [0, 2, 4, 6]
    shards = [exercises.sampler_shard(10, 4, r) for r in range(4)]
    assert sorted(i for s in shards for i in s) == sorted([*range(10), 0, 1])


def test_sampler_shard_right_and_wrong(capsys):
    exercises.check_sampler_shard([1, 5, 9], 10, 4, 1)
    exercises.check_sampler_shard(torch.tensor([2, 6, 0]), 10, 4, 2)
    out = capsys.readouterr().out
    assert out.count("✓ DistributedSampler shard") == 2
    with pytest.raises(AssertionError, match="interleaves"):
        exercises.check_sampler_shard([3, 4, 5], 10, 4, 1)          # a contiguous block
    with pytest.raises(AssertionError, match=r"pads the dataset .* ceil\(10/4\) = 3"):
        exercises.check_sampler_shard([1, 5], 10, 4, 1)             # forgot the padding
    with pytest.raises(AssertionError, match="keep the sampler's order"):
        exercises.check_sampler_shard([9, 5, 1], 10, 4, 1)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        exercises.check_sampler_shard([1], 10, 4, 4)


def test_class_weights_right_and_wrong(capsys):
    counts = [717, 52, 2560, 1792]
    inverse = [1 / c for c in counts]
    good = [w / (sum(inverse) / 4) for w in inverse]
    exercises.check_class_weights(good, counts)
    exercises.check_class_weights(torch.tensor(good), pd.Series(counts, index=list("abcd")))
    exercises.check_class_weights(good, dict(zip("abcd", counts)))
    assert capsys.readouterr().out.count("✓ class weights") == 3
    with pytest.raises(AssertionError, match="divide by their mean"):
        exercises.check_class_weights(inverse, counts)              # not normalised
    with pytest.raises(AssertionError, match="use 1 / count"):
        exercises.check_class_weights([c / 1000 for c in counts], counts)
    with pytest.raises(AssertionError, match="one weight per class"):
        exercises.check_class_weights(good[:3], counts)
    with pytest.raises(ValueError, match="count"):
        exercises.check_class_weights([1.0], [-1])


def test_class_weights_agree_with_labkit_train():
    from labkit.train import class_weights_from_counts

    for counts in ([717, 52, 2560, 1792], [10, 10, 10], [5, 0, 20]):
        exercises.check_class_weights(class_weights_from_counts(counts), counts)


def _fedavg(states, sizes):
    total = sum(sizes)
    return {k: sum(s[k] * (n / total) for s, n in zip(states, sizes)) for k in states[0]}


def test_fedavg_right_and_wrong(capsys):
    exercises.check_fedavg(_fedavg)
    assert "FedAvg" in _one_check_line(capsys)
    plain = lambda states, sizes: {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    with pytest.raises(AssertionError, match="plain mean"):
        exercises.check_fedavg(plain)

    def in_place(states, sizes):
        out = states[0]
        for k in out:
            out[k].mul_(sizes[0] / sum(sizes))
            for s, n in zip(states[1:], sizes[1:]):
                out[k].add_(s[k] * n / sum(sizes))
        return out
    with pytest.raises(AssertionError, match="in place"):
        exercises.check_fedavg(in_place)
    with pytest.raises(AssertionError, match="keys"):
        exercises.check_fedavg(lambda states, sizes: {"weight": states[0]["fc.weight"]})
    with pytest.raises(AssertionError, match="dtype"):
        exercises.check_fedavg(lambda states, sizes: {k: v.double() for k, v in _fedavg(states, sizes).items()})
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_fedavg(_stub)


def test_reference_fedavg_is_weighted_mean():
    a = {"w": torch.tensor([0.0, 4.0])}
    b = {"w": torch.tensor([4.0, 0.0])}
    assert torch.allclose(exercises.reference_fedavg([a, b], [3, 1])["w"], torch.tensor([1.0, 3.0]))
