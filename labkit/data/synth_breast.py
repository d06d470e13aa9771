"""A synthetic stand-in for breast histopathology patches (IDC), written in the per-patient layout.

The public IDC set (and seed 001's data) cannot be downloaded here, so labkit can write look-alike
patches in the public set's layout::

    <root>/<patient_id>/{0,1}/<patient_id>_idx5_x<X>_y<Y>_class<C>.png

Each patch is an RGB "H&E-stained" picture built with the optical-density stain model
(``rgb = exp(-(c_H * h + c_E * e))``): pink eosin tissue texture with fibres and pale gaps, and
purple hematoxylin nuclei. Class 1 (invasive ductal carcinoma) patches have denser, larger,
darker and irregular nuclei; how strongly varies per patch, so some positives look benign.

Patients come from **hospitals** of unequal size (by default 3 holding about 50 %, 30 % and 20 %
of the patients); each hospital stains with its own tint and intensity, and each patient varies a
little around it, with its own positive rate (about 28 % overall, some patients near 0 %, some
above 50 %) and its own tumour grade (how abnormal its positive nuclei look). Which patient came
from which hospital is written to ``<root>/sites.csv`` (``patient,site``), a file the public set
does not have. THESE ARE NOT MEDICAL IMAGES and nothing learned on them is a medical result.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from labkit.data.cache import MARKER
from labkit.files import atomic_path

PATCH = 50
#: The file naming each patient's hospital (stand-in only; the public IDC set has no such file).
SITES_FILE = "sites.csv"
#: Bumped when the stand-in changes; an older stand-in is rewritten on the next load.
STANDIN_VERSION = 2
#: Optical-density stain vectors (per unit concentration) of hematoxylin and eosin.
H_VEC = np.array([0.65, 0.70, 0.29], np.float32) * 1.6
E_VEC = np.array([0.07, 0.99, 0.11], np.float32) * 0.9

MARKER_TEXT = """\
SYNTHETIC STAND-IN written by labkit (labkit.data.synth_breast.write_breast_standin).

These are computer-generated look-alikes of H&E breast histopathology patches in the per-patient
folder layout of the public IDC dataset (<patient_id>/{0,1}/<patient_id>_idx5_x<X>_y<Y>_class<C>.png).
They are NOT medical images, and every number measured on them is NOT a medical result. They
exist so that the labs run offline.

To use the real data: delete this folder and put the IDC patches (one folder per patient) or the
seed project's 0/ and 1/ folders in its place, or point data_dir at them.
"""


_INTERP: dict[tuple[int, int], np.ndarray] = {}


def _interp(size: int, cells: int) -> np.ndarray:
    """``[size, cells]`` linear-interpolation weights from ``cells`` grid points to ``size`` pixels."""
    key = (size, cells)
    if key not in _INTERP:
        pos = np.linspace(0, cells - 1, size)
        lo = np.minimum(pos.astype(int), cells - 2)
        frac = (pos - lo).astype(np.float32)
        m = np.zeros((size, cells), np.float32)
        m[np.arange(size), lo] = 1 - frac
        m[np.arange(size), lo + 1] = frac
        _INTERP[key] = m
    return _INTERP[key]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a ``cells``×``cells`` random grid upsampled bilinearly."""
    m = _interp(size, cells)
    return m @ rng.random((cells, cells), dtype=np.float32) @ m.T


def render_patch(label: int, rng: np.random.Generator, patient: dict, size: int = PATCH) -> np.ndarray:
    """One patch of class ``label`` (0/1) for ``patient`` (see :func:`make_patients`) as uint8 ``[size, size, 3]``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # noqa: F841 (xx, yy: fibre direction)
    # eosin: tissue texture with fibres and pale gaps (fat, lumen)
    tissue = 0.5 + 0.7 * _smooth_noise(rng, size, 5) + 0.25 * _smooth_noise(rng, size, 12)
    angle = rng.uniform(0, np.pi)
    fibres = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(0.5, 0.9) + rng.uniform(0, 6.3))
    tissue = tissue + 0.25 * fibres * _smooth_noise(rng, size, 4)
    gaps = _smooth_noise(rng, size, 4) > rng.uniform(0.72, 0.95)
    conc_e = np.where(gaps, 0.08, tissue) * patient["eosin"]
    conc_h = 0.05 * _smooth_noise(rng, size, 8)
    # nuclei: positives are denser, larger, darker, irregular; strength varies per patch
    s = rng.uniform(0.15, 1.0) * patient["grade"] if label else 0.0
    count = rng.poisson(7 + 16 * s)
    if count:  # each nucleus is drawn in a 15×15 window around its centre, all at once
        half = 7
        w = np.arange(-half, half + 1, dtype=np.float32)
        ix, iy = rng.integers(-2, size + 2, (2, count))
        sub = rng.uniform(-0.5, 0.5, (2, count, 1, 1)).astype(np.float32)
        r = rng.uniform(1.6, 2.8, (count, 1, 1)) * (1 + 0.6 * s * rng.uniform(0.5, 1.2, (count, 1, 1)))
        ecc = rng.uniform(1.0, 1.35 + 0.5 * s, (count, 1, 1))
        rot = rng.uniform(0, np.pi, (count, 1, 1))
        ph3, ph5 = rng.uniform(0, 6.3, (2, count, 1, 1))
        dark = rng.uniform(0.9, 1.3, (count, 1, 1)) * (1 + 0.5 * s)
        dx, dy = w[None, None, :] - sub[0], w[None, :, None] - sub[1]
        u = (np.cos(rot) * dx + np.sin(rot) * dy) / ecc
        v = -np.sin(rot) * dx + np.cos(rot) * dy
        rho, phi = np.sqrt(u * u + v * v), np.arctan2(v, u)
        wobble = 1 + s * (0.25 * np.sin(3 * phi + ph3) + 0.2 * np.sin(5 * phi + ph5))
        blobs = dark * np.clip((r * wobble - rho) / 0.8 + 0.5, 0, 1)
        canvas = np.zeros((size + 2 * half + 4, size + 2 * half + 4), np.float32)
        for k in range(count):
            y0, x0 = iy[k] + 2, ix[k] + 2
            canvas[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1] += blobs[k]
        nuclei = canvas[half + 2:half + 2 + size, half + 2:half + 2 + size]
        conc_h = conc_h + nuclei * (1 - 0.2 * s * _smooth_noise(rng, size, 10))
    od = conc_h[..., None] * patient["h_vec"] + conc_e[..., None] * patient["e_vec"]
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 4.0, od.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_patients(n: int, rng: np.random.Generator, positive_rate: float = 0.3, hospitals: int = 3) -> list[dict]:
    """``n`` patients: id, hospital (``site``), stain vectors (tint), eosin intensity, tumour grade and
    positive rate. Hospital ``h`` gets a share of the patients proportional to ``0.6 ** h`` (3
    hospitals: 50 / 30 / 20 %) and its own stain tint; patients vary a little around it."""
    ids = rng.choice(np.arange(10_000, 16_999), size=n, replace=False)
    a = 1.4
    b = a * (1 - positive_rate) / positive_rate
    share = 0.6 ** np.arange(hospitals)
    counts = np.floor(share / share.sum() * n).astype(int)
    counts[:n - counts.sum()] += 1                        # the rounding remainder to the largest ones
    site_of = rng.permutation(np.repeat(np.arange(hospitals), counts))
    stains = [(rng.normal(0, 0.2, (2, 3)).astype(np.float32), float(rng.uniform(0.7, 1.2)))
              for _ in range(hospitals)]
    out = []
    for pid, site in zip(ids, site_of):
        tint, eosin = stains[site]
        tint = tint + rng.normal(0, 0.07, (2, 3)).astype(np.float32)
        out.append({"id": str(int(pid)), "site": f"hospital-{chr(65 + int(site))}",
                    "h_vec": H_VEC * (1 + tint[0]), "e_vec": E_VEC * (1 + tint[1]),
                    "eosin": eosin * float(rng.uniform(0.85, 1.15)), "grade": float(rng.uniform(0.6, 1.25)),
                    "rate": float(np.clip(rng.beta(a, b), 0.03, 0.75))})
    return out


def patch_name(pid: str, x: int, y: int, label: int) -> str:
    """The IDC file name of one patch."""
    return f"{pid}_idx5_x{x}_y{y}_class{label}.png"


def write_breast_standin(root: str | os.PathLike, patients: int = 30, patches: tuple[int, int] = (40, 80),
                         seed: int = 0, progress: bool = True, hospitals: int = 3) -> Path:
    """Write a synthetic IDC-layout stand-in into ``root`` and return ``root``.

    ``patients`` patient folders with between ``patches[0]`` and ``patches[1]`` 50×50 RGB PNG patches
    each (every patient has at least one patch of each class) from ``hospitals`` hospitals of unequal
    size (``sites.csv``), plus a ``LABKIT_SYNTHETIC.txt`` marker.
    The folder is written whole beside ``root`` and renamed into place; the same ``seed`` writes the
    same pictures. ``root`` must be missing, empty, or an earlier stand-in (which is replaced).
    """
    root = Path(root)
    if root.exists() and not (root / MARKER).exists():
        found = sorted(p.name for p in root.iterdir() if p.name != ".labkit_cache") if root.is_dir() else [root.name]
        if found:
            raise FileExistsError(f"{root} already exists and holds {found[:8]}; refusing to write a synthetic "
                                  f"stand-in there. Pick an empty or missing folder.")
    if not isinstance(patients, int) or patients < 2:
        raise ValueError(f"patients={patients!r}: need an integer >= 2")
    lo, hi = patches
    if not (isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi):
        raise ValueError(f"patches={patches!r}: need (low, high) integers with 2 <= low <= high")
    if not isinstance(hospitals, int) or not 1 <= hospitals <= min(patients, 26):
        raise ValueError(f"hospitals={hospitals!r}: need an integer between 1 and min(patients, 26)")
    rng = np.random.default_rng(seed)
    people = make_patients(patients, rng, hospitals=hospitals)
    sizes = rng.integers(lo, hi + 1, size=patients)
    tik = time.perf_counter()
    with atomic_path(root) as tmp, tqdm(total=int(sizes.sum()), desc="writing synthetic breast stand-in",
                                        unit="img", disable=not progress) as bar:
        for k, (person, n) in enumerate(zip(people, sizes)):
            prng = np.random.default_rng([seed, k])
            labels = (prng.random(n) < person["rate"]).astype(int)
            labels[0], labels[1] = 0, 1                      # both class folders exist for every patient
            cells = prng.choice(40 * 40, size=n, replace=False)   # distinct positions on the slide
            for c in (0, 1):
                (tmp / person["id"] / str(c)).mkdir(parents=True)
            for label, cell in zip(labels, cells):
                x, y = int(cell % 40) * PATCH + 1, int(cell // 40) * PATCH + 1
                img = render_patch(int(label), prng, person)
                Image.fromarray(img, mode="RGB").save(tmp / person["id"] / str(label)
                                                      / patch_name(person["id"], x, y, int(label)), compress_level=1)
                bar.update(1)
        (tmp / SITES_FILE).write_text("patient,site\n" + "".join(f"{p['id']},{p['site']}\n" for p in people))
        (tmp / MARKER).write_text(MARKER_TEXT + f"\nseed={seed} patients={patients} patches={lo}-{hi} "
                                  f"hospitals={hospitals} version={STANDIN_VERSION}\n")
    if progress:
        print(f"wrote {int(sizes.sum())} synthetic patches of {patients} patients to {root} "
              f"in {time.perf_counter() - tik:.1f}s")
    return root
