"""Plots are written as real PNG files, atomically, and the tables hold the right numbers."""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from labkit import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"]


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert plt.get_fignums() == []  # closed in pyplot: no figures pile up in scripts


def test_class_distribution(tmp_path):
    counts = pd.DataFrame({"train": [717, 52, 2560, 1792], "train_%": [14.0, 1.0, 50.0, 35.0],
                           "test": [179, 12, 640, 448]}, index=pd.Index(CLASSES, name="class"))
    fig = plotting.plot_class_distribution(counts, tmp_path / "classes.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "classes.png")
    ax = fig.axes[0]
    assert len(ax.containers) == 2  # train and test bars; the percent column is not plotted
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert ax.get_title()
    with pytest.raises(ValueError, match="count column"):
        plotting.plot_class_distribution(counts[["train_%"]], tmp_path / "bad.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_samples(tmp_path, channels):
    images = torch.randint(0, 256, (10, channels, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    fig = plotting.plot_samples(images, labels, CLASSES, tmp_path / "s.png", n=9)
    assert_png(tmp_path / "s.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [CLASSES[i] for i in labels[:9].tolist()]
    with pytest.raises(ValueError, match="labels"):
        plotting.plot_samples(images, labels + 4, CLASSES, tmp_path / "bad.png")


def test_history_list_and_frame(tmp_path):
    hist = [{"epoch": e, "loss": 1.0 / e, "acc": 0.5 + 0.1 * e, "val_loss": 1.1 / e, "val_acc": 0.45 + 0.1 * e}
            for e in (1, 2, 3)]
    fig = plotting.plot_history(hist, tmp_path / "h.png", title="baseline")
    assert_png(tmp_path / "h.png")
    loss_ax, acc_ax = fig.axes[:2]
    assert loss_ax.get_ylabel() == "loss" and acc_ax.get_ylabel() == "accuracy"
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["train", "validation"]
    assert list(loss_ax.lines[0].get_ydata()) == [1.0, 0.5, 1.0 / 3]
    plotting.plot_history(pd.DataFrame(hist).set_index("epoch"), tmp_path / "h2.png")  # epochs_frame() shape
    assert_png(tmp_path / "h2.png")
    with pytest.raises(ValueError, match="loss"):
        plotting.plot_history([{"epoch": 1, "foo": 2}], tmp_path / "bad.png")


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion(tmp_path, normalize):
    y_true = np.array([0, 0, 1, 2, 2, 2, 3, 3])
    y_pred = np.array([0, 2, 1, 2, 2, 0, 3, 2])
    fig = plotting.plot_confusion(y_true, y_pred, CLASSES, tmp_path / "cm.png", normalize=normalize)
    assert_png(tmp_path / "cm.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    cells = [t.get_text() for t in ax.texts]
    assert cells[0] == ("0.50" if normalize else "1")  # true MildDemented: 1 of 2 right
    with pytest.raises(ValueError, match="y_pred"):
        plotting.plot_confusion(y_true, y_pred + 1, CLASSES, tmp_path / "bad.png")


def test_comparison(tmp_path):
    df = pd.DataFrame({"run": ["baseline", "ray-2w"], "test_acc": [0.61, 0.63], "seconds": [50.0, 80.0]})
    fig = plotting.plot_comparison(df, tmp_path / "c.png", metrics=["test_acc", "seconds"])
    assert_png(tmp_path / "c.png")
    assert [ax.get_title() for ax in fig.axes] == ["test_acc", "seconds"]
    with pytest.raises(ValueError, match="val_f1"):
        plotting.plot_comparison(df, tmp_path / "bad.png", metrics=["val_f1"])


def test_classification_table():
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 2, 1, 2, 2, 0]
    df = plotting.classification_table(y_true, y_pred, CLASSES)
    assert list(df.index) == CLASSES and list(df.columns) == ["precision", "recall", "f1", "support"]
    assert df.loc["MildDemented", "precision"] == 0.5 and df.loc["MildDemented", "recall"] == 0.5
    assert df.loc["NonDemented", "recall"] == pytest.approx(2 / 3)
    assert df.loc["VeryMildDemented"].tolist() == [0, 0, 0, 0]  # no samples: zero, not a warning
    assert df["support"].sum() == 6


def test_relative_path_resolves_against_course_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    plotting.plot_history([{"epoch": 1, "loss": 1.0, "acc": 0.5}], "results/x/h.png")
    assert_png(tmp_path / "results" / "x" / "h.png")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "h.png"
    target_old = tmp_path / "old.png"
    hist = [{"epoch": 1, "loss": 1.0, "acc": 0.5}]
    plotting.plot_history(hist, target_old)
    before = target_old.read_bytes()

    def broken_savefig(self, fname, **kw):
        with open(fname, "wb") as fh:
            fh.write(PNG_MAGIC + b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plotting.plot_history(hist, target)
    with pytest.raises(OSError):
        plotting.plot_history(hist, target_old)
    assert not target.exists()
    assert target_old.read_bytes() == before  # an older plot is kept whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
    assert plt.get_fignums() == []


def test_non_png_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plotting.plot_history([{"epoch": 1, "loss": 1.0, "acc": 0.5}], tmp_path / "h.jpg")


def test_history_plot_draws_the_majority_rate(tmp_path):
    history = [{"epoch": 1, "loss": 1.0, "acc": 0.4, "val_loss": 1.1, "val_acc": 0.45},
               {"epoch": 2, "loss": 0.8, "acc": 0.6, "val_loss": 0.9, "val_acc": 0.55}]
    fig = plotting.plot_history(history, tmp_path / "h.png", majority_rate=0.5)
    accuracy = fig.axes[1]
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in accuracy.get_lines())
    assert "majority class (0.50)" in [t.get_text() for t in accuracy.get_legend().get_texts()]
