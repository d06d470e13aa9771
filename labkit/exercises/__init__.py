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

A lab's run then trains with the student's answer (:func:`answer_or_reference`): a wrong answer changes what
trains, and an untouched stub falls back to the reference with a one-line notice, so a student copy runs to the end.

Every check compares with an *independent* reference (a different formula, PyTorch's own class, a
brute-force count), never with the function under test nor labkit's own implementation of it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

#: ``labkit grade`` sets this in the graded kernel (after the student's cells): checks then raise, and the grade is
#: read from the kernel's answer, not from what a notebook prints.
STRICT = False
#: This kernel's exercise results so far: question name → passed (shown by :func:`status_table`).
STATUS: dict[str, bool] = {}


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


@contextmanager
def reported(question: str) -> Iterator[None]:
    """Run a public check and **report** it: ``✔``/``✘`` with the check's message and hint, without stopping the
    notebook, so Run All reaches the end with an exercise unfinished (an untouched stub reports "not implemented
    yet"). Under ``labkit grade`` (:data:`STRICT`) the failure is raised instead::

        with reported("class_weights"):
            check_class_weights(inverse_frequency_weights, counts)
    """
    try:
        yield
    except NotImplementedError as exc:
        STATUS[question] = False
        if STRICT:
            raise
        print(f"✘ {question}: not implemented yet: complete the exercise cell above ({exc}) and run both cells again.")
    except AssertionError as exc:
        STATUS[question] = False
        if STRICT:
            raise
        print(f"✘ {question}: {exc}")
    else:
        STATUS[question] = True


def status_table() -> str:
    """The exercises this kernel has checked, ✔/✘ each, as a small text table (the last cell of a lab)."""
    if not STATUS:
        return "no exercise checked yet in this kernel"
    width = max(len(q) for q in STATUS)
    lines = [f"{q:<{width}}  {'✔ passed' if ok else '✘ not yet'}" for q, ok in STATUS.items()]
    done = sum(STATUS.values())
    return "\n".join([*lines, f"{done} of {len(STATUS)} exercise(s) pass"])


#: What an untouched exercise returns instead of raising, where a stub must return something.
STUB_MARKER = ...


def answer_or_reference(fn: Callable, reference: Callable, probe: tuple, what: str) -> Callable:
    """The function a lab's run uses: the student's ``fn``, right or wrong (the check cell has already said which),
    unless it is still the untouched stub — calling it with ``probe`` raises ``NotImplementedError`` or returns
    :data:`STUB_MARKER` — then ``reference``, with a one-line notice (so a student copy still runs to the end)."""
    try:
        untouched = fn(*probe) is STUB_MARKER
    except NotImplementedError:
        untouched = True
    if untouched:
        print(f"Note: {what} is not implemented yet, so this run uses the reference answer instead; complete the "
              "exercise to train with yours.")
        return reference
    return fn
