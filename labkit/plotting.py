"""Plots for the labs: class balance, sample images, training curves, confusion matrix, comparisons.

Every ``plot_*`` function saves a PNG atomically at ``path`` (relative paths resolve against the
course root, like every labkit path) and returns the :class:`matplotlib.figure.Figure`.

Display and memory: in Jupyter (the inline backend) the figure is left to pyplot, which shows it
once at the end of the cell and then closes it, like any seaborn plot — write
``plotting.plot_history(...);`` (the ``;`` stops a second copy from the returned value). Everywhere
else (scripts, tests, Ray workers) the figure is closed in pyplot before it is returned, so no
figures pile up; the returned figure can still be saved again or shown with ``display(fig)``.
Without a display (a server, CI) the Agg backend is selected at import.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

if (sys.platform.startswith("linux") and "MPLBACKEND" not in os.environ and "ipykernel" not in sys.modules
        and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from labkit.env import resolve_path  # noqa: E402
from labkit.files import atomic_path  # noqa: E402

DPI = 120
_STYLE = "whitegrid"


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (a failed save leaves no file behind)."""
    final = resolve_path(path)
    if final.suffix.lower() != ".png":
        raise ValueError(f"save_figure: path={str(path)!r} must end in .png (labkit plots are PNG files).")
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return final


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6, 4)):
    with sns.axes_style(_STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=size, layout="constrained", squeeze=False)
    return fig, axes


def _labels(values, name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(values.cpu() if hasattr(values, "cpu") else values).astype(np.int64).ravel()
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds class index {arr.min() if arr.min() < 0 else arr.max()} "
                         f"but there are only {num_classes} classes; pass the matching class names.")
    return arr


def _count_columns(counts: pd.DataFrame) -> list[str]:
    """The columns of a class-count table that hold counts (not percentages)."""
    skip = ("%", "pct", "percent", "share", "frac")
    cols = [c for c in counts.columns if pd.api.types.is_integer_dtype(counts[c])
            and not any(s in str(c).lower() for s in skip)]
    if not cols:
        raise ValueError(f"plot_class_distribution: no integer count column in {list(counts.columns)}; "
                         "pass ImageData.class_counts() or a table with one count column per split.")
    return cols


def plot_class_distribution(counts: pd.DataFrame | pd.Series, path: str | os.PathLike,
                            title: str = "Images per class") -> Figure:
    """Grouped bars of images per class and split, each bar labelled with its share of the split.

    ``counts``: rows = classes, one integer count column per split (percent columns are ignored),
    as from ``ImageData.class_counts()``; a Series is one split.
    """
    if isinstance(counts, pd.Series):
        counts = counts.to_frame(counts.name or "count")
    cols = _count_columns(counts)
    long = (counts[cols].rename_axis("class").reset_index()
            .melt(id_vars="class", var_name="split", value_name="images"))
    long["class"] = long["class"].astype(str)
    fig, axes = _figure(size=(max(6.0, 1.4 * len(counts)), 4))
    ax = axes[0, 0]
    sns.barplot(data=long, x="class", y="images", hue="split", ax=ax)
    for container, col in zip(ax.containers, cols):
        total = counts[col].sum()
        ax.bar_label(container, labels=[f"{v / total:.0%}" if total else "" for v in counts[col]], fontsize=8)
    ax.set(title=title, xlabel="class", ylabel="images")
    ax.tick_params(axis="x", labelrotation=15)
    return _done(fig, path)


def plot_samples(images, labels, classes: Sequence[str], path: str | os.PathLike, n: int = 16,
                 title: str = "Sample images") -> Figure:
    """A grid of the first ``n`` images (uint8 or float ``[N, C, H, W]``, C = 1 or 3) titled with their class."""
    imgs = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"plot_samples: images must be [N, C, H, W] with C = 1 or 3, got shape {imgs.shape}.")
    n = min(int(n), len(imgs))
    if n < 1:
        raise ValueError("plot_samples: no images to show (n < 1 or an empty split).")
    labs = _labels(labels, "plot_samples: labels", len(classes))[:n]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = _figure(rows, cols, size=(1.9 * cols, 2.0 * rows + 0.3))
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= n:
            continue
        img = imgs[i].transpose(1, 2, 0).astype(np.float32)
        if imgs.dtype != np.uint8:  # normalised floats: stretch to [0, 1] for display
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        else:
            img = img / 255.0
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(str(classes[labs[i]]), fontsize=9)
    fig.suptitle(title)
    return _done(fig, path)


def plot_history(history: list[dict] | pd.DataFrame, path: str | os.PathLike, title: str = "",
                 majority_rate: float | None = None) -> Figure:
    """Loss and accuracy per epoch, train vs validation (two panels), from :func:`labkit.train.fit`'s records.

    ``majority_rate`` (accuracy of always answering the most common class) is drawn as a dashed
    line on the accuracy panel: a curve under it has learned nothing useful."""
    df = pd.DataFrame(history)
    if "epoch" not in df.columns:  # epochs_frame() indexes by epoch; a bare list counts from 1
        df = df.reset_index() if df.index.name == "epoch" else df.assign(epoch=np.arange(1, len(df) + 1))
    panels = [("loss", ("loss", "val_loss")), ("accuracy", ("acc", "val_acc"))]
    if df.empty or not any(c in df.columns for _, pair in panels for c in pair):
        raise ValueError(f"plot_history: need per-epoch 'loss'/'acc' (and 'val_loss'/'val_acc') columns, "
                         f"got {list(df.columns)}.")
    fig, axes = _figure(1, 2, size=(10, 3.8))
    for ax, (name, (train_col, val_col)) in zip(axes[0], panels):
        for col, label in ((train_col, "train"), (val_col, "validation")):
            if col in df.columns and df[col].notna().any():
                sns.lineplot(data=df, x="epoch", y=col, marker="o", label=label, ax=ax)
        ax.set(title=name.capitalize(), xlabel="epoch", ylabel=name)
        if name == "accuracy":
            ax.set_ylim(0, 1.02)
            if majority_rate is not None:
                ax.axhline(majority_rate, color="0.3", linestyle="--", linewidth=1,
                           label=f"majority class ({majority_rate:.2f})")
                ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return _done(fig, path)


def plot_confusion(y_true, y_pred, classes: Sequence[str], path: str | os.PathLike, normalize: bool = True,
                   title: str | None = None) -> Figure:
    """Confusion matrix heatmap, rows = true class, columns = predicted class.

    ``normalize=True`` shows each row as fractions of that true class (so the diagonal is the
    per-class recall); otherwise image counts.
    """
    k = len(classes)
    yt, yp = _labels(y_true, "plot_confusion: y_true", k), _labels(y_pred, "plot_confusion: y_pred", k)
    if yt.shape != yp.shape:
        raise ValueError(f"plot_confusion: y_true has {yt.size} labels but y_pred has {yp.size}.")
    cm = confusion_matrix(yt, yp, labels=list(range(k)))
    values = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, axes = _figure(size=(1.3 * k + 3, 1.1 * k + 2))
    ax = axes[0, 0]
    sns.heatmap(values, annot=True, fmt=".2f" if normalize else "d", cmap="Blues", square=True,
                vmin=0, vmax=1 if normalize else None, xticklabels=list(classes), yticklabels=list(classes),
                cbar_kws={"label": "fraction of true class" if normalize else "images"}, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=title or ("Confusion matrix (rows sum to 1)" if normalize else "Confusion matrix (images)"))
    ax.tick_params(axis="x", labelrotation=30)
    ax.tick_params(axis="y", labelrotation=0)
    return _done(fig, path)


def plot_comparison(df: pd.DataFrame, path: str | os.PathLike, metrics: list[str], label_col: str = "run",
                    title: str = "") -> Figure:
    """One bar panel per metric comparing runs (rows of ``df``, named by ``label_col``)."""
    missing = [c for c in [label_col, *metrics] if c not in df.columns]
    if missing:
        raise ValueError(f"plot_comparison: columns {missing} not in the table; it has {list(df.columns)}.")
    if not metrics or df.empty:
        raise ValueError("plot_comparison: need at least one metric and one row to compare.")
    data = df.assign(**{label_col: df[label_col].astype(str)})
    fig, axes = _figure(1, len(metrics), size=(max(4.0, 0.8 * len(df) + 2) * len(metrics), 4))
    for ax, metric in zip(axes[0], metrics):
        sns.barplot(data=data, x=label_col, y=metric, hue=label_col, legend=False, ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.3g", fontsize=8)
        ax.set(title=metric, xlabel=label_col, ylabel=metric)
        ax.tick_params(axis="x", labelrotation=20)
    if title:
        fig.suptitle(title)
    return _done(fig, path)


def classification_table(y_true, y_pred, classes: Sequence[str]) -> pd.DataFrame:
    """Per-class ``precision``, ``recall``, ``f1`` and ``support`` (scikit-learn; 0 where undefined)."""
    k = len(classes)
    yt, yp = _labels(y_true, "classification_table: y_true", k), _labels(y_pred, "classification_table: y_pred", k)
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=list(range(k)), zero_division=0)
    return pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s},
                        index=pd.Index(list(classes), name="class"))


def _inline() -> bool:
    """True under Jupyter's inline backend, which shows open figures after each cell and closes them."""
    return "inline" in matplotlib.get_backend()


def _done(fig: Figure, path: str | os.PathLike) -> Figure:
    """Save; close in pyplot unless Jupyter's inline backend will show and close it (see module doc)."""
    try:
        save_figure(fig, path)
    except BaseException:
        plt.close(fig)
        raise
    if not _inline():
        plt.close(fig)
    return fig
