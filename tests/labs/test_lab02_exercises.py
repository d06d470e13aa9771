"""labkit.exercises.lab02: each check passes a right answer (printing one ✓ line) and explains a wrong one."""
from __future__ import annotations

import math

import pytest
import torch
from checks import one_check_line, stub

from labkit.exercises import lab02 as exercises


def _good_scale_lr(lr, world_size, rule):
    return {"none": lr, "linear": lr * world_size, "sqrt": lr * math.sqrt(world_size)}[rule]


def test_lr_scaling_right_and_wrong(capsys):
    exercises.check_lr_scaling(_good_scale_lr)
    assert "LR scaling" in one_check_line(capsys)
    swapped = lambda lr, ws, rule: _good_scale_lr(lr, ws, {"linear": "sqrt", "sqrt": "linear"}.get(rule, rule))
    with pytest.raises(AssertionError, match="'linear' multiplies the learning rate by world_size"):
        exercises.check_lr_scaling(swapped)
    with pytest.raises(AssertionError, match="return a float"):
        exercises.check_lr_scaling(lambda lr, ws, rule: str(lr))
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_lr_scaling(stub)
    assert capsys.readouterr().out == ""


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
    exercises.check_sampler_shard(exercises.sampler_shard, 10, 4, 1)   # a function is called by the check
    assert capsys.readouterr().out.startswith("✓ DistributedSampler shard")
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_sampler_shard(stub, 10, 4, 1)


def test_lr_scaling_reference_is_independent_of_labkit():
    import inspect

    assert "labkit.train" not in inspect.getsource(exercises)
    for ws in (1, 3, 8):
        assert exercises._reference_scale_lr(0.1, ws, "sqrt") == pytest.approx(0.1 * math.sqrt(ws))


def test_global_mean_right_and_wrong(capsys):
    exercises.check_global_mean(lambda pairs: sum(s for s, _ in pairs) / sum(n for _, n in pairs))
    assert "weighted all-reduce" in one_check_line(capsys)
    mean_of_means = lambda pairs: (lambda m: sum(m) / len(m))([s / n for s, n in pairs if n])
    with pytest.raises(AssertionError, match="you averaged the workers' means"):
        exercises.check_global_mean(mean_of_means)
    divides_by_workers = lambda pairs: sum(s / n for s, n in pairs if n) / len(pairs)
    with pytest.raises(AssertionError, match=r"sum of all sums\) / \(sum of all counts"):
        exercises.check_global_mean(divides_by_workers)
    with pytest.raises(AssertionError, match="return one number"):
        exercises.check_global_mean(lambda pairs: [s for s, _ in pairs])
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_global_mean(stub)
    assert capsys.readouterr().out == ""


def test_global_mean_reference_is_brute_force_over_uneven_shards():
    shards = exercises._shards(0)
    assert [len(s) for s in shards] == [3, 1, 2, 0]
    import inspect

    src = inspect.getsource(exercises.check_global_mean)
    assert "labkit" not in src.replace("labkit.exercises", "")   # no labkit implementation as the reference


def test_the_workers_train_with_the_answer_and_an_untouched_stub_falls_back(capsys):
    wrong = lambda lr, ws, rule: lr * ws * 10
    assert exercises.lr_rule_for_run(wrong) is wrong                 # a wrong answer is what trains
    assert exercises.lr_rule_for_run(_good_scale_lr) is _good_scale_lr
    assert capsys.readouterr().out == ""
    rule = exercises.lr_rule_for_run(stub)                           # untouched: the reference rule
    assert rule(1e-3, 4, "linear") == pytest.approx(4e-3) and rule(1e-3, 4, "sqrt") == pytest.approx(2e-3)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "my_scale_lr (exercise 3) is not implemented yet" in out
    assert exercises.lr_rule_for_run(lambda lr, ws, rule: ...)(0.1, 2, "none") == 0.1   # the stub marker too
