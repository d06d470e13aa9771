"""``labkit summary``: one page that compares every lab run recorded under ``results/``.

Reads each run record (``results/<lab>/<run_id>.json``, see :mod:`labkit.results`) and writes
``results/SUMMARY.md`` (a short intro and one table) and ``results/summary.png`` (bar plots of
time per epoch and the final metric per lab), both atomically.
"""
from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from labkit.files import atomic_path, write_text
from labkit.results import RunRecord, load_record, record_paths, results_root
from labkit.timing import format_seconds

#: Final-metric keys in order of preference; the first one a record has is reported.
METRIC_KEYS = ("test_acc", "val_acc", "acc", "top1")
#: Honest-evaluation columns: (column, keys tried in order in the record's ``final``).
HONEST_KEYS = (("balanced_acc", ("balanced_acc", "test_balanced_acc", "val_balanced_acc")),
               ("macro_f1", ("macro_f1", "test_macro_f1", "val_macro_f1")),
               ("majority_rate", ("majority_rate", "test_majority_rate")))
#: Newest runs listed in the SUMMARY.md table (the plot uses all runs).
MAX_ROWS = 40


def final_metric(final: dict[str, Any]) -> tuple[str | None, float | None]:
    """The headline metric of a record: the first of :data:`METRIC_KEYS` present, else the first
    numeric entry of ``final``; ``(None, None)`` when there is none."""
    numeric = {k: v for k, v in final.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    for key in (*METRIC_KEYS, *numeric):
        if key in numeric:
            return key, float(numeric[key])
    return None, None


def _first_number(final: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = final.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def seconds_per_epoch(record: RunRecord) -> float | None:
    """Mean of ``epochs[*].seconds``, or ``None`` when the record has no epoch timings."""
    times = [e["seconds"] for e in record.epochs
             if isinstance(e, dict) and isinstance(e.get("seconds"), (int, float)) and not isinstance(e.get("seconds"), bool)]
    return sum(times) / len(times) if times else None


def _device(env: dict[str, Any]) -> str:
    device = str(env.get("device") or "?")
    if device.startswith("cuda"):
        name = env.get("device_name")
        gpus = env.get("gpu_count") or 1
        return f"{gpus}× {name or device}" if gpus > 1 else str(name or device)
    cpus = env.get("cpu_count")
    return f"{device} ({cpus} cores)" if cpus else device


def _workers(record: RunRecord) -> int:
    for value in (record.env.get("world_size"), record.params.get("workers"), record.params.get("world_size")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 1


def _date(started: str) -> str:
    try:
        when = datetime.fromisoformat(started).astimezone(timezone.utc)
    except (TypeError, ValueError):
        return str(started)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def summary_frame(results_dir: str | os.PathLike | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per run record (oldest first) and the list of unreadable record files."""
    rows, skipped = [], []
    for path in record_paths(results_dir=results_dir):
        try:
            rec = load_record(path)
        except ValueError:
            skipped.append(str(path))
            continue
        metric, value = final_metric(rec.final)
        synthetic = rec.data.get("synthetic")
        rows.append({
            "lab": rec.lab, "run_id": rec.run_id, "started": rec.started, "date": _date(rec.started),
            "device": _device(rec.env), "workers": _workers(rec),
            "mode": "quick" if rec.params.get("quick") else "full",
            "seconds_per_epoch": seconds_per_epoch(rec), "epochs": len(rec.epochs),
            "metric": metric, "value": value,
            **{column: _first_number(rec.final, keys) for column, keys in HONEST_KEYS},
            "synthetic": "yes" if synthetic else "no" if synthetic is not None else "?",
        })
    columns = ["lab", "run_id", "started", "date", "device", "workers", "mode", "seconds_per_epoch",
               "epochs", "metric", "value", *(c for c, _ in HONEST_KEYS), "synthetic"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["lab", "started"], kind="stable").reset_index(drop=True), skipped


def markdown_table(frame: pd.DataFrame) -> str:
    """The SUMMARY.md table: lab, device, workers, mode, time/epoch, final metric, balanced accuracy,
    macro-F1, majority-class rate, synthetic data, date."""
    header = ["lab", "device", "workers", "mode", "time/epoch", "final metric", "balanced acc", "macro-F1",
              "majority rate", "synthetic data", "date"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["--:"] + ["---"] + ["--:"] * 5 + ["---"] * 2) + "|"]
    number = lambda v: "—" if v is None or pd.isna(v) else f"{v:.3f}"
    for row in frame.itertuples():
        spe = "—" if pd.isna(row.seconds_per_epoch) else format_seconds(row.seconds_per_epoch)
        metric = "—" if row.metric is None or pd.isna(row.value) else f"{row.value:.3f} ({row.metric})"
        cells = [row.lab, row.device, str(row.workers), row.mode, spe, metric, number(row.balanced_acc),
                 number(row.macro_f1), number(row.majority_rate), row.synthetic, row.date]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _readme(frame: pd.DataFrame, skipped: list[str]) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        "# Results\n\n"
        "This folder holds what the labkit labs produced on this machine: one run record per run "
        "(`<lab>/<run_id>.json`: parameters, environment, data, per-epoch metrics, final metrics), the "
        "plots each lab saved next to its records, and the executed notebooks of `labkit run` in "
        f"`executed/`. This page and `summary.png` were written by `labkit summary` on {now} from "
        f"{len(frame)} run record{'s' if len(frame) != 1 else ''}; `labkit run` rewrites them at the end.\n"
    )
    if frame.empty:
        return intro + "\nNo run records yet: run the labs (`labkit run --quick` for a short pass) to fill this table.\n"
    shown = frame.tail(MAX_ROWS) if len(frame) > MAX_ROWS else frame
    text = intro + (
        "\nTime/epoch is the mean wall time of the recorded epochs; the final metric is the first of "
        f"{', '.join(METRIC_KEYS)} the run reported. Read it beside the **majority rate** (the accuracy of always "
        "answering the most common class) and the **balanced accuracy** (mean per-class recall; 1/K for any "
        "constant answer): on imbalanced data accuracy alone flatters. Quick runs use a small subset, small images and few "
        "epochs: their numbers show that a lab works, not how well the method does.\n\n"
        "![time per epoch and final metric per lab](summary.png)\n\n" + markdown_table(shown) + "\n"
    )
    if len(shown) < len(frame):
        text += f"\nOnly the newest {MAX_ROWS} of {len(frame)} runs are listed (each lab's newest last).\n"
    if (frame["synthetic"] == "yes").any():
        text += ("\nRuns with synthetic data = yes trained on a generated stand-in dataset, not on real scans: "
                 "their metrics say nothing about medical performance.\n")
    if skipped:
        text += "\nJSON files that are not run records (skipped): " + ", ".join(f"`{p}`" for p in skipped) + "\n"
    return text


def plot_summary(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Two seaborn bar plots (time per epoch and final metric per lab; bars are means over runs,
    coloured by device, workers and mode), saved atomically as a PNG."""
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    data = frame.assign(setting=frame["device"] + " ×" + frame["workers"].astype(str) + " " + frame["mode"])
    order = sorted(data["lab"].unique())
    panels = [("seconds_per_epoch", "seconds per epoch", "time per epoch (lower is faster)"),
              ("value", "final metric", "final metric: " + ", ".join(sorted(data["metric"].dropna().unique())))]
    for ax, (column, ylabel, title) in zip(axes, panels):
        part = data.dropna(subset=[column])
        if part.empty:
            ax.text(0.5, 0.5, "no runs recorded this yet" if not frame.empty else "no run records yet",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            shown = [o for o in order if o in set(part["lab"])]
            sns.barplot(data=part, x="lab", y=column, hue="setting", order=shown, ax=ax, errorbar=None)
            if column == "value":   # the majority-class rate of each lab, as a dashed tick across its bars
                majority = part.groupby("lab")["majority_rate"].mean()
                drawn = [i for i, lab in enumerate(shown) if pd.notna(majority.get(lab))]
                for n, i in enumerate(drawn):
                    ax.hlines(majority[shown[i]], i - 0.4, i + 0.4, colors="0.2", linestyles="--",
                              label="majority-class rate" if n == 0 else None)
            ax.set_xlabel("")
            ax.tick_params(axis="x", labelrotation=20)
            if ax.get_legend() is not None:
                ax.legend(fontsize=7, title=None)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    fig.suptitle("labkit: results per lab")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def write_summary(results_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``results/SUMMARY.md`` and ``results/summary.png``; return their paths.

    (``results/README.md`` is the folder's tracked description; the summary has a file of its own, so a
    course run leaves the git tree clean.)

    Works with no records (the page says so and the figure is an empty placeholder).
    """
    root = results_root(results_dir)
    frame, skipped = summary_frame(results_dir)
    readme = write_text(root / "SUMMARY.md", _readme(frame, skipped))
    png = plot_summary(frame, root / "summary.png")
    return readme, png
