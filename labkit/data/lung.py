"""The 9-class lung set of seed 004 (chest X-ray + OCT): its folder layout, checks and loader.

Layout (``DATA_PATH`` or ``data_dir`` points at the root)::

    <root>/train/<class>/*.png|*.jpg      # the nine class folders of CLASSES in each split
    <root>/val/<class>/...
    <root>/test/<class>/...

The files have mixed sizes, modes (grayscale and RGB) and formats (PNG, JPEG); the loader decodes
each file once (``labkit.data.cache``), converts it to grayscale (the X-rays and OCT scans are
gray even when saved as RGB) and resizes it to ``image_size × image_size``. When the data is absent (``data="auto"``), a synthetic
stand-in is written in this layout (:mod:`labkit.data.synth_lung`) and a loud notice is printed.
A root that lacks a split or a class folder is an error that names what is missing.
"""
from __future__ import annotations

import itertools
import os
import re
import warnings
from pathlib import Path

import torch

from labkit.data.cache import load_images_cached, notice_box
from labkit.data.images import ImageData, ImageSplit, scan_class_folders, stratified_subset
from labkit.data.synth_lung import CLASSES, MARKER, SPLITS, write_lung_standin
from labkit.env import resolve_path

DEFAULT_DIR = "data/lung"
DATA_CHOICES = ("auto", "real", "synthetic")

#: The loud notice printed when the stand-in is used (``{root}`` filled in).
NOTICE_LINES = ["SYNTHETIC STAND-IN DATA — THESE ARE NOT MEDICAL IMAGES", "",
                "The lung set (train/ val/ test/ with 9 class folders) was not found, so labkit",
                "uses generated look-alike chest X-rays and OCT scans in the same layout:",
                "  {root}",
                "Accuracies on them are NOT medical results.", "",
                "For the real data: set DATA_PATH (or data_dir) to the dataset's root."]


#: File names that carry a patient id: OCT2017's ``CNV-1016042-1.jpeg`` and the pediatric
#: pneumonia X-rays' ``person1_bacteria_1.jpeg``. Other sources (and the stand-in) carry none.
PATIENT_PATTERNS = (re.compile(r"^(?:CNV|DME|DRUSEN|NORMAL)-(\d+)-\d+\.jpe?g$", re.IGNORECASE),
                    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+\.jpe?g$", re.IGNORECASE))


def patient_id(path: str | os.PathLike) -> str | None:
    """The patient id a lung file name carries, or ``None`` when its name has none."""
    name = Path(path).name
    for pattern in PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def shared_patients(files_by_split: dict[str, list[str]]) -> dict[tuple[str, str], set[str]]:
    """For each pair of splits, the patient ids found in both (pairs with none are left out).

    Images of one patient on both sides of a split let a model score by recognising the patient,
    not the disease; Yagis et al. (Sci Rep 2021) measured up to ~30 points of such inflation."""
    ids = {split: {p for p in map(patient_id, files) if p} for split, files in files_by_split.items()}
    overlap = {(a, b): ids[a] & ids[b] for a, b in itertools.combinations(ids, 2)}
    return {pair: shared for pair, shared in overlap.items() if shared}


def warn_shared_patients(files_by_split: dict[str, list[str]], root: Path) -> dict[tuple[str, str], set[str]]:
    """Warn, with the count and a few ids, when splits share patients; returns :func:`shared_patients`."""
    overlap = shared_patients(files_by_split)
    for (a, b), shared in overlap.items():
        examples = ", ".join(sorted(shared)[:5])
        warnings.warn(f"lung data at {root}: {len(shared)} patient(s) have images in both '{a}' and '{b}' "
                      f"(e.g. {examples}); scores on '{b}' are inflated by recognising patients. Re-split by "
                      f"patient id (the number in CNV-<id>-N.jpeg / person<id>_...) for an honest estimate.",
                      stacklevel=3)
    return overlap


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$DATA_PATH`` (seed 004's variable), else ``data/lung``; relative paths
    resolve against the course folder."""
    return resolve_path(data_dir or os.environ.get("DATA_PATH") or DEFAULT_DIR)


def check_layout(root: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError`` naming the missing split or class folders of ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"lung data folder {root} does not exist; point DATA_PATH or data_dir at the root "
                                f"that holds {'/, '.join(SPLITS)}/ (or use data='auto' for a synthetic stand-in).")
    missing_splits = [s for s in SPLITS if not (root / s).is_dir()]
    if missing_splits:
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(
            f"lung data at {root}: split folder(s) {missing_splits} missing (found {have}); the layout is "
            f"{root}/{{train,val,test}}/<class>/ with the classes {list(CLASSES)}.")
    for split in SPLITS:
        missing = [c for c in CLASSES if not (root / split / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"lung data at {root}: split '{split}' lacks the class folder(s) {missing}; every split needs "
                f"all 9 classes: {list(CLASSES)}.")


def _is_empty(root: Path) -> bool:
    """True when ``root`` is missing or holds nothing visible (labkit's cache folder left out)."""
    return not root.is_dir() or not any(not p.name.startswith(".") for p in root.iterdir())


def find_lung(data: str = "auto", data_dir: str | os.PathLike | None = None, seed: int = 0,
              progress: bool = True) -> tuple[Path, bool]:
    """``(dataset root, synthetic?)`` for the ``data`` choice, the layout checked.

    ``"auto"``: the data at the root, or a stand-in written there when the root is missing or empty;
    ``"real"``: an error unless real data is there; ``"synthetic"``: the stand-in (kept in
    ``<parent>/synthetic/<name>`` when the root holds other data, so real files are never touched).
    """
    if data not in DATA_CHOICES:
        raise ValueError(f"data={data!r}: use one of {DATA_CHOICES}.")
    root = data_root(data_dir)
    if data == "synthetic" and not (root / MARKER).exists() and not _is_empty(root):
        root = root.parent / "synthetic" / root.name
    synthetic = (root / MARKER).exists()
    if data == "real" and (synthetic or _is_empty(root)):
        what = "a synthetic stand-in" if synthetic else "nothing"
        raise FileNotFoundError(f"data='real' but {root} holds {what}; set DATA_PATH or data_dir to the lung "
                                f"dataset's root (train/ val/ test/ with 9 class folders each), or use data='auto'.")
    if not synthetic and _is_empty(root):
        write_lung_standin(root, seed=seed, progress=progress)
        synthetic = True
    check_layout(root)
    return root, synthetic


def load_lung(data: str = "auto", data_dir: str | os.PathLike | None = None, image_size: int = 128,
              max_train: int | None = None, max_test: int | None = None, seed: int = 0, strict: bool = False,
              progress: bool = True) -> ImageData:
    """Load the lung set as an :class:`~labkit.data.images.ImageData`: splits ``train``/``val``/``test``
    of grayscale uint8 images ``[N, 1, image_size, image_size]`` (RGB files are converted; the
    labs' ``batch_transform`` repeats the channel for 3-channel models).

    ``max_train`` caps the training split, ``max_test`` the validation and test splits (stratified
    subsets fixed by ``seed``, taken before decoding). Decoded images are cached; unreadable files
    are skipped with a warning (listed in ``skipped``) unless ``strict``. With ``progress`` (the
    default) a synthetic stand-in is announced with a loud notice; Ray workers pass ``False``.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size={image_size!r}: need an integer >= 8.")
    root, synthetic = find_lung(data, data_dir, seed=seed, progress=progress)
    if synthetic and progress:
        print(notice_box([line.format(root=root) for line in NOTICE_LINES]))
    classes = list(CLASSES)
    splits, skipped = {}, []
    listed = {split: scan_class_folders(root, root / split, classes) for split in SPLITS}
    if not synthetic:
        warn_shared_patients({split: files for split, (files, _) in listed.items()}, root)
    for split in SPLITS:
        files, labels = listed[split]
        keep = stratified_subset(labels, max_train if split == "train" else max_test, seed)
        files, labels = [files[i] for i in keep], labels[keep]
        images, kept, bad = load_images_cached(root, files, image_size, "L", tag=f"lung-{split}", strict=strict,
                                               progress=progress)
        splits[split] = ImageSplit(images, torch.from_numpy(labels[kept]), [files[i] for i in kept])
        skipped += bad
    return ImageData(name="lung", root=root, layout="train-val-test", synthetic=synthetic, classes=classes,
                     splits=splits, skipped=skipped)
