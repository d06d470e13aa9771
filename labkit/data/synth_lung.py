"""A synthetic stand-in for seed 004's 9-class lung set (chest X-ray + OCT), in its folder layout.

The real set cannot be downloaded here, so labkit can write look-alike files in the same layout::

    <root>/train|val|test/<class>/<class>-00012.png|.jpg

Chest-X-ray-like pictures for the five X-ray classes (torso, two dark lung fields, ribs, spine,
heart shadow, clavicles) and layered OCT-like B-scans for the four OCT classes (retinal bands
with a foveal pit, bright RPE line, speckle). Each class adds its own lesion, at a random
strength that is sometimes faint:

=====================  ==============================================================
lung-normal            no lesion
lung-covid             bilateral, peripheral, lower-zone ground-glass blobs
lung-opacity           one dense irregular consolidation in one lung
lung-viral-pneumonia   bilateral perihilar streaky (interstitial) pattern
lung-tuberculosis      upper-zone nodules and a cavity (bright ring, dark centre)
lung-oct-normal        smooth layers
lung-oct-drusen        small bumps under the RPE line
lung-oct-dme           thickened retina with dark cysts
lung-oct-cnv           a large dome lifting the RPE with fluid above it
=====================  ==============================================================

Like the real data the files have mixed sizes, modes (grayscale "L" and "RGB") and formats
(PNG and JPEG) — in the same proportions in every class of a modality, so they carry no label.
Anatomy, pose, contrast, noise and lesion strength vary per image, so the task is learnable but
not trivial. THESE ARE NOT MEDICAL IMAGES and nothing learned on them is a medical result.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from labkit.files import atomic_path

#: The nine class folders of seed 004's dataset, in label order.
CLASSES = ("lung-covid", "lung-normal", "lung-opacity", "lung-viral-pneumonia", "lung-tuberculosis",
           "lung-oct-cnv", "lung-oct-dme", "lung-oct-drusen", "lung-oct-normal")
SPLITS = ("train", "val", "test")
XRAY_CLASSES = CLASSES[:5]
OCT_CLASSES = CLASSES[5:]
from labkit.data.cache import MARKER  # noqa: E402,F401  (one marker for every stand-in)

#: (width, height) choices per modality, like the mixed sizes of the real files.
XRAY_SIZES = ((256, 256), (299, 299), (320, 288), (240, 256))
OCT_SIZES = ((384, 248), (320, 208), (256, 176), (352, 256))

MARKER_TEXT = """\
SYNTHETIC STAND-IN written by labkit (labkit.data.synth_lung.write_lung_standin).

These are computer-generated look-alikes of chest X-rays and OCT B-scans in the folder layout of
the 9-class lung dataset of the source project (train/ val/ test/, one folder per class). They are
NOT medical images, and accuracies measured on them are NOT medical results. They exist so that
the labs run offline.

To use the real data: delete this folder and put the dataset (train/, val/, test/ with the nine
class folders) in its place, or point DATA_PATH / data_dir at it.
"""


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1]: ``x`` across (shape [1, w]) and ``y`` down (shape [h, 1])."""
    return (np.linspace(-1, 1, w, dtype=np.float32)[None, :], np.linspace(-1, 1, h, dtype=np.float32)[:, None])


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over ``width``."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _blob(x, y, cx, cy, rx, ry) -> np.ndarray:
    """A Gaussian bump of radii ``rx``/``ry`` centred at (cx, cy)."""
    return np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))


def render_xray(cls: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One chest-X-ray-like picture of class ``cls`` as float32 ``[h, w]`` in about [0, 1]."""
    w, h = size
    x, y = _grid(w, h)
    u = rng.uniform
    # pose: shift, scale, slight rotation
    ang = np.deg2rad(u(-5, 5))
    x0, y0 = x - u(-0.06, 0.06), y - u(-0.05, 0.05)
    x, y = (np.cos(ang) * x0 + np.sin(ang) * y0) / u(0.9, 1.05), (-np.sin(ang) * x0 + np.cos(ang) * y0) / u(0.9, 1.05)
    torso = _ramp(1 - np.sqrt((x / 0.95) ** 2 + ((y - 0.25) / 1.25) ** 2), 0.08)
    img = 0.06 + u(0.42, 0.55) * torso
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx, rx, ry = side * u(0.38, 0.46), u(0.25, 0.32), u(0.55, 0.68)
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y + 0.02) / ry) ** 2 * (1 + 0.5 * (y > 0)))
        lungs = np.maximum(lungs, _ramp(1 - r, 0.12))
    img = img - u(0.22, 0.32) * lungs
    ribs = np.zeros_like(img)
    for k in range(9):
        yk = -0.62 + 0.15 * k + u(-0.02, 0.02)
        ribs += np.exp(-((y - yk - 0.35 * (np.abs(x) - 0.4) ** 2) / 0.025) ** 2)
    img = img + u(0.06, 0.11) * ribs * lungs
    img = img + u(0.25, 0.35) * np.exp(-(x / 0.09) ** 2) * torso                       # spine / mediastinum
    heart = 1 - np.sqrt(((x - 0.15) / u(0.24, 0.32)) ** 2 + ((y - 0.38) / u(0.2, 0.26)) ** 2)
    img = img + u(0.12, 0.2) * _ramp(heart, 0.4)
    clavicles = np.exp(-((y + 0.6 + 0.22 * np.abs(x)) / 0.03) ** 2) * (np.abs(x) > 0.06) * (np.abs(x) < 0.75)
    img = img + 0.15 * clavicles * torso
    img = img + _xray_lesion(cls, x, y, rng) * lungs
    return np.clip(img, 0, None) ** u(0.85, 1.2) * u(0.9, 1.1)                             # exposure


def _xray_lesion(cls: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The class-specific brightening inside the lungs (zero for ``lung-normal``)."""
    u = rng.uniform
    s = u(0.25, 1.0)                                   # lesion strength: sometimes faint
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
    if cls == "lung-covid":                            # bilateral peripheral lower ground glass
        for side in (-1, 1):
            for _ in range(rng.integers(2, 4)):
                out += 0.3 * s * _blob(x, y, side * u(0.5, 0.68), u(0.05, 0.5), u(0.12, 0.2), u(0.14, 0.24))
        out = np.minimum(out, 0.4 * s)
    elif cls == "lung-opacity":                        # one dense lobar consolidation, one side only
        side, cy = rng.choice([-1, 1]), u(-0.1, 0.4)
        for _ in range(3):
            out += 0.35 * s * _blob(x, y, side * u(0.3, 0.5), cy + u(-0.12, 0.12), u(0.16, 0.26), u(0.14, 0.22))
        out = np.minimum(out, 0.5 * s)
    elif cls == "lung-viral-pneumonia":                # perihilar haze with interstitial streaks, both sides
        r, phi = np.sqrt(x ** 2 + (y - 0.05) ** 2), np.arctan2(y - 0.05, x)
        streaks = np.abs(np.sin(phi * u(14, 20) + u(0, 6.3) + 6 * r)) ** 4
        out += s * (0.15 + 0.15 * streaks) * np.exp(-((r - 0.35) / 0.25) ** 2)
    elif cls == "lung-tuberculosis":                   # upper-zone nodules and haze + a cavity
        side = rng.choice([-1, 1])
        for _ in range(rng.integers(3, 7)):
            out += 0.25 * s * _blob(x, y, rng.choice([-1, 1]) * u(0.3, 0.55), u(-0.6, -0.25), 0.045, 0.045)
        cx, cy, rad = side * u(0.35, 0.5), u(-0.5, -0.3), u(0.09, 0.15)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        out += 0.12 * s * _blob(x, y, cx, cy, 0.3, 0.25)
        out += 0.35 * s * np.exp(-((r - rad) / 0.035) ** 2) - 0.12 * s * (r < rad * 0.75)
    elif cls != "lung-normal":
        raise ValueError(f"{cls!r} is not an X-ray class; use one of {XRAY_CLASSES}")
    return out


def render_oct(cls: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One layered OCT-B-scan-like picture of class ``cls`` as float32 ``[h, w]`` in about [0, 1]."""
    w, h = size
    x, y = _grid(w, h)
    u = rng.uniform
    s = u(0.25, 1.0)                                   # lesion strength: sometimes faint
    cx = u(-0.25, 0.25)
    base = u(-0.25, 0.0) + u(-0.1, 0.1) * x + u(0.0, 0.15) * x ** 2
    top = base + u(0.12, 0.2) * np.exp(-((x - cx) / 0.15) ** 2)          # inner surface with the foveal pit
    rpe_lift = np.zeros_like(x)
    extra = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
    if cls == "lung-oct-drusen":
        for _ in range(rng.integers(2, 6)):
            rpe_lift = rpe_lift + s * u(0.06, 0.12) * np.exp(-((x - u(-0.7, 0.7)) / u(0.06, 0.12)) ** 2)
    elif cls == "lung-oct-dme":                        # swollen retina: the inner surface bulges up
        top = top - s * u(0.15, 0.3) * np.exp(-((x - cx) / 0.4) ** 2)
    elif cls == "lung-oct-cnv":
        rpe_lift = s * u(0.12, 0.24) * np.exp(-((x - cx - u(-0.2, 0.2)) / u(0.15, 0.3)) ** 2)
    elif cls != "lung-oct-normal":
        raise ValueError(f"{cls!r} is not an OCT class; use one of {OCT_CLASSES}")
    rpe = base + u(0.5, 0.6) - rpe_lift
    thick = rpe - top
    d = (y - top) / np.maximum(rpe - top, 0.05)         # 0 at the inner surface, 1 at the RPE
    # band profile across the retina: bright nerve-fibre layer, darker nuclear layers, bright lines
    bands = (0.55 * np.exp(-((d - 0.06) / 0.07) ** 2) + 0.35 * np.exp(-((d - 0.3) / 0.1) ** 2)
             + 0.2 * np.exp(-((d - 0.55) / 0.06) ** 2) + 0.45 * np.exp(-((d - 0.9) / 0.03) ** 2))
    inside = _ramp(d, 0.04) * _ramp(1.02 - d, 0.04)
    img = 0.08 + bands * inside
    img = img + 0.9 * np.exp(-((y - rpe) / 0.018) ** 2)                                  # RPE line
    img = img + 0.35 * np.exp(-np.clip(y - rpe - 0.02, 0, None) / 0.12) * (y > rpe + 0.02)  # choroid
    if cls == "lung-oct-dme":                                                             # dark cysts
        for _ in range(rng.integers(2, 6)):
            ex = cx + u(-0.4, 0.4)
            col = int(np.clip((ex + 1) / 2 * (w - 1), 0, w - 1))
            ey = top[0, col] + u(0.3, 0.7) * thick[0, col]
            cyst = _ramp(1 - np.sqrt(((x - ex) / u(0.08, 0.15)) ** 2 + ((y - ey) / u(0.06, 0.11)) ** 2), 0.3)
            extra = extra - 0.8 * s * cyst * img
    elif cls == "lung-oct-cnv":                                                           # fluid + bright mass
        mass = _ramp(y - rpe, 0.02) * _ramp(rpe + rpe_lift * 0.9 - y, 0.02) * (rpe_lift > 0.01)
        extra = extra + 0.35 * s * mass
        fluid = _ramp(y - (rpe - 0.05 * s), 0.02) * _ramp(rpe - 0.01 - y, 0.02) * (rpe_lift > 0.02)
        extra = extra - 0.5 * fluid * img
    elif cls == "lung-oct-drusen":
        extra = extra + 0.25 * _ramp(y - rpe, 0.01) * _ramp(rpe + rpe_lift - y, 0.01)
    return (img + extra) * u(0.8, 1.15)


def render(cls: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One picture of ``cls`` as uint8 ``[h, w]`` with ``size = (w, h)``: the scene is drawn at half
    resolution and upsampled; noise (Gaussian for X-ray, multiplicative speckle for OCT) is added at
    full resolution."""
    half = (max(8, size[0] // 2), max(8, size[1] // 2))
    xray = cls in XRAY_CLASSES
    img = render_xray(cls, rng, half) if xray else render_oct(cls, rng, half)
    img = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    if xray:
        img = img + rng.normal(0, rng.uniform(0.015, 0.04), img.shape).astype(np.float32)
    else:
        speckle = rng.standard_gamma(rng.uniform(3, 6), img.shape).astype(np.float32)
        img = img * speckle / speckle.mean() + rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, folder: Path, stem: str, rng: np.random.Generator, xray: bool) -> str:
    """Save with a random mode (L or RGB) and format (PNG or JPEG), same odds in every class."""
    image = Image.fromarray(arr, mode="L")
    if rng.random() < 0.3:
        image = image.convert("RGB")
    png = rng.random() < (0.7 if xray else 0.3)
    name = f"{stem}.png" if png else f"{stem}.jpg"
    if png:
        image.save(folder / name)
    else:
        image.save(folder / name, quality=int(rng.integers(85, 96)))
    return name


def standin_counts(train_per_class: int = 150, val_per_class: int = 30, test_per_class: int = 50) -> dict:
    """Images per split and class of a stand-in (balanced); nothing is written."""
    out = {}
    for split, n in zip(SPLITS, (train_per_class, val_per_class, test_per_class)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{split}_per_class={n!r}: need a whole number >= 1 of images per class")
        out[split] = {cls: n for cls in CLASSES}
    return out


def write_lung_standin(root: str | os.PathLike, train_per_class: int = 150, val_per_class: int = 30,
                       test_per_class: int = 50, seed: int = 0, progress: bool = True) -> Path:
    """Write a synthetic stand-in of the 9-class lung set into ``root`` and return ``root``.

    ``root`` gets ``{train,val,test}/<class>/<class>-NNNNN.{png,jpg}`` and a ``LABKIT_SYNTHETIC.txt``
    marker. The folder is written whole beside ``root`` and renamed into place, so an interrupted
    write leaves nothing behind; the same ``seed`` gives the same pictures. ``root`` must be missing,
    empty, or an earlier stand-in (which is replaced): real data is never overwritten.
    """
    root = Path(root)
    if root.exists() and not (root / MARKER).exists():
        found = sorted(p.name for p in root.iterdir() if p.name != ".labkit_cache") if root.is_dir() else [root.name]
        if found:
            raise FileExistsError(f"{root} already exists and holds {found[:8]}; refusing to write a synthetic "
                                  f"stand-in there. Pick an empty or missing folder.")
    counts = standin_counts(train_per_class, val_per_class, test_per_class)
    total = sum(sum(c.values()) for c in counts.values())
    tik = time.perf_counter()
    with atomic_path(root) as tmp, tqdm(total=total, desc="writing synthetic lung stand-in", unit="img",
                                        disable=not progress) as bar:
        jobs = []
        for s, (split, per_class) in enumerate(counts.items()):
            for c, (cls, n) in enumerate(per_class.items()):
                (tmp / split / cls).mkdir(parents=True)
                jobs.append((tmp / split / cls, cls, n, np.random.default_rng([seed, s, c])))

        def write_class(folder: Path, cls: str, n: int, rng: np.random.Generator) -> None:
            sizes = XRAY_SIZES if cls in XRAY_CLASSES else OCT_SIZES
            for i in range(n):
                size = sizes[rng.integers(len(sizes))]
                _save(render(cls, rng, size), folder, f"{cls}-{i:05d}", rng, cls in XRAY_CLASSES)
                bar.update(1)

        # One generator per (split, class), so the bytes do not depend on the threads; NumPy and PIL release the
        # GIL in their loops, so the classes render on every core.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda job: write_class(*job), jobs))
        (tmp / MARKER).write_text(MARKER_TEXT + f"\nseed={seed} per_class={train_per_class}/{val_per_class}/"
                                                f"{test_per_class}\n")
    if progress:
        print(f"wrote {total} synthetic images to {root} in {time.perf_counter() - tik:.1f}s")
    return root
