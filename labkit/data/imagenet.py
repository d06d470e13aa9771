"""ImageNet-style data for lab 03: ILSVRC, Tiny ImageNet or plain class folders — real when present,
else a synthetic stand-in written in the Tiny ImageNet layout.

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

Images always come out as 3-channel uint8 (Tiny ImageNet mixes grayscale JPEGs in). Class names are
the first synonym in ``words.txt`` when there is one. Decoded images are cached; a real dataset folder
is never written into (its cache lives under ``<course>/data/.cache/``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from labkit.data.cache import cache_file, decode_files, file_stamps, load_images_cached, notice_box, read_json
from labkit.files import atomic_path
from labkit.data.images import ImageData, ImageSplit, list_class_folders, regular_files, scan_class_folders, stratified_subset
from labkit.data.synth_tiny import MARKER, TINY_FOLDER, write_tiny_imagenet_standin
from labkit.env import resolve_path

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


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


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
    if not _entries(root):
        return None
    for name in LAYOUTS if layout == "auto" else (layout,):
        for folder in _candidates(root, name):
            if _matches(folder, name):
                return name, folder
    expected = {"ilsvrc": "[ILSVRC/]Data/CLS-LOC/train/<wnid>/",
                "tiny-imagenet": f"[{TINY_FOLDER}/]wnids.txt + train/<wnid>/images/",
                "plain": "train/<class>/ and val/<class>/"}
    wanted = "; ".join(v for k, v in expected.items() if layout in ("auto", k))
    raise FileNotFoundError(f"{root} holds {_entries(root)[:10]} — not the {layout if layout != 'auto' else 'an'} "
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
        raise FileNotFoundError(f"{what} folder {path} is missing; found {_entries(path.parent)[:10]} in "
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
def standin_notice(root: Path, num_classes: int) -> str:
    """The loud banner printed whenever the synthetic stand-in is used."""
    lines = ["SYNTHETIC DATA — NOT IMAGENET",
             "",
             f"This run uses a computer-generated stand-in with {num_classes} classes of",
             "shapes and textures, written in the Tiny ImageNet layout",
             "(no real ImageNet data was found, or data='synthetic'):",
             f"  {root}",
             "Accuracies on it are NOT comparable with Tiny ImageNet / ImageNet results",
             "(seed 002 reported ~67% top-1 on real Tiny ImageNet).",
             "",
             "To use real data, put tiny-imagenet-200 (or ILSVRC) into the data folder",
             "and load with data='real'."]
    return notice_box(lines)


def _decode(root: Path, files: list[str], image_size: int, tag: str, strict: bool,
            progress: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """3-channel uint8 images of ``files`` via labkit's cache (which never writes into a real dataset)."""
    return load_images_cached(root, files, image_size, "RGB", tag=tag, strict=strict, progress=progress)


def default_memory_budget() -> int:
    """Bytes of decoded images a load may keep in RAM: half the memory available right now."""
    import psutil

    return int(psutil.virtual_memory().available // 2)


def _decode_to_disk(root: Path, files: list[str], image_size: int, tag: str, strict: bool, progress: bool,
                    chunk: int = 2048) -> tuple[torch.Tensor, np.ndarray, list[str], Path]:
    """Decode ``files`` chunk by chunk into a raw uint8 file in labkit's cache folder and return the images
    **memory-mapped** from it (``torch.from_file``: pages are read from disk when a batch touches them, so
    a split larger than RAM works). Reused while the file list and every file's size and mtime match."""
    path = cache_file(root, files, image_size, "RGB", f"{tag}-mmap").with_suffix(".u8")
    meta_path = path.with_suffix(".json")
    stamp = hashlib.sha1(file_stamps(root, files).numpy().tobytes()).hexdigest()
    per_image = 3 * image_size * image_size
    meta = read_json(meta_path)  # None when missing or damaged (with a warning): decoded again
    if not (meta and meta.get("stamps") == stamp and path.is_file()
            and path.stat().st_size == len(meta["kept"]) * per_image):
        kept, skipped = [], []
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            for start in range(0, len(files), chunk):
                images, k, bad = decode_files(root, files[start:start + chunk], image_size, "RGB", strict,
                                              progress, desc=f"decoding {tag} to disk")
                fh.write(images.numpy().tobytes())
                kept += (k + start).tolist()
                skipped += bad
        meta = {"stamps": stamp, "kept": kept, "skipped": skipped, "image_size": image_size}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta))
    n = len(meta["kept"])
    images = (torch.from_file(str(path), shared=False, size=n * per_image, dtype=torch.uint8)
              .view(n, 3, image_size, image_size) if n else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8))
    return images, np.asarray(meta["kept"], dtype=np.int64), list(meta["skipped"]), path


def _standin_classes(root: Path) -> int | None:
    """The class count recorded in a stand-in's marker file."""
    for word in (root / MARKER).read_text().split():
        if word.startswith("num_classes="):
            return int(word.split("=", 1)[1])
    return None


def find_or_write_imagenet(data: str, root: Path, layout: str, standin_classes: int, progress: bool) -> tuple[str, Path, bool]:
    """(layout, dataset folder, synthetic) for the ``data`` choice; writes the stand-in when needed."""
    if data not in DATA_CHOICES:
        raise ValueError(f"data={data!r}: use one of {DATA_CHOICES}")
    marker = (root / MARKER).exists() or (root.parent / MARKER).exists()
    if data == "synthetic" and _entries(root) and not marker:
        root = root.parent / "synthetic" / root.name   # never mixes with (or writes into) real data
        marker = (root / MARKER).exists()
    if data == "real" and marker:
        raise FileNotFoundError(f"{root} holds a synthetic stand-in ({MARKER}), not real data. Delete that folder "
                                f"and put the real dataset there, or use data='auto'.")
    if marker and (root / MARKER).exists() and _standin_classes(root) != standin_classes:
        write_tiny_imagenet_standin(root, num_classes=standin_classes, progress=progress)  # ours: rewritten
    found = locate_imagenet(root, layout if not marker else "tiny-imagenet")
    if found is None:
        if data == "real":
            raise FileNotFoundError(f"no ImageNet data at {root}. {GET_DATA.format(root=root)}")
        if layout not in ("auto", "tiny-imagenet"):
            raise FileNotFoundError(f"no {layout} data at {root}, and the synthetic stand-in has the tiny-imagenet "
                                    f"layout: use layout='auto'. {GET_DATA.format(root=root)}")
        write_tiny_imagenet_standin(root, num_classes=standin_classes, progress=progress)
        found, marker = locate_imagenet(root, "tiny-imagenet"), True
    return found[0], found[1], marker


def _check_int(name: str, value, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"load_imagenet: {name}={value!r} must be an integer >= {low}"
                         + (" (or None)" if optional else "") + ".")


def load_imagenet(data: str = "auto", data_dir: str | os.PathLike = "data/tiny-imagenet", layout: str = "auto",
                  image_size: int = 64, subset: bool = False, subset_size: int | None = None,
                  max_train: int | None = None, max_val: int | None = None, standin_classes: int = 10,
                  seed: int = 0, strict: bool = False, progress: bool = True, test_size: int = 0,
                  memory_budget: int | float | None = None) -> ImageData:
    """Load ImageNet-style data as 3-channel uint8 tensors ``[N, 3, image_size, image_size]``.

    ``data``: ``"auto"`` (real data at ``data_dir`` if present, else a synthetic Tiny-ImageNet-layout
    stand-in with ``standin_classes`` classes, written there once), ``"real"`` (error when absent) or
    ``"synthetic"`` (the stand-in; kept in ``<parent>/synthetic/<name>`` when ``data_dir`` holds
    other data). ``layout``: ``"auto"`` or one of :data:`LAYOUTS`. ``subset``: train on a random
    subset of ``subset_size`` images (default 10,000, the seed's; class shares kept, fixed by
    ``seed``; ``subset_size`` is ignored without ``subset``); ``max_train``/``max_val`` cap the
    splits the same way (quick mode). Unreadable files are skipped with a warning naming them
    (``strict=True`` raises). Returns an :class:`ImageData` with splits ``"train"`` and ``"val"``,
    class names from ``words.txt`` when present (the wnids are in ``data.wnids``). The stand-in is
    always drawn with seed 0 (like a real dataset, it does not change with ``seed``).

    ``test_size`` > 0 holds that many training images out (class shares kept, fixed by ``seed``) as a
    ``"test"`` split that no choice (of a row, an epoch, a learning rate) may look at: Tiny ImageNet's
    and ILSVRC's own test images are unlabelled. ``memory_budget`` (bytes; default
    :func:`default_memory_budget`): a split whose decoded images need more is decoded once into a
    raw file in the cache folder and **memory-mapped** from there instead of held in RAM (a real
    ILSVRC train split at 224 px is ~193 GB); ``data.memory_mapped`` lists those splits' files.
    """
    _check_int("image_size", image_size, 8)
    _check_int("standin_classes", standin_classes, 2)
    _check_int("subset_size", subset_size, 1, optional=True)
    _check_int("max_train", max_train, 1, optional=True)
    _check_int("max_val", max_val, 1, optional=True)
    _check_int("test_size", test_size, 0)
    if memory_budget is None:
        memory_budget = default_memory_budget()
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget < 0:
        raise ValueError(f"load_imagenet: memory_budget={memory_budget!r} must be a number of bytes >= 0.")
    root = resolve_path(data_dir)
    layout, folder, synthetic = find_or_write_imagenet(data, root, layout, standin_classes, progress)
    if synthetic:
        print(standin_notice(folder, standin_classes))
    listing = {"ilsvrc": lambda: list_ilsvrc(folder, root), "tiny-imagenet": lambda: list_tiny_imagenet(folder),
               "plain": lambda: list_plain(folder)}[layout]()
    splits, skipped, mapped = {}, [], {}
    parts = {split: (listing.files[split], listing.labels[split], np.arange(len(listing.files[split])))
             for split in ("train", "val")}
    if test_size:
        files, labels, _ = parts["train"]
        if test_size >= len(files):
            raise ValueError(f"load_imagenet: test_size={test_size} leaves no training images ({len(files)} in all).")
        held = stratified_subset(labels, test_size, seed)
        rest = np.setdiff1d(np.arange(len(files)), held)
        parts["test"] = (files, labels, held)
        parts["train"] = (files, labels, rest)
    for split, cap in (("train", max_train), ("val", max_val), ("test", None)):
        if split not in parts:
            continue
        files, labels, keep = parts[split]
        if split == "train" and subset:
            keep = keep[stratified_subset(labels[keep], subset_size or SUBSET_SIZE, seed)]
        keep = keep[stratified_subset(labels[keep], cap, seed)]
        files, labels = [files[i] for i in keep], labels[keep]
        if len(files) * 3 * image_size * image_size > memory_budget:
            images, kept, bad, mapped[split] = _decode_to_disk(folder, files, image_size, f"{layout}-{split}",
                                                               strict, progress)
        else:
            images, kept, bad = _decode(folder, files, image_size, f"{layout}-{split}", strict, progress)
        splits[split] = ImageSplit(images, torch.from_numpy(labels[kept]), [files[i] for i in kept])
        skipped += bad
    name = {"ilsvrc": "imagenet", "tiny-imagenet": "tiny-imagenet"}.get(layout, folder.name)
    out = ImageData(name=name, root=folder, layout=layout, synthetic=synthetic, classes=listing.names,
                    splits=splits, skipped=skipped)
    out.wnids = listing.keys
    out.memory_mapped = mapped
    return out


__all__ = ["LAYOUTS", "default_memory_budget", "find_imagenet_layout", "locate_imagenet", "load_imagenet", "list_ilsvrc",
           "list_tiny_imagenet", "list_plain", "ilsvrc_val_labels", "class_names", "standin_notice"]
