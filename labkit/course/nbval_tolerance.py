"""Trained results compared within a tolerance when ``labkit regrade`` re-runs a notebook.

nbval compares a checked cell's outputs as text, exactly (after ``nbval_sanitize.cfg``). That is right
for what is the same on every machine — configuration, counts, shapes, exercise checks — but a model
trained on a Colab GPU in mixed precision does not end with the same accuracy, to two decimals, as a
re-run on the instructor's CPU. Cells tagged ``labkit-result`` (a lab's headline metrics; they carry
``nbval-check-output`` too) are therefore compared number by number: the text around the numbers
must match exactly, each number within ``tolerance`` (absolute). A typed-in result that moved further
than that still fails.

``labkit regrade`` loads this module into nbval's pytest run (``-p labkit.course.nbval_tolerance``) and
passes the tolerance in ``$LABKIT_REGRADE_TOLERANCE``. It also keeps the machine description that
:func:`labkit.params.check` displays (MIME type :data:`ENV_MIME`) out of every comparison.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

from labkit.env import ENV_MIME

#: The tag of cells whose numbers are compared within the tolerance.
RESULT_TAG = "labkit-result"
#: Default absolute tolerance: metrics are printed in [0, 1] with 2 decimals; 0.05 absorbs the
#: spread between devices and precisions at a fixed seed, not a different result.
DEFAULT_TOLERANCE = 0.05

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def tolerance_from_env() -> float:
    """The tolerance in ``$LABKIT_REGRADE_TOLERANCE``, else :data:`DEFAULT_TOLERANCE`."""
    raw = os.environ.get("LABKIT_REGRADE_TOLERANCE", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TOLERANCE
    except ValueError:
        raise ValueError(f"LABKIT_REGRADE_TOLERANCE={raw!r}: need a number >= 0, e.g. 0.05.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"LABKIT_REGRADE_TOLERANCE={raw!r}: need a number >= 0, e.g. 0.05.")
    return value


def compare_within(submitted: str, rerun: str, tolerance: float) -> str | None:
    """``None`` when ``rerun`` matches ``submitted`` with every number within ``tolerance`` (and the
    words between them equal, spacing aside), else a one-line reason naming the first difference."""
    # column alignment may shift when a number gains a digit: compare the words, not the spacing
    words_a = [re.sub(r"[ \t]+", " ", w) for w in _NUMBER.split(submitted)]
    words_b = [re.sub(r"[ \t]+", " ", w) for w in _NUMBER.split(rerun)]
    nums_a, nums_b = _NUMBER.findall(submitted), _NUMBER.findall(rerun)
    if words_a != words_b or len(nums_a) != len(nums_b):
        return "the text around the numbers differs"
    for a, b in zip(nums_a, nums_b):
        if abs(float(a) - float(b)) > tolerance + 1e-12:
            return f"submitted {a}, re-run {b}: differs by {abs(float(a) - float(b)):.3g} > tolerance {tolerance:g}"
    return None


def _texts(outputs: list[Any], sanitize) -> list[str]:
    texts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            texts.append(sanitize(out.get("text", "")))
        elif "text/plain" in out.get("data", {}):
            texts.append(sanitize(out["data"]["text/plain"]))
        elif out.get("output_type") == "error":
            texts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return texts


def pytest_configure(config) -> None:
    """Wrap nbval's output comparison (the plugin is active only inside ``labkit regrade``)."""
    from nbval.plugin import IPyNbCell, IPyNbFile, coalesce_streams

    tolerance = tolerance_from_env()
    if getattr(IPyNbCell, "_labkit_wrapped", False):
        return
    exact = IPyNbCell.compare_outputs
    setup = IPyNbFile.setup

    def file_setup(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        self.skip_compare = tuple(self.skip_compare) + (ENV_MIME,)

    def compare_outputs(self, test, ref, skip_compare=None):
        if RESULT_TAG not in self.cell.metadata.get("tags", []):
            return exact(self, test, ref, skip_compare)
        got = _texts(coalesce_streams(test), self.sanitize)
        want = _texts(ref, self.sanitize)
        self.comparison_traceback = []
        reason = (f"{len(want)} outputs submitted, {len(got)} re-run" if len(got) != len(want) else
                  next((r for r in (compare_within(a, b, tolerance) for a, b in zip(want, got)) if r), None))
        if reason is None:
            return True
        self.comparison_traceback += [f"trained result outside the tolerance: {reason}",
                                      "assert reference_output == test_output failed:"]
        for a, b in zip(want, got):
            for line_a, line_b in zip(a.splitlines(), b.splitlines()):
                if line_a != line_b:
                    self.comparison_traceback += [f"  + {line_a}", f"  - {line_b}"]
        return False

    IPyNbFile.setup = file_setup
    IPyNbCell.compare_outputs = compare_outputs
    IPyNbCell._labkit_wrapped = True
