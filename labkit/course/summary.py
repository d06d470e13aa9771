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
               ("majority_rate", ("majority_rate", "test_majority_rate")),
               ("chance", ("chance", "test_chance")))
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
        classes = rec.data.get("classes")
        if rows[-1]["chance"] is None and isinstance(classes, (list, tuple)) and classes:
            rows[-1]["chance"] = 1.0 / len(classes)         # any constant answer's balanced accuracy
    columns = ["lab", "run_id", "started", "date", "device", "workers", "mode", "seconds_per_epoch",
               "epochs", "metric", "value", *(c for c, _ in HONEST_KEYS), "synthetic"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["lab", "started"], kind="stable").reset_index(drop=True), skipped


def markdown_table(frame: pd.DataFrame) -> str:
    """The SUMMARY.md table: lab, device, workers, mode, time/epoch, final metric, balanced accuracy,
    macro-F1, majority-class rate, chance (1/K), synthetic data, date."""
    header = ["lab", "device", "workers", "mode", "time/epoch", "final metric", "balanced acc", "macro-F1",
              "majority rate", "chance", "synthetic data", "date"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["--:"] + ["---"] + ["--:"] * 6 + ["---"] * 2) + "|"]
    number = lambda v: "—" if v is None or pd.isna(v) else f"{v:.3f}"
    for row in frame.itertuples():
        spe = "—" if pd.isna(row.seconds_per_epoch) else format_seconds(row.seconds_per_epoch)
        metric = "—" if row.metric is None or pd.isna(row.value) else f"{row.value:.3f} ({row.metric})"
        cells = [row.lab, row.device, str(row.workers), row.mode, spe, metric, number(row.balanced_acc),
                 number(row.macro_f1), number(row.majority_rate), number(row.chance), row.synthetic, row.date]
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
        "answering the most common class) and the **balanced accuracy** (mean per-class recall) beside **chance** "
        "(1/K: what any constant answer scores in balanced accuracy): on imbalanced data accuracy alone flatters. "
        "Quick runs use a small subset, small images and few "
        "epochs: their numbers show that a lab works, not how well the method does.\n\n"
        "![each lab's metrics beside its majority rate and chance; time per epoch within each lab](summary.png)\n\n"
        + markdown_table(shown) + "\n"
    )
    if len(shown) < len(frame):
        text += f"\nOnly the newest {MAX_ROWS} of {len(frame)} runs are listed (each lab's newest last).\n"
    if (frame["synthetic"] == "yes").any():
        text += ("\nRuns with synthetic data = yes trained on a generated stand-in dataset, not on real scans: "
                 "their metrics say nothing about medical performance.\n")
    if skipped:
        text += "\nJSON files that are not run records (skipped): " + ", ".join(f"`{p}`" for p in skipped) + "\n"
    return text


def _lab_label(lab: str) -> str:
    """``03_imagenet_ddp_ablations`` → ``03 imagenet\nddp ablations`` (two short lines under a bar)."""
    words = lab.replace("_", " ").split()
    half = max(1, (len(words) + 1) // 2)
    return " ".join(words[:half]) + ("\n" + " ".join(words[half:]) if words[half:] else "")


def plot_summary(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The summary figure, saved atomically as a PNG.

    Top: each lab's newest run — its final metric and balanced accuracy as bars, its majority-class rate and
    chance (1/K) as ticks across them: whether a lab learned is read within the lab, against its own bars.
    Bottom: one small panel per lab with the time per epoch of each setting it ran (device × workers, mode),
    each on its own scale: quick sizes differ between labs, so seconds compare only within a lab."""
    import seaborn as sns
    from matplotlib.figure import Figure

    labs = sorted(frame["lab"].unique()) if not frame.empty else []
    columns = max(1, len(labs))
    fig = Figure(figsize=(max(8.0, 1.7 * columns), 7.0), layout="constrained")
    grid = fig.add_gridspec(2, columns, height_ratios=[1.3, 1.0])
    top = fig.add_subplot(grid[0, :])
    if frame.empty:
        top.text(0.5, 0.5, "no run records yet", ha="center", va="center", transform=top.transAxes)
        top.set_axis_off()
    else:
        newest = frame.groupby("lab").tail(1).set_index("lab").loc[labs]
        bars = pd.DataFrame({"final metric": newest["value"], "balanced accuracy": newest["balanced_acc"]},
                            index=labs).rename_axis("lab").reset_index().melt("lab", var_name="kind")
        sns.barplot(data=bars.dropna(subset=["value"]), x="lab", y="value", hue="kind", order=labs, ax=top,
                    palette=["#4c72b0", "#55a868"])
        for i, lab in enumerate(labs):
            for column, style, name in (("majority_rate", "--", "majority-class rate"), ("chance", ":", "chance (1/K)")):
                value = newest.loc[lab, column]
                if pd.notna(value):
                    top.hlines(value, i - 0.42, i + 0.42, colors="0.15", linestyles=style, linewidth=1.6,
                               label=name if i == 0 or name not in top.get_legend_handles_labels()[1] else None)
        top.set_xticks(range(len(labs)), [_lab_label(lab) for lab in labs], fontsize=8)
        top.set(xlabel="", ylabel="score", ylim=(0, 1))
        top.legend(fontsize=8, ncols=4, loc="upper right")
        top.set_title("each lab's newest run: a bar above its dashed tick (majority) and dotted tick (chance) "
                      "has learned something", fontsize=9)
    for i, lab in enumerate(labs):
        ax = fig.add_subplot(grid[1, i])
        part = frame[(frame["lab"] == lab)].dropna(subset=["seconds_per_epoch"])
        if part.empty:
            ax.text(0.5, 0.5, "no epoch\ntimings", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            setting = part["device"].str.replace(r" \(.*\)", "", regex=True) + "\n×" + part["workers"].astype(str) \
                + " " + part["mode"]
            times = part.assign(setting=setting).groupby("setting", sort=False)["seconds_per_epoch"].mean()
            ax.bar(range(len(times)), times.to_numpy(), color="#8172b2")
            ax.set_xticks(range(len(times)), list(times.index), fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
        ax.set_title(_lab_label(lab), fontsize=8)
        if i == 0:
            ax.set_ylabel("seconds per epoch\n(within a lab)", fontsize=8)
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
