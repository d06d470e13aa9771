"""Writers for the awkward files real dataset folders contain, and tiny "real" layouts of every dataset
labkit reads (no stand-in marker, so labkit treats them as real data and must never write into them).

Each layout puts 1–2 small images per class, so a load takes well under a second.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- single files
GOOD_VALUE = 90          # the gray level of every good image
#: Side of the test images: the breast layout's real patch size (a smaller patch is a slide-border patch there,
#: padded with white); the other layouts resize it like any image.
SIDE = 50


def good(path: Path, value: int = GOOD_VALUE, fmt: str | None = None) -> Path:
    """A small valid image (gray ``value``); format from the suffix unless ``fmt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    Image.new("RGB", (SIDE, SIDE), (value,) * 3).save(path, kind)
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut off half-way (an interrupted download or copy)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


#: The RGBA test image: left half opaque OPAQUE_RGB, right half fully transparent over white.
OPAQUE_RGB = (200, 40, 40)


def rgba_png(path: Path) -> Path:
    arr = np.zeros((SIDE, SIDE, 4), np.uint8)
    arr[:, :SIDE // 2] = (*OPAQUE_RGB, 255)
    arr[:, SIDE // 2:] = (255, 255, 255, 0)
    Image.fromarray(arr, "RGBA").save(path, "PNG")
    return path


#: The 16-bit test image: left half LOW16, right half HIGH16 (both above 255: PIL alone clips them to white).
LOW16, HIGH16 = 10_000, 60_000


def gray16_png(path: Path) -> Path:
    arr = np.full((SIDE, SIDE), LOW16, np.uint16)
    arr[:, SIDE // 2:] = HIGH16
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    im.save(path, "PNG")
    return path


def cmyk_jpeg(path: Path) -> Path:
    """Pure red in CMYK (print workflows save JPEGs like this)."""
    Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    return path


def clutter(folder: Path) -> list[str]:
    """OS and editor clutter in ``folder``: ``.DS_Store``, ``Thumbs.db`` (binary junk), ``notes.txt``."""
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(64))
    (folder / "notes.txt").write_text("scanner settings: 120 kV\n")
    return [".DS_Store", "Thumbs.db", "notes.txt"]


def macosx_clutter(root: Path, class_dir: Path) -> None:
    """What unzipping a Mac-made archive leaves: ``__MACOSX/<same tree>/._<file>`` AppleDouble files at the
    top, a ``__MACOSX/`` inside the split folder, and ``._<file>`` beside the images."""
    rel = class_dir.relative_to(root)
    for base in (root / "__MACOSX" / rel, class_dir.parent / "__MACOSX" / class_dir.name):
        base.mkdir(parents=True, exist_ok=True)
        (base / "._img0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (class_dir / "._img0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))


def symlink_loops(class_dir: Path) -> str:
    """A file link that points at itself and a folder link that points at its own parent."""
    os.symlink("loop.png", class_dir / "loop.png")
    os.symlink("..", class_dir / "up")
    return "loop.png"


# ----------------------------------------------------------------------------- dataset layouts
@dataclass
class Layout:
    """A tiny real-looking dataset: ``root`` (what ``data_dir`` points at), the ``class_dir`` bad files go
    into, ``name(i)`` a file name that dataset accepts in ``class_dir``, ``load(**kw)`` and the number of
    images the clean dataset has (``n``)."""

    kind: str
    root: Path
    class_dir: Path
    name: Callable[[int, str], str]
    load: Callable[..., object]
    n: int
    channels: int


def decoded(data, filename: str) -> np.ndarray | None:
    """The decoded ``[C, S, S]`` image of the file called ``filename`` in a loaded dataset, or ``None``."""
    parts = [(data.files, data.images)] if hasattr(data, "patients") else \
        [(part.files, part.images) for part in data.splits.values()]
    for files, images in parts:
        for i, f in enumerate(files):
            if Path(f).name == filename:
                return images[i].numpy()
    return None


def count(data) -> int:
    return len(data) if hasattr(data, "patients") else sum(len(p) for p in data.splits.values())


def alzheimer(parent: Path) -> Layout:
    from labkit.data.alzheimer import CLASSES, load_alzheimer

    root = parent / "alzheimer"
    for split in ("train", "test"):
        for c in CLASSES:
            for i in range(2):
                good(root / split / c / f"img{i}.jpg")
    return Layout("alzheimer", root, root / "train" / CLASSES[0], lambda i, ext: f"extra{i}.{ext}",
                  lambda **kw: load_alzheimer(**{"data": "real", "data_dir": root, "image_size": 16,
                                                 "progress": False, **kw}), 16, 1)


def lung(parent: Path) -> Layout:
    from labkit.data.lung import load_lung
    from labkit.data.synth_lung import CLASSES, SPLITS

    root = parent / "lung"
    for split in SPLITS:
        for c in CLASSES:
            good(root / split / c / "img0.png")
    return Layout("lung", root, root / "train" / CLASSES[0], lambda i, ext: f"extra{i}.{ext}",
                  lambda **kw: load_lung(**{"data": "real", "data_dir": root, "image_size": 16, "progress": False,
                                            **kw}), len(SPLITS) * len(CLASSES), 1)


WNIDS = ["n01443537", "n01629819", "n01641577"]


def tiny_imagenet(parent: Path) -> Layout:
    from labkit.data.imagenet import load_imagenet

    root = parent / "tiny"
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    rows = []
    for k, w in enumerate(WNIDS):
        for i in range(2):
            good(folder / "train" / w / "images" / f"{w}_{i}.JPEG")
        good(folder / "val" / "images" / f"val_{k}.JPEG")
        rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t5\t5")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return Layout("tiny-imagenet", root, folder / "train" / WNIDS[0] / "images",
                  lambda i, ext: f"{WNIDS[0]}_extra{i}.{ext}",
                  lambda **kw: load_imagenet(**{"data": "real", "data_dir": root, "image_size": 16, "progress": False,
                                                "memory_budget": 2**30, **kw}), 9, 3)


def breast(parent: Path) -> Layout:
    from labkit.data.breast import load_breast

    root = parent / "breast"
    for pid in ("10001", "10002"):
        for c in (0, 1):
            good(root / pid / str(c) / f"{pid}_idx5_x1_y1_class{c}.png")
    return Layout("breast", root, root / "10001" / "1", lambda i, ext: f"10001_idx5_x{100 + i}_y1_class1.png",
                  lambda **kw: load_breast(**{"data": "real", "data_dir": root, "image_size": 16, "progress": False,
                                              **kw}), 4, 3)


LAYOUTS = {"alzheimer": alzheimer, "lung": lung, "tiny-imagenet": tiny_imagenet, "breast": breast}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` (links not followed) with its type, size and modification time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(Path(folder) / name)
            out[(Path(folder) / name).relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
