"""Dataset-agnostic image containers and folder helpers.

Every dataset loader in labkit returns an :class:`ImageData`: decoded uint8 tensors in memory (one
:class:`ImageSplit` per split), the class names, where the files came from and whether they are a
synthetic stand-in. The helpers below scan class folders, take stratified subsets and unpack a zip
archive once.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from labkit.env import portable_path
from labkit.files import atomic_path


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``, source ``files``
    (relative to the dataset root)."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageData:
    """A loaded image dataset: splits of decoded images plus where they came from."""

    name: str
    root: Path
    layout: str
    synthetic: bool
    classes: list[str]
    splits: dict[str, ImageSplit]
    skipped: list[str] = field(default_factory=list)

    def __getitem__(self, split: str) -> ImageSplit:
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in {self.name}; have {sorted(self.splits)}")
        return self.splits[split]

    def class_counts(self) -> pd.DataFrame:
        """Images per class: one row per class, columns ``<split>`` (count) and ``<split> %``."""
        table = {}
        for split, part in self.splits.items():
            counts = np.bincount(part.labels.numpy(), minlength=len(self.classes))
            table[split] = counts
            table[f"{split} %"] = np.round(100.0 * counts / max(1, counts.sum()), 1)
        return pd.DataFrame(table, index=pd.Index(self.classes, name="class"))

    def describe(self) -> dict:
        """A JSON-ready summary for the run record (``RunRecord.data``)."""
        some = next(iter(self.splits.values()), None)
        shape = list(some.images.shape[1:]) if some is not None else None
        counts = {split: {c: int(n) for c, n in zip(self.classes, np.bincount(
            part.labels.numpy(), minlength=len(self.classes)))} for split, part in self.splits.items()}
        return {"name": self.name, "layout": self.layout, "root": portable_path(self.root), "synthetic": self.synthetic,
                "classes": list(self.classes), "counts": counts, "image_shape": shape,
                "skipped": list(self.skipped)}

    def loader(self, split: str, batch_size: int, shuffle: bool | None = None, seed: int = 0,
               sampler=None, drop_last: bool = False) -> DataLoader:
        """A ``DataLoader`` yielding ``(x uint8 [B,C,H,W], y int64 [B])`` from memory.

        ``shuffle`` defaults to ``split == "train"`` (seeded by ``seed``); pass a ``sampler`` (e.g. a
        ``DistributedSampler``) instead to control the order yourself. No worker processes are
        needed: the images are already decoded, augmentation runs on whole batches afterwards.
        """
        part = self[split]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: need an integer >= 1")
        if sampler is not None:
            shuffle = False
        elif shuffle is None:
            shuffle = split == "train"
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(TensorDataset(part.images, part.labels), batch_size=batch_size, shuffle=shuffle,
                          sampler=sampler, drop_last=drop_last, num_workers=0, generator=gen)


#: Names that are not data and are never reported: OS clutter and the ``__MACOSX/`` folder a zip
#: made on a Mac carries (resource forks, ``._name`` files). Hidden names (``.DS_Store``) are skipped too.
IGNORED_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}


def visible_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that are not hidden (labkit's cache folder among those left out), sorted; ``[]`` when
    it is not a folder. What an error message lists as "found"."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def list_class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir`` (hidden folders and ``__MACOSX`` left out)."""
    return sorted(p.name for p in split_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_NAMES)


def regular_files(folder: Path) -> list[str]:
    """Sorted visible regular files of ``folder``; broken or looping links and other non-files are
    skipped with a warning naming them (sub-folders silently: they are not images of this class)."""
    names = []
    for n in sorted(os.listdir(folder)):
        if n.startswith(".") or n in IGNORED_NAMES:
            continue
        path = folder / n
        if path.is_file():
            names.append(n)
        elif not path.is_dir():
            what = "a broken or looping symbolic link" if path.is_symlink() else "not a regular file"
            warnings.warn(f"skipped {path}: {what}", stacklevel=3)
    return names


def scan_class_folders(root: Path, split_dir: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Files below ``split_dir/<class>/`` (relative to ``root``) and their class indices.

    Every regular, non-hidden file is listed — non-images are found (and reported) when decoding.
    An empty or missing class folder is an error that names it.
    """
    files, labels = [], []
    for k, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"class folder {folder} is missing; {split_dir} holds "
                                    f"{list_class_folders(split_dir)}, expected {classes}")
        names = regular_files(folder)
        if not names:
            raise ValueError(f"class folder {folder} is empty: every class needs at least one image. "
                             f"Re-extract the dataset or delete {root} to start again.")
        files += [(folder / n).relative_to(root).as_posix() for n in names]
        labels += [k] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def stratified_subset(labels: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``max_n`` items (all when ``None`` or more than there are), class shares kept
    by largest remainder. Every class that has items keeps at least one, even if that means a few
    more than ``max_n``. The same ``seed`` picks the same items."""
    n = len(labels)
    if max_n is None or max_n >= n:
        return np.arange(n)
    if not isinstance(max_n, (int, np.integer)) or max_n < 1:
        raise ValueError(f"max_n={max_n!r}: need a whole number >= 1 (or None for all)")
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * max_n / n
    take = np.minimum(np.maximum(np.floor(share).astype(int), 1), counts)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    while take.sum() < max_n:                        # hand out the rest by largest remainder
        room = [i for i in order if take[i] < counts[i]]
        take[room[0]] += 1
        order = np.concatenate([order[order != room[0]], [room[0]]])
    while take.sum() > max_n and (take > 1).any():   # the minimum-one rule overshot: trim the largest
        take[np.argmax(take)] -= 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


#: Archives are refused when they would unpack to more than this many bytes (ILSVRC's zip: ~160 GB) ...
MAX_UNZIPPED_BYTES = 512 * 2**30
#: ... or hold a member (over 1 MiB unpacked) compressed more than this many times (images: ~1x; bombs: 1000x).
MAX_RATIO = 200


class UnsafeArchiveError(ValueError):
    """A zip member would land outside the target folder, is a link, or is absurdly large (a zip bomb)."""


def check_archive(zf: zipfile.ZipFile, archive: Path, dest: Path, max_bytes: int | None = None,
                  max_ratio: float | None = None) -> list[zipfile.ZipInfo]:
    """The members of ``zf`` to unpack (``__MACOSX/`` left out), after refusing the whole archive with
    :class:`UnsafeArchiveError` naming it and the member when one escapes ``dest`` (``../``, an
    absolute path, a drive letter), is a symbolic link, or the sizes look like a zip bomb."""
    max_bytes = MAX_UNZIPPED_BYTES if max_bytes is None else max_bytes
    max_ratio = MAX_RATIO if max_ratio is None else max_ratio
    members, total = [], 0
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if parts and parts[0] == "__MACOSX":
            continue
        why = None
        if stat.S_ISLNK(info.external_attr >> 16):
            why = "is a symbolic link (it could point anywhere on this machine)"
        elif name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            why = f"would be written outside {dest} (zip-slip)"
        elif info.file_size > 2**20 and info.file_size > max_ratio * max(info.compress_size, 1):
            why = (f"unpacks {info.compress_size:,} bytes into {info.file_size:,} (more than {max_ratio:g}x: a zip "
                   "bomb)")
        if why:
            raise UnsafeArchiveError(f"{archive}: member {name!r} {why}. Nothing was unpacked; use the "
                                     "dataset's original download.")
        total += info.file_size
        members.append(info)
    if total > max_bytes:
        raise UnsafeArchiveError(f"{archive} would unpack to {total / 2**30:.1f} GiB, over labkit's limit of "
                                 f"{max_bytes / 2**30:.1f} GiB (labkit.data.images.MAX_UNZIPPED_BYTES). Nothing "
                                 "was unpacked; unpack it yourself if you trust it.")
    free = shutil.disk_usage(next(p for p in (dest, *dest.parents) if p.exists())).free
    if total > free:
        raise OSError(errno.ENOSPC, f"{archive} unpacks to {total / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
                                    f"are free at {dest}; free some space. Nothing was unpacked")
    return members


def extract_zip_once(archive: Path, dest: Path | None = None, progress: bool = True) -> Path:
    """Unpack ``archive`` into ``dest`` (default: a folder named like the zip beside it) unless that
    folder already exists; the folder is written whole, then renamed, so it is never half-full.
    Unsafe archives (see :func:`check_archive`) and damaged members are refused naming the archive and
    member; ``__MACOSX/`` clutter is left out."""
    dest = dest or archive.with_suffix("")
    if dest.is_dir():
        return dest
    try:
        with zipfile.ZipFile(archive) as zf:
            members = check_archive(zf, archive, dest)
            with atomic_path(dest) as tmp:
                tmp.mkdir()
                if progress:
                    print(f"extracting {archive.name} into {dest} (once) ...")
                zf.extractall(tmp, members=members)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:   # a damaged member: zipfile's message names it
        raise ValueError(f"{archive} is not readable ({err}); download it again. Nothing was unpacked.") from err
    except OSError as err:
        if err.filename is None:    # already names the archive (ours, or atomic_path's disk-full message)
            raise
        raise OSError(err.errno, f"unpacking {archive} into {dest} failed at {err.filename}: {err.strerror}. "
                                 "Nothing was unpacked") from err
    return dest
