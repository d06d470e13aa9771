"""labkit.exercises.lab01: each check passes a right answer (printing one ✓ line) and explains a wrong one."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from checks import one_check_line, stub

from labkit.exercises import lab01 as exercises


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


def test_class_weights_calls_the_function_and_reports_astub(capsys):
    counts = [717, 52, 2560, 1792]
    seen = []

    def answer(c):
        seen.append(c)
        inverse = [1 / x for x in c]
        return [w * len(c) / sum(inverse) for w in inverse]

    exercises.check_class_weights(answer, pd.Series(counts))
    assert seen == [counts] and all(type(x) is int for x in seen[0])  # called with a plain list of ints
    one_check_line(capsys)
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_class_weights(stub, counts)
    with pytest.raises(AssertionError, match="use 1 / count"):
        exercises.check_class_weights(lambda c: [1.0] * len(c), counts)   # unweighted
    with pytest.raises(AssertionError, match="use 1 / count"):
        exercises.check_class_weights(lambda c: [x / (sum(c) / len(c)) for x in c], counts)  # frequency, not 1/frequency


def test_class_weights_absent_class_gets_zero(capsys):
    exercises.check_class_weights([1.0, 0.0, 1.0], [5, 0, 5])
    with pytest.raises(AssertionError):
        exercises.check_class_weights([1.0, 1.0, 1.0], [5, 0, 5])
