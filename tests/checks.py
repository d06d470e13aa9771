"""Helpers the exercise-check tests share (``tests/labs/test_labNN_exercises.py``)."""
from __future__ import annotations


def stub(*args):
    """A student's untouched exercise: the student copy's body."""
    raise NotImplementedError("Exercise: complete this cell")


def one_check_line(capsys) -> str:
    """The check printed exactly one ``✓ ...`` line; returns it."""
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("✓ "), out
    return out
