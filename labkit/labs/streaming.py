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
- :class:`WorkerMeter` — the training function's instrumentation behind one name: time spent waiting
  for data, the ids each worker saw (coverage across workers), one report per epoch with the last
  checkpoint, and the trainer-alone timing (GPU-synchronised).
- :func:`in_flight_bytes`, :func:`idle_seconds` — what the backpressure run plots and records.
- :func:`output_columns`, :func:`estimate_parquet_bytes`, :func:`write_parquet` — the three inference
  outputs the seed compared (predictions only / top-k / full probabilities), their size estimate and
  the bytes Parquet actually writes.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
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


# --------------------------------------------------------------------------- the worker's instrumentation
class WorkerMeter:
    """Everything the lab's training function measures, behind one name, so the function reads as its lesson.

    ``meter.batches(it)`` yields ``it``'s batches, timing the waits for data and keeping the ids;
    ``meter.add(loss, right)`` counts a step; ``meter.report(epoch, model, optimizer)`` gathers every
    worker's ids (coverage: rows missed or repeated across the whole epoch against ``n_train``), reports
    the epoch to Ray Train (with a checkpoint after the last) and prints one line on rank 0;
    ``meter.time_compute(step, model, optimizer)`` times training steps on a synthetic batch already on
    the device — the trainer alone — with ``torch.cuda.synchronize`` before every clock read (a GPU runs
    asynchronously) — and returns the history. Run inside a Ray Train worker.
    """

    def __init__(self, config: dict, device: torch.device) -> None:
        import ray.train

        from labkit.distributed import worker

        worker.quiet_ray_worker_logs()
        context = ray.train.get_context()
        self.rank, self.world, self.device, self.config = context.get_world_rank(), context.get_world_size(), device, config
        if device.type == "cpu":
            torch.set_num_threads(config["threads"])
        self.history: list[dict] = []

    def batches(self, iterator):
        """Yield ``iterator``'s batches; the time between a step's end and the next batch is waiting for data."""
        from labkit.timing import sync

        self.loss_sum, self.correct, self.images, self.wait_s, self.ids = 0.0, 0, 0, 0.0, []
        self.start = tick = time.perf_counter()
        for batch in iterator:
            self.wait_s += time.perf_counter() - tick
            self.ids.append(batch["id"].cpu())
            self.last = len(batch["label"])
            yield batch
            sync(self.device)
            tick = time.perf_counter()
        self.seconds = time.perf_counter() - self.start

    def add(self, loss: torch.Tensor, right: torch.Tensor) -> None:
        """Count one step: its mean loss and number of right answers."""
        self.loss_sum += float(loss) * self.last
        self.correct += int(right)
        self.images += self.last

    def _gather(self, value):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def report(self, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """One epoch's row (this worker's loss/accuracy, all workers' throughput and coverage), reported."""
        import ray.train

        from labkit.distributed import worker

        ids = torch.cat(self.ids) if self.ids else torch.empty(0, dtype=torch.long)
        parts = self._gather((ids.tolist(), self.seconds))
        all_ids = [i for part, _ in parts for i in part]
        unique, n_train = len(set(all_ids)), self.config["n_train"]
        row = {"epoch": epoch, "loss": self.loss_sum / max(self.images, 1), "acc": self.correct / max(self.images, 1),
               "images": len(all_ids), "seconds": self.seconds, "wait_s": self.wait_s,
               # all workers together: images of the epoch over the slowest worker's time
               "images_per_s": len(all_ids) / max(s for _, s in parts),
               "worker_images_per_s": self.images / self.seconds, "rows_seen": len(all_ids), "unique_ids": unique,
               "missed_rows": n_train - unique, "repeated_rows": len(all_ids) - unique,
               "shard_rows": len(ids), "shard_unique": int(ids.unique().numel()), "world_size": self.world}
        self.history.append(row)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0 and epoch == self.config["epochs"]:
                worker.save_checkpoint(folder, model, optimizer, epoch, self.history)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(row, checkpoint=checkpoint)
        if self.rank == 0:
            worker.say(f"epoch {epoch}/{self.config['epochs']}: loss {row['loss']:.3f}  acc {row['acc']:.3f}  "
                       f"{row['images_per_s']:.0f} img/s, waiting for data {self.wait_s:.1f} of {self.seconds:.1f} s")
        return row

    def time_compute(self, step, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Images/s of ``step(model, optimizer, x, y)`` alone, on a copy of the model (the trained weights
        stay as reported) and one synthetic uint8 batch on the device; returns the history with it."""
        from labkit.timing import sync

        c = self.config
        probe = copy.deepcopy(getattr(model, "module", model))
        probe_opt = type(optimizer)(probe.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                           if k in ("lr", "betas", "eps", "weight_decay")})
        channels = 1 if c["mode"] == "L" else 3
        x = torch.randint(0, 256, (c["batch_size"], channels, c["image_size"], c["image_size"]),
                          dtype=torch.uint8, device=self.device)
        y = torch.randint(0, c["num_classes"], (c["batch_size"],), device=self.device)
        for _ in range(2):
            step(probe, probe_opt, x, y)                                  # warm-up
        sync(self.device)                                                 # the GPU has finished the warm-up
        tick = time.perf_counter()
        for _ in range(c["n_batches"]):
            step(probe, probe_opt, x, y)
        sync(self.device)                                                 # ... and every timed step
        rate = c["n_batches"] * c["batch_size"] / (time.perf_counter() - tick)
        rates = self._gather(rate)
        for row in self.history:
            row["compute_images_per_s"] = float(np.mean(rates))          # one worker's compute
            row["compute_images_per_s_total"] = float(np.sum(rates))     # what all workers could consume
        return self.history


# --------------------------------------------------------------------------- backpressure
def in_flight_bytes(made_at: np.ndarray, made_bytes: np.ndarray, consumed_at: np.ndarray,
                    consumed_bytes: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Bytes made by the pipeline but not yet consumed, at each of ``times`` (all in one clock)."""
    made = np.array([made_bytes[made_at <= t].sum() for t in times], dtype=np.float64)
    used = np.array([consumed_bytes[consumed_at <= t].sum() for t in times], dtype=np.float64)
    return np.maximum(made - used, 0.0)


class Stamped:
    """Wrap a batch function: its output gains ``started_at`` and ``made_at`` (``time.time()`` when the
    call began and ended), so a plot can follow each block from its task to its consumer."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        out = self.fn(batch)
        n = len(next(iter(out.values()))) if out else 0
        return {**out, "started_at": np.full(n, start), "made_at": np.full(n, time.time())}


def idle_seconds(starts: np.ndarray, ends: np.ndarray) -> float:
    """Time between the first start and the last end during which no task ran (the gaps in the union
    of the ``[start, end]`` intervals): how long the operator stood paused."""
    if len(starts) == 0:
        return 0.0
    order = np.argsort(starts)
    idle, reach = 0.0, float(ends[order[0]])
    for i in order[1:]:
        if starts[i] > reach:
            idle += float(starts[i]) - reach
        reach = max(reach, float(ends[i]))
    return idle


def replace_folder(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the folder ``new`` (written in full) where ``final`` was, so a re-run never mixes old files in."""
    new, final = Path(new), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(final)
    return final


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the Parquet files in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.parquet"))


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
