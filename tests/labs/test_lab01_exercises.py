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


# --- the run trains with the answer ------------------------------------------------------------------------------

def test_the_run_uses_the_answer_and_falls_back_from_an_untouched_stub(capsys):
    counts = [717, 52, 2560, 1792]
    inverse = [1 / c for c in counts]
    good = [w / (sum(inverse) / 4) for w in inverse]
    used = exercises.class_weights_for_run(lambda c: good, counts)
    assert used.dtype == torch.float32 and torch.allclose(used, torch.tensor(good, dtype=torch.float32))
    assert capsys.readouterr().out == ""
    wrong = exercises.class_weights_for_run(lambda c: [1.0] * len(c), counts)      # a wrong answer trains as it is
    assert torch.equal(wrong, torch.ones(4))
    fallback = exercises.class_weights_for_run(stub, counts)                        # untouched: the reference
    assert torch.allclose(fallback, torch.tensor(good, dtype=torch.float32))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "inverse_frequency_weights is not implemented yet" in out and "reference" in out
    with pytest.raises(ValueError, match="one weight per class"):
        exercises.class_weights_for_run(lambda c: [1.0], counts)


def test_the_notebook_loss_is_weighted_by_the_students_function():
    """Lab 01's loss cell, run with a wrong answer and with class_weights on: the loss carries that answer."""
    from pathlib import Path

    import jupytext
    from torch import nn

    from labkit.params import Config

    lab = Path(__file__).resolve().parents[2] / "labs" / "01_baseline.py"
    [cell] = [c.source for c in jupytext.read(lab).cells
              if c.cell_type == "code" and "loss_fn = nn.CrossEntropyLoss(" in c.source]
    assert "class_weights_for_run(inverse_frequency_weights" in cell and "train.class_weights_from_counts" not in cell
    for class_weights, answer, want in ((True, lambda c: [4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]),
                                        (False, lambda c: [4.0, 3.0, 2.0, 1.0], None)):
        ns = {"nn": nn, "dev": torch.device("cpu"), "cfg": Config(class_weights=class_weights),
              "inverse_frequency_weights": answer, "train_counts": [10, 20, 30, 40],
              "class_weights_for_run": exercises.class_weights_for_run}
        exec(compile(cell, str(lab), "exec"), ns)
        got = ns["loss_fn"].weight
        assert (got is None) if want is None else got.tolist() == want
