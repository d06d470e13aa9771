"""Find a class's submissions and grade them in parallel: a local pool of processes, or Ray tasks on a cluster.

Each submission is graded by its own process (:mod:`labkit.course.grading.execute`) in its own scratch folder,
with a fresh kernel, its results and Ray files kept there, and — where the machine allows it (``unshare``) — a
network namespace that has only loopback: a submission can reach 127.0.0.1 (its own Ray cluster) and nothing else.
The process is killed (with its whole process group) ``timeout + 60`` seconds after it started, whatever it does.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import nbformat

#: Seconds a grading process gets beyond ``timeout`` (the checks' own minute, kernel start and shut-down).
GRACE_S = 60


@dataclass
class Submission:
    """One student's notebook for the lab being graded."""

    student: str
    path: Path


def _student_from_file(name: str, lab: str) -> str:
    """``alice_01_baseline.ipynb`` / ``01_baseline-alice.ipynb`` / ``alice.ipynb`` → ``alice``."""
    stem = Path(name).stem
    number, _, title = lab.partition("_")
    for part in sorted({lab, title, number} - {""}, key=len, reverse=True):
        stem = re.sub(rf"(^|[_\-. ]){re.escape(part)}($|[_\-. ])", r"\1\2", stem)
    stem = re.sub(r"[_\-. ]+", "_", stem).strip("_")
    return stem or Path(name).stem


def find_submissions(folder: str | os.PathLike, lab: str) -> list[Submission]:
    """Submissions in the layouts an instructor downloads: one folder per student holding the lab's notebook
    (``alice/01_baseline.ipynb``; the folder name is the student), or flat files with the student's name in the
    file name (``alice_01_baseline.ipynb``). Checkpoint copies (``.ipynb_checkpoints``) are ignored.

    Raises ``FileNotFoundError`` for a missing or empty folder, ``ValueError`` for a notebook that cannot be read
    or two submissions of one student — before anything is graded."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"submissions folder {root} does not exist: give the folder you downloaded.")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.ipynb")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if len(rel.parts) == 1:
            student = _student_from_file(path.name, lab)
        else:
            notebooks = [p for p in path.parent.glob("*.ipynb") if not p.name.startswith(".")]
            if len(notebooks) > 1 and lab.split("_")[0] not in path.name:
                continue                              # a student's other notebooks: grade the lab's
            student = rel.parts[0]
        if student in found:
            raise ValueError(f"two submissions for student {student!r}: {found[student]} and {path}; keep one.")
        found[student] = path
    if not found:
        raise FileNotFoundError(f"no notebooks (*.ipynb) under {root}: nothing to grade.")
    for student, path in found.items():
        try:
            nbformat.validate(nbformat.read(path, as_version=4))
        except Exception as exc:  # noqa: BLE001 - every kind of unreadable file gets the same clear error
            raise ValueError(f"submission of {student!r} ({path}) is not a readable notebook "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); fix or remove it, "
                             "then grade again.") from None
    return [Submission(s, p) for s, p in sorted(found.items())]


@lru_cache(maxsize=1)
def loopback_only_prefix() -> tuple[str, ...]:
    """The command prefix that runs a process in a network namespace with only loopback (up), or ``()`` where
    the machine does not allow it (no ``unshare``, no user namespaces)."""
    prefix = ("unshare", "-rn", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$0" "$@"')
    if shutil.which("unshare") is None:
        return ()
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", "import socket; socket.socket().bind(('127.0.0.1', 0))"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if done.returncode == 0 else ()


def grade_one(submission: str, student: str, lab: str, scratch_root: str, timeout: float,
              cell_timeout: float, tolerance: float, submission_path: str = "", quick: bool = False,
              home: str = "") -> dict[str, Any]:
    """Grade one submission in a process of its own (see the module docstring); returns its result dict.

    ``submission`` and ``lab`` are the notebooks' text (JSON), so a Ray task can run this on any node, shared
    file system or not; ``scratch_root`` is used where it exists (else the node's temporary folder). ``quick``
    re-runs in quick mode (``LABKIT_QUICK=1``); ``home``, where it exists, is the course folder whose ``data/`` the
    submission reads (its results always go to the scratch folder)."""
    root = scratch_root if os.path.isdir(scratch_root) else tempfile.gettempdir()
    scratch = Path(tempfile.mkdtemp(prefix=f"{re.sub(r'[^A-Za-z0-9_-]', '_', student)[:20]}-", dir=root))
    out = scratch / "result.json"
    (scratch / "submission.ipynb").write_text(submission, encoding="utf-8")
    (scratch / "lab.ipynb").write_text(lab, encoding="utf-8")
    lab_path = scratch / "lab.ipynb"
    ray_tmp = tempfile.mkdtemp(prefix="lkg", dir="/tmp")       # short: Ray's socket paths are length-limited
    child_env = {**os.environ, "LABKIT_RESULTS": str(scratch / "results"), "RAY_TMPDIR": ray_tmp,
                 "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "LABKIT_COURSE_RAY_ADDRESS", "JPY_PARENT_PID", "LABKIT_QUICK"):
        child_env.pop(name, None)
    if quick:
        child_env["LABKIT_QUICK"] = "1"
    if home and os.path.isdir(home):
        child_env["LABKIT_HOME"] = home
    prefix = loopback_only_prefix()
    cmd = [*prefix, sys.executable, "-m", "labkit.course.grading.execute", str(scratch / "submission.ipynb"),
           str(lab_path), str(out), "--timeout", str(timeout), "--cell-timeout", str(cell_timeout),
           "--tolerance", str(tolerance)]
    tick = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=scratch, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        log, _ = proc.communicate(timeout=timeout + GRACE_S)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        killed = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)          # the kernel and anything it started (Ray, DDP ranks)
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if out.exists() and not killed:
        result = json.loads(out.read_text(encoding="utf-8"))
    else:
        why = (f"killed after {timeout + GRACE_S:g} s (time limit {timeout:g} s + {GRACE_S} s)" if killed
               else f"the grading process exited with status {proc.returncode}: {(log or '').strip()[-300:]}")
        result = {"status": "timeout" if killed else "crashed", "reason": why, "questions": {}, "ran_to_end": False,
                  "reproduces": False, "reproduce_reason": "not run"}
    result.update(student=student, submission=str(submission_path), wall_seconds=round(time.monotonic() - tick, 1),
                  network="loopback only" if prefix else "not isolated (unshare is not available here)",
                  graded_on=os.uname().nodename, scratch=str(scratch))
    return result


def _grade_on_node(*args: Any) -> dict[str, Any]:
    """:func:`grade_one` as a Ray task; the result names the Ray node that graded it."""
    import ray

    return {**grade_one(*args), "ray_node": ray.get_runtime_context().get_node_id()}


def default_jobs(cpus_per_submission: int = 2, memory_gb_per_submission: float = 3.0) -> int:
    """Parallel submissions this machine holds: bounded by its cores and its memory."""
    import psutil

    cores = os.cpu_count() or 1
    memory = psutil.virtual_memory().total / 2**30
    return max(1, min(cores // cpus_per_submission, int(memory // memory_gb_per_submission)))


def grade_all(submissions: Sequence[Submission], lab_path: Path, scratch_root: Path, *, timeout: float,
              cell_timeout: float, tolerance: float, jobs: int = 1, address: str | None = None,
              cpus_per_submission: int = 1, quick: bool = False,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Grade every submission, ``jobs`` at a time on this machine, or as Ray tasks on the cluster at ``address``
    (each asks for ``cpus_per_submission`` CPUs, so the cluster runs as many at once as it has room for)."""
    lab = Path(lab_path).read_text(encoding="utf-8")
    from labkit.env import project_root

    home = str(project_root())
    args = [(s.path.read_text(encoding="utf-8"), s.student, lab, str(scratch_root), timeout, cell_timeout, tolerance,
             str(s.path), quick, home) for s in submissions]
    results: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        echo(f"[{len(results)}/{len(args)}] {result['student']}: {result['status']}"
             + (f" ({result['reason']})" if result.get("reason") else ""))

    if address:
        import ray

        from labkit.distributed import ray_cluster

        with ray_cluster(address):
            task = ray.remote(num_cpus=cpus_per_submission, max_retries=0)(_grade_on_node)
            pending = [task.remote(*a) for a in args]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done(ray.get(ready[0]))
    else:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for future in as_completed([pool.submit(grade_one, *a) for a in args]):
                done(future.result())
    order = {s.student: i for i, s in enumerate(submissions)}
    return sorted(results, key=lambda r: order[r["student"]])
