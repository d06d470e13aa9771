"""Where ImageNet-style data lives on disk, for lab 03: the three folder layouts, each listed as (file, label)
pairs without decoding an image. ``labkit.data.imagenet`` loads what these list.

Layouts found under ``data_dir`` (``layout="auto"``; ``data_dir`` may be the dataset folder or the
folder that holds it):

* ``ilsvrc``: ``[ILSVRC/]Data/CLS-LOC/train/<wnid>/*.JPEG`` and a flat ``Data/CLS-LOC/val/``
  (a ``val/<wnid>/`` folder per class also works). Flat val labels come from, in this order:

  1. ``LOC_val_solution.csv`` (Kaggle's ImageNet localization download; columns ``ImageId,
     PredictionString``, the first token of ``PredictionString`` is the wnid);
  2. ``ImageSets/CLS-LOC/val.txt`` (the image ids, first column — its second column is a running
     number, NOT a class) plus one label per line in the same order, from either
     ``ILSVRC2012_validation_ground_truth.txt`` with the devkit's ``meta.mat`` beside it (1-based
     ILSVRC2012_IDs, which are *not* in wnid order: ``meta.mat`` maps them), or ``val_labels.txt``
     (a wnid, or a 0-based index into ``LOC_synset_mapping.txt`` order = sorted wnids, per line).

  These files are looked for in the ILSVRC folder, ``ImageSets/CLS-LOC/``, the devkit's ``data/``
  folder and the folder above. Class names come from ``LOC_synset_mapping.txt`` or ``words.txt``.
* ``tiny-imagenet``: ``[tiny-imagenet-200/]wnids.txt``, ``words.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (file, wnid, box; tab-separated). The
  unlabelled ``test/`` is ignored.
* ``plain``: ``train/<class>/*`` and ``val/<class>/*``.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labkit.data.images import list_class_folders, regular_files, scan_class_folders, visible_entries
from labkit.data.synth_tiny import TINY_FOLDER

LAYOUTS = ("ilsvrc", "tiny-imagenet", "plain")
DATA_CHOICES = ("auto", "real", "synthetic")
#: The seed's default ``--subset-size``.
SUBSET_SIZE = 10_000
GET_DATA = ("Put Tiny ImageNet (the extracted tiny-imagenet-200 folder), ILSVRC (Data/CLS-LOC/...) or plain "
            "train/ val/ class folders into {root}, or use data='auto' to work with a synthetic stand-in.")


@dataclass
class Listing:
    """What a layout holds, before decoding: class keys and names, files (relative) and labels."""

    keys: list[str]
    names: list[str]
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]


def _candidates(root: Path, layout: str) -> list[Path]:
    if layout == "ilsvrc":
        return [root, root / "ILSVRC"]
    if layout == "tiny-imagenet":
        return [root, root / TINY_FOLDER]
    return [root]


def _matches(folder: Path, layout: str) -> bool:
    if layout == "ilsvrc":
        return (folder / "Data" / "CLS-LOC" / "train").is_dir()
    if layout == "tiny-imagenet":
        return (folder / "wnids.txt").is_file() and (folder / "train").is_dir()
    return (folder / "train").is_dir() and (folder / "val").is_dir()


def locate_imagenet(root: str | os.PathLike, layout: str = "auto") -> tuple[str, Path] | None:
    """``(layout, dataset folder)`` for the data at ``root``; ``None`` when ``root`` is missing or
    empty. Anything else that fits no layout is an error listing what was found and expected."""
    root = Path(root)
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout={layout!r}: use 'auto' or one of {LAYOUTS}")
    if not visible_entries(root):
        return None
    for name in LAYOUTS if layout == "auto" else (layout,):
        for folder in _candidates(root, name):
            if _matches(folder, name):
                return name, folder
    expected = {"ilsvrc": "[ILSVRC/]Data/CLS-LOC/train/<wnid>/",
                "tiny-imagenet": f"[{TINY_FOLDER}/]wnids.txt + train/<wnid>/images/",
                "plain": "train/<class>/ and val/<class>/"}
    wanted = "; ".join(v for k, v in expected.items() if layout in ("auto", k))
    raise FileNotFoundError(f"{root} holds {visible_entries(root)[:10]} — not the {layout if layout != 'auto' else 'an'} "
                            f"ImageNet layout. Expected {wanted}. {GET_DATA.format(root=root)}")


def find_imagenet_layout(root: str | os.PathLike) -> str:
    """``"ilsvrc"`` | ``"tiny-imagenet"`` | ``"plain"`` for the data at ``root``; a clear error otherwise."""
    found = locate_imagenet(root)
    if found is None:
        raise FileNotFoundError(f"{root} is missing or empty. {GET_DATA.format(root=root)}")
    return found[0]


# --------------------------------------------------------------------------- class names
def read_synonyms(path: Path, keys: list[str]) -> dict[str, str]:
    """``wnid -> first synonym`` from ``words.txt`` (tab) or ``LOC_synset_mapping.txt`` (space)."""
    wanted, out = set(keys), {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and parts[0] in wanted:
                out[parts[0]] = parts[1].split(",")[0].strip()
    return out


def class_names(keys: list[str], *files: Path) -> list[str]:
    """Readable names for ``keys`` from the first existing synonym file; repeated names (ImageNet has
    two "crane"s) get their wnid appended; keys without an entry keep the key."""
    names = dict(zip(keys, keys))
    for path in files:
        if path.is_file():
            names.update(read_synonyms(path, keys))
            break
    out = [names[k] for k in keys]
    return [f"{n} ({k})" if out.count(n) > 1 else n for n, k in zip(out, keys)]


# --------------------------------------------------------------------------- layouts
def _class_folder_split(root: Path, split_dir: Path, keys: list[str], sub: str = "") -> tuple[list[str], np.ndarray]:
    folders = [f"{k}/{sub}" if sub and (split_dir / k / sub).is_dir() else k for k in keys]
    return scan_class_folders(root, split_dir, folders)


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} is missing; found {visible_entries(path.parent)[:10]} in "
                                f"{path.parent}. Re-extract the dataset.")


def _labelled_flat(root: Path, folder: Path, labels_by_id: dict[str, str], keys: list[str],
                   source: Path) -> tuple[list[str], np.ndarray]:
    """Every file in the flat ``folder`` with its label from ``labels_by_id`` (by file name stem)."""
    index = {k: i for i, k in enumerate(keys)}
    files, labels = [], []
    for name in regular_files(folder):  # hidden files, Thumbs.db and links that go nowhere are left out
        stem = name.rsplit(".", 1)[0]
        key = labels_by_id.get(name, labels_by_id.get(stem))
        if key is None:
            raise ValueError(f"{folder / name} has no label in {source}; remove the file or use the matching "
                             f"label file.")
        if key not in index:
            raise ValueError(f"{source} labels {name} as {key!r}, which is not a training class "
                             f"(e.g. {keys[:3]}); the label file does not belong to this dataset.")
        files.append((folder / name).relative_to(root).as_posix())
        labels.append(index[key])
    if not files:
        raise ValueError(f"validation folder {folder} holds no images.")
    return files, np.asarray(labels, dtype=np.int64)


def list_tiny_imagenet(root: Path) -> Listing:
    """Files and labels of a Tiny ImageNet folder (``wnids.txt``, ``train/``, ``val/``)."""
    keys = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    if not keys:
        raise ValueError(f"{root / 'wnids.txt'} lists no classes; re-extract the dataset.")
    _need_dir(root / "train", "training")
    train = _class_folder_split(root, root / "train", keys, "images")
    val_dir, ann = root / "val", root / "val" / "val_annotations.txt"
    _need_dir(val_dir, "validation")
    if ann.is_file():
        by_id = {}
        for i, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) >= 2:
                by_id[parts[0]] = parts[1]
            elif line.strip():
                raise ValueError(f"{ann}, line {i}: {line!r} is not 'file<TAB>wnid<TAB>box'.")
        images = val_dir / "images"
        _need_dir(images, "validation image")
        val = _labelled_flat(root, images, by_id, keys, ann)
    elif all((val_dir / k).is_dir() for k in keys):  # val re-sorted into class folders
        val = _class_folder_split(root, val_dir, keys, "images")
    else:
        raise FileNotFoundError(f"{ann} is missing: it holds the validation labels. Re-extract the dataset.")
    names = class_names(keys, root / "words.txt")
    return Listing(keys, names, {"train": train[0], "val": val[0]}, {"train": train[1], "val": val[1]})


def _find(places: list[Path], name: str) -> Path | None:
    return next((p / name for p in places if (p / name).is_file()), None)


def _devkit_ids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's ``meta.mat`` (leaf synsets only)."""
    import scipy.io

    synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def ilsvrc_val_labels(places: list[Path], keys: list[str]) -> tuple[dict[str, str], Path]:
    """``image id -> wnid`` for the flat ILSVRC val folder, and the file it came from (see the
    module docstring for the accepted files and their order of preference)."""
    solution = _find(places, "LOC_val_solution.csv")
    if solution is not None:
        with open(solution, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
            raise ValueError(f"{solution} needs the columns ImageId,PredictionString.")
        return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows if r["PredictionString"].strip()}, solution
    val_txt = _find(places, "val.txt")
    if val_txt is None:
        raise FileNotFoundError(f"no validation labels: put LOC_val_solution.csv, or ImageSets/CLS-LOC/val.txt "
                                f"with ILSVRC2012_validation_ground_truth.txt + meta.mat or val_labels.txt, "
                                f"into {places[0]}.")
    ids = [line.split()[0] for line in val_txt.read_text().splitlines() if line.strip()]
    truth, labels_txt = _find(places, "ILSVRC2012_validation_ground_truth.txt"), _find(places, "val_labels.txt")
    if truth is not None:
        meta = truth.parent / "meta.mat"
        if not meta.is_file():
            raise FileNotFoundError(f"{truth} holds devkit ILSVRC2012_IDs, which are not in wnid order: put the "
                                    f"devkit's meta.mat beside it ({meta}) so they can be mapped to wnids.")
        to_wnid = _devkit_ids(meta)
        values = [to_wnid.get(int(x), x) for x in truth.read_text().split()]
        source = truth
    elif labels_txt is not None:
        values = [x if not x.isdigit() else (keys[int(x)] if int(x) < len(keys) else x)
                  for x in labels_txt.read_text().split()]
        bad = next((x for x in values if x.isdigit()), None)
        if bad is not None:
            raise ValueError(f"{labels_txt}: class index {bad} is out of range for {len(keys)} classes "
                             f"(0-based, LOC_synset_mapping.txt / sorted-wnid order).")
        source = labels_txt
    else:
        raise FileNotFoundError(f"{val_txt} lists the validation images but not their classes (its second column "
                                f"is a running number). Put LOC_val_solution.csv, ILSVRC2012_validation_ground_truth"
                                f".txt + meta.mat, or val_labels.txt (one wnid or 0-based index per line) beside it.")
    if len(values) != len(ids):
        raise ValueError(f"{source} has {len(values)} labels but {val_txt} lists {len(ids)} images; they must "
                         f"match line by line.")
    return dict(zip(ids, values)), source


def list_ilsvrc(root: Path, data_dir: Path | None = None) -> Listing:
    """Files and labels of an ILSVRC folder (``Data/CLS-LOC/{train,val}``)."""
    base = root / "Data" / "CLS-LOC"
    _need_dir(base / "train", "training")
    keys = list_class_folders(base / "train")
    if not keys:
        raise ValueError(f"{base / 'train'} holds no class folders.")
    train = scan_class_folders(root, base / "train", keys)
    val_dir = base / "val"
    _need_dir(val_dir, "validation")
    places = list(dict.fromkeys([root, root / "ImageSets" / "CLS-LOC", root / "ILSVRC2012_devkit_t12" / "data",
                                 root / "devkit" / "data", *([data_dir] if data_dir else []), root.parent]))
    if all((val_dir / k).is_dir() for k in keys):  # val re-sorted into class folders
        val = scan_class_folders(root, val_dir, keys)
    else:
        by_id, source = ilsvrc_val_labels(places, keys)
        val = _labelled_flat(root, val_dir, by_id, keys, source)
    names = class_names(keys, *(p / n for n in ("LOC_synset_mapping.txt", "words.txt") for p in places))
    return Listing(keys, names, {"train": train[0], "val": val[0]}, {"train": train[1], "val": val[1]})


def list_plain(root: Path) -> Listing:
    """Files and labels of ``train/<class>/`` + ``val/<class>/`` (the same class folders in both)."""
    keys = list_class_folders(root / "train")
    if not keys:
        raise ValueError(f"{root / 'train'} holds no class folders.")
    train = scan_class_folders(root, root / "train", keys)
    val = scan_class_folders(root, root / "val", keys)
    names = class_names(keys, root / "words.txt", root / "LOC_synset_mapping.txt")
    return Listing(keys, names, {"train": train[0], "val": val[0]}, {"train": train[1], "val": val[1]})


# --------------------------------------------------------------------------- loading
