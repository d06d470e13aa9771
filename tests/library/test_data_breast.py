"""labkit.data.breast / synth_breast: both real layouts, the IDC name parser, clear errors on bad input,
and train/val/test splits (patient-level shares no patient; the saved split is reused)."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from labkit.data.breast import (
    find_breast_layout,
    has_patient_ids,
    load_breast,
    parse_idc_name,
    saved_split,
    split_by_group,
    split_by_patient,
    split_patches,
)
from labkit.data.cache import MARKER, UnreadableImageError
from labkit.data.images import extract_zip_once
from labkit.data.synth_breast import SITES_FILE, make_patients, patch_name, write_breast_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A small stand-in: 8 patients × 6-10 patches."""
    return write_breast_standin(tmp_path_factory.mktemp("b") / "breast", patients=8, patches=(6, 10), progress=False)


def _png(path, value=128, size=(50, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_parse_idc_name_and_malformed_names():
    assert parse_idc_name("10253_idx5_x1001_y1351_class1.png") == ("10253", 1001, 1351, 1)
    for bad in ("10253_idx5_x1001_class1.png", "10253_idx5_x1_y1_class2.png", "notes.txt", "10253_x1_y1_class0.png"):
        with pytest.raises(ValueError, match="not an IDC patch name") as err:
            parse_idc_name(f"/data/10253/0/{bad}")
        assert bad in str(err.value)


def test_standin_layout_rates_and_notice(standin, capsys):
    assert (standin / MARKER).is_file()
    assert find_breast_layout(standin) == ("idc", standin)
    ds = load_breast(data_dir=standin, image_size=24, progress=False)
    assert "SYNTHETIC DATA" in capsys.readouterr().out
    assert ds.synthetic and ds.layout == "idc" and ds.images.shape[1:] == (3, 24, 24)
    assert ds.images.dtype == torch.uint8 and len(set(ds.patients)) == 8
    for f, pid, y in zip(ds.files, ds.patients, ds.labels.tolist()):
        assert parse_idc_name(f)[0] == pid and parse_idc_name(f)[3] == y and f.startswith(f"{pid}/{y}/")
    assert 0.1 < ds.labels.float().mean() < 0.6
    # patients differ: their positive rates are not all alike
    assert ds.patient_table()["positive %"].std() > 5


def test_seed_binary_layout_has_no_patients(tmp_path):
    root = tmp_path / "seed" / "vanitha_dataset"        # a single wrapping folder is looked through
    for c in (0, 1):
        for i in range(4):
            _png(root / str(c) / f"img{i}.png", 60 + 100 * c)
    ds = load_breast(data="real", data_dir=tmp_path / "seed", image_size=16, progress=False)
    assert ds.layout == "binary" and ds.patients is None and not ds.synthetic
    assert ds.labels.tolist() == [0] * 4 + [1] * 4
    assert ds.patient_table().empty
    with pytest.raises(ValueError, match="no patient ids"):
        saved_split(ds, "patient")
    parts = saved_split(ds, "patch")
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(8))


def test_bad_folders_name_the_culprit(tmp_path):
    odd = tmp_path / "odd"
    (odd / "stuff").mkdir(parents=True)
    (odd / "readme.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="not a breast-patch layout") as err:
        load_breast(data_dir=odd, progress=False)
    assert str(odd) in str(err.value)

    empty_class = tmp_path / "empty"
    _png(empty_class / "10001" / "0" / patch_name("10001", 1, 1, 0))
    (empty_class / "10001" / "1").mkdir()
    with pytest.raises(ValueError, match="is empty") as err:
        load_breast(data_dir=empty_class, progress=False)
    assert "10001/1" in str(err.value)

    wrong_name = tmp_path / "wrong"
    _png(wrong_name / "10001" / "0" / "scan.png")
    with pytest.raises(ValueError, match="not an IDC patch name") as err:
        load_breast(data_dir=wrong_name, progress=False)
    assert "scan.png" in str(err.value)

    moved = tmp_path / "moved"
    _png(moved / "10001" / "0" / patch_name("10002", 1, 1, 0))
    with pytest.raises(ValueError, match="Move it to 10002/0/"):
        load_breast(data_dir=moved, progress=False)

    with pytest.raises(FileNotFoundError, match="data='real'"):
        load_breast(data="real", data_dir=tmp_path / "missing", progress=False)


def test_undecodable_patch_is_named(tmp_path):
    root = tmp_path / "broken"
    _png(root / "10001" / "0" / patch_name("10001", 1, 1, 0))
    _png(root / "10001" / "1" / patch_name("10001", 51, 1, 1))
    bad = root / "10001" / "1" / patch_name("10001", 101, 1, 1)
    bad.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=bad.name):
        ds = load_breast(data_dir=root, image_size=16, progress=False)
    assert len(ds) == 2 and any(bad.name in s for s in ds.skipped)
    with pytest.raises(UnreadableImageError, match=bad.name):
        load_breast(data_dir=root, image_size=20, strict=True, progress=False)


def test_splits_keep_every_sample_once_and_patients_apart():
    rng = np.random.default_rng(1)
    patients = [f"p{k}" for k in rng.integers(0, 25, 600)]
    labels = rng.integers(0, 2, 600)
    for parts in (split_by_patient(patients, labels, seed=3), split_patches(labels, seed=3)):
        allidx = np.concatenate([parts[s] for s in ("train", "val", "test")])
        assert sorted(allidx.tolist()) == list(range(600))
    parts = split_by_patient(patients, labels, seed=3)
    groups = {s: {patients[i] for i in parts[s]} for s in parts}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"] and all(groups.values())
    # same seed, same split
    again = split_by_patient(patients, labels, seed=3)
    assert all(np.array_equal(parts[s], again[s]) for s in parts)


def test_saved_split_is_written_once_and_reused(standin):
    ds = load_breast(data_dir=standin, image_size=24, progress=False)
    first = saved_split(ds, "patient", seed=5)
    files = list((standin / ".labkit_cache").glob("split-patient-seed5-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["level"] == "patient" and set(saved["files"]) == {"train", "val", "test"}
    stamp = files[0].stat().st_mtime_ns
    second = saved_split(ds, "patient", seed=5)
    assert files[0].stat().st_mtime_ns == stamp
    assert all(np.array_equal(first[s], second[s]) for s in first)
    pids = {s: {ds.patients[i] for i in first[s]} for s in first}
    assert not (pids["train"] & pids["test"]) and not (pids["train"] & pids["val"]) and not (pids["val"] & pids["test"])


def test_standin_refuses_to_overwrite_real_data(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        write_breast_standin(tmp_path / "real", patients=2, patches=(2, 2), progress=False)


def test_standin_hospitals_are_unequal_and_stain_differently(tmp_path):
    root = write_breast_standin(tmp_path / "b", patients=20, patches=(6, 8), progress=False)
    assert (root / SITES_FILE).is_file()
    ds = load_breast(data_dir=root, image_size=16, progress=False)
    assert ds.sites is not None and len(ds.sites) == len(ds) and ds.describe()["hospitals"] == 3
    per_patient = dict(zip(ds.patients, ds.sites))
    counts = sorted(list(per_patient.values()).count(s) for s in set(per_patient.values()))
    assert counts[-1] >= 2 * counts[0]                      # 10 / 6 / 4 patients
    # each hospital its own tint: the patients' stain vectors sit closer to their hospital's than to the others'
    people = make_patients(60, np.random.default_rng(0))
    stain = {p["id"]: np.concatenate([p["h_vec"], p["e_vec"]]) for p in people}
    site = {p["id"]: p["site"] for p in people}
    names = sorted(set(site.values()))
    centres = {s: np.mean([stain[p] for p in stain if site[p] == s], axis=0) for s in names}
    within = np.mean([np.linalg.norm(stain[p] - centres[site[p]]) for p in stain])
    between = np.mean([np.linalg.norm(centres[a] - centres[b]) for a in names for b in names if a < b])
    assert between > 2 * within, (between, within)


def test_the_archive_as_it_unzips_is_read_once(tmp_path, capsys):
    """The public archive holds the patient folders twice (top level and IDC_regular_ps50_idx5/): zipped,
    unzipped with labkit's own extractor, read with each patch once."""
    built = tmp_path / "archive"
    for pid, n in (("10001", 3), ("10002", 2)):
        for i in range(n):
            for c in (0, 1):
                name = patch_name(pid, 50 * i + 1, 1, c)
                _png(built / pid / str(c) / name, 40 + 150 * c)
                _png(built / "IDC_regular_ps50_idx5" / pid / str(c) / name, 40 + 150 * c)    # the nested copy
    _png(built / "IDC_regular_ps50_idx5" / "10003" / "1" / patch_name("10003", 1, 1, 1), 200)  # only in the copy
    (built / "docs").mkdir()                                                                    # an odd extra folder
    (built / "docs" / "readme.txt").write_text("about")
    (built / "10001" / ".ipynb_checkpoints").mkdir()
    with zipfile.ZipFile(tmp_path / "IDC.zip", "w") as zf:
        for path in sorted(built.rglob("*")):
            zf.write(path, path.relative_to(built).as_posix())
    root = extract_zip_once(tmp_path / "IDC.zip", tmp_path / "unzipped", progress=False)
    ds = load_breast(data="real", data_dir=root, image_size=16, progress=False)
    names = [f.rsplit("/", 1)[1] for f in ds.files]
    assert len(names) == len(set(names)) == 2 * 5 + 1           # every patch once, the copy's own one included
    assert sorted(set(ds.patients)) == ["10001", "10002", "10003"]
    assert not any(f.startswith("IDC_regular") for f in ds.files if not f.split("/")[1].startswith("10003"))
    out = capsys.readouterr().out
    assert "IDC_regular_ps50_idx5/ holds a copy of 3 patient folders: 10 patches" in out and "docs" in out
    assert any("copy" in n for n in ds.notes) and ds.describe()["notes"] == ds.notes
    parts = saved_split(ds, "patch")
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(ds)))


def test_border_patches_are_padded_not_stretched(tmp_path):
    root = tmp_path / "border"
    _png(root / "10001" / "0" / patch_name("10001", 1, 1, 0), 0, size=(50, 50))
    _png(root / "10001" / "1" / patch_name("10001", 2451, 1, 1), 0, size=(50, 25))   # cut at the slide's edge
    ds = load_breast(data="real", data_dir=root, image_size=50, progress=False)
    border = ds.images[ds.files.index(f"10001/1/{patch_name('10001', 2451, 1, 1)}")]
    assert border[:, :24].max() == 0 and border[:, 26:].min() == 255          # tissue on top, white below
    assert ds.images[ds.labels == 0].max() == 0


def test_patient_ids_known_before_loading(tmp_path):
    binary = tmp_path / "seed"
    for c in (0, 1):
        _png(binary / str(c) / "a.png")
    assert has_patient_ids("real", binary) is False
    assert has_patient_ids("synthetic", binary) is True and has_patient_ids("auto", tmp_path / "none") is True
    _png(tmp_path / "idc" / "10001" / "0" / patch_name("10001", 1, 1, 0))
    assert has_patient_ids("real", tmp_path / "idc") is True


def test_split_by_group_gives_each_group_every_split():
    rng = np.random.default_rng(2)
    patients = [f"p{k}" for k in rng.integers(0, 40, 800)]
    groups = [int(p[1:]) % 4 == 0 for p in patients]       # a small group (10 patients) and a large one
    labels = rng.integers(0, 2, 800)
    parts = split_by_group(patients, labels, groups, seed=0)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(800))
    for g in (False, True):
        for s in ("train", "val", "test"):
            assert any(groups[i] == g for i in parts[s]), (g, s)
    owners = {s: {patients[i] for i in parts[s]} for s in parts}
    assert not owners["train"] & owners["test"] and not owners["val"] & owners["test"]
