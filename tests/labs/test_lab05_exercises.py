"""labkit.exercises.lab05: each check passes a right answer (printing one ✓ line) and explains a wrong one."""
from __future__ import annotations

import pytest
import torch
from checks import one_check_line, stub
from labcells import LABS, assert_hidden_check_earns_its_place

from labkit.exercises import lab05 as exercises


def _weighted(states, sizes):
    """Every entry weighted by sample count, integers rounded, dtype kept (running_var NOT pooled)."""
    total = sum(sizes)
    out = {}
    for k, first in states[0].items():
        mean = sum(s[k].double() * (n / total) for s, n in zip(states, sizes))
        out[k] = (mean if first.is_floating_point() else mean.round()).to(first.dtype)
    return out


def _fedavg(states, sizes):
    """A right answer: the weighted average, each running_var pooled through the second moment."""
    total = sum(sizes)
    out = _weighted(states, sizes)
    for k in out:
        if k.endswith("running_var"):
            m = k[: -len("running_var")] + "running_mean"
            second = sum((s[k].double() + s[m].double() ** 2) * (n / total) for s, n in zip(states, sizes))
            out[k] = (second - out[m].double() ** 2).to(states[0][k].dtype)
    return out


def test_fedavg_right_answer_passes(capsys):
    exercises.check_fedavg(_fedavg)
    assert "FedAvg" in one_check_line(capsys)


def test_fedavg_typical_wrong_answers_fail_with_a_hint():
    # the old lesson's answer: running_var averaged like a weight, the spread between client means left out
    with pytest.raises(AssertionError, match="spread between their means"):
        exercises.check_fedavg(_weighted)

    def plain(states, sizes):
        return {k: (torch.stack([s[k].double() for s in states]).mean(0)).to(states[0][k].dtype) for k in states[0]}
    with pytest.raises(AssertionError, match="plain mean"):
        exercises.check_fedavg(plain)

    def in_place(states, sizes):
        out = states[0]
        for k in out:
            if out[k].is_floating_point():
                out[k].mul_(sizes[0] / sum(sizes))
                for s, n in zip(states[1:], sizes[1:]):
                    out[k].add_(s[k] * n / sum(sizes))
        return out
    with pytest.raises(AssertionError, match="in place"):
        exercises.check_fedavg(in_place)

    def params_only(states, sizes):
        return {k: v for k, v in _fedavg(states, sizes).items() if "running" not in k and "num_batches" not in k}
    with pytest.raises(AssertionError, match="BatchNorm buffers"):
        exercises.check_fedavg(params_only)

    def all_float(states, sizes):
        return {k: v.float() for k, v in _fedavg(states, sizes).items()}
    with pytest.raises(AssertionError, match="num_batches_tracked.*dtype|dtype.*integer"):
        exercises.check_fedavg(all_float)

    def truncates(states, sizes):
        total = sum(sizes)
        out = _fedavg(states, sizes)
        out.update({k: sum(s[k].double() * (n / total) for s, n in zip(states, sizes)).to(v.dtype)
                    for k, v in out.items() if not v.is_floating_point()})
        return out
    with pytest.raises(AssertionError, match="round"):
        exercises.check_fedavg(truncates)

    def counter_summed(states, sizes):
        out = _fedavg(states, sizes)
        out.update({k: sum(s[k] for s in states) for k in out if not out[k].is_floating_point()})
        return out
    with pytest.raises(AssertionError, match="integer counter"):
        exercises.check_fedavg(counter_summed)

    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_fedavg(stub)


def test_reference_fedavg_is_weighted_mean_and_rounds_counters():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(3)}
    ref = exercises.reference_fedavg([a, b], [3, 1])
    assert torch.allclose(ref["w"], torch.tensor([1.0, 3.0]))
    assert ref["n"].dtype == torch.int64 and ref["n"].item() == 8      # (30 + 3) / 4 = 8.25


def test_reference_pools_statistics_from_the_activations():
    states, sizes, acts = exercises._client_states()
    ref = exercises.reference_fedavg(states, sizes, acts)
    pooled = torch.from_numpy(__import__("numpy").concatenate(acts))
    assert torch.allclose(ref["1.running_var"].double(), pooled.var(0, unbiased=False), atol=1e-5)
    # the clients' means differ, so the pooled variance is clearly above the average of their variances
    averaged = sum(s["1.running_var"].double() * n for s, n in zip(states, sizes)) / sum(sizes)
    assert (ref["1.running_var"].double() - averaged > 0.5).all()
    assert torch.allclose(_fedavg(states, sizes)["1.running_var"], ref["1.running_var"], atol=1e-4)


def test_check_states_hold_bn_buffers_and_a_counter():
    states, sizes, _ = exercises._client_states()
    keys = set(states[0])
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= keys
    assert states[0]["1.num_batches_tracked"].dtype == torch.int64
    assert all((s["1.running_var"] > 0).all() for s in states)


# --------------------------------------------------------------------------- hidden checks (labkit grade)
LAB = next(p for p in LABS if p.name.startswith("05_"))
SOLUTION = {'fedavg': ['fedavg']}
#: For each question, a plausible wrong answer that its public check lets through.
WRONG = {
    "fedavg": """
def fedavg(states, num_samples):
    total = float(sum(num_samples))
    out = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, n in zip(states, num_samples):
            value = state[key].to(torch.float64)
            if key.endswith("running_var"):
                value = value + state[key[:-3] + "mean"].to(torch.float64) ** 2
            acc += value * (n / total)
        if key.endswith("running_var"):
            mean = sum(s[key[:-3] + "mean"].to(torch.float64) * (n / total) for s, n in zip(states, num_samples))
            acc = acc - mean ** 2
        out[key] = acc.float() if first.is_floating_point() else acc.round().to(first.dtype)   # always float32
    return out
""",
}


@pytest.mark.parametrize("question", sorted(SOLUTION))
def test_hidden_checks_pass_the_solution_and_fail_a_wrong_answer_the_public_check_misses(question):
    assert_hidden_check_earns_its_place(LAB, question, SOLUTION[question], WRONG[question])


def test_the_rounds_use_the_students_fedavg_or_a_pooling_reference_while_it_is_a_stub(capsys):
    mine = lambda states, sizes: states[0]  # noqa: E731  (wrong, but the student's: the rounds use it)
    assert exercises.fedavg_for_run(mine) is mine
    reference = exercises.fedavg_for_run(stub)
    assert "fedavg (section 6) is not implemented yet" in capsys.readouterr().out
    exercises.check_fedavg(reference)              # the fallback pools BatchNorm variances as the exercise asks
    one_check_line(capsys)
