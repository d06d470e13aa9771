"""Breast histopathology patches (invasive ductal carcinoma, IDC) — real when present, else a stand-in.

Two real layouts at ``data_dir``, read by the same code:

* ``idc`` (the public IDC set): ``<root>/<patient_id>/{0,1}/<patient_id>_idx5_x<X>_y<Y>_class<C>.png``
  — 50×50 RGB patches, one folder per patient; the patient id comes from the folder and the file
  name (they must agree).
* ``binary`` (seed 001's): ``<root>/0/`` (no cancer) and ``<root>/1/`` (IDC) — no patient ids, so a
  patient-level split is impossible and the lab says so.

The public archive unzips messily; labkit reads it as it comes. A single wrapping folder (e.g.
``IDC_regular_ps50_idx5/``) is looked through. Beside the patient folders the archive holds a second
copy of them (``IDC_regular_ps50_idx5/<patient_id>/{0,1}/``): a folder holding patient folders is
read as a copy, and a patch is used **once** (by file name, the top-level one first) — the split is
by patient, so a duplicate would leak. Folders holding neither patient folders nor classes are
skipped. What was skipped is said in a notice and kept in ``BreastData.notes``. Border patches
(smaller than 50×50 at the slide's edge) are padded with white to 50×50, never stretched.
An optional ``sites.csv`` (``patient,site``) names each patient's hospital (the stand-in writes
one). ``data="auto"``
writes the synthetic stand-in (:mod:`labkit.data.synth_breast`) when ``data_dir`` is missing or
empty. Patches are decoded once into a uint8 cache. The train / validation / test split is made
once — by patient (stratified by positive rate) or by patch — and saved as JSON beside the cache,
so every later run (and every client) uses the same one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from labkit.data.cache import MARKER, cache_dir_for, load_images_cached, notice_box
from labkit.data.images import IGNORED_NAMES, regular_files, stratified_subset
from labkit.data.synth_breast import PATCH, SITES_FILE, STANDIN_VERSION, write_breast_standin
from labkit.env import portable_path, resolve_path
from labkit.files import write_json

CLASSES = ("no IDC", "IDC")
DATA_CHOICES = ("auto", "real", "synthetic")
SPLITS = ("train", "val", "test")
IDC_NAME = re.compile(r"^(?P<pid>[A-Za-z0-9-]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<c>[01])\.png$")
GET_DATA = ("Put the IDC patches (one folder per patient: <patient_id>/0/, <patient_id>/1/) or the seed's "
            "0/ and 1/ folders into {root}; or use data='auto' / 'synthetic' to work with a synthetic stand-in.")


def parse_idc_name(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """``(patient_id, x, y, label)`` from an IDC file name ``<pid>_idx5_x<X>_y<Y>_class<C>.png``.

    A name that does not follow the pattern raises ``ValueError`` naming the file.
    """
    name = Path(path).name
    m = IDC_NAME.match(name)
    if m is None:
        raise ValueError(f"{path}: not an IDC patch name; expected <patient_id>_idx5_x<X>_y<Y>_class<0|1>.png "
                         f"(e.g. 10253_idx5_x1001_y1001_class0.png). Move or rename the file.")
    return m["pid"], int(m["x"]), int(m["y"]), int(m["c"])


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_NAMES)


def _idc_named(folder: Path) -> bool:
    """True when the first file in ``folder/0`` or ``folder/1`` has an IDC patch name."""
    for c in ("0", "1"):
        sub = folder / c
        if sub.is_dir():
            first = next((p for p in _visible(sub) if p.is_file()), None)
            if first is not None:
                return IDC_NAME.match(first.name) is not None
    return True


def find_breast_layout(root: str | os.PathLike, depth: int = 1) -> tuple[str, Path] | None:
    """``(layout, folder)`` with layout ``"idc"`` or ``"binary"``, or ``None`` when ``root`` is
    missing or empty. Anything else raises ``FileNotFoundError`` listing what was found."""
    root = Path(root)
    if not root.is_dir():
        return None
    entries = [p for p in _visible(root) if p.name != MARKER]
    if not entries:
        return None
    dirs = [p for p in entries if p.is_dir()]
    names = {p.name for p in dirs}
    if {"0", "1"} <= names:
        if names - {"0", "1"}:
            raise FileNotFoundError(f"{root} holds the class folders 0/ and 1/ but also {sorted(names - {'0', '1'})[:5]};"
                                    f" only 0/ (no IDC) and 1/ (IDC) are classes. Remove or rename the others.")
        return "binary", root
    patients = [p for p in dirs if (p / "0").is_dir() or (p / "1").is_dir()]
    if (len(dirs) == 1 == len(patients) and depth > 0 and (dirs[0] / "0").is_dir() and (dirs[0] / "1").is_dir()
            and not _idc_named(dirs[0])):
        return find_breast_layout(dirs[0], depth - 1)     # a wrapped seed layout: <wrapper>/0/, <wrapper>/1/
    if patients:      # other folders (a nested copy of the patient folders, odd extras): see scan_breast
        return "idc", root
    if depth > 0 and len(dirs) == 1 and len(entries) == 1:
        return find_breast_layout(dirs[0], depth - 1)
    raise FileNotFoundError(f"{root} holds {[p.name for p in entries][:8]} — not a breast-patch layout. Expected "
                            f"'<patient_id>/{{0,1}}/<patient_id>_idx5_x<X>_y<Y>_class<C>.png' (IDC) or '0/' and "
                            f"'1/' (the seed's). {GET_DATA.format(root=root)}")


def _class_files(folder: Path) -> list[Path]:
    files = [folder / n for n in regular_files(folder)]
    if not files:
        raise ValueError(f"class folder {folder} is empty: remove it or put its patches back.")
    return files


def _patient_folders(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_dir() and ((p / "0").is_dir() or (p / "1").is_dir())]


def scan_breast(root: Path, layout: str, folder: Path) -> tuple[list[str], np.ndarray, list[str] | None, list[str]]:
    """Files (relative to ``root``), labels, patient ids (``None`` for the ``binary`` layout) and notes
    on what was skipped: a nested copy of the patient folders (each patch used once, by file name),
    folders that hold no patches."""
    files, labels, patients, notes = [], [], [], []
    if layout == "binary":
        for c in (0, 1):
            for p in _class_files(folder / str(c)):
                files.append(p.relative_to(root).as_posix())
                labels.append(c)
        return files, np.asarray(labels, np.int64), None, notes
    top = _patient_folders(folder)
    copies, odd = [], []
    for p in _visible(folder):
        if p.is_dir() and p not in top:
            (copies if _patient_folders(p) else odd).append(p)
    seen: set[str] = set()
    for source in [top, *(_patient_folders(c) for c in copies)]:
        duplicates = added = 0
        for person in source:
            extra = [p.name for p in _visible(person) if p.is_dir() and p.name not in ("0", "1")]
            if extra:
                notes.append(f"skipped the folder(s) {extra[:5]} in {person.relative_to(root)}/: a patient folder "
                             f"holds only 0/ and 1/")
            for c in (0, 1):
                sub = person / str(c)
                if not sub.is_dir():
                    continue
                for p in _class_files(sub):
                    pid, _, _, label = parse_idc_name(p)
                    if pid != person.name or label != c:
                        raise ValueError(f"{p}: the name says patient {pid!r}, class {label} but the file sits in "
                                         f"{person.name}/{c}/. Move it to {pid}/{label}/.")
                    if p.name in seen:
                        duplicates += 1
                        continue
                    seen.add(p.name)
                    added += 1
                    files.append(p.relative_to(root).as_posix())
                    labels.append(c)
                    patients.append(pid)
        if source is not top:
            where = source[0].parent.relative_to(root).as_posix()
            notes.append(f"{where}/ holds a copy of {len(source)} patient folders: {duplicates} patches already "
                         f"read from the top level were skipped (each patch is used once), {added} new ones used")
    if odd:
        notes.append(f"skipped {[p.name for p in odd][:5]}: folder(s) holding neither patient folders nor 0/ and 1/")
    return files, np.asarray(labels, np.int64), patients, notes


def read_sites(root: Path, folder: Path) -> dict[str, str] | None:
    """``{patient: site}`` from ``sites.csv`` (columns ``patient,site``) in ``root`` or ``folder``, else None."""
    for place in dict.fromkeys([root, folder]):
        path = place / SITES_FILE
        if path.is_file():
            table = pd.read_csv(path, dtype=str)
            if list(table.columns[:2]) != ["patient", "site"]:
                raise ValueError(f"{path}: expected the columns patient,site; got {list(table.columns)}. Fix or "
                                 f"remove the file.")
            return dict(zip(table["patient"], table["site"]))
    return None


@dataclass
class BreastData:
    """Decoded patches: ``images`` uint8 ``[N, 3, S, S]``, ``labels`` int64 ``[N]`` (1 = IDC),
    ``patients`` (one id per patch, or ``None`` without patient ids), source ``files``."""

    images: torch.Tensor
    labels: torch.Tensor
    patients: list[str] | None
    files: list[str]
    root: Path
    layout: str
    synthetic: bool
    skipped: list[str] = field(default_factory=list)
    classes: tuple[str, str] = CLASSES
    #: each patch's hospital (from ``sites.csv``), or ``None``
    sites: list[str] | None = None
    #: what the reader skipped (a nested copy, odd folders), said once when loading
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def patient_table(self) -> pd.DataFrame:
        """Patches and positive rate per patient (empty without patient ids)."""
        if self.patients is None:
            return pd.DataFrame(columns=["patches", "positive", "positive %"])
        df = pd.DataFrame({"patient": self.patients, "y": self.labels.numpy()})
        out = df.groupby("patient")["y"].agg(patches="size", positive="sum")
        out["positive %"] = (100 * out["positive"] / out["patches"]).round(1)
        return out

    def describe(self) -> dict:
        """A JSON-ready summary for the run record."""
        y = self.labels.numpy()
        return {"name": "breast-idc", "layout": self.layout, "root": portable_path(self.root),
                "synthetic": self.synthetic, "classes": list(self.classes), "patches": len(y), "positive": int(y.sum()),
                "patients": None if self.patients is None else len(set(self.patients)),
                "image_shape": list(self.images.shape[1:]), "skipped": list(self.skipped),
                "hospitals": None if self.sites is None else len(set(self.sites)), "notes": list(self.notes)}


def _synthetic_notice(root: Path) -> str:
    return notice_box(["SYNTHETIC DATA — THESE ARE NOT MEDICAL IMAGES", "",
                       "This run uses computer-generated look-alike H&E patches",
                       "(the real breast histopathology data was not found, or data='synthetic'):",
                       f"  {root}", "Every number computed on them is NOT a medical result.", "",
                       "To use the real data, put the IDC patches (<patient_id>/0/, /1/)",
                       "or the seed's 0/ and 1/ folders there and load with data='real'."])


def load_breast(data: str = "auto", data_dir: str | os.PathLike = "data/breast", image_size: int = 50,
                max_patches: int | None = None, seed: int = 0, strict: bool = False,
                progress: bool = True) -> BreastData:
    """Load the breast patches as RGB uint8 tensors ``[N, 3, image_size, image_size]``.

    ``data``: ``"auto"`` (real if present, else the stand-in written once into ``data_dir``),
    ``"real"`` (error when absent) or ``"synthetic"`` (kept in ``<parent>/synthetic/<name>`` when
    ``data_dir`` holds other data). ``max_patches`` takes a class-stratified subset fixed by ``seed``.
    Unreadable patches are skipped with a warning naming them (``strict=True`` raises instead).
    """
    if data not in DATA_CHOICES:
        raise ValueError(f"data={data!r}: use one of {DATA_CHOICES}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size={image_size!r}: need an integer >= 8")
    root = resolve_path(data_dir)
    if data == "synthetic" and not (root / MARKER).exists() and find_breast_layout(root) is not None:
        root = root.parent / "synthetic" / root.name
    found = find_breast_layout(root)
    synthetic = (root / MARKER).exists()
    if synthetic and f"version={STANDIN_VERSION}" not in (root / MARKER).read_text(errors="replace"):
        print(f"{root} holds a stand-in written by an older labkit: writing the current one (hospitals, sites.csv)")
        write_breast_standin(root, seed=0, progress=progress)
        found = find_breast_layout(root)
    if data == "real" and (found is None or synthetic):
        why = "holds a synthetic stand-in" if synthetic else "holds no breast patches"
        raise FileNotFoundError(f"data='real' but {root} {why}. {GET_DATA.format(root=root)}")
    if found is None:
        write_breast_standin(root, seed=0, progress=progress)
        found, synthetic = find_breast_layout(root), True
    if synthetic:
        print(_synthetic_notice(root))
    layout, folder = found
    files, labels, patients, notes = scan_breast(root, layout, folder)
    if notes:
        print("\n".join([f"NOTE — {root} read as the archive unzips:", *(f"  - {n}" for n in notes)]))
    site_of = read_sites(root, folder) if patients is not None else None
    if site_of is not None and (missing := sorted(set(patients) - set(site_of))):
        raise ValueError(f"{SITES_FILE} beside {folder} names no site for the patient(s) {missing[:5]}; add them "
                         f"or remove the file.")
    keep = stratified_subset(labels, max_patches, seed)
    files, labels = [files[i] for i in keep], labels[keep]
    patients = None if patients is None else [patients[i] for i in keep]
    images, kept, skipped = load_images_cached(root, files, image_size, "RGB", tag="breast", strict=strict,
                                               progress=progress, pad_to=PATCH)
    patients = None if patients is None else [patients[i] for i in kept]
    return BreastData(images=images, labels=torch.from_numpy(labels[kept]), patients=patients,
                      files=[files[i] for i in kept], root=root, layout=layout, synthetic=synthetic,
                      skipped=skipped, notes=notes,
                      sites=None if site_of is None else [site_of[p] for p in patients])


def has_patient_ids(data: str = "auto", data_dir: str | os.PathLike = "data/breast") -> bool:
    """Whether :func:`load_breast` with these arguments will have patient ids, without decoding anything:
    False only for the seed's ``0/ 1/`` layout (a lab checks ``split='hospital'`` with it up front)."""
    if data == "synthetic":
        return True
    found = find_breast_layout(resolve_path(data_dir))
    return found is None or found[0] == "idc"


# --------------------------------------------------------------------------- train / val / test
def _cut(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    n_val, n_test = max(1, round(n * fractions[1])), max(1, round(n * fractions[2]))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} items cannot fill train/val/test with fractions {fractions}")
    return n_val, n_test


def split_patches(labels: np.ndarray, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, np.ndarray]:
    """Patch-level split, stratified by class: sorted index arrays for train / val / test."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = _cut(len(idx), fractions) if len(idx) >= 3 else (0, 0)
        out["val"] += idx[:n_val].tolist()
        out["test"] += idx[n_val:n_val + n_test].tolist()
        out["train"] += idx[n_val + n_test:].tolist()
    return {s: np.sort(np.asarray(v, np.int64)) for s, v in out.items()}


def split_by_patient(patients: list[str], labels: np.ndarray, fractions=(0.7, 0.15, 0.15),
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Patient-level split: every patient's patches land in exactly one of train / val / test.

    Stratified by positive rate: patients are sorted by it, cut into blocks of about
    ``1 / min(fraction)`` patients, and each block sends its patients to the splits in a seeded
    random order, so each split spans low- to high-rate patients.
    """
    labels = np.asarray(labels)
    ids = sorted(set(patients))
    n_val, n_test = _cut(len(ids), fractions)
    pid_index = {p: i for i, p in enumerate(ids)}
    per = np.asarray([pid_index[p] for p in patients])
    rate = np.bincount(per, weights=labels, minlength=len(ids)) / np.bincount(per, minlength=len(ids))
    rng = np.random.default_rng(seed)
    order = np.argsort(rate + rng.uniform(0, 1e-6, len(ids)), kind="stable")
    # deal patients out like cards: quotas per split, each block of patients shuffled
    quota = {"train": len(ids) - n_val - n_test, "val": n_val, "test": n_test}
    assign: dict[int, str] = {}
    block = max(2, int(round(len(ids) / max(1, min(n_val, n_test)))))
    for start in range(0, len(ids), block):
        members = order[start:start + block]
        wants = [s for s in ("val", "test") if quota[s] > 0]
        slots = rng.permutation(len(members))
        for j, member in enumerate(members):
            split = wants[slots[j]] if slots[j] < len(wants) else "train"
            if quota[split] == 0:
                split = next(s for s in SPLITS if quota[s] > 0)
            assign[int(member)] = split
            quota[split] -= 1
    return {s: np.flatnonzero(np.asarray([assign[int(k)] == s for k in per])) for s in SPLITS}


def split_by_group(patients: list[str], labels: np.ndarray, groups, fractions=(0.7, 0.15, 0.15),
                   seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`split_by_patient` within each group (e.g. hospital, one entry per patch): every group
    keeps patients in train, validation and test, so each can be scored on its own."""
    groups = np.asarray(groups)
    out = {s: [] for s in SPLITS}
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        part = split_by_patient([patients[i] for i in idx], np.asarray(labels)[idx], fractions, seed)
        for s in SPLITS:
            out[s] += idx[part[s]].tolist()
    return {s: np.sort(np.asarray(v, np.int64)) for s, v in out.items()}


def saved_split(data: BreastData, level: str = "patient", fractions=(0.7, 0.15, 0.15),
                seed: int = 0, groups=None) -> dict[str, np.ndarray]:
    """The train / val / test split of ``data`` at ``level`` ("patient" or "patch"), made once and
    saved as JSON (file names per split) in the dataset's cache folder; later calls read it back.
    ``groups`` (one entry per patch, e.g. its hospital) makes the patient split within each group.

    A patient split of data without patient ids raises ``ValueError`` (use ``level="patch"``).
    """
    if level not in ("patient", "patch"):
        raise ValueError(f"level={level!r}: use 'patient' or 'patch'")
    if level == "patient" and data.patients is None:
        raise ValueError(f"{data.root} ({data.layout} layout) has no patient ids, so a patient-level split is "
                         f"impossible; use level='patch' (and know that patients may then sit on both sides).")
    grouping = None if groups is None else [str(g) for g in groups]
    if grouping is not None and (level != "patient" or len(grouping) != len(data.files)):
        raise ValueError(f"groups: one entry per patch ({len(data.files)}) and level='patient' needed")
    key = hashlib.sha1(json.dumps([level, list(fractions), seed, data.files, *([grouping] if grouping else [])]
                                  ).encode()).hexdigest()[:12]
    path = cache_dir_for(data.root) / f"split-{level}-seed{seed}-{key}.json"
    index = {f: i for i, f in enumerate(data.files)}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            out = {s: np.sort(np.asarray([index[f] for f in saved["files"][s]], np.int64)) for s in SPLITS}
            if sum(len(v) for v in out.values()) == len(index) and len(np.unique(np.concatenate(list(out.values())))) == len(index):
                return out
        except (ValueError, KeyError, TypeError):
            pass  # damaged or stale: made again below
    if grouping is not None:
        out = split_by_group(data.patients, data.labels.numpy(), grouping, fractions, seed)
    elif level == "patient":
        out = split_by_patient(data.patients, data.labels.numpy(), fractions, seed)
    else:
        out = split_patches(data.labels.numpy(), fractions, seed)
    write_json(path, {"level": level, "fractions": list(fractions), "seed": seed,
                      "files": {s: [data.files[i] for i in out[s]] for s in SPLITS}})
    return out


__all__ = ["CLASSES", "BreastData", "find_breast_layout", "has_patient_ids", "load_breast", "parse_idc_name",
           "read_sites", "saved_split", "split_by_group", "split_by_patient", "split_patches"]
