"""A synthetic stand-in for Tiny ImageNet, written in Tiny ImageNet's own folder layout.

Tiny ImageNet (200 classes of 64×64 JPEGs) cannot be downloaded here, so labkit writes look-alike
files where it would be: ``tiny-imagenet-200/`` with ``wnids.txt``, ``words.txt``,
``train/<wnid>/images/<wnid>_<i>.JPEG`` (+ ``<wnid>_boxes.txt``), ``val/images/val_<i>.JPEG`` +
``val/val_annotations.txt`` (file, wnid, box; tab-separated) and an unlabelled ``test/images/``.

Each class is a shape (circle, square, triangle, ring, cross, star, diamond, ellipse) filled with a
texture (stripes, checks, dots, rings, shading) in a class hue. Classes share shapes with other
classes and textures with others, so no single cue separates them; every image varies the position,
scale, rotation, colour (hue jitter overlaps neighbouring classes), background gradient and clutter,
noise, and may be partly occluded. About 2% of the files are grayscale JPEGs, as in the real dataset.
The task is learnable in a few epochs but not trivially so, and augmentation and regularisation move
the results. The wnids (``n9…``, beyond WordNet's range) and names (``synthetic …``) are made up.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from labkit.files import atomic_path

#: Folder name of the Tiny ImageNet download.
TINY_FOLDER = "tiny-imagenet-200"
#: Written into the root of every stand-in (the same marker as labkit's other stand-ins).
from labkit.data.cache import MARKER  # noqa: E402  (one marker for every stand-in)
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "diamond", "ellipse")
TEXTURES = ("striped", "checked", "dotted", "ringed", "shaded")
GRAY_FRACTION = 0.02
CHUNK = 128

MARKER_TEXT = """\
SYNTHETIC STAND-IN written by labkit (labkit.data.synth_tiny.write_tiny_imagenet_standin).

Computer-generated shapes and textures in the folder layout of Tiny ImageNet (tiny-imagenet-200).
They are NOT ImageNet images; accuracies on them are not comparable with published Tiny ImageNet
or ImageNet results. They exist so that lab 03 runs offline.

To use the real data: delete this folder and put the extracted tiny-imagenet-200 folder (or an
ILSVRC / plain train/ val/ folder) in its place.
"""


def class_design(num_classes: int) -> list[dict]:
    """Per class: ``wnid``, ``name``, ``shape``, ``texture``, ``hue`` (0–1) and texture ``freq``.

    Shape and texture indices are mixed so that classes share a shape with some classes and a
    texture with others; hues are spread by the golden ratio.
    """
    out = []
    for c in range(num_classes):
        shape = c % len(SHAPES)
        texture = (c + c // len(SHAPES)) % len(TEXTURES)
        hue = (c * 0.618034) % 1.0
        name = f"synthetic {TEXTURES[texture]} {SHAPES[shape]} {c:03d}"
        out.append({"wnid": f"n9{c:07d}", "name": name, "shape": SHAPES[shape], "texture": TEXTURES[texture],
                    "hue": hue, "freq": 0.10 + 0.03 * ((c * 7) % 5)})
    return out


def _soft(d: np.ndarray) -> np.ndarray:
    """Inside (d < 0) → 1, outside → 0, with a one-pixel anti-aliased edge."""
    return np.clip(0.5 - d, 0.0, 1.0)


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) of ``shape`` of radius ``s``."""
    r = np.sqrt(u * u + v * v)
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return r - s
    if shape == "square":
        return np.maximum(au, av) - 0.8 * s
    if shape == "triangle":
        angles = (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)
        return np.max([u * math.cos(a) + v * math.sin(a) for a in angles], axis=0) - 0.55 * s
    if shape == "ring":
        return np.abs(r - 0.72 * s) - 0.28 * s
    if shape == "cross":
        return np.minimum(np.maximum(au - 0.32 * s, av - s), np.maximum(av - 0.32 * s, au - s))
    if shape == "star":
        phi = np.arctan2(v, u)
        return r - s * (0.62 + 0.38 * np.cos(5 * phi))
    if shape == "diamond":
        return (au + av - 1.05 * s) * 0.7071
    if shape == "ellipse":
        return (np.sqrt((u / s) ** 2 + (v / (0.5 * s)) ** 2) - 1) * 0.5 * s
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, s: np.ndarray, freq: float, phase: np.ndarray) -> np.ndarray:
    """Texture value in [0, 1] in object coordinates (scales with the object)."""
    k = 2 * np.pi * freq * 24.0 / np.maximum(s, 1.0)   # ~ freq·24 px periods per object radius
    if texture == "striped":
        return _soft(-4 * np.sin(k * u + phase))
    if texture == "checked":
        return _soft(-4 * np.sin(k * u + phase) * np.sin(k * v + phase))
    if texture == "dotted":
        return _soft(-4 * (np.cos(k * u + phase) + np.cos(k * v + phase) - 1.0))
    if texture == "ringed":
        return _soft(-4 * np.sin(k * np.sqrt(u * u + v * v) + phase))
    if texture == "shaded":
        return np.clip(0.5 + 0.5 * (u + v) / np.maximum(s, 1.0), 0.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}; use one of {TEXTURES}")


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB; inputs [B] in [0, 1], output [B, 3]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(len(h))]


def _interpolation_matrix(k: int, size: int) -> np.ndarray:
    """``[size, k]`` weights of linear interpolation from ``k`` samples to ``size`` pixels."""
    pos = np.linspace(0, k - 1, size, dtype=np.float32)
    return np.clip(1 - np.abs(pos[:, None] - np.arange(k, dtype=np.float32)[None]), 0, 1)


def render_class(design: dict, n: int, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` images of one class; returns uint8 ``[n, size, size, 3]`` and boxes ``[n, 4]``
    (x0, y0, x1, y1, inclusive pixel coordinates of the object)."""
    f32 = np.float32
    col = lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1)).astype(f32)  # noqa: E731  one value per image
    ys, xs = np.mgrid[0:size, 0:size].astype(f32)
    ys, xs = ys[None], xs[None]
    # Background: a gradient between two random colours, low-frequency blotches, clutter.
    rgb = lambda lo=0.0, hi=1.0: rng.uniform(lo, hi, (n, 1, 1, 3)).astype(f32)  # noqa: E731  a colour per image
    gray = col(0.2, 0.8)[..., None]                          # muted background colours
    c0, c1 = gray + (rgb(0.1, 0.9) - gray) * 0.6, gray + (rgb(0.1, 0.9) - gray) * 0.6
    angle = col(0, 2 * np.pi)
    g = np.clip(0.5 + ((xs - size / 2) * np.cos(angle) + (ys - size / 2) * np.sin(angle)) / size, 0, 1)[..., None]
    img = c0 + (c1 - c0) * g
    up = _interpolation_matrix(5, size)                      # 5×5 random blotches, bilinearly enlarged
    img += 0.08 * np.einsum("hi,nijc,wj->nhwc", up, rng.standard_normal((n, 5, 5, 3), dtype=f32), up, optimize=True)
    for _ in range(2):  # clutter: small discs and thin bars of random colours
        cx, cy, rad = col(0, size), col(0, size), col(1.5, size / 10)
        disc = _soft(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - rad) * (col(0, 1) < 0.7)
        img += disc[..., None] * (rgb() - img)
        a = col(0, np.pi)
        bar = _soft(np.abs((xs - cx) * np.sin(a) - (ys - cy) * np.cos(a)) - col(0.3, 1.2)) * (col(0, 1) < 0.5)
        img += bar[..., None] * (rgb() - img)
    # The object: class shape and texture, random pose and colour.
    s = col(0.20, 0.40) * size
    cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(f32) * f32(size)
    rot = col(0, 2 * np.pi)
    du, dv = xs - cx, ys - cy
    u, v = du * np.cos(rot) + dv * np.sin(rot), -du * np.sin(rot) + dv * np.cos(rot)
    mask = _soft(_shape_distance(design["shape"], u, v, s))
    tex = _texture(design["texture"], u, v, s, design["freq"], col(0, 2 * np.pi))
    hue = ((design["hue"] + rng.normal(0, 0.04, n)) % 1.0).astype(f32)
    fg = _hsv(hue, rng.uniform(0.5, 1.0, n).astype(f32), rng.uniform(0.6, 1.0, n).astype(f32))
    fg2 = _hsv((hue + 0.5) % 1.0, rng.uniform(0.2, 0.7, n).astype(f32), rng.uniform(0.05, 0.45, n).astype(f32))
    obj = fg[:, None, None] * tex[..., None] + fg2[:, None, None] * (1 - tex[..., None])
    img = img * (1 - mask[..., None]) + obj * mask[..., None]
    # Occluders: with probability 0.35 a rectangle of random colour over part of the object.
    ox, oy = cx + col(-1, 1) * s, cy + col(-1, 1) * s
    occ = _soft(np.maximum(np.abs(xs - ox) - col(0.2, 0.6) * s, np.abs(ys - oy) - col(0.2, 0.6) * s))
    occ = occ * (col(0, 1) < 0.35)
    img += occ[..., None] * (rgb() - img)
    img = img * col(0.75, 1.2)[..., None] + rng.standard_normal(img.shape, dtype=f32) * col(0.01, 0.07)[..., None]
    inside = mask > 0.5
    rows, cols = inside.any(2), inside.any(1)
    first = lambda m: m.argmax(1)  # noqa: E731
    last = lambda m: size - 1 - m[:, ::-1].argmax(1)  # noqa: E731
    boxes = np.stack([first(cols), first(rows), last(cols), last(rows)], 1)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), boxes


def _save(arr: np.ndarray, path: Path, gray: bool) -> None:
    image = Image.fromarray(arr, mode="RGB")
    (image.convert("L") if gray else image).save(path, format="JPEG", quality=90)


def _write_chunk(design: dict, c: int, split: str, start: int, m: int, seed: int, size: int,
                 paths: list[Path]) -> list[tuple[int, int, int, int]]:
    """Render and save images ``start … start+m-1`` of class ``c`` in ``split``; own seeded
    generator per chunk, so the bytes do not depend on thread scheduling."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), c, start])
    images, boxes = render_class(design, m, rng, size)
    gray = rng.uniform(size=m) < GRAY_FRACTION
    for arr, path, g in zip(images, paths, gray):
        _save(arr, path, bool(g))
    return [tuple(int(x) for x in b) for b in boxes]


def write_tiny_imagenet_standin(root: str | os.PathLike, num_classes: int = 10, train_per_class: int = 500,
                                val_per_class: int = 50, test_per_class: int = 10, seed: int = 0,
                                size: int = 64, progress: bool = True) -> Path:
    """Write a synthetic Tiny-ImageNet-layout stand-in into ``root`` and return ``root``.

    ``root`` gets ``tiny-imagenet-200/`` (the name of the real download, whatever ``num_classes``)
    and the ``LABKIT_SYNTHETIC.txt`` marker. Real Tiny ImageNet has 500/50/50 images per class;
    the defaults keep 500 train and 50 val. The folder is written whole beside ``root`` and renamed
    into place (an interrupted write leaves nothing); the same arguments give the same bytes.
    ``root`` must be missing, empty, or an earlier stand-in (replaced): real data is never touched.
    """
    root = Path(root)
    for name, value, low in (("num_classes", num_classes, 2), ("train_per_class", train_per_class, 1),
                             ("val_per_class", val_per_class, 1), ("test_per_class", test_per_class, 0),
                             ("size", size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"write_tiny_imagenet_standin: {name}={value!r} must be an integer >= {low}.")
    if root.exists() and not (root / MARKER).exists():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else ["(a file)"]
        if found:
            raise FileExistsError(f"{root} already exists and holds {found[:8]}; refusing to write a synthetic "
                                  f"stand-in there. Pick an empty or missing folder.")
    designs = class_design(num_classes)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    total = num_classes * sum(counts.values())
    tik = time.perf_counter()
    with atomic_path(root) as tmp, tqdm(total=total, desc="writing Tiny-ImageNet stand-in", unit="img",
                                        disable=not progress) as bar:
        base = tmp / TINY_FOLDER
        jobs, val_rows = [], []
        for c, d in enumerate(designs):
            folder = base / "train" / d["wnid"] / "images"
            folder.mkdir(parents=True)
            for split, n in counts.items():
                for start in range(0, n, CHUNK):
                    m = min(CHUNK, n - start)
                    if split == "train":
                        names = [f"{d['wnid']}_{i}.JPEG" for i in range(start, start + m)]
                        paths = [folder / x for x in names]
                    else:  # val/test files are numbered across classes, in class-interleaved order
                        idx = [(start + i) * num_classes + c for i in range(m)]
                        names = [f"{split}_{i}.JPEG" for i in idx]
                        paths = [base / split / "images" / x for x in names]
                    jobs.append((d, c, split, start, m, names, paths))
        for split in ("val", "test"):
            (base / split / "images").mkdir(parents=True)
        train_boxes: dict[str, list[str]] = {d["wnid"]: [] for d in designs}
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(_write_chunk, d, c, split, start, m, seed, size, paths)
                       for d, c, split, start, m, names, paths in jobs]
            try:
                for (d, c, split, start, m, names, paths), fut in zip(jobs, futures):
                    boxes = ["\t".join(map(str, b)) for b in fut.result()]
                    if split == "train":
                        train_boxes[d["wnid"]] += [f"{x}\t{b}" for x, b in zip(names, boxes)]
                    elif split == "val":  # sorted by number below, like the real val_annotations.txt
                        val_rows += [(int(x[4:-5]), f"{x}\t{d['wnid']}\t{b}") for x, b in zip(names, boxes)]
                    bar.update(m)
            except BaseException:  # an error or Ctrl-C: drop the chunks not started yet, don't write them all
                for f in futures:
                    f.cancel()
                raise
        for wnid, rows in train_boxes.items():
            (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(rows) + "\n")
        (base / "val" / "val_annotations.txt").write_text("\n".join(r for _, r in sorted(val_rows)) + "\n")
        (base / "wnids.txt").write_text("".join(d["wnid"] + "\n" for d in designs))
        (base / "words.txt").write_text("".join(f"{d['wnid']}\t{d['name']}, synthetic class {c}\n"
                                                for c, d in enumerate(designs)))
        (tmp / MARKER).write_text(MARKER_TEXT + f"\nseed={seed} num_classes={num_classes} "
                                  f"train_per_class={train_per_class} val_per_class={val_per_class} "
                                  f"test_per_class={test_per_class} size={size}\n")
    if progress:
        print(f"wrote {total} synthetic Tiny-ImageNet-layout images to {root} in {time.perf_counter() - tik:.1f}s")
    return root
