"""The course website's own pages (MyST markdown): the landing page and the results page.

Everything on them is read from the course run (executed copies, run records, the lab folders' plots
and tables) or from the labs (titles); the captions say what to look for in each plot.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from labkit.results import RESULT_DIRS, load_record, record_paths
from labkit.timing import format_seconds

#: What to look for in each plot a lab saves, by file name (any lab).
CAPTIONS = {
    "class_distribution": "Images per class. An uneven bar chart is why accuracy alone flatters: compare every "
                          "accuracy with the majority rate.",
    "samples": "A few input images with their labels: check that the model sees what you expect (generated "
               "stand-in images in a quick run).",
    "training_curves": "Loss and accuracy per epoch, training beside validation: look for validation loss turning "
                       "up while training loss still falls (overfitting), or both flat (not learning).",
    "confusion_matrix": "Rows are true classes, columns predictions: read the diagonal, and which classes are "
                        "confused with which; one full column means the model answers one class.",
    "training_comparison": "The distributed run's curves beside the single-process baseline: if they overlap, "
                           "distributing changed the speed, not the training.",
    "time_breakdown": "Where an epoch's time goes per setting: look at how much is start-up and communication "
                      "rather than compute.",
    "ablations": "Each ablation's accuracy against the baseline, with its spread over seeds: a gap smaller than "
                 "the spread is noise (see the verdicts in the table below).",
    "learning_curves": "Validation accuracy per epoch for each ablation: look at which change helps early and "
                       "which only late.",
    "lr_finder": "Loss while the learning rate grows: pick a rate on the steep descent, well before the minimum.",
    "mixup_cutmix": "Training images after MixUp and CutMix: the labels are mixed in the same proportions.",
    "onecycle": "The one-cycle schedule: warm-up to the peak learning rate, then annealing.",
    "cls_attention": "Where the ViT's class token attends: look whether attention falls on the lungs rather than "
                     "on borders or markers.",
    "vit_vs_cnn": "The ViT beside a small CNN on the same data: on small data the CNN's built-in locality usually "
                  "wins.",
    "fedavg": "The global model's accuracy per FedAvg round, hospitals with their own class mix (non-IID) beside "
              "an even (IID) split: look at how much the skew slows or lowers the curve.",
    "throughput": "Images per second through the pipeline per setting: look where more CPU workers stop helping.",
    "latency": "Request latency percentiles per serving setting: batching trades a little latency for throughput.",
    "trials": "Each Tune trial's metric per iteration: trials the scheduler stopped early end early.",
}
#: Tables shown on the results page: (lab folder, file, columns kept).
TABLES = (
    ("03_ablations", "ablations.csv", ("ablation", "seeds", "test_top1", "top1_spread", "diff", "bound", "verdict")),
    ("05_federated", "metrics.csv", None),
    ("06_streaming", "throughput.csv", None),
    ("07_serve", "latency.csv", None),
    ("07_serve", "quantization.csv", None),
)
STUDENT_NOTE = ("Every lab page is the **student copy** of the lab, shown with the outputs of a quick course run "
                "for every cell a student does not edit; exercise cells and their checks are shown without outputs.")


@dataclass
class LabInfo:
    """One lab as the site shows it."""

    name: str                       # 01_baseline
    title: str                      # Lab 01 — A baseline CNN ...
    teaches: str                    # the title after the dash
    results: Path                   # results/<lab folder>/
    cpu_seconds: float | None = None
    gpu: str | None = None
    executed: bool = False
    stale: bool = False
    synthetic: bool | None = None
    figures: list[Path] = field(default_factory=list)


def lab_title(nb: nbformat.NotebookNode, name: str) -> str:
    """The first markdown heading of a lab (``Lab 01 — ...``), or its file name."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    return name


def lab_info(lab: Path, executed: Path | None, results: Path, stale: bool) -> LabInfo:
    """What the landing and results pages say about one lab, from its notebook, executed copy and records."""
    title = lab_title(nbformat.read(lab, as_version=4), lab.stem)
    teaches = re.split(r"\s+[—–-]\s+", title, maxsplit=1)[-1]
    folder = results / RESULT_DIRS.get(lab.stem, lab.stem)
    info = LabInfo(lab.stem, title, teaches, folder, executed=executed is not None, stale=stale)
    records = []
    for path in record_paths(results_dir=results):
        try:
            rec = load_record(path)
        except ValueError:
            continue
        if rec.lab == lab.stem or path.parent == folder:
            records.append(rec)
    records.sort(key=lambda r: r.started)
    if records:
        info.synthetic = records[-1].data.get("synthetic")
    gpu = [r for r in records if str(r.env.get("device", "")).startswith("cuda")]
    duration = None
    if executed is not None:
        duration = nbformat.read(executed, as_version=4).metadata.get("papermill", {}).get("duration")
    newest_on_gpu = bool(records) and records[-1] in gpu
    if isinstance(duration, (int, float)) and not newest_on_gpu:
        info.cpu_seconds = float(duration)
    if gpu:
        rec = gpu[-1]
        name = rec.env.get("device_name") or rec.env.get("device")
        if newest_on_gpu and isinstance(duration, (int, float)):
            info.gpu = f"{format_seconds(duration)} ({name})"
        else:
            times = [e.get("seconds") for e in rec.epochs if isinstance(e, dict) and isinstance(e.get("seconds"), (int, float))]
            info.gpu = f"{format_seconds(sum(times) / len(times))} per epoch ({name})" if times else f"ran on {name}"
    info.figures = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return info


def landing_page(labs: list[LabInfo]) -> str:
    """``index.md``: what the course teaches, the labs, run times, what to know first, how to start."""
    rows = []
    for lab in labs:
        cpu = format_seconds(lab.cpu_seconds) if lab.cpu_seconds is not None else "not measured"
        note = (" (run from an older version: changed cells without outputs)" if lab.stale
                else "" if lab.executed else " (not executed)")
        rows.append(f"| [{lab.name[:2]}](labs/{lab.name}.ipynb) | {lab.teaches}{note} | {cpu} | "
                    f"{lab.gpu or 'not measured'} |")
    toc = "\n".join(f"labs/{lab.name}" for lab in labs)
    return f"""# labkit: distributed deep learning for medical imaging

A hands-on course in seven Jupyter labs. It starts from one model trained on one device and takes the
same training, step by step, to many workers: Ray Train, plain PyTorch DDP with the ablations that
decide ImageNet-style recipes, a Vision Transformer tracked with MLflow, federated averaging across
hospitals, streaming data pipelines, and finally tuning, compressing and serving the model. Every lab
runs on a laptop CPU in quick mode and uses a GPU when there is one.

{STUDENT_NOTE}

## The labs

| lab | what it teaches | quick run, CPU | quick run, GPU |
|---|---|--:|--:|
{chr(10).join(rows)}

Run times are those of the course run that built this site (wall time of the executed notebook, quick
mode); "not measured" means no run on that kind of machine was recorded. The [results](results.md)
page collects every lab's plots and the summary table.

## What to know first

- Python and NumPy; the basics of PyTorch (tensors, a model, a training loop).
- What a train/validation/test split is, and accuracy beside a class-balanced metric.
- A shell: running a command, setting an environment variable. No cluster is needed: every
  distributed lab starts its workers on your machine.

## How to start

- **Colab**: open a lab page and click "Open in Colab"; the first cell installs the course.
- **Locally**: clone the repository, then `make setup` (a virtual environment with the course's
  pinned packages) and `jupyter lab`, and open `student/01_baseline.ipynb`.
- **Headless**: `papermill student/01_baseline.ipynb out.ipynb -p quick True` runs one lab;
  `make course` runs every lab in quick mode and writes `results/`.

```{{toctree}}
:maxdepth: 1
:caption: Labs
:hidden:

{toc}
```

```{{toctree}}
:maxdepth: 1
:caption: Results
:hidden:

results
```
"""


def _number(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text.replace("|", "/")
    if math.isnan(value):
        return "—"
    return text if re.fullmatch(r"-?\d+", text) else f"{value:.3g}"


def csv_table(path: Path, columns: tuple[str, ...] | None = None, max_rows: int = 30) -> str:
    """A CSV file as a markdown table (numbers to 3 significant digits), at most ``max_rows`` rows."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return ""
    keep = [c for c in (columns or rows[0].keys()) if c in rows[0]]
    lines = ["| " + " | ".join(keep) + " |", "|" + "|".join("---" for _ in keep) + "|"]
    lines += ["| " + " | ".join(_number(row.get(c) or "") for c in keep) + " |" for row in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"\n(first {max_rows} of {len(rows)} rows)")
    return "\n".join(lines)


def summary_table(summary_md: Path) -> str:
    """The table of ``SUMMARY.md`` (and its explanation), without its heading and figure."""
    if not summary_md.is_file():
        return "No `SUMMARY.md` in the results folder: run `labkit summary`."
    text = summary_md.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.startswith(("# ", "![")) and "This folder holds" not in ln]
    return "\n".join(lines).strip()


def results_page(labs: list[LabInfo], summary_md: Path, has_png: bool, images: dict[Path, str]) -> str:
    """``results.md``: the summary table and figure, then each lab's plots and tables with captions.
    ``images`` maps each plot to its path inside the site."""
    parts = ["# Results of the quick course run", ""]
    if any(lab.synthetic for lab in labs):
        parts += ["```{warning}", "Labs marked *stand-in data* trained on generated images that only imitate the "
                  "real datasets' layout. Their numbers show that a lab works, not how well a method does on "
                  "medical images: they are not medical results.", "```", ""]
    if has_png:
        parts += ["```{figure} _static/results/summary.png", ":target: _static/results/summary.png",
                  ":alt: each lab's metric beside its majority rate and chance, and time per epoch within each lab", "",
                  "Top: each lab's newest run, its metric and balanced accuracy beside its majority rate (dashed) "
                  "and chance (dotted); a bar that does not clear its ticks learned nothing useful. Bottom: time per "
                  "epoch within each lab (quick sizes differ between labs: compare within a panel only).", "```", ""]
    parts += [summary_table(summary_md), ""]
    for lab in labs:
        label = " (stand-in data)" if lab.synthetic else ""
        parts += [f"## {lab.title}{label}", "", f"From [the lab's page](labs/{lab.name}.ipynb).", ""]
        if not lab.figures:
            parts += ["This lab saved no plots in this course run.", ""]
        for png in lab.figures:
            caption = CAPTIONS.get(png.stem, f"A plot the lab saved ({png.name}).")
            parts += [f"```{{figure}} {images[png]}", f":target: {images[png]}",
                      f":alt: {png.stem.replace('_', ' ')}", "",
                      f"**{png.stem.replace('_', ' ')}**{label}. {caption}", "```", ""]
        for folder, name, columns in TABLES:
            path = lab.results / name
            if lab.results.name == folder and path.is_file():
                parts += [f"**{name}**{label}" + (": each ablation against the baseline over paired seeds; the "
                          "verdict says whether the difference is beyond the noise bound." if name == "ablations.csv"
                          else "."), "", csv_table(path, columns), ""]
    return "\n".join(parts)
