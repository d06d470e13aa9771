"""ImageNet-style data for lab 03: ILSVRC, Tiny ImageNet or plain class folders — real when present,
else a synthetic stand-in written in the Tiny ImageNet layout.

The layouts (``ilsvrc``, ``tiny-imagenet``, ``plain``; ``layout="auto"`` finds which) and how each is listed
are in :mod:`labkit.data.imagenet_layouts`.

Images always come out as 3-channel uint8 (Tiny ImageNet mixes grayscale JPEGs in). Class names are
the first synonym in ``words.txt`` when there is one. Decoded images are cached; a real dataset folder
is never written into (its cache lives under ``<course>/data/.cache/``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from labkit.data.cache import cache_file, decode_files, file_stamps, load_images_cached, notice_box, read_json
from labkit.data.images import visible_entries
from labkit.data.imagenet_layouts import (  # noqa: F401  (the layout helpers are part of this module's API)
    DATA_CHOICES,
    GET_DATA,
    LAYOUTS,
    SUBSET_SIZE,
    Listing,
    class_names,
    find_imagenet_layout,
    ilsvrc_val_labels,
    list_ilsvrc,
    list_plain,
    list_tiny_imagenet,
    locate_imagenet,
)
from labkit.data.images import ImageData, ImageSplit, stratified_subset
from labkit.data.synth_tiny import MARKER, write_tiny_imagenet_standin
from labkit.env import resolve_path
from labkit.files import atomic_path


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
    if data == "synthetic" and visible_entries(root) and not marker:
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
