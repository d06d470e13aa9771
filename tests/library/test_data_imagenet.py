"""labkit.data.imagenet + labkit.data.synth_tiny: every layout on tiny hand-made folders, the val label
files, 3-channel output, bad input, real folders left untouched, and the Tiny-ImageNet stand-in."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from labkit.data import imagenet
from labkit.data.cache import UnreadableImageError
from labkit.data.imagenet import find_imagenet_layout, load_imagenet
from labkit.data.synth_tiny import MARKER, write_tiny_imagenet_standin

WNIDS = ["n01443537", "n01629819", "n01641577"]  # goldfish, salamander, bullfrog
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n01641577": "bullfrog, Rana catesbeiana"}
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]  # class k is drawn in COLOURS[k]


@pytest.fixture(autouse=True)
def course_home(tmp_path, monkeypatch):
    """labkit's own folders (data/.cache) live in a temporary course folder."""
    home = tmp_path / "course"
    home.mkdir()
    monkeypatch.setenv("LABKIT_HOME", str(home))
    monkeypatch.delenv("LABKIT_CACHE", raising=False)
    return home


def _jpeg(path: Path, k: int, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (12, 12), COLOURS[k])
    (img.convert("L") if gray else img).save(path, "JPEG", quality=95)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _colour_labels(split) -> np.ndarray:
    """The class each decoded image was drawn in (argmax of the mean colour)."""
    return split.images.float().mean((2, 3)).argmax(1).numpy()


def make_tiny(parent: Path) -> Path:
    root = parent / "tiny-imagenet-200"
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")  # the real file is not sorted
    (root / "words.txt").write_text("n00001740\tentity\n" + "".join(f"{w}\t{WORDS[w]}\n" for w in WNIDS))
    for k, w in enumerate(WNIDS):
        for i in range(3):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", k, gray=(k == 1 and i == 0))
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t5\t5\n")
    rows = []
    for i, k in enumerate([2, 0, 1, 1, 0]):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG", k)
        rows.append(f"val_{i}.JPEG\t{WNIDS[k]}\t1\t2\t10\t11")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    _jpeg(root / "test" / "images" / "test_0.JPEG", 0)
    return root


def make_ilsvrc(parent: Path) -> Path:
    root = parent / "ILSVRC"
    for k, w in enumerate(WNIDS):
        for i in range(2):
            _jpeg(root / "Data" / "CLS-LOC" / "train" / w / f"{w}_{i}.JPEG", k)
    for i, k in enumerate([1, 2, 0, 2]):
        _jpeg(root / "Data" / "CLS-LOC" / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", k)
    return root


VAL_CLASSES = [1, 2, 0, 2]


def test_tiny_imagenet_layout_labels_names_and_gray(tmp_path):
    root = make_tiny(tmp_path / "data")
    data = load_imagenet("real", tmp_path / "data", image_size=16, progress=False)
    assert find_imagenet_layout(tmp_path / "data") == "tiny-imagenet" and data.layout == "tiny-imagenet"
    assert data.root == root and not data.synthetic and data.wnids == WNIDS
    assert data.classes == ["goldfish", "European fire salamander", "bullfrog"]  # first synonym of words.txt
    train, val = data.splits["train"], data.splits["val"]
    assert train.images.shape == (9, 3, 16, 16) and val.images.shape == (5, 3, 16, 16)
    assert val.labels.tolist() == [2, 0, 1, 1, 0]  # from val_annotations.txt
    gray = train.files.index(f"train/{WNIDS[1]}/images/{WNIDS[1]}_0.JPEG")
    coloured = np.arange(9) != gray
    assert (_colour_labels(val) == val.labels.numpy()).all()
    assert (_colour_labels(train) == train.labels.numpy())[coloured].all()
    g = train.images[gray].int()
    assert (g[0] == g[1]).all() and (g[1] == g[2]).all()  # the grayscale JPEG, as 3 equal channels
    assert not any(f.startswith("test/") for f in train.files + val.files)  # unlabelled test/ ignored
    direct = load_imagenet("real", root, image_size=16, progress=False)  # data_dir = the folder itself
    assert direct.splits["val"].files == val.files


def test_real_folder_is_never_written_into(tmp_path, course_home):
    make_tiny(tmp_path / "data")
    before = _tree(tmp_path / "data")
    load_imagenet("auto", tmp_path / "data", image_size=16, progress=False)
    load_imagenet("auto", tmp_path / "data", image_size=8, max_train=3, progress=False)
    assert _tree(tmp_path / "data") == before
    assert list((course_home / "data" / ".cache").rglob("*.pt"))  # the cache went to labkit's own folder


def test_ilsvrc_val_labels_from_kaggle_solution_csv(tmp_path):
    make_ilsvrc(tmp_path / "kaggle")
    rows = [f"ILSVRC2012_val_{i + 1:08d},{WNIDS[k]} 1 2 30 40 {WNIDS[k]} 3 4 5 6" for i, k in enumerate(VAL_CLASSES)]
    (tmp_path / "kaggle" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    (tmp_path / "kaggle" / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in WNIDS))
    data = load_imagenet("real", tmp_path / "kaggle", image_size=8, progress=False)
    assert data.layout == "ilsvrc" and data.classes[0] == "goldfish"
    assert data.splits["val"].labels.tolist() == VAL_CLASSES
    assert (_colour_labels(data.splits["val"]) == VAL_CLASSES).all()
    assert len(data.splits["train"]) == 6


@pytest.mark.parametrize("style", ["index", "wnid"])
def test_ilsvrc_val_labels_from_val_txt_and_label_file(tmp_path, style):
    root = make_ilsvrc(tmp_path)
    sets = root / "ImageSets" / "CLS-LOC"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("".join(f"ILSVRC2012_val_{i + 1:08d} {i + 1}\n" for i in range(4)))
    with pytest.raises(FileNotFoundError, match="running number"):
        load_imagenet("real", root, image_size=8, progress=False)
    (sets / "val_labels.txt").write_text("".join(f"{k if style == 'index' else WNIDS[k]}\n" for k in VAL_CLASSES))
    data = load_imagenet("real", root, image_size=8, progress=False)
    assert data.splits["val"].labels.tolist() == VAL_CLASSES
    (sets / "val_labels.txt").write_text("0\n1\n")
    with pytest.raises(ValueError, match="2 labels but .*val.txt lists 4"):
        load_imagenet("real", root, image_size=8, progress=False)


def test_ilsvrc_val_labels_from_devkit_ground_truth(tmp_path):
    root = make_ilsvrc(tmp_path)
    (root / "ImageSets" / "CLS-LOC").mkdir(parents=True)
    (root / "ImageSets" / "CLS-LOC" / "val.txt").write_text("".join(f"ILSVRC2012_val_{i + 1:08d} {i + 1}\n"
                                                                   for i in range(4)))
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    ids = {WNIDS[0]: 3, WNIDS[1]: 1, WNIDS[2]: 2}  # devkit IDs are not in wnid order
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[WNIDS[k]]}\n" for k in VAL_CLASSES))
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        load_imagenet("real", root, image_size=8, progress=False)
    synsets = np.array([(ids[w], w, WORDS[w], 0) for w in WNIDS] + [(1001, "n00001740", "entity", 3)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    data = load_imagenet("real", root, image_size=8, progress=False)
    assert data.splits["val"].labels.tolist() == VAL_CLASSES


def test_plain_layout_and_subset(tmp_path):
    for split, n in (("train", 10), ("val", 2)):
        for k, cls in enumerate(["cat", "dog", "fox"]):
            for i in range(n):
                _jpeg(tmp_path / split / cls / f"{i}.jpg", k)
    data = load_imagenet("auto", tmp_path, image_size=8, progress=False)
    assert data.layout == "plain" and data.classes == ["cat", "dog", "fox"]
    assert len(data.splits["train"]) == 30 and len(data.splits["val"]) == 6
    assert (_colour_labels(data.splits["train"]) == data.splits["train"].labels.numpy()).all()
    sub = load_imagenet("auto", tmp_path, image_size=8, subset=True, subset_size=6, seed=1, progress=False)
    again = load_imagenet("auto", tmp_path, image_size=8, subset=True, subset_size=6, seed=1, progress=False)
    other = load_imagenet("auto", tmp_path, image_size=8, subset=True, subset_size=6, seed=2, progress=False)
    assert len(sub.splits["train"]) == 6 and len(sub.splits["val"]) == 6  # val is not subset
    assert sub.splits["train"].files == again.splits["train"].files != other.splits["train"].files
    assert np.bincount(sub.splits["train"].labels.numpy()).tolist() == [2, 2, 2]
    ignored = load_imagenet("auto", tmp_path, image_size=8, subset=False, subset_size=6, progress=False)
    assert len(ignored.splits["train"]) == 30


def test_missing_folders_and_unknown_layouts_are_named(tmp_path):
    root = make_tiny(tmp_path / "a")
    for p in sorted((root / "val").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "val").rmdir()
    with pytest.raises(FileNotFoundError, match=r"validation folder .*tiny-imagenet-200/val is missing"):
        load_imagenet("real", root, image_size=8, progress=False)
    junk = tmp_path / "junk"
    (junk / "photos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds \['photos'\].*tiny-imagenet-200"):
        load_imagenet("auto", junk, image_size=8, progress=False)
    with pytest.raises(FileNotFoundError, match="no ImageNet data at"):
        load_imagenet("real", tmp_path / "nothing", image_size=8, progress=False)
    with pytest.raises(ValueError, match="layout='fancy'"):
        load_imagenet("real", junk, layout="fancy", progress=False)
    with pytest.raises(ValueError, match="image_size"):
        load_imagenet("real", junk, image_size=0, progress=False)


def test_unreadable_file_is_named(tmp_path):
    root = make_tiny(tmp_path)
    bad = root / "train" / WNIDS[0] / "images" / "broken.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="broken.JPEG"):
        data = load_imagenet("real", root, image_size=8, progress=False)
    assert data.skipped == [f"train/{WNIDS[0]}/images/broken.JPEG"] and len(data.splits["train"]) == 9
    with pytest.raises(UnreadableImageError, match="broken.JPEG"):
        load_imagenet("real", root, image_size=8, strict=True, progress=False)


# --------------------------------------------------------------------------- the stand-in
SMALL = dict(train_per_class=6, val_per_class=3, test_per_class=2, size=32, progress=False)


def test_standin_layout_and_determinism(tmp_path):
    root = write_tiny_imagenet_standin(tmp_path / "a", num_classes=4, seed=3, **SMALL)
    base = root / "tiny-imagenet-200"
    wnids = (base / "wnids.txt").read_text().split()
    assert len(wnids) == 4 and (root / MARKER).is_file() and find_imagenet_layout(root) == "tiny-imagenet"
    words = dict(line.split("\t") for line in (base / "words.txt").read_text().splitlines())
    assert all(words[w].startswith("synthetic") for w in wnids)
    assert all(len(list((base / "train" / w / "images").glob("*.JPEG"))) == 6 for w in wnids)
    ann = [line.split("\t") for line in (base / "val" / "val_annotations.txt").read_text().splitlines()]
    assert len(ann) == 12 and all((base / "val" / "images" / a[0]).is_file() and a[1] in wnids for a in ann)
    assert all(0 <= int(a[2]) <= int(a[4]) < 32 for a in ann)  # boxes inside the image
    assert len(list((base / "test" / "images").glob("*.JPEG"))) == 8
    with Image.open(next((base / "train" / wnids[0] / "images").glob("*.JPEG"))) as im:
        assert im.size == (32, 32)
    same = write_tiny_imagenet_standin(tmp_path / "b", num_classes=4, seed=3, **SMALL)
    other = write_tiny_imagenet_standin(tmp_path / "c", num_classes=4, seed=4, **SMALL)
    assert _tree(same) == _tree(root) != _tree(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "course"]  # no temporaries left


def test_standin_never_overwrites_other_data(tmp_path):
    make_tiny(tmp_path / "real")
    before = _tree(tmp_path / "real")
    with pytest.raises(FileExistsError, match="refusing"):
        write_tiny_imagenet_standin(tmp_path / "real", num_classes=3, **SMALL)
    assert _tree(tmp_path / "real") == before
    with pytest.raises(ValueError, match="num_classes"):
        write_tiny_imagenet_standin(tmp_path / "x", num_classes=1, **SMALL)


def test_standin_is_learnable_but_not_trivial(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    root = write_tiny_imagenet_standin(tmp_path / "s", num_classes=10, train_per_class=40, val_per_class=20,
                                       test_per_class=0, size=32, progress=False)
    data = load_imagenet("auto", root, image_size=8, progress=False)
    x = {s: data.splits[s].images.flatten(1).float().numpy() / 255 for s in ("train", "val")}
    y = {s: data.splits[s].labels.numpy() for s in ("train", "val")}
    with threadpool_limits(1):  # BLAS threads fighting torch's on 2 cores make this 30x slower
        model = LogisticRegression(max_iter=300, C=0.1).fit(x["train"], y["train"])
    acc = model.score(x["val"], y["val"])
    assert acc > 0.2, f"a linear model on 8 px pixels should beat chance (0.10) clearly, got {acc:.2f}"
    assert acc < 0.9, f"the stand-in should not be trivially separable, got {acc:.2f}"


def test_load_imagenet_writes_the_standin_loudly_and_keeps_real_data_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(imagenet, "write_tiny_imagenet_standin",
                        functools.partial(write_tiny_imagenet_standin, **{**SMALL, "size": 16}))
    data = load_imagenet("auto", tmp_path / "new", image_size=8, standin_classes=3, progress=False)
    assert data.synthetic and len(data.classes) == 3 and data.classes[0].startswith("synthetic")
    assert "SYNTHETIC DATA" in capsys.readouterr().out
    assert len(data.splits["train"]) == 18 and len(data.splits["val"]) == 9
    more = load_imagenet("auto", tmp_path / "new", image_size=8, standin_classes=5, progress=False)
    assert len(more.classes) == 5  # an own stand-in with another class count is rewritten
    with pytest.raises(FileNotFoundError, match="synthetic stand-in"):
        load_imagenet("real", tmp_path / "new", image_size=8, progress=False)
    make_tiny(tmp_path / "real")
    before = _tree(tmp_path / "real")
    syn = load_imagenet("synthetic", tmp_path / "real", image_size=8, standin_classes=3, progress=False)
    assert syn.synthetic and syn.root == tmp_path / "synthetic" / "real" / "tiny-imagenet-200"
    assert _tree(tmp_path / "real") == before


def test_interrupted_standin_write_leaves_nothing(tmp_path, monkeypatch):
    from labkit.data import synth_tiny

    calls = []

    def failing_save(arr, path, gray):
        calls.append(path)
        if len(calls) > 5:
            raise KeyboardInterrupt("stopped by the user")
        Image.fromarray(arr).save(path, "JPEG")

    monkeypatch.setattr(synth_tiny, "_save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_tiny_imagenet_standin(tmp_path / "s", num_classes=3, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["course"]  # no half-written folder, no temporary


def test_test_split_is_held_out_of_train_and_stratified(tmp_path):
    write_tiny_imagenet_standin(tmp_path / "d", num_classes=4, train_per_class=20, val_per_class=4,
                                test_per_class=0, size=16, progress=False)
    plain = load_imagenet("auto", tmp_path / "d", image_size=16, standin_classes=4, progress=False)
    assert sorted(plain.splits) == ["train", "val"], "no test split unless asked for (real layouts unchanged)"
    data = load_imagenet("auto", tmp_path / "d", image_size=16, standin_classes=4, test_size=12, max_train=40,
                         progress=False)
    train, test = data.splits["train"], data.splits["test"]
    assert len(test) == 12 and len(train) == 40
    assert not set(train.files) & set(test.files), "the test images must not be trained on"
    assert set(test.files) < set(plain.splits["train"].files) and data.splits["val"].files == plain.splits["val"].files
    assert np.bincount(test.labels.numpy()).tolist() == [3, 3, 3, 3], "class shares kept"
    with pytest.raises(ValueError, match="test_size"):
        load_imagenet("auto", tmp_path / "d", image_size=16, standin_classes=4, test_size=80, progress=False)


def test_memory_budget_memory_maps_and_gives_the_same_batches(tmp_path):
    write_tiny_imagenet_standin(tmp_path / "d", num_classes=3, train_per_class=10, val_per_class=4,
                                test_per_class=0, size=16, progress=False)
    kw = dict(image_size=16, standin_classes=3, test_size=6, progress=False)
    ram = load_imagenet("auto", tmp_path / "d", memory_budget=10**9, **kw)
    disk = load_imagenet("auto", tmp_path / "d", memory_budget=100, **kw)   # a tiny budget: nothing fits
    assert ram.memory_mapped == {} and sorted(disk.memory_mapped) == ["test", "train", "val"]
    for split in ("train", "val", "test"):
        path = disk.memory_mapped[split]
        assert path.is_file() and path.stat().st_size == disk.splits[split].images.numel()
        assert disk.splits[split].files == ram.splits[split].files
        for (xa, ya), (xb, yb) in zip(ram.loader(split, 4, seed=1), disk.loader(split, 4, seed=1)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = load_imagenet("auto", tmp_path / "d", memory_budget=100, **kw)  # the on-disk cache is reused
    assert again.memory_mapped["train"] == disk.memory_mapped["train"]
    assert torch.equal(again.splits["train"].images, ram.splits["train"].images)
    assert imagenet.default_memory_budget() > 0
