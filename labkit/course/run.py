"""Run the course: execute lab notebooks with papermill and report which lab failed where.

``labkit run`` is a thin command over :func:`run_labs`. Each lab is executed from the course
folder (so ``data/`` and ``results/`` resolve the same way as in Jupyter) with a kernel from the
current Python environment, and its executed copy is written to ``results/executed/<lab>.ipynb``.

>>> runs = run_labs(["01"], quick=True)          # doctest: +SKIP
>>> print(format_runs(runs))                       # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ipykernel.kernelspec
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from labkit.distributed.local_ray import COURSE_CLUSTER_VAR
from labkit.env import project_root, resolve_path
from labkit.results import results_root
from labkit.timing import format_seconds

#: Kernel names that mean "Python in this environment" (the labs' kernelspec says ``python3``).
PYTHON_KERNELS = ("python3", "python")


class CurrentEnvKernelSpecManager(KernelSpecManager):
    """Resolves ``python3`` to an ipykernel running on *this* interpreter (``sys.executable``).

    A ``python3`` kernelspec installed elsewhere (e.g. a system Jupyter) could point to another
    Python without labkit; the labs must run where labkit and torch are installed.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name in PYTHON_KERNELS:
            # The kernel's own log at ERROR: ipykernel 7 warns at every start that its sockets are plain TCP (they
            # are bound to 127.0.0.1), once per lab and per graded submission; cells' output and warnings still
            # reach the notebook.
            spec = ipykernel.kernelspec.get_kernel_dict(extra_arguments=["--IPKernelApp.log_level=ERROR"])
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)
        return super().get_kernel_spec(kernel_name)


class CurrentEnvKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, with ``python3`` meaning the current environment's kernel."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return CurrentEnvKernelSpecManager(data_dir=self.data_dir)


@dataclass
class CellFailure:
    """Where and why a lab stopped: the cell index in the lab notebook (0-based, all cells
    counted, as in ``nbformat``), the execution count shown as ``In [n]``, its first source
    line, and the exception."""

    cell: int | None
    execution_count: int | None
    first_line: str
    ename: str
    evalue: str

    def describe(self) -> str:
        """``cell 7 (In [5]) `model = ...`: ValueError: ...`` on one line."""
        where = "before any cell ran" if self.cell is None else f"cell {self.cell}"
        if self.execution_count is not None:
            where += f" (In [{self.execution_count}])"
        if self.first_line:
            where += f" `{self.first_line}`"
        evalue = " ".join(str(self.evalue).split())
        if len(evalue) > 160:
            evalue = evalue[:157] + "..."
        return f"{where}: {self.ename}: {evalue}" if evalue else f"{where}: {self.ename}"


@dataclass
class LabRun:
    """The outcome of executing one lab notebook."""

    lab: str
    source: Path
    output: Path
    seconds: float
    failure: CellFailure | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every cell ran without an error."""
        return self.failure is None


def parse_value(text: str) -> Any:
    """Read a ``-p NAME VALUE`` value like papermill's command line does: ``True``/``False``/
    ``None`` and ints/floats become Python values, anything else stays a string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_parameters(pairs: Sequence[Sequence[str]] | None) -> dict[str, Any]:
    """``[["epochs", "3"], ["device", "cpu"]]`` → ``{"epochs": 3, "device": "cpu"}``."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        if len(pair) != 2 or not pair[0].isidentifier():
            raise ValueError(f"parameter {list(pair)!r}: expected -p NAME VALUE with a Python name, e.g. -p epochs 3.")
        params[pair[0]] = parse_value(pair[1])
    return params


def parse_yaml_parameters(text: str, where: str = "-y") -> dict[str, Any]:
    """Parameters from YAML, as papermill's ``-y``/``-f`` read them: a mapping of names to values,
    lists and dicts included (``'workers: [1, 2]'`` → ``{"workers": [1, 2]}``)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML ({exc}); write e.g. -y 'sweep: [1, 2]'.") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: YAML parameters must be a mapping NAME: VALUE, got a {type(data).__name__}; "
                         "write e.g. -y 'sweep: [1, 2]'.")
    bad = [k for k in data if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ValueError(f"{where}: parameter name(s) {bad!r} are not Python names.")
    return data


def gather_parameters(files: Sequence[str] = (), yamls: Sequence[str] = (),
                      pairs: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """Merge parameters in papermill's order: ``-f`` files, then ``-y`` YAML, then ``-p`` pairs (later wins)."""
    params: dict[str, Any] = {}
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"-f {name}: no such parameters file.")
        params.update(parse_yaml_parameters(path.read_text(encoding="utf-8"), where=f"-f {name}"))
    for text in yamls:
        params.update(parse_yaml_parameters(text, where=f"-y {text!r}"))
    params.update(parse_parameters(pairs))
    return params


def available_labs(labs_dir: str | os.PathLike = "labs") -> list[Path]:
    """All lab notebooks in ``labs_dir`` (relative to the course folder), sorted by name."""
    folder = resolve_path(labs_dir)
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))


def find_labs(names: Sequence[str] | None = None, labs_dir: str | os.PathLike = "labs") -> list[Path]:
    """Turn lab names into notebook paths, in the order given.

    A name may be a number prefix (``"01"``), a lab name (``"01_baseline"``) or a path to a
    notebook. With no names, every notebook in ``labs_dir`` is returned, sorted.
    """
    labs = available_labs(labs_dir)
    if not names:
        if not labs:
            raise FileNotFoundError(f"no lab notebooks (*.ipynb) in {resolve_path(labs_dir)}; "
                                    "pass --labs-dir or a notebook path.")
        return labs
    found: list[Path] = []
    for name in names:
        as_path = Path(name).expanduser()
        if as_path.suffix == ".ipynb" or os.sep in name or "/" in name:
            path = as_path if as_path.is_absolute() or as_path.exists() else resolve_path(as_path)
            if not path.is_file():
                raise FileNotFoundError(f"lab notebook {name!r} does not exist (looked at {path}).")
            found.append(path.resolve())
            continue
        exact = [p for p in labs if p.stem == name]
        matches = exact or [p for p in labs if p.stem.startswith(name + "_") or p.stem.startswith(name)]
        if len(matches) != 1:
            known = ", ".join(p.stem for p in labs) or "none"
            why = "matches several labs" if matches else "matches no lab"
            raise ValueError(f"lab {name!r} {why} in {resolve_path(labs_dir)} (labs: {known}); "
                             "give a longer name or a notebook path.")
        found.append(matches[0])
    return found


@contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or, with ``None``, remove) environment variables for a block; restore them after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(source: str) -> str:
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 70 else line[:67] + "..."


def _failure_from(exc: BaseException, lab_nb: nbformat.NotebookNode) -> CellFailure:
    """A :class:`CellFailure` from papermill's error (cell index mapped back to the lab notebook,
    which has no injected-parameters cell) or from any other exception."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        matches = [i for i, c in enumerate(lab_nb.cells) if c.cell_type == "code" and c.source == exc.source]
        cell = min(matches, key=lambda i: abs(i - exc.cell_index)) if matches else exc.cell_index
        return CellFailure(cell, exc.exec_count, _first_line(exc.source), exc.ename, exc.evalue)
    return CellFailure(None, None, "", type(exc).__name__, str(exc))


def run_lab(source: str | os.PathLike, output: str | os.PathLike, parameters: dict[str, Any] | None = None,
            *, progress: bool = False, cwd: str | os.PathLike | None = None,
            timeout: float | None = None) -> LabRun:
    """Execute one notebook with papermill into ``output`` and return how it went.

    The notebook runs in ``cwd`` (default: the course folder) on this environment's Python kernel.
    It is executed into a hidden temporary file beside ``output`` that is renamed onto ``output``
    at the end, so ``output`` is never half-written; a failed lab still leaves its executed copy
    (with the error) for inspection. ``timeout`` limits each cell, in seconds (default: none).
    """
    import papermill

    source, output = Path(source), Path(output)
    params = dict(parameters or {})
    lab_nb = nbformat.read(source, as_version=4)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.{uuid.uuid4().hex[:8]}.partial.ipynb")
    failure: CellFailure | None = None
    tik = time.perf_counter()
    try:
        # MPLBACKEND is dropped for the kernel: an executed lab keeps its figures inline, as in Jupyter, even when
        # the shell (a server, the tests) exports MPLBACKEND=Agg — the regrade, the summary and the site read them.
        with environ(MPLBACKEND=None):
            papermill.execute_notebook(
                str(source), str(tmp), parameters=params, kernel_name="python3",
                cwd=str(cwd or project_root()), progress_bar=progress, log_output=False,
                kernel_manager_class=CurrentEnvKernelManager, execution_timeout=timeout,
                # Stop the kernel at once when the notebook ends: the labs close their own Ray, Serve and process
                # stacks in their last cells, and a graceful stop only waits ~3 s for Python to tear down torch's
                # imports (triton, sympy) in every lab. Ray's reaper still stops a cluster the kernel started.
                shutdown_kernel="immediate",
            )
    except Exception as exc:  # noqa: BLE001 - every failure is reported per lab, the course goes on
        failure = _failure_from(exc, lab_nb)
    seconds = time.perf_counter() - tik
    if tmp.exists():
        try:
            nb = nbformat.read(tmp, as_version=4)
            nb.metadata.setdefault("papermill", {})["output_path"] = str(output)
            nbformat.write(nb, tmp)
        except Exception:  # noqa: BLE001 - keep papermill's file as it is
            pass
        os.replace(tmp, output)
    return LabRun(source.stem, source, output, seconds, failure, params)


def uses_ray(notebook: str | os.PathLike) -> bool:
    """Whether a lab notebook starts (or joins) a Ray cluster: a code cell calls ``ray_cluster(``."""
    nb = nbformat.read(notebook, as_version=4)
    return any(c.cell_type == "code" and "ray_cluster(" in c.source for c in nb.cells)


@contextmanager
def course_cluster(paths: Sequence[Path], parameters: dict[str, Any],
                   echo: Callable[[str], None] = print) -> Iterator[str | None]:
    """One local Ray cluster for every lab of a course run that uses Ray (when two or more do, and no
    ``address`` / ``$RAY_ADDRESS`` names a cluster already): started here, on 127.0.0.1 only, sized to this
    machine, and shut down when the block ends — also on an error or ■. Yields its address (``None`` when the
    labs start their own). Each lab joins it instead of paying Ray's start-up again (~5–15 s on 2 cores)."""
    ray_labs = [p for p in paths if uses_ray(p)]
    if len(ray_labs) < 2 or parameters.get("address") or os.environ.get("RAY_ADDRESS"):
        yield None
        return
    import ray

    from labkit.distributed import ray_cluster

    with environ(**{COURSE_CLUSTER_VAR: None}), ray_cluster(None) as info:
        address = ray.get_runtime_context().gcs_address
        echo(f"Ray: one local cluster for the {len(ray_labs)} Ray labs at {address} "
             f"({info['cpus']} CPU(s), {info['gpus']} GPU(s), started in {format_seconds(info['init_seconds'])})")
        yield address


def run_labs(labs: Sequence[str] | None = None, *, quick: bool = False, parameters: dict[str, Any] | None = None,
             results_dir: str | os.PathLike | None = None, labs_dir: str | os.PathLike = "labs",
             progress: bool | None = None, timeout: float | None = None, shared_ray: bool = True,
             echo: Callable[[str], None] = print) -> list[LabRun]:
    """Execute labs in order and return one :class:`LabRun` each (later labs run after a failure).

    ``quick`` passes ``-p quick True`` and sets ``LABKIT_QUICK=1``; ``parameters`` are passed to
    every lab (a lab warns about names it does not have). Executed copies go to
    ``<results>/executed/<lab>.ipynb``; the notebooks see ``LABKIT_RESULTS=<results>``.
    ``progress`` shows papermill's per-cell bar (default: when stderr is a terminal).
    ``shared_ray`` starts one Ray cluster for all the Ray labs (:func:`course_cluster`) instead of one each.
    """
    paths = find_labs(labs, labs_dir)
    root = results_root(results_dir)
    params = {**({"quick": True} if quick else {}), **(parameters or {})}
    show_bar = sys.stderr.isatty() if progress is None else progress
    runs: list[LabRun] = []
    env = {"LABKIT_RESULTS": str(root), "LABKIT_QUICK": "1" if quick else os.environ.get("LABKIT_QUICK")}
    width = max(len(p.stem) for p in paths)
    with contextlib.ExitStack() as stack:
        stack.enter_context(environ(**env))
        shared, started = None, not shared_ray
        for i, path in enumerate(paths, 1):
            if not started and uses_ray(path):   # started just before the first Ray lab: no start-up load on the others
                started = True
                shared = stack.enter_context(course_cluster(paths[i - 1:], params, echo))
            out = root / "executed" / f"{path.stem}.ipynb"
            with environ(**{COURSE_CLUSTER_VAR: shared}):
                run = run_lab(path, out, params, progress=show_bar, timeout=timeout)
            runs.append(run)
            status = "ok" if run.ok else "FAILED"
            echo(f"[{i}/{len(paths)}] {run.lab:<{width}}  {status:<6}  {format_seconds(run.seconds):>8}"
                 + ("" if run.ok else f"  {run.failure.describe()}"))
    return runs


def format_runs(runs: Sequence[LabRun]) -> str:
    """A plain-text table of lab runs: lab, status, time, and where a failed lab stopped."""
    if not runs:
        return "no labs were run"
    header = ("lab", "status", "time", "failed at")
    rows = [(r.lab, "ok" if r.ok else "FAILED", format_seconds(r.seconds), "" if r.ok else r.failure.describe())
            for r in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(3)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(header[:3], widths)) + "  " + header[3]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[3]))
    for row in rows:
        lines.append(("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:3], widths)) + "  " + row[3]).rstrip())
    failed = [r for r in runs if not r.ok]
    total = format_seconds(sum(r.seconds for r in runs))
    lines.append(f"{len(runs) - len(failed)} of {len(runs)} labs ran cleanly in {total}"
                 + (f"; failed: {', '.join(r.lab for r in failed)} (executed copies show the error: "
                    f"{failed[0].output.parent})" if failed else "."))
    return "\n".join(lines)
