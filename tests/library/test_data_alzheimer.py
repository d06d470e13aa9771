"""Alzheimer dataset layer: layouts, stand-in, cache, bad input. Tiny stand-ins, seconds in total."""
from __future__ import annotations

import functools
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.data import alzheimer, cache
from labkit.data.alzheimer import CLASSES, load_alzheimer
from labkit.data.cache import UnreadableImageError, cache_dir_for
from labkit.data.images import stratified_subset
from labkit.data.synth_mri import KAGGLE_COUNTS, KAGGLE_FOLDER, MARKER, standin_counts, write_alzheimer_standin

N_TRAIN, N_TEST, SIZE = 60, 20, (44, 52)
tiny_standin = functools.partial(write_alzheimer_standin, n_train=N_TRAIN, n_test=N_TEST, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """A tiny stand-in written once for the module (copied by tests that change files)."""
    return tiny_standin(tmp_path_factory.mktemp("standin") / "alzheimer")


@pytest.fixture
def real_kaggle(standin, tmp_path) -> Path:
    """The stand-in's files without the marker: looks like a real Kaggle download."""
    root = tmp_path / "alzheimer"
    shutil.copytree(standin / KAGGLE_FOLDER, root / KAGGLE_FOLDER)
    return root


@pytest.fixture
def real_plain(standin, tmp_path) -> Path:
    root = tmp_path / "plain"
    shutil.copytree(standin / KAGGLE_FOLDER, root)
    return root


def load(root, **kw):
    kw = {"data": "real", "image_size": 16, "progress": False, **kw}
    return load_alzheimer(data_dir=root, **kw)


def expected_counts(split: str) -> list[int]:
    counts = standin_counts(N_TRAIN, N_TEST)[split]
    return [counts[c] for c in CLASSES]


# ---------------------------------------------------------------- layouts
def test_standin_loads_in_kaggle_layout(standin, capsys):
    d = load(standin, data="auto")
    assert (d.layout, d.synthetic, d.classes) == ("kaggle", True, list(CLASSES))
    assert "NOT MEDICAL" in capsys.readouterr().out
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        part = d.splits[split]
        assert part.images.shape == (n, 1, 16, 16) and part.images.dtype == torch.uint8
        assert part.labels.dtype == torch.int64 and len(part.files) == n
        assert np.bincount(part.labels.numpy(), minlength=4).tolist() == expected_counts(split)
        assert all(f.startswith(f"{KAGGLE_FOLDER}/{split}/") for f in part.files)
    info = d.describe()
    assert info["synthetic"] is True and info["counts"]["train"]["NonDemented"] == expected_counts("train")[2]
    table = d.class_counts()
    assert list(table.index) == list(CLASSES) and table["train"].sum() == N_TRAIN


def test_real_kaggle_and_plain_layouts(real_kaggle, real_plain):
    d = load(real_kaggle)
    assert (d.layout, d.synthetic) == ("kaggle", False)
    p = load(real_plain)
    assert (p.layout, p.synthetic) == ("plain", False)
    assert torch.equal(d.splits["train"].images, p.splits["train"].images)


def test_zip_is_extracted_once(real_kaggle, tmp_path, monkeypatch):
    root = tmp_path / "zipped"
    root.mkdir()
    with zipfile.ZipFile(root / "AlzheimerDataset4.zip", "w") as zf:
        for f in sorted(real_kaggle.rglob("*.jpg")):
            zf.write(f, f.relative_to(real_kaggle).as_posix())
    d = load(root)
    assert d.layout == "zip" and not d.synthetic and len(d.splits["train"]) == N_TRAIN
    assert (root / "AlzheimerDataset4" / KAGGLE_FOLDER / "train").is_dir()
    assert d.splits["test"].files[0].startswith("AlzheimerDataset4/")

    def no_extract(*args, **kw):
        raise AssertionError("extracted a second time")
    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extract)
    assert len(load(root).splits["test"]) == N_TEST


def test_zip_extraction_is_atomic(real_plain, tmp_path, monkeypatch):
    root = tmp_path / "z"
    root.mkdir()
    with zipfile.ZipFile(root / "data.zip", "w") as zf:
        for f in sorted(real_plain.rglob("*.jpg")):
            zf.write(f, f.relative_to(real_plain).as_posix())

    def half_extract(self, path, *args, **kw):
        Path(path, "train").mkdir(parents=True)
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extractall", half_extract)
        with pytest.raises(OSError, match="disk full"):
            load(root)
    assert sorted(p.name for p in root.iterdir()) == ["data.zip"]   # nothing half-written left behind
    assert load(root).layout == "zip"


# ---------------------------------------------------------------- data choices
def test_auto_writes_standin_once(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(alzheimer, "write_alzheimer_standin", lambda root, **kw: calls.append(root) or tiny_standin(root))
    root = tmp_path / "data" / "alzheimer"
    d = load(root, data="auto")
    assert d.synthetic and (root / MARKER).is_file() and len(d.splits["train"]) == N_TRAIN
    assert "NOT MEDICAL" in capsys.readouterr().out
    load(root, data="auto")
    assert calls == [root]


def test_synthetic_never_writes_into_real_data(real_plain, monkeypatch):
    monkeypatch.setattr(alzheimer, "write_alzheimer_standin", lambda root, **kw: tiny_standin(root))
    before = sorted(p.relative_to(real_plain) for p in real_plain.rglob("*"))
    d = load(real_plain, data="synthetic")
    assert d.synthetic and d.root == real_plain.parent / "synthetic" / real_plain.name
    after = sorted(p.relative_to(real_plain) for p in real_plain.rglob("*") if ".labkit_cache" not in p.parts)
    assert after == before
    assert not load(real_plain, data="auto").synthetic     # auto still picks the real data


def test_real_refuses_the_standin(standin):
    with pytest.raises(FileNotFoundError, match=MARKER):
        load(standin, data="real")


def test_bad_data_choice(standin):
    with pytest.raises(ValueError, match="data='fake'"):
        load(standin, data="fake")


# ---------------------------------------------------------------- errors
def test_missing_root_says_how_to_get_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load(missing)
    text = str(err.value)
    assert str(missing) in text and "Alzheimer's Dataset (4 class of images)" in text
    assert "labkit data synth" in text and 'data="auto"' in text
    assert not missing.exists()


def test_unknown_layout_lists_what_was_found(tmp_path):
    root = tmp_path / "odd"
    (root / "images").mkdir(parents=True)
    (root / "readme.txt").write_text("hi")
    for data in ("real", "auto"):
        with pytest.raises(FileNotFoundError, match=r"readme\.txt") as err:
            load(root, data=data)
        assert "images" in str(err.value) and str(root) in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == ["images", "readme.txt"]   # no stand-in written there


def test_empty_class_folder(real_plain):
    for f in (real_plain / "test" / "ModerateDemented").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="ModerateDemented.*empty"):
        load(real_plain)


def test_unexpected_class_folders(real_plain):
    (real_plain / "train" / "MildDemented").rename(real_plain / "train" / "Mild")
    with pytest.raises(ValueError, match="expected"):
        load(real_plain)


def test_bad_sizes_are_named(standin, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        load(standin, data="auto", image_size="128")
    with pytest.raises(ValueError, match="max_train=0"):
        load(standin, data="auto", max_train=0)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="a_file"):
        write_alzheimer_standin(tmp_path / "a_file", n_train=4, n_test=4, progress=False)


# ---------------------------------------------------------------- unreadable files
def test_corrupt_and_non_image_files_are_skipped(real_plain):
    folder = real_plain / "train" / "NonDemented"
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("scan protocol")
    with pytest.warns(UserWarning) as record:
        d = load(real_plain)
    text = " ".join(str(w.message) for w in record)
    assert "broken.jpg" in text and "notes.txt" in text and "skipped 2" in text
    assert sorted(Path(f).name for f in d.skipped) == ["broken.jpg", "notes.txt"]
    assert len(d.splits["train"]) == N_TRAIN and d.describe()["skipped"] == d.skipped
    with pytest.warns(UserWarning, match="skipped 2"):            # the cached load still reports them
        assert load(real_plain).skipped == d.skipped


def test_strict_raises_naming_the_file(real_plain):
    (real_plain / "test" / "MildDemented" / "zz_truncated.jpg").write_bytes(b"GIF89a")
    with pytest.raises(UnreadableImageError, match="zz_truncated.jpg"):
        load(real_plain, strict=True)


# ---------------------------------------------------------------- cache
def test_second_load_reads_the_cache(real_plain, monkeypatch):
    first = load(real_plain)
    assert any(cache.cache_dir_for(real_plain).glob("alzheimer-train-16px-L-*.pt"))
    assert not (real_plain / ".labkit_cache").exists(), "a real dataset folder must never be written into"

    def fail(*args, **kw):
        raise AssertionError("decoded again although the cache is valid")
    monkeypatch.setattr(cache, "decode_image", fail)
    second = load(real_plain)
    assert torch.equal(first.splits["train"].images, second.splits["train"].images)
    assert first.splits["test"].files == second.splits["test"].files


def test_cache_is_invalidated_when_a_file_changes(real_plain, monkeypatch):
    first = load(real_plain)
    files = first.splits["test"].files
    target, donor = real_plain / files[0], real_plain / files[-1]
    shutil.copyfile(donor, target)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    decoded = []
    real_decode = cache.decode_image
    monkeypatch.setattr(cache, "decode_image", lambda path, *a: decoded.append(Path(path).name) or real_decode(path, *a))
    second = load(real_plain)
    assert Path(files[0]).name in decoded
    assert torch.equal(second.splits["test"].images[0], first.splits["test"].images[-1])
    assert not torch.equal(second.splits["test"].images[0], first.splits["test"].images[0])
    decoded.clear()
    (real_plain / files[-1]).unlink()                            # a changed file list: decoded again
    assert len(load(real_plain).splits["test"]) == N_TEST - 1 and decoded


def test_cache_falls_back_to_course_folder_when_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path / "course"))
    monkeypatch.delenv("LABKIT_CACHE", raising=False)
    monkeypatch.setattr(cache.os, "access", lambda path, mode: False)
    folder = cache_dir_for(tmp_path / "readonly_data")
    assert folder.parent == tmp_path / "course" / "data" / ".cache" and folder.is_dir()


# ---------------------------------------------------------------- subsets and loaders
def test_max_train_is_stratified_and_seeded(standin):
    d = load(standin, data="auto", max_train=12, max_test=8, seed=3)
    counts = np.bincount(d.splits["train"].labels.numpy(), minlength=4)
    assert counts.sum() == 12 and (counts >= 1).all()
    again = load(standin, data="auto", max_train=12, max_test=8, seed=3)
    other = load(standin, data="auto", max_train=12, max_test=8, seed=4)
    assert again.splits["train"].files == d.splits["train"].files != other.splits["train"].files
    labels = np.repeat([0, 1, 2, 3], [2560, 1792, 717, 52])
    picked = np.bincount(labels[stratified_subset(labels, 1200, seed=0)])
    assert picked.sum() == 1200 and picked.min() >= 1 and abs(picked[0] / 1200 - 0.5) < 0.01


def test_loader_batches(standin):
    d = load(standin, data="auto", image_size=24)
    x, y = next(iter(d.loader("train", batch_size=8)))
    assert x.shape == (8, 1, 24, 24) and x.dtype == torch.uint8 and y.dtype == torch.int64
    ys = torch.cat([b[1] for b in d.loader("test", batch_size=7)])
    assert torch.equal(ys, d.splits["test"].labels)              # test split: not shuffled
    a = torch.cat([b[1] for b in d.loader("train", 8, seed=1)])
    b = torch.cat([b[1] for b in d.loader("train", 8, seed=1)])
    assert torch.equal(a, b) and not torch.equal(a, d.splits["train"].labels)
    assert len(list(d.loader("train", 8, drop_last=True))) == N_TRAIN // 8


# ---------------------------------------------------------------- the stand-in itself
def test_standin_counts_match_the_real_dataset():
    assert standin_counts() == KAGGLE_COUNTS
    full = standin_counts()["train"]
    shares = {c: round(100 * n / 5121) for c, n in full.items()}
    assert shares == {"NonDemented": 50, "VeryMildDemented": 35, "MildDemented": 14, "ModerateDemented": 1}
    small = standin_counts(10, 4)
    assert sum(small["train"].values()) == 10 and min(small["test"].values()) == 1


def test_standin_is_deterministic(tmp_path):
    kw = {"n_train": 6, "n_test": 4, "size": (40, 48), "progress": False}
    a = write_alzheimer_standin(tmp_path / "a", seed=7, **kw)
    b = write_alzheimer_standin(tmp_path / "b", seed=7, **kw)
    c = write_alzheimer_standin(tmp_path / "c", seed=8, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 10 and files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    from PIL import Image
    with Image.open(a / files[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "L", (40, 48))


def test_standin_refuses_to_overwrite_other_data(real_plain):
    with pytest.raises(FileExistsError, match="refusing"):
        write_alzheimer_standin(real_plain, n_train=4, n_test=4, progress=False)


def test_standin_is_learnable_but_not_trivial(tmp_path):
    """A linear model on 16 px pixels beats the majority class clearly but is far from perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = write_alzheimer_standin(tmp_path / "learn", n_train=400, n_test=300, size=(88, 104), progress=False)
    d = load(root, data="auto", image_size=16)
    x_train, y_train = d.splits["train"].images.flatten(1).float().numpy(), d.splits["train"].labels.numpy()
    x_test, y_test = d.splits["test"].images.flatten(1).float().numpy(), d.splits["test"].labels.numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=500)).fit(x_train, y_train)
    acc, majority = model.score(x_test, y_test), np.bincount(y_test).max() / len(y_test)
    assert acc > majority + 0.08, f"stand-in not learnable: accuracy {acc:.3f}, majority {majority:.3f}"
    assert acc < 0.97, f"stand-in too easy: accuracy {acc:.3f}"
