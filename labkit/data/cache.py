"""Decode image files once and keep them as a uint8 tensor file.

The seed project decoded every JPEG with PIL in every epoch. Here each image is decoded and resized
once; the result is saved with ``torch.save`` (a dict of tensors and lists, read back with
``torch.load(weights_only=True)``) under ``<stand-in root>/.labkit_cache/`` for a stand-in labkit
wrote, else (a real dataset folder is never written into, and a read-only stand-in falls back here)
under ``$LABKIT_CACHE`` or ``<course>/data/.cache/``. A cache file belongs to one image size, one
channel mode and one file list; it is rebuilt when any file's size or modification time changes,
and when it is damaged (unreadable, or its images no longer match their checksum), with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from labkit.env import resolve_path
from labkit.files import atomic_path

CACHE_VERSION = 2  # 2: entries carry a checksum of their images
CACHE_FOLDER = ".labkit_cache"
#: The file that marks a folder as a synthetic stand-in written by labkit.
MARKER = "LABKIT_SYNTHETIC.txt"
#: Channel modes: PIL mode -> channels stored.
MODES = {"L": 1, "RGB": 3}


class UnreadableImageError(ValueError):
    """A dataset file could not be decoded as an image (raised with ``strict=True``)."""


def is_standin(root: str | os.PathLike) -> bool:
    """True when ``root`` (or one of its two parents) is a labkit stand-in: it holds :data:`MARKER`."""
    root = Path(root).resolve()
    return any((p / MARKER).exists() for p in (root, *list(root.parents)[:2]))



def notice_box(lines: list[str]) -> str:
    """The loud box every stand-in prints when a lab uses it: ``lines`` framed in ``!!``."""
    width = max(len(x) for x in lines) + 2
    bar = "!" * (width + 4)
    return "\n".join([bar, *(f"!! {x:<{width - 2}} !!" for x in lines), bar])
def cache_dir_for(root: str | os.PathLike) -> Path:
    """Where the decoded tensors of the dataset at ``root`` are cached.

    ``<root>/.labkit_cache`` for a stand-in labkit wrote (the folder is ours); for anything else
    ``<course>/data/.cache/<name>-<hash>`` (or ``$LABKIT_CACHE/<name>-<hash>``): a real dataset folder is
    never written into.
    """
    root = Path(root).resolve()
    if is_standin(root):
        folder = root / CACHE_FOLDER
        try:
            if folder.is_dir() or os.access(root, os.W_OK):   # a read-only stand-in: fall back below
                folder.mkdir(exist_ok=True)
                if os.access(folder, os.W_OK):
                    return folder
        except OSError:
            pass
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    base = resolve_path(os.environ.get("LABKIT_CACHE") or "data/.cache")
    fallback = base / f"{root.name}-{digest}"
    try:
        fallback.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the image cache folder {fallback} ({err.strerror}); set "
                                 f"LABKIT_CACHE to a writable folder") from err
    return fallback


def file_stamps(root: Path, files: list[str]) -> torch.Tensor:
    """``[N, 2]`` int64: size in bytes and modification time (ns) of each file."""
    out = np.empty((len(files), 2), dtype=np.int64)
    for i, name in enumerate(files):
        st = os.stat(root / name)
        out[i] = st.st_size, st.st_mtime_ns
    return torch.from_numpy(out)


def decode_image(path: str | os.PathLike, image_size: int, mode: str = "L", pad_to: int | None = None) -> np.ndarray:
    """One image file as uint8 ``[C, image_size, image_size]`` (PIL decode, bilinear resize).

    JPEGs are decoded at a reduced scale when that is still at least ``image_size`` (``draft``).
    ``pad_to``: an image smaller than ``pad_to``×``pad_to`` (a tile cut at a slide's border) is first
    padded with white to that size (kept at the top left), so it is not stretched.
    """
    with Image.open(path) as im:
        if im.format == "JPEG" and pad_to is None:
            im.draft(mode, (image_size, image_size))
        im = to_8bit(im).convert(mode)
        if pad_to is not None and (im.width < pad_to or im.height < pad_to):
            canvas = Image.new(mode, (max(pad_to, im.width), max(pad_to, im.height)), "white")
            canvas.paste(im, (0, 0))
            im = canvas
        im = im.resize((image_size, image_size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` with 8 bits per channel and no transparency, ready for ``convert("L"/"RGB")``.

    16-bit grayscale (``I;16``) is scaled by 1/257 (65535 -> 255; PIL's own conversion clips at 255);
    32-bit integer and float images are scaled from their own range (float images within [0, 1]
    by 255). Transparent pixels (alpha, palette transparency) are composited over black.
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and 255 < hi <= 65535):
            arr = arr / 257.0
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0
        elif lo < 0 or hi > 255:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return im


def _try_decode(args: tuple) -> np.ndarray | Exception:
    try:
        return decode_image(*args)
    except Exception as err:  # noqa: BLE001 — any decoder failure is reported naming the file, never raised deep in PIL
        return err


def decode_files(root: Path, files: list[str], image_size: int, mode: str = "L", strict: bool = False,
                 progress: bool = True, desc: str = "decoding images", pad_to: int | None = None
                 ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode ``files`` (relative to ``root``) with a progress bar.

    Returns ``(images uint8 [K,C,S,S], kept indices [K], skipped files)``. A file that is not a
    readable image is skipped with a warning naming it, or raises :class:`UnreadableImageError`
    when ``strict``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {sorted(MODES)}")
    out = np.empty((len(files), MODES[mode], image_size, image_size), dtype=np.uint8)
    kept, skipped = [], []
    jobs = [(root / name, image_size, mode, pad_to) for name in files]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        results = pool.map(_try_decode, jobs, chunksize=32)
        for i, res in enumerate(tqdm(results, total=len(files), desc=desc, unit="img", disable=not progress)):
            if isinstance(res, Exception):
                if strict:
                    raise UnreadableImageError(f"{root / files[i]} is not a readable image ({res}). Remove or "
                                               f"replace the file, or load with strict=False to skip it.")
                warnings.warn(f"skipped {root / files[i]}: not a readable image ({res})", stacklevel=2)
                skipped.append(files[i])
                continue
            out[len(kept)] = res
            kept.append(i)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) of {len(files)} below {root}", stacklevel=2)
    return torch.from_numpy(out[: len(kept)]), np.asarray(kept, dtype=np.int64), skipped


def cache_file(root: Path, files: list[str], image_size: int, mode: str, tag: str = "images",
               pad_to: int | None = None) -> Path:
    """Where the tensors for this (image size, channel mode, file list, padding) live."""
    extra = [] if pad_to is None else [pad_to]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, image_size, mode, files, *extra]).encode()).hexdigest()[:16]
    return cache_dir_for(root) / f"{tag}-{image_size}px-{mode}-{key}.pt"


def images_digest(images: torch.Tensor) -> str:
    """A checksum of a uint8 image tensor (``torch.load`` does not notice flipped bytes in tensor data)."""
    return hashlib.blake2b(np.ascontiguousarray(images.numpy()).data, digest_size=16).hexdigest()


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        if entry.get("version") == CACHE_VERSION and entry.get("digest") != images_digest(entry["images"]):
            raise ValueError("its checksum does not match: the file is damaged")
        return entry
    except Exception as err:  # noqa: BLE001 — a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache file {path} ({err}); decoding again", stacklevel=3)
        return None


def read_json(path: Path) -> dict | None:
    """A JSON cache note, or ``None`` (with a warning naming it) when it is missing or damaged."""
    if not path.is_file():
        return None
    try:
        out = json.loads(path.read_text())
        return out if isinstance(out, dict) else None
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable cache file {path} ({err}); decoding again", stacklevel=3)
        return None


def load_images_cached(root: str | os.PathLike, files: list[str], image_size: int, mode: str = "L", *,
                       tag: str = "images", strict: bool = False, progress: bool = True, pad_to: int | None = None
                       ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Like :func:`decode_files`, but read from / written to the tensor cache.

    The cache is used only when its file list and every file's size and mtime still match;
    otherwise the files are decoded again and the cache file is replaced (atomically).
    """
    root = Path(root)
    path = cache_file(root, files, image_size, mode, tag, pad_to)
    stamps = file_stamps(root, files)
    entry = _read(path)
    if (entry is not None and entry.get("version") == CACHE_VERSION and entry.get("files") == files
            and torch.equal(entry.get("stamps"), stamps)):
        skipped = list(entry["skipped"])
        if skipped and strict:
            raise UnreadableImageError(f"{root / skipped[0]} is not a readable image (found on an earlier load). "
                                       f"Remove or replace the file, or load with strict=False to skip it.")
        if skipped:
            warnings.warn(f"skipped {len(skipped)} unreadable file(s) below {root}: {skipped[:5]}", stacklevel=2)
        return entry["images"], entry["kept"].numpy(), skipped
    images, kept, skipped = decode_files(root, files, image_size, mode, strict, progress, desc=f"decoding {tag}",
                                         pad_to=pad_to)
    entry = {"version": CACHE_VERSION, "files": list(files), "stamps": stamps, "images": images,
             "digest": images_digest(images),
             "kept": torch.from_numpy(kept), "skipped": skipped, "image_size": image_size, "mode": mode}
    try:
        with atomic_path(path) as tmp:
            torch.save(entry, tmp)
    except OSError as err:
        warnings.warn(f"could not write the image cache {path} ({err}); images will be decoded again next time",
                      stacklevel=2)
    return images, kept, skipped
