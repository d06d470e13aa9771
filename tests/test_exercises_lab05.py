"""labkit.exercises.lab05: each check passes a right answer (printing one ✓ line) and explains a wrong one."""
from __future__ import annotations

import pytest
import torch

from labkit.exercises import lab05 as exercises


def _stub(*args):
    raise NotImplementedError("Exercise: complete this cell")


def _one_check_line(capsys) -> str:
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ "), out
    return out


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
