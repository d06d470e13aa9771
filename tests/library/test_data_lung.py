"""The lung set (Lab 04): the synthetic stand-in's layout, its determinism, the loader, and the errors
for a missing split or class folder."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from labkit.data.lung import check_layout, data_root, find_lung, load_lung
from labkit.data.synth_lung import CLASSES, MARKER, SPLITS, render, write_lung_standin

COUNTS = (3, 2, 2)  # train / val / test images per class: small and fast


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return write_lung_standin(tmp_path_factory.mktemp("lung") / "lung", *COUNTS, seed=0, progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def test_standin_has_the_lung_layout(standin):
    assert (standin / MARKER).is_file()
    for split, n in zip(SPLITS, COUNTS):
        assert sorted(p.name for p in (standin / split).iterdir()) == sorted(CLASSES)
        for cls in CLASSES:
            files = list((standin / split / cls).iterdir())
            assert len(files) == n and all(f.name.startswith(cls) for f in files)
    check_layout(standin)  # no error


def test_standin_mixes_sizes_modes_and_formats(standin):
    files = [p for p in standin.rglob("*") if p.suffix in (".png", ".jpg")]
    assert {p.suffix for p in files} == {".png", ".jpg"}
    modes, sizes = set(), set()
    for p in files:
        with Image.open(p) as im:
            modes.add(im.mode)
            sizes.add(im.size)
    assert modes == {"L", "RGB"}
    assert len(sizes) >= 4


def test_standin_is_deterministic_and_seeded(standin, tmp_path):
    again = write_lung_standin(tmp_path / "again", *COUNTS, seed=0, progress=False)
    other = write_lung_standin(tmp_path / "other", *COUNTS, seed=1, progress=False)
    assert _digest(again) == _digest(standin)
    assert _digest(other) != _digest(standin)


def test_classes_differ_by_their_lesions():
    """Same random stream, different class: the pictures differ (the lesion), same modality looks alike."""
    import numpy as np

    pics = {c: render(c, np.random.default_rng(7), (64, 64)).astype(float) for c in CLASSES}
    normal = pics["lung-normal"]
    for cls in ("lung-covid", "lung-opacity", "lung-tuberculosis", "lung-viral-pneumonia"):
        assert abs(pics[cls] - normal).mean() > 0.5
    assert abs(pics["lung-oct-normal"] - normal).mean() > 20  # OCT and X-ray look nothing alike


def test_standin_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "scan.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="refusing"):
        write_lung_standin(tmp_path / "real", 1, 1, 1, progress=False)
    assert not (tmp_path / "real" / MARKER).exists()


def test_load_lung_shapes_counts_and_subsets(standin, capsys):
    data = load_lung(data_dir=standin, image_size=24, progress=True)
    assert "SYNTHETIC" in capsys.readouterr().out
    assert data.synthetic and data.classes == list(CLASSES) and set(data.splits) == set(SPLITS)
    for split, n in zip(SPLITS, COUNTS):
        part = data[split]
        assert tuple(part.images.shape) == (9 * n, 1, 24, 24) and part.images.dtype.is_floating_point is False
        assert sorted(part.labels.tolist()) == sorted(list(range(9)) * n)
    small = load_lung(data_dir=standin, image_size=16, max_train=9, max_test=9, progress=False)
    assert len(small["train"]) == 9 and len(small["val"]) == 9 and len(small["test"]) == 9
    assert sorted(small["train"].labels.tolist()) == list(range(9))  # stratified: one per class


@pytest.mark.parametrize("remove, names", [("val/lung-oct-dme", ("val", "lung-oct-dme")),
                                           ("train/lung-covid", ("train", "lung-covid")),
                                           ("test", ("test",))])
def test_missing_class_or_split_is_named(standin, tmp_path, remove, names):
    root = tmp_path / "lung"
    shutil.copytree(standin, root)
    shutil.rmtree(root / remove)
    (root / MARKER).unlink()  # now it is "real" data with a hole in it
    with pytest.raises(FileNotFoundError) as err:
        load_lung(data_dir=root, image_size=16, progress=False)
    for name in names:
        assert name in str(err.value)


def test_auto_writes_a_standin_into_an_empty_folder_and_real_refuses_it(tmp_path, monkeypatch):
    import labkit.data.lung as lung

    calls = []

    def small_standin(root, seed=0, progress=True):
        calls.append(root)
        return write_lung_standin(root, 1, 1, 1, seed=seed, progress=False)

    monkeypatch.setattr(lung, "write_lung_standin", small_standin)
    (tmp_path / "empty").mkdir()
    root, synthetic = find_lung("auto", tmp_path / "empty", progress=False)
    assert synthetic and calls == [root] and (root / MARKER).exists()
    with pytest.raises(FileNotFoundError, match="data='real'"):
        find_lung("real", root)


def test_data_path_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "mounted"))
    assert data_root(None) == tmp_path / "mounted"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"  # an explicit data_dir wins
    monkeypatch.delenv("DATA_PATH")
    assert data_root(None).parts[-2:] == ("data", "lung")


def test_unreadable_file_is_skipped_with_a_warning(standin, tmp_path):
    root = tmp_path / "lung"
    shutil.copytree(standin, root)
    (root / "train" / "lung-normal" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        data = load_lung(data_dir=root, image_size=16, progress=False)
    assert data.skipped == ["train/lung-normal/broken.png"]
    assert len(data["train"]) == 9 * COUNTS[0]


def test_patient_ids_are_read_from_oct_and_pneumonia_names():
    from labkit.data.lung import patient_id

    assert patient_id("train/lung-oct-cnv/CNV-1016042-1.jpeg") == "1016042"
    assert patient_id("DRUSEN-95633-12.jpeg") == "95633"
    assert patient_id("person1_bacteria_1.jpeg") == "person1"
    assert patient_id("lung-oct-cnv-00001.png") is None          # the stand-in's names carry none
    assert patient_id("COVID-1.png") is None


def test_patients_shared_across_splits_are_counted_and_warned(standin, tmp_path):
    from labkit.data.lung import shared_patients

    files = {"train": ["a/CNV-11-1.jpeg", "a/CNV-11-2.jpeg", "a/DME-12-1.jpeg", "a/person3_virus_1.jpeg"],
             "val": ["a/CNV-13-1.jpeg"], "test": ["a/DME-12-4.jpeg", "a/CNV-11-9.jpeg", "a/NORMAL-99-1.jpeg"]}
    assert shared_patients(files) == {("train", "test"): {"11", "12"}}
    # a "real" copy of the stand-in in which one OCT patient appears in train and in test
    real = tmp_path / "lung"
    shutil.copytree(standin, real)
    (real / MARKER).unlink()
    for split in ("train", "test"):
        folder = real / split / "lung-oct-cnv"
        first = sorted(folder.iterdir())[0]
        first.rename(folder / f"CNV-4242-{int(split == 'test')}.jpeg")
    with pytest.warns(UserWarning, match=r"1 patient\(s\) have images in both 'train' and 'test' \(e\.g\. 4242\)"):
        load_lung(data="real", data_dir=real, image_size=16, progress=False)
