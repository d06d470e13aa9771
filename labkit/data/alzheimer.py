"""The Kaggle "Alzheimer's Dataset (4 class of images)" — real when present, else a stand-in.

Accepted layouts at ``data_dir`` (the seed project used the first):

* ``kaggle``: ``<data_dir>/Alzheimer_s Dataset/{train,test}/<class>/*.jpg``
* ``plain``:  ``<data_dir>/{train,test}/<class>/*.jpg``
* ``zip``:    ``<data_dir>/*.zip`` holding either layout; unpacked once into ``<data_dir>/<zip name>/``.

``data="auto"`` uses the real files when they are there and otherwise writes a synthetic stand-in
(see :mod:`labkit.data.synth_mri`) into ``data_dir`` once, with a loud notice.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from labkit.data.cache import load_images_cached, notice_box
from labkit.data.images import (ImageData, ImageSplit, extract_zip_once, list_class_folders, scan_class_folders,
                                stratified_subset, visible_entries)
from labkit.data.synth_mri import KAGGLE_FOLDER, MARKER, write_alzheimer_standin
from labkit.env import resolve_path

CLASSES = ("MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented")
SPLITS = ("train", "test")
DATA_CHOICES = ("auto", "real", "synthetic")
GET_DATA = ('Download the Kaggle "Alzheimer\'s Dataset (4 class of images)" and put its zip (or the extracted '
            '"Alzheimer_s Dataset" folder) into {root}; or run `labkit data synth` / use data="auto" to work '
            "with a synthetic stand-in.")


def synthetic_notice(root: Path) -> str:
    lines = ["SYNTHETIC DATA — THESE ARE NOT MEDICAL IMAGES",
             "",
             "This run uses computer-generated look-alike brain slices",
             "(the real Alzheimer MRI dataset was not found, or data='synthetic'):",
             f"  {root}",
             "Accuracies, confusion matrices and every other number computed",
             "on them are NOT medical results.",
             "",
             'To use the real data, put the Kaggle "Alzheimer\'s Dataset',
             '(4 class of images)" into the data folder and load with data="real".']
    return notice_box(lines)


def _split_root(folder: Path, depth: int = 2) -> Path | None:
    """The folder holding ``train/`` and ``test/``: ``folder`` itself, its Kaggle sub-folder, or
    (for archives) the same one or two wrapping folders down."""
    if all((folder / s).is_dir() for s in SPLITS):
        return folder
    kaggle = sorted(folder.glob("Alzheimer*Dataset"))
    if kaggle and all((kaggle[0] / s).is_dir() for s in SPLITS):
        return kaggle[0]
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if depth > 0 and len(subdirs) == 1:
        return _split_root(subdirs[0], depth - 1)
    return None


def find_alzheimer_layout(root: Path, progress: bool = True) -> tuple[str, Path] | None:
    """``(layout, folder with train/ and test/)`` for the data at ``root``, or ``None`` when
    ``root`` is missing or empty. A zip archive is unpacked (once). Anything else at ``root`` is
    an error that lists what was found."""
    root = Path(root)
    found = visible_entries(root)
    if not found:
        return None
    kaggle = sorted(root.glob("Alzheimer*Dataset"))
    if kaggle and kaggle[0].is_dir():
        split_root = _split_root(kaggle[0], depth=0)
        if split_root is None:
            raise FileNotFoundError(f"{kaggle[0]} should hold train/ and test/ folders; found "
                                    f"{visible_entries(kaggle[0])}. Re-extract the dataset.")
        return "kaggle", split_root
    if all((root / s).is_dir() for s in SPLITS):
        return "plain", root
    archives = sorted(root.glob("*.zip"))
    if archives:
        if (root / MARKER).exists():
            raise FileExistsError(f"{root} holds a synthetic stand-in ({MARKER}) and the archive {archives[0].name}."
                                  f" Delete everything else in {root} (keep the zip) to use the real data.")
        folder = extract_zip_once(archives[0], progress=progress)
        split_root = _split_root(folder)
        if split_root is None:
            raise FileNotFoundError(f"{archives[0]} does not hold the Alzheimer dataset layout: unpacked into {folder}"
                                    f", found {visible_entries(folder)}; expected 'Alzheimer_s Dataset/' or train/ and test/.")
        return "zip", split_root
    raise FileNotFoundError(f"{root} holds {found} — not a known Alzheimer dataset layout. Expected "
                            f"'{KAGGLE_FOLDER}/{{train,test}}/<class>/', '{{train,test}}/<class>/' or the dataset's "
                            f".zip. {GET_DATA.format(root=root)}")


def locate_alzheimer(data: str, root: Path, progress: bool) -> tuple[str, Path, Path, bool]:
    """(layout, data root, folder with train/test, synthetic) for the ``data`` choice."""
    if data not in DATA_CHOICES:
        raise ValueError(f"data={data!r}: use one of {DATA_CHOICES}")
    if data == "synthetic" and not (root / MARKER).exists():
        root = root.parent / "synthetic" / root.name   # never mixes with (or writes into) real data
    found = find_alzheimer_layout(root, progress)
    synthetic = (root / MARKER).exists()
    if data == "real":
        if found is None:
            raise FileNotFoundError(f"no Alzheimer dataset at {root}. {GET_DATA.format(root=root)}")
        if synthetic:
            raise FileNotFoundError(f"{root} holds a synthetic stand-in ({MARKER}), not the real data. Delete "
                                    f"that folder and put the real dataset there, or use data='auto'.")
    if data == "synthetic" and found is not None and not synthetic:
        raise FileExistsError(f"{root} holds data without the {MARKER} marker; data='synthetic' will not use or "
                              f"overwrite it. Move it away or pass another data_dir.")
    if found is None:
        write_alzheimer_standin(root, progress=progress)
        found, synthetic = find_alzheimer_layout(root, progress), True
    layout, split_root = found
    return layout, root, split_root, synthetic


def load_alzheimer(data: str = "auto", data_dir: str | os.PathLike = "data/alzheimer", image_size: int = 128,
                   max_train: int | None = None, max_test: int | None = None, seed: int = 0,
                   strict: bool = False, progress: bool = True) -> ImageData:
    """Load the Alzheimer MRI dataset as grayscale uint8 tensors ``[N, 1, image_size, image_size]``.

    ``data``: ``"auto"`` (real if present, else the synthetic stand-in, written once into
    ``data_dir``), ``"real"`` (error when absent) or ``"synthetic"`` (the stand-in; kept in
    ``<parent>/synthetic/<name>`` when ``data_dir`` is not itself a stand-in). ``max_train`` /
    ``max_test`` take a stratified subset fixed by ``seed`` (quick mode). Decoded images are cached;
    unreadable files are skipped with a warning (``strict=True`` raises instead).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size={image_size!r}: need an integer >= 8")
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r}: need an integer >= 1, or None for all images")
    root = resolve_path(data_dir)
    layout, root, split_root, synthetic = locate_alzheimer(data, root, progress)
    if synthetic:
        print(synthetic_notice(root))

    classes = list_class_folders(split_root / "train")
    if classes != sorted(CLASSES):
        raise ValueError(f"{split_root / 'train'} holds class folders {classes}; expected {sorted(CLASSES)}. "
                         f"Re-extract the dataset into {root}.")
    splits, skipped = {}, []
    for split, max_n in (("train", max_train), ("test", max_test)):
        files, labels = scan_class_folders(root, split_root / split, classes)
        keep = stratified_subset(labels, max_n, seed)
        files, labels = [files[i] for i in keep], labels[keep]
        images, kept, bad = load_images_cached(root, files, image_size, "L", tag=f"alzheimer-{split}",
                                               strict=strict, progress=progress)
        splits[split] = ImageSplit(images, torch.from_numpy(labels[kept]), [files[i] for i in kept])
        skipped += bad
    return ImageData(name="alzheimer", root=root, layout=layout, synthetic=synthetic, classes=classes,
                     splits=splits, skipped=skipped)


def alzheimer_present(data_dir: str | os.PathLike = "data/alzheimer") -> bool:
    """True when real (not synthetic) Alzheimer data sits at ``data_dir`` (nothing is unpacked)."""
    root = resolve_path(data_dir)
    if (root / MARKER).exists() or not root.is_dir():
        return False
    return any(root.glob("Alzheimer*Dataset")) or all((root / s).is_dir() for s in SPLITS) or any(root.glob("*.zip"))


__all__ = ["CLASSES", "load_alzheimer", "find_alzheimer_layout", "alzheimer_present"]
