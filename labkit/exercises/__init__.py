"""Checks for the labs' exercises, one module per lab (``labkit.exercises.lab01`` ...).

Each check runs a student's answer against a reference on a few cases, raises an
``AssertionError`` that says what is wrong and gives a hint, and prints one ``✓ ...`` line when
the answer is right. In a lab, the exercise cell holds the solution between ``# BEGIN SOLUTION``
and ``# END SOLUTION`` (the student copy has a ``raise NotImplementedError`` there) and the
next cell, tagged ``nbval-check-output``, calls the check::

    def my_scale_lr(lr, world_size, rule):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

    from labkit.exercises.lab02 import check_lr_scaling
    check_lr_scaling(my_scale_lr)

Write exercises as functions, as above: then the student copy still defines the name and the
check cell reports "not implemented yet" instead of a ``NameError``.

Every check compares with an *independent* reference (a different formula, PyTorch's own class, a
brute-force count), never with the function under test nor labkit's own implementation of it.
"""
from __future__ import annotations

from typing import Any, Callable


def ok(message: str) -> None:
    """Print the one ``✓ ...`` line of a passed check."""
    print(f"✓ {message}")


def call_student(fn: Callable, *args: Any, what: str) -> Any:
    """Call the student's function; a stub's NotImplementedError becomes a clear AssertionError."""
    try:
        return fn(*args)
    except NotImplementedError as exc:
        raise AssertionError(f"{what} is not implemented yet: complete the exercise cell above "
                             f"(replace the `raise NotImplementedError` line) and run it again.") from exc
