"""Grade one submission in a fresh kernel: run the student's cells, then the instructor's checks.

Run as its own process (``python -m labkit.course.grading.execute …``, started by :mod:`labkit.course.grading.pool`
in a scratch folder, on loopback-only networking where the machine allows it), it writes one JSON result.

1. The submission's code cells run in order in a new kernel of this environment (outputs cleared), each within
   ``cell_timeout`` and all within ``timeout``. The first error, time-out or dead kernel stops the student's part
   and is the submission's status, with the cell and the reason; a dead kernel scores nothing that had not run.
2. In the same kernel (when it is alive), a reset cell drops every ``labkit.exercises`` module (a fresh import
   from disk: a student's redefinition or monkey-patch of a check is gone) and turns the checks strict; then each
   question's public and hidden check cells run **from the instructor's lab**. A question passes when the kernel
   answers every one of its cells with status ``ok`` — decided from the kernel protocol's reply, not from
   anything the student's code prints.
3. Trained results (cells tagged ``labkit-result``) are compared, number by number within ``tolerance``, between
   what the submission shows and what the re-run printed; an edited or missing result does not reproduce.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import nbformat

from labkit.course.grading.questions import Rubric, is_hidden, read_rubric
from labkit.course.nbval_tolerance import RESULT_TAG, compare_within
from labkit.env import ENV_MIME
from labkit.files import write_text


def reset_source() -> str:
    """Runs in the student's kernel after the student's cells, before any check: every ``labkit.exercises`` module
    dropped and the package loaded again from *this* labkit's files (not whatever a student put on ``sys.path`` or
    into ``sys.modules``), checks made strict, IPython's custom exception handler reset (it could hide a failure)."""
    import labkit.exercises

    init = Path(labkit.exercises.__file__).resolve()
    return f"""\
import sys as _lk_sys, importlib.util as _lk_util
for _lk_name in [m for m in list(_lk_sys.modules) if m == "labkit.exercises" or m.startswith("labkit.exercises.")]:
    del _lk_sys.modules[_lk_name]
_lk_spec = _lk_util.spec_from_file_location("labkit.exercises", {str(init)!r},
                                            submodule_search_locations=[{str(init.parent)!r}])
_lk_exercises = _lk_util.module_from_spec(_lk_spec)
_lk_sys.modules["labkit.exercises"] = _lk_exercises
_lk_spec.loader.exec_module(_lk_exercises)
_lk_exercises.STRICT = True
if "labkit" in _lk_sys.modules:
    _lk_sys.modules["labkit"].exercises = _lk_exercises
try:
    get_ipython().set_custom_exc((), None)
except Exception:
    pass
"""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _texts(outputs: list[Any]) -> list[str]:
    """What a cell printed, as texts (streams coalesced, plain-text results), for the reproduce comparison."""
    texts, stream = [], ""
    for out in outputs:
        if out.get("output_type") == "stream":
            stream += out.get("text", "")
        elif "text/plain" in out.get("data", {}):
            texts.append(out["data"]["text/plain"])
    return [_ANSI.sub("", t) for t in ([stream] if stream else []) + texts]


def _machine(outputs: list[Any]) -> dict | None:
    for out in outputs:
        data = out.get("data", {})
        if ENV_MIME in data:
            value = data[ENV_MIME]
            return json.loads(value) if isinstance(value, str) else dict(value)
    return None


def reproduces(submitted: nbformat.NotebookNode, rerun: nbformat.NotebookNode, tolerance: float) -> tuple[bool, str]:
    """Whether every trained-result cell of the submission printed the same on the re-run (numbers within
    ``tolerance``), and a one-line reason."""
    cells = [i for i, c in enumerate(submitted.cells) if c.cell_type == "code" and RESULT_TAG in c.metadata.get("tags", [])]
    if not cells:
        return False, "the submission shows no trained result (no cell tagged labkit-result)"
    for i in cells:
        want, got = _texts(submitted.cells[i].outputs), _texts(rerun.cells[i].outputs)
        if not want:
            return False, f"cell {i}: the submission shows no output (it was not run before submitting)"
        if not got:
            return False, f"cell {i}: the re-run did not reach it"
        if len(want) != len(got):
            return False, f"cell {i}: {len(want)} outputs submitted, {len(got)} re-run"
        for a, b in zip(want, got):
            reason = compare_within(a, b, tolerance)
            if reason:
                return False, f"cell {i}: {reason}"
    return True, f"{len(cells)} result cell(s) within ±{tolerance:g}"


def _first_line(source: str) -> str:
    line = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    return line if len(line) <= 60 else line[:57] + "..."


def grade_notebook(submission: Path, rubric: Rubric, *, timeout: float, cell_timeout: float,
                   tolerance: float, scratch: Path) -> dict[str, Any]:
    """Execute ``submission`` in ``scratch`` and grade it against ``rubric`` (see the module docstring)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from labkit.course.run import CurrentEnvKernelManager

    submitted = nbformat.read(submission, as_version=4)
    nb = nbformat.from_dict(submitted)
    nb.cells = [c for c in nb.cells if not is_hidden(c)]          # a student cannot smuggle in "hidden" cells
    submitted = nbformat.from_dict(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", force_raise_errors=True,
                            kernel_manager_class=CurrentEnvKernelManager, interrupt_on_timeout=True,
                            shutdown_kernel="immediate",   # killed when grading ends: nothing of the student's waits
                            resources={"metadata": {"path": str(scratch)}})
    result: dict[str, Any] = {"status": "ok", "reason": "", "ran_to_end": False, "questions": {}, "cells_run": 0}
    deadline = time.monotonic() + timeout
    tick = time.monotonic()

    def run(cell: nbformat.NotebookNode, index: int) -> str | None:
        """Run one cell; ``None`` when the kernel answered ok, else why not."""
        left = deadline - time.monotonic()
        if left <= 1:
            raise TimeoutError
        client.timeout = max(1, int(min(cell_timeout, left)))
        started = time.monotonic()
        try:
            client.execute_cell(cell, index)
            return None
        except CellTimeoutError:
            raise TimeoutError from None
        except CellExecutionError as exc:
            if time.monotonic() - started >= client.timeout - 0.5:
                raise TimeoutError from None          # interrupted at the limit: a KeyboardInterrupt reply
            return f"{exc.ename}: {' '.join(str(exc.evalue).split())[:200]}"

    alive, reset = True, reset_source()
    with client.setup_kernel():
        code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        i, cell = 0, nbformat.v4.new_code_cell("")
        try:
            for i, cell in code:
                why = run(cell, i)
                result["cells_run"] += 1
                if why is not None:
                    result.update(status="error", reason=f"cell {i} `{_first_line(cell.source)}` raised {why}")
                    break
            else:
                result["ran_to_end"] = True
        except TimeoutError:
            limit = "notebook" if time.monotonic() >= deadline - 1 else "cell"
            result.update(status="timeout", reason=f"stopped in cell {i} `{_first_line(cell.source)}` at the "
                                                   f"{limit} time limit ({timeout if limit == 'notebook' else cell_timeout:g} s)")
        except DeadKernelError:
            alive = False
            result.update(status="dead kernel", reason=f"the kernel died in cell {i} `{_first_line(cell.source)}`")
        deadline = max(deadline, time.monotonic() + 60)   # the checks get their own minute after a time-out
        for question in rubric.questions:
            if not alive:
                result["questions"][question.name] = {"passed": False, "message": "not graded: the kernel died"}
                continue
            try:
                for source in [reset, *question.public, *question.hidden]:
                    probe = nbformat.v4.new_code_cell(source)
                    nb.cells.append(probe)                 # nbclient writes outputs into nb.cells[index] ...
                    try:
                        why = run(probe, len(nb.cells) - 1)
                    finally:
                        nb.cells.pop()                     # ... never kept: no check's code in graded.ipynb
                    if why is not None:
                        hidden = source in question.hidden
                        message = f"hidden check failed ({question.name})" if hidden else why
                        result["questions"][question.name] = {"passed": False, "message": message,
                                                              "output": "" if hidden else "".join(_texts(probe.outputs))}
                        break
                else:
                    result["questions"][question.name] = {"passed": True, "message": "",
                                                          "output": "".join(_texts(probe.outputs))}
            except TimeoutError:
                result["questions"][question.name] = {"passed": False, "message": "the check did not finish in time"}
            except DeadKernelError:
                alive = False
                result["questions"][question.name] = {"passed": False, "message": "the kernel died in the check"}
    result["seconds"] = round(time.monotonic() - tick, 1)
    ok, why = reproduces(submitted, nb, tolerance)
    result["reproduces"], result["reproduce_reason"] = ok, why
    result["submitted_on"] = next((m for c in submitted.cells if c.cell_type == "code" for m in [_machine(c.outputs)] if m), None)
    result["rerun_on"] = next((m for c in nb.cells if c.cell_type == "code" for m in [_machine(c.outputs)] if m), None)
    nbformat.write(nb, scratch / "graded.ipynb")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.course.grading.execute SUBMISSION LAB OUT.json --timeout … --cell-timeout … --tolerance …``"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path)
    parser.add_argument("lab", type=Path, help="the instructor's lab notebook (its questions and hidden checks)")
    parser.add_argument("out", type=Path, help="where the JSON result goes")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--cell-timeout", type=float, required=True)
    parser.add_argument("--tolerance", type=float, required=True)
    args = parser.parse_args(argv)
    scratch = args.out.parent
    try:
        result = grade_notebook(args.submission, read_rubric(args.lab), timeout=args.timeout,
                                cell_timeout=args.cell_timeout, tolerance=args.tolerance, scratch=scratch)
    except Exception as exc:  # noqa: BLE001 - one submission's failure is its result, never the class's
        result = {"status": "grader error", "reason": f"{type(exc).__name__}: {exc}", "questions": {},
                  "ran_to_end": False, "reproduces": False, "reproduce_reason": "not run"}
    write_text(args.out, json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
