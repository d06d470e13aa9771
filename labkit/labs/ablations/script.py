"""Lab 03's sweep through the notebook's own DDP script: the ablation table measures the code the student edits.

:func:`run_script` turns each config into the script's command-line switches
(:func:`labkit.labs.ablations.recipe.switch_args`), writes them to ``runs.json`` and launches the script **once**
with ``torchrun`` (``labkit.distributed.ddp.torchrun``: output streamed line by line): every (row, seed) run then
trains in the same process group, one after another, so start-up (processes, imports, rendezvous, data
loading) is paid once, not once per run. Before anything starts, every config is checked to give each rank at
least one full batch (:func:`check_fit`). The results come back from the ``metrics.json`` rank 0 writes per run,
in the form :func:`labkit.labs.ablations.sweep.ablation_table` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

from labkit.distributed import ddp
from labkit.errors import ParameterError
from labkit.files import write_text
from labkit.labs.ablations.recipe import AblationConfig, fit_error, switch_args
from labkit.labs.ablations.sweep import row_name, slug


def check_fit(configs: list[AblationConfig], n_train: int, world_size: int) -> None:
    """Refuse, before any rank starts, a config whose largest per-rank batch exceeds a rank's share of the
    ``n_train`` training images (it would take no optimizer step): the error names the images, ranks, batch
    size and what to change."""
    problems = list(dict.fromkeys(e for c in configs if (e := fit_error(n_train, world_size, c))))
    if problems:
        raise ParameterError("\n".join(problems))


def read_run(folder: str | Path) -> dict:
    """One run's result from the ``metrics.json`` the script's rank 0 wrote in ``folder``."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the DDP script did not finish this run (see its output "
                                "above); rerun the sweep with resume=True to continue from its checkpoint.")
    run = json.loads(path.read_text())
    return {**run, "row": row_name(run["name"]), "checkpoint": str(Path(folder) / "checkpoint.pt")}


def run_script(script: str | Path, configs: list[AblationConfig], n_train: int, data_args: list[str], *,
               world_size: int, out_dir: str | Path, device: str = "auto", resume: bool = False,
               on_line=print) -> list[dict]:
    """Run every config with the notebook's DDP ``script`` in ONE ``torchrun`` launch on ``world_size`` ranks.

    ``data_args``: the script's data options (``--data-dir``, ``--max-train``, …), the same for every run;
    ``n_train``: the training images they give (to refuse a batch that does not fit before launching).
    ``out_dir`` gets ``runs.json`` and one folder per run (``checkpoint.pt``, ``metrics.json``). ``resume``
    continues every run from its checkpoint (finished runs are only scored again). Returns one result per config:
    ``name``, ``row``, ``seed``, ``config``, ``history``, ``final``, ``checkpoint``.
    """
    if not configs:
        raise ParameterError("run_script: no configs to run.")
    check_fit(configs, n_train, world_size)
    out_dir = Path(out_dir)
    runs_file = out_dir / "runs.json"
    write_text(runs_file, json.dumps([switch_args(c) for c in configs], indent=1))
    args = [*data_args, "--device", device, "--runs", str(runs_file), "--out", str(out_dir)]
    ddp.torchrun(script, args + (["--resume"] if resume else []), world_size, device=device, on_line=on_line)
    return [read_run(out_dir / slug(c.name)) for c in configs]
