"""Lab 06's plumbing: image files → rows for Ray Data, one decode + augment batch function, output sizes.

The lesson (the Ray Data pipeline, the Ray Train worker function, the inference actor) is written in
``labs/06_streaming_data.ipynb``; this module keeps what the lab, its benchmark and its tests repeat:

- :func:`list_image_files` — the files of a labkit layout (Alzheimer, lung, Tiny ImageNet) as rows
  ``{"id", "path", "label"}`` (the label comes from the class folder), with the stand-in written when
  the real data is absent, exactly as the other labs find it.
- :class:`DecodeAugment` — the batch function Ray Data's ``map_batches`` and the DataLoader path both
  run: decode each file (PIL), resize, and (for training) flip/rotate — uint8 out, normalised on the
  trainer's device. Each row's flip/rotation comes from its ``draw`` column when there is one (a seeded
  ``ray.data.expressions.random``), so ``seed`` fixes the augmentation whichever task decodes the row.
  A file that does not decode is dropped with a warning naming it (``strict=True``: a
  :class:`~labkit.data.cache.UnreadableImageError` naming it instead).
- :mod:`labkit.labs.streaming.meter` — :class:`WorkerMeter`, the training function's instrumentation behind
  one name (waits for data, coverage across workers, reports, the GPU-synchronised trainer-alone timing),
  and what the backpressure run and the inference folders need.
- :func:`output_columns`, :func:`estimate_parquet_bytes`, :func:`write_parquet` — the three inference
  outputs the seed compared (predictions only / top-k / full probabilities), their size estimate and
  the bytes Parquet actually writes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit.data import alzheimer, imagenet, lung
from labkit.data.augment import BatchAugment
from labkit.data.cache import UnreadableImageError, decode_image, notice_box
from labkit.data.images import scan_class_folders, stratified_subset
from labkit.env import portable_path, resolve_path
from labkit.files import atomic_path
from labkit.labs.streaming.meter import Stamped, WorkerMeter, folder_bytes, idle_seconds, in_flight_bytes, replace_folder

#: ``data`` layouts Lab 06 reads, with their default folders.
LAYOUTS = {"alzheimer": "data/alzheimer", "lung": "data/lung", "tiny-imagenet": "data/tiny-imagenet"}
#: Bytes of each column type in Parquet's PLAIN encoding (what :func:`write_parquet` writes).
PLAIN_BYTES = {"int64": 8, "int32": 4, "int16": 4, "float32": 4, "float64": 8, "bool": 1 / 8}
#: Parquet's fixed costs without compression, dictionary or statistics (pyarrow, measured once and
#: checked by tests/labs/test_streaming.py): per file (magic, footer, schema) and per column (column chunk
#: metadata, page header, the column's name in the schema and metadata).
PARQUET_FILE_BYTES = 100
PARQUET_COLUMN_BYTES = 90


# --------------------------------------------------------------------------- files → rows
@dataclass
class FileListing:
    """The image files of one dataset: per split, absolute ``paths`` and class indices ``labels``."""

    layout: str
    root: Path
    synthetic: bool
    classes: list[str]
    mode: str                                  # PIL mode the files decode to: "L" or "RGB"
    splits: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)

    def items(self, split: str, shuffle_seed: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{"id", "path", "label"}`` of ``split`` for ``ray.data.from_items``; ``id`` is the
        file's index in the split (stable), ``shuffle_seed`` mixes the classes (the files are listed
        class by class)."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in the {self.layout} listing; have {sorted(self.splits)}")
        paths, labels = self.splits[split]
        order = np.arange(len(paths))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(paths))
        return [{"id": int(i), "path": paths[i], "label": int(labels[i])} for i in order]

    def class_counts(self):
        """Files per class and split (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame({s: np.bincount(y, minlength=len(self.classes)) for s, (_, y) in self.splits.items()},
                            index=pd.Index(self.classes, name="class"))

    def describe(self) -> dict:
        """A JSON-ready summary for the run record."""
        return {"name": self.layout, "layout": self.layout, "root": portable_path(self.root), "synthetic": self.synthetic,
                "classes": list(self.classes), "mode": self.mode,
                "counts": {s: {c: int(n) for c, n in zip(self.classes, np.bincount(y, minlength=len(self.classes)))}
                           for s, (_, y) in self.splits.items()}}


def _alzheimer(data: str, root: Path, progress: bool) -> tuple[Path, Path, bool, dict[str, str]]:
    _, root, split_root, synthetic = alzheimer.locate_alzheimer(data, root, progress)
    if synthetic and progress:
        print(alzheimer.synthetic_notice(root))
    return root, split_root, synthetic, {"train": "train", "test": "test"}


def list_image_files(layout: str = "alzheimer", data: str = "auto", data_dir: str | os.PathLike | None = None,
                     max_train: int | None = None, max_test: int | None = None, seed: int = 0,
                     progress: bool = True, max_val: int | None = None) -> FileListing:
    """The image files of ``layout`` (``"alzheimer"``, ``"lung"`` or ``"tiny-imagenet"``) at ``data_dir``.

    Splits ``"train"`` and ``"test"``: the held-out files nothing is tuned on (Alzheimer: its ``test``
    folder; lung and Tiny ImageNet: their ``val`` folder, which this lab only scores), capped to
    stratified subsets of ``max_train`` / ``max_test`` files fixed by ``seed`` (``max_val``: the old
    name of ``max_test``).
    ``data="auto"`` writes the synthetic stand-in when the real data is absent and prints its notice.
    Nothing is decoded here: that is the pipeline's job.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"data layout {layout!r}: use one of {sorted(LAYOUTS)}.")
    root = resolve_path(data_dir or LAYOUTS[layout])
    if layout == "alzheimer":
        root, split_root, synthetic, names = _alzheimer(data, root, progress)
        classes, mode = sorted(alzheimer.CLASSES), "L"
        listed = {s: scan_class_folders(root, split_root / folder, classes) for s, folder in names.items()}
    elif layout == "lung":
        root, synthetic = lung.find_lung(data, root, seed=seed, progress=progress)
        if synthetic and progress:
            print(notice_box([line.format(root=root) for line in lung.NOTICE_LINES]))
        classes, mode = list(lung.CLASSES), "L"
        listed = {"train": scan_class_folders(root, root / "train", classes),
                  "test": scan_class_folders(root, root / "val", classes)}
    else:
        found, folder, synthetic = imagenet.find_or_write_imagenet(data, root, "auto", 10, progress)
        listing = {"ilsvrc": lambda: imagenet.list_ilsvrc(folder, root),
                   "tiny-imagenet": lambda: imagenet.list_tiny_imagenet(folder),
                   "plain": lambda: imagenet.list_plain(folder)}[found]()
        if synthetic and progress:
            print(imagenet.standin_notice(folder, len(listing.keys)))
        root, classes, mode = folder, list(listing.names), "RGB"
        listed = {"train": (listing.files["train"], listing.labels["train"]),
                  "test": (listing.files["val"], listing.labels["val"])}
    splits = {}
    max_test = max_val if max_test is None else max_test
    for split, cap in (("train", max_train), ("test", max_test)):
        files, labels = listed[split]
        keep = stratified_subset(labels, cap, seed)
        splits[split] = ([str(root / files[i]) for i in keep], np.asarray(labels)[keep].astype(np.int64))
    return FileListing(layout=layout, root=root, synthetic=synthetic, classes=classes, mode=mode, splits=splits)


# --------------------------------------------------------------------------- decode + augment
def decode_paths(paths: list[str], image_size: int, mode: str = "L", strict: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` into uint8 ``[K, C, S, S]``; returns ``(images, kept indices)``.

    A file that is not a readable image is left out with a warning naming it, or raises
    :class:`UnreadableImageError` naming it when ``strict`` — never a silent gap, never a hang."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    kept = []
    for i, path in enumerate(paths):
        try:
            out[len(kept)] = decode_image(path, image_size, mode)
        except (OSError, ValueError, SyntaxError) as err:
            if strict:
                raise UnreadableImageError(f"{path} is not a readable image ({err}). Remove or replace the file, "
                                           "or run with strict=False to skip it with a warning.") from None
            warnings.warn(f"skipped {path}: not a readable image ({err})", stacklevel=2)
            continue
        kept.append(i)
    return out[: len(kept)], np.asarray(kept, dtype=np.int64)


class DecodeAugment:
    """The batch function of the pipeline: ``{"id", "path", "label"}`` columns → ``{"image" uint8
    [B,C,S,S], "label", "id"}``, augmented (random flip + rotation up to ``degrees``) when ``train``.

    One object serves both paths: the lab passes an instance to ``map_batches``, which Ray Data ships
    to stateless **tasks** (a callable object, not a class: no actor pool) and calls per batch; the
    DataLoader path uses :meth:`collate`. With a ``draw`` column (floats in [0, 1), one per row) each
    row's flip/rotation is ``draw`` × the number of choices, so a seeded draw fixes the augmentation
    whichever task or process decodes the row; without one, ``seed`` seeds this object's generator.
    """

    def __init__(self, image_size: int, mode: str = "L", train: bool = False, degrees: float = 10.0,
                 seed: int | None = None, strict: bool = False, keep_path: bool = False) -> None:
        self.image_size, self.mode, self.train, self.strict, self.keep_path = image_size, mode, train, strict, keep_path
        self.augment = BatchAugment(train=True, degrees=degrees, seed=seed, cpu_threads=1) if train else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, kept = decode_paths(list(batch["path"]), self.image_size, self.mode, self.strict)
        if self.augment is not None and len(kept) and "draw" in batch:
            images = self.flip_rotate_drawn(images, np.asarray(batch["draw"], dtype=np.float64)[kept])
        elif self.augment is not None and len(kept):
            images = self.augment.flip_rotate(torch.from_numpy(images)).numpy()
        out = {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)[kept],
               "id": np.asarray(batch["id"], dtype=np.int64)[kept]}
        if self.keep_path:
            out["path"] = np.asarray(batch["path"])[kept]
        return out

    def flip_rotate_drawn(self, images: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """Flip/rotate each image by the choice its ``draw`` (in [0, 1)) picks among the augmenter's maps."""
        b, c, h, w = images.shape
        maps = self.augment.index_maps(h, w, torch.device("cpu"))
        choice = torch.from_numpy(np.minimum((draw * len(maps)).astype(np.int64), len(maps) - 1))
        flat = torch.cat([torch.from_numpy(images).reshape(b, c, h * w), torch.zeros(b, c, 1, dtype=torch.uint8)], 2)
        return torch.gather(flat, 2, maps[choice].unsqueeze(1).expand(b, c, h * w)).view(b, c, h, w).numpy()

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``collate_fn`` for a ``DataLoader`` over :meth:`FileListing.items`: the same work, as tensors."""
        out = self({k: np.asarray([r[k] for r in rows]) for k in ("id", "path", "label")})
        return {k: torch.from_numpy(v) for k, v in out.items() if k != "path"}


# --------------------------------------------------------------------------- inference outputs
def output_columns(kind: str, num_classes: int, top_k: int) -> dict[str, str]:
    """Columns (name → type) of one inference output: ``"predictions"`` (class + confidence),
    ``"top_k"`` (k classes + k probabilities) or ``"probabilities"`` (all classes)."""
    base = {"id": "int64"}
    if kind == "predictions":
        return {**base, "prediction": "int16", "confidence": "float32"}
    if kind == "top_k":
        return {**base, **{f"class_{j}": "int16" for j in range(top_k)}, **{f"prob_{j}": "float32" for j in range(top_k)}}
    if kind == "probabilities":
        return {**base, **{f"p_{c}": "float32" for c in range(num_classes)}}
    raise ValueError(f"kind={kind!r}: use 'predictions', 'top_k' or 'probabilities'.")


def payload_bytes(rows: int, columns: dict[str, str]) -> float:
    """Bytes of the values alone: ``rows`` × the PLAIN size of every column."""
    return rows * sum(PLAIN_BYTES[t] for t in columns.values())


def estimate_parquet_bytes(rows: int, columns: dict[str, str]) -> float:
    """Estimated size of an uncompressed Parquet file (:func:`write_parquet`): the values plus the
    format's fixed costs per column and per file."""
    return payload_bytes(rows, columns) + PARQUET_COLUMN_BYTES * len(columns) + PARQUET_FILE_BYTES


def output_table(kind: str, ids: np.ndarray, probs: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """The columns of :func:`output_columns` filled from ``probs`` ``[N, C]`` (sorted top-k by ``np.argsort``)."""
    cols = output_columns(kind, probs.shape[1], top_k)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    values: dict[str, np.ndarray] = {"id": np.asarray(ids, dtype=np.int64)}
    if kind == "predictions":
        values.update(prediction=order[:, 0], confidence=np.take_along_axis(probs, order[:, :1], 1)[:, 0])
    elif kind == "top_k":
        top = np.take_along_axis(probs, order, 1)
        values.update({f"class_{j}": order[:, j] for j in range(top_k)})
        values.update({f"prob_{j}": top[:, j] for j in range(top_k)})
    else:
        values.update({f"p_{c}": probs[:, c] for c in range(probs.shape[1])})
    return {name: np.asarray(values[name]).astype(t) for name, t in cols.items()}


def write_parquet(path: str | os.PathLike, columns: dict[str, Any], compression: str | None = None) -> int:
    """Write ``columns`` (name → array or list) as one Parquet file, atomically; returns its bytes.

    Default: no compression, no dictionary, no statistics — so the size is what
    :func:`estimate_parquet_bytes` predicts. Pass ``compression="zstd"`` for a file to keep."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: (pa.array(v) if not isinstance(v, pa.Array) else v) for k, v in columns.items()})
    plain = compression is None
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression or "none", use_dictionary=not plain,
                       write_statistics=not plain, store_schema=not plain)
    return Path(path).stat().st_size


__all__ = ["DecodeAugment", "FileListing", "LAYOUTS", "WorkerMeter", "decode_paths", "estimate_parquet_bytes",
           "folder_bytes", "idle_seconds", "in_flight_bytes", "list_image_files", "output_columns", "output_table",
           "payload_bytes", "replace_folder", "Stamped", "write_parquet", "UnreadableImageError"]
