"""A synthetic stand-in for the Kaggle "Alzheimer's Dataset (4 class of images)".

The real dataset cannot be downloaded here, so labkit can write look-alike files in the same
folder layout: grayscale JPEG axial "brain MRI" slices (176 × 208 like the Kaggle images) drawn
from a simple parametric phantom — skull ring, CSF gap, grey-matter cortex with sulci, white
matter and two lateral ventricles. The class sets a latent severity that widens the sulci,
enlarges the ventricles and shrinks the brain; per-subject variation (head size, slice level,
contrast, rotation, noise) makes neighbouring classes overlap, so the task is learnable but not
trivial. THESE ARE NOT MEDICAL IMAGES and nothing learned on them is a medical result.
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

#: Folder name of the Kaggle download (the apostrophe became an underscore in the zip).
KAGGLE_FOLDER = "Alzheimer_s Dataset"
#: Written into the root of every stand-in so that later loads know what it is.
from labkit.data.cache import MARKER  # noqa: E402  (one marker for every stand-in)
#: Image counts of the real dataset (seed project README); the stand-in keeps these ratios.
KAGGLE_COUNTS = {
    "train": {"NonDemented": 2560, "VeryMildDemented": 1792, "MildDemented": 717, "ModerateDemented": 52},
    "test": {"NonDemented": 640, "VeryMildDemented": 448, "MildDemented": 179, "ModerateDemented": 12},
}
#: Severity of each class on the latent atrophy scale, and the file-name prefix the Kaggle files use.
SEVERITY = {"NonDemented": 0.0, "VeryMildDemented": 1.0, "MildDemented": 2.0, "ModerateDemented": 3.0}
FILE_PREFIX = {"NonDemented": "nonDem", "VeryMildDemented": "verymildDem", "MildDemented": "mildDem",
               "ModerateDemented": "moderateDem"}
#: Spread of a subject's latent severity around its class value (overlap between neighbours).
SEVERITY_SD = 0.5
#: Images drawn per vectorised batch (also the unit of seeding).
CHUNK = 64

MARKER_TEXT = """\
SYNTHETIC STAND-IN written by labkit (labkit.data.synth_mri.write_alzheimer_standin).

These are computer-generated look-alikes of brain MRI slices in the folder layout of the Kaggle
"Alzheimer's Dataset (4 class of images)". They are NOT medical images, and accuracies measured on
them are NOT medical results. They exist so that the labs run offline.

To use the real data: delete this folder and put the Kaggle dataset (its zip, or the extracted
"Alzheimer_s Dataset" folder) in its place.
"""


def standin_counts(n_train: int = 5121, n_test: int = 1279) -> dict[str, dict[str, int]]:
    """Images per split and class for a stand-in of ``n_train``/``n_test`` images.

    Counts are proportional to the real dataset's (50/35/14/1 %), rounded by largest remainder,
    with at least one image per class when the split has room for it; the defaults give exactly
    the real counts. No files are written.
    """
    out = {}
    for split, total in (("train", n_train), ("test", n_test)):
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"n_{split}={total!r}: need a whole number >= 0 of images")
        real = KAGGLE_COUNTS[split]
        share = np.array([total * c / sum(real.values()) for c in real.values()])
        counts = np.floor(share).astype(int)
        if total >= len(real):
            counts = np.maximum(counts, 1)
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        i = 0
        while counts.sum() < total:
            counts[order[i % len(order)]] += 1
            i += 1
        while counts.sum() > total:  # only after the minimum-one bump: take from the largest class
            counts[np.argmax(counts)] -= 1
        out[split] = dict(zip(real, counts.tolist()))
    return out


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over ``width`` (anti-aliased edges)."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def render_slices(severity: np.ndarray, rng: np.random.Generator, size: tuple[int, int] = (176, 208)) -> np.ndarray:
    """Draw one synthetic axial slice per entry of ``severity`` (latent, ~0 healthy … 3 moderate).

    Vectorised over the batch; returns uint8 ``[B, height, width]`` with ``size = (width, height)``.
    The anatomy is drawn at half resolution and upsampled (bilinear), noise is added at full size.
    """
    width, height = size[0] // 2, size[1] // 2
    b = len(severity)
    f32 = np.float32

    def p(low: float, high: float) -> np.ndarray:  # one uniform value per subject, shaped [B,1,1]
        return rng.uniform(low, high, (b, 1, 1)).astype(f32)

    z = severity.astype(f32)[:, None, None]
    level = p(-1.0, 1.0)                      # slice height: nuisance that also changes brain/ventricle size
    angle = np.deg2rad(p(-8.0, 8.0))          # small head rotation
    ys = (np.arange(height, dtype=f32) - (height - 1) / 2) / (height / 2)
    xs = (np.arange(width, dtype=f32) - (width - 1) / 2) / (height / 2)
    xx, yy = xs[None, None, :] - p(-0.04, 0.04), ys[None, :, None] - p(-0.04, 0.04)
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * xx + sin * yy, -sin * xx + cos * yy
    ax = 0.78 * p(0.93, 1.05) * (1 - 0.04 * level ** 2)
    ay = 0.92 * p(0.95, 1.04) * (1 - 0.04 * level ** 2)
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    phi = np.arctan2(v, u)
    px = 1.5 / height                          # one and a half pixels in these units: edge softness

    # Brain surface: slightly lumpy ellipse that shrinks with atrophy.
    lump = 0.025 * np.cos(3 * phi + p(0, 6.3)) + 0.02 * np.cos(5 * phi + p(0, 6.3))
    surface = (0.90 - 0.035 * z - 0.02 * p(-1, 1)) * (1 + lump)
    brain = _ramp(surface - r, px)
    # Sulci: dark CSF clefts cutting into the cortex, curved, tapering; wider and deeper with atrophy.
    n_sulci = np.round(p(15, 21))
    t = n_sulci * phi / (2 * np.pi) + p(0, 1) + 0.12 * np.sin(11 * r + p(0, 6.3))
    dist = np.abs(t - np.round(t))             # 0 at a sulcus centre, 0.5 at a gyrus crown
    s_width = np.clip(0.06 + 0.045 * z + 0.03 * p(-1, 1), 0.03, 0.4)
    s_depth = 0.11 + 0.03 * z + 0.02 * p(-1, 1)
    below = r - (surface - s_depth)            # > 0 inside the sulcal band
    taper = 0.35 + 0.65 * np.clip(below / s_depth, 0.0, 1.0)
    sulcus = _ramp(s_width * taper - dist, 0.05) * _ramp(below, px * 2)
    # Grey-matter ribbon of roughly even thickness: white matter reaches up into each gyrus.
    inner = surface - 0.075 - (s_depth - 0.02) * np.cos(np.pi * dist) ** 2 * p(0.8, 1.0)
    cortex = _ramp(r - inner, px * 2)
    fissure = _ramp(0.012 + 0.006 * z - np.abs(u), px) * _ramp(np.abs(v) - 0.5 + 0.05 * z, px * 3)
    sulcus = np.maximum(sulcus, fissure)
    # Lateral ventricles: two tilted ellipses, larger with severity and at lower slices.
    vs = np.clip(1.0 + 0.3 * z + 0.2 * p(-1, 1) - 0.2 * level, 0.5, None)
    vent = np.zeros_like(r)
    for side in (-1.0, 1.0):
        cx, tilt = side * 0.11 * (0.8 + 0.2 * vs), side * np.deg2rad(p(10, 22))
        du, dv = u - cx, v + 0.05
        a = (np.cos(tilt) * du + np.sin(tilt) * dv) / (0.045 * vs)
        c = (-np.sin(tilt) * du + np.cos(tilt) * dv) / (0.20 * (0.85 + 0.15 * vs))
        vent = np.maximum(vent, _ramp(1 - np.sqrt(a ** 2 + c ** 2), 0.25))

    wm, gm, csf = p(0.70, 0.82), p(0.42, 0.52), p(0.06, 0.12)
    tissue = wm + (gm - wm) * cortex
    tissue = tissue + (csf - tissue) * np.maximum(sulcus, vent)
    img = csf + (tissue - csf) * brain
    skull = _ramp(r - 0.955, px) * _ramp(1.0 - r, px)
    img = img + (p(0.45, 0.65) - img) * skull
    img = img * _ramp(1.0 - r, px)             # black background outside the head
    img = img * p(0.85, 1.15) * (1 + 0.08 * (p(-1, 1) * u + p(-1, 1) * v))   # contrast + bias field
    full = np.stack([np.asarray(Image.fromarray(x, mode="F").resize(size, Image.BILINEAR)) for x in img])
    full += rng.standard_normal(full.shape, dtype=f32) * p(0.02, 0.05)
    return np.clip(full * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _write_chunk(folder: Path, cls: str, start: int, m: int, seed: int, split: str, size: tuple[int, int]) -> int:
    """Write images ``start … start+m-1`` of class ``cls``; each chunk has its own seeded generator,
    so the bytes do not depend on how chunks are scheduled over threads."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, sorted(SEVERITY).index(cls), start])
    severity = SEVERITY[cls] + rng.normal(0.0, SEVERITY_SD, m)
    for i, arr in enumerate(render_slices(severity, rng, size)):
        Image.fromarray(arr, mode="L").save(folder / f"{FILE_PREFIX[cls]}{start + i}.jpg", quality=90)
    return m


def write_alzheimer_standin(root: str | os.PathLike, n_train: int = 5121, n_test: int = 1279, seed: int = 0,
                            size: tuple[int, int] = (176, 208), progress: bool = True) -> Path:
    """Write a synthetic stand-in of the Kaggle Alzheimer dataset into ``root`` and return ``root``.

    ``root`` gets ``Alzheimer_s Dataset/{train,test}/<class>/*.jpg`` (``size`` = width, height) and a
    ``LABKIT_SYNTHETIC.txt`` marker. The folder is written whole beside ``root`` and then renamed
    into place, so an interrupted write leaves nothing behind. The same ``seed`` gives the same bytes.
    ``root`` must be missing, empty, or an earlier stand-in (which is replaced): real data is never
    overwritten.
    """
    root = Path(root)
    if root.exists() and not (root / MARKER).exists():
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
        if not root.is_dir() or found:
            raise FileExistsError(f"{root} already exists and holds {found[:8] or 'a file'}; refusing to write a "
                                  f"synthetic stand-in there. Pick an empty or missing folder.")
    if size[0] < 16 or size[1] < 16:
        raise ValueError(f"size={size!r}: need width and height of at least 16 pixels")
    counts = standin_counts(n_train, n_test)
    total = sum(sum(c.values()) for c in counts.values())
    tik = time.perf_counter()
    with atomic_path(root) as tmp, tqdm(total=total, desc="writing synthetic MRI stand-in", unit="img",
                                        disable=not progress) as bar:
        jobs = []
        for split, per_class in counts.items():
            for cls, n in per_class.items():
                folder = tmp / KAGGLE_FOLDER / split / cls
                folder.mkdir(parents=True)
                jobs += [(folder, cls, start, min(CHUNK, n - start), seed, split, size) for start in range(0, n, CHUNK)]
        # NumPy and PIL release the GIL in their loops, so threads use all cores.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for m in pool.map(lambda job: _write_chunk(*job), jobs):
                bar.update(m)
        (tmp / MARKER).write_text(MARKER_TEXT + f"\nseed={seed} n_train={n_train} n_test={n_test} size={size}\n")
    if progress:
        print(f"wrote {total} synthetic images to {root} in {time.perf_counter() - tik:.1f}s")
    return root
