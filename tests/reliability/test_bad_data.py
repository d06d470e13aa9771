"""Bad data in every dataset layout labkit reads (Alzheimer, lung, Tiny ImageNet, breast): each awkward file is
read correctly, skipped with a warning naming it, or refused with an error naming it — never a stack trace from
deep inside PIL or torch, never a hang — and the dataset folder is never written into."""
from __future__ import annotations

import os
import re
import signal
import warnings
from pathlib import Path

import badfiles
import numpy as np
import pytest
from badfiles import LAYOUTS, count, decoded

from labkit.data import cache
from labkit.data.cache import UnreadableImageError

pytestmark = pytest.mark.usefixtures("isolated_course")

KINDS = sorted(LAYOUTS)


@pytest.fixture(params=KINDS)
def layout(request, tmp_path) -> badfiles.Layout:
    return LAYOUTS[request.param](tmp_path / "datasets")


@pytest.fixture(autouse=True)
def no_hang():
    """A load that hangs (a symlink loop followed forever) fails the test instead of the whole run."""
    def stop(*_):
        raise TimeoutError("the load did not finish within 60 s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def load_quietly(layout, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = layout.load(**kw)
    return data, [str(w.message) for w in caught]


def test_clean_layouts_load(layout):
    data, warned = load_quietly(layout)
    assert count(data) == layout.n and not warned


@pytest.mark.parametrize("writer", [badfiles.truncated_jpeg, badfiles.zero_bytes], ids=["truncated-jpeg", "zero-bytes"])
def test_unreadable_file_is_skipped_with_a_warning_naming_it(layout, writer):
    bad = writer(layout.class_dir / layout.name(0, "jpg"))
    data, warned = load_quietly(layout)
    assert count(data) == layout.n, "the good images all load"
    assert any(bad.name in w and "not a readable image" in w for w in warned), warned
    assert any(Path(s).name == bad.name for s in data.skipped)
    with pytest.raises(UnreadableImageError, match=re.escape(bad.name)):
        layout.load(strict=True)


def _expect(layout, rgb) -> float | np.ndarray:
    """What a pixel of colour ``rgb`` decodes to in this layout's channel mode (PIL's L = ITU-R 601 luma)."""
    r, g, b = rgb
    return np.asarray(rgb, float) if layout.channels == 3 else np.asarray([(299 * r + 587 * g + 114 * b) / 1000])


def test_png_with_alpha_is_composited_over_black(layout):
    name = layout.name(1, "png")
    badfiles.rgba_png(layout.class_dir / name)
    data, warned = load_quietly(layout)
    img = decoded(data, name)
    assert img is not None and count(data) == layout.n + 1 and not warned
    assert np.allclose(img[:, 8, 2], _expect(layout, badfiles.OPAQUE_RGB), atol=3), "opaque pixels keep their colour"
    assert np.all(img[:, 8, 13] <= 3), "fully transparent pixels are black, not the hidden white"


def test_16_bit_grayscale_png_is_scaled_not_clipped(layout):
    name = layout.name(2, "png")
    badfiles.gray16_png(layout.class_dir / name)
    data, _ = load_quietly(layout)
    img = decoded(data, name)
    assert img is not None
    assert np.allclose(img[:, 8, 2], badfiles.LOW16 / 257, atol=2)     # 10000 -> 39 (PIL alone: 255)
    assert np.allclose(img[:, 8, 13], badfiles.HIGH16 / 257, atol=2)   # 60000 -> 233


def test_cmyk_jpeg_is_converted(layout):
    name = layout.name(3, "jpg")
    badfiles.cmyk_jpeg(layout.class_dir / name)
    data, warned = load_quietly(layout)
    img = decoded(data, name)
    assert img is not None and not warned
    assert np.allclose(img[:, 8, 8], _expect(layout, (255, 0, 0)), atol=12)


def test_os_clutter_is_ignored_and_other_files_are_named(layout):
    names = badfiles.clutter(layout.class_dir)
    if layout.kind == "breast":   # IDC folders hold only <pid>_idx5_x<X>_y<Y>_class<C>.png patches
        with pytest.raises(ValueError, match="notes.txt.*not an IDC patch name"):
            layout.load()
        return
    data, warned = load_quietly(layout)
    assert count(data) == layout.n
    assert [s for s in data.skipped] and all(Path(s).name == "notes.txt" for s in data.skipped)
    assert any("notes.txt" in w for w in warned)
    assert not any(n in w for n in names[:2] for w in warned), "OS clutter is not reported"


def test_empty_class_folder_is_refused_naming_it(layout):
    for p in layout.class_dir.iterdir():
        p.unlink()
    (layout.class_dir / ".DS_Store").write_bytes(b"junk")   # clutter does not count as an image
    with pytest.raises(ValueError, match="is empty") as err:
        layout.load()
    assert str(layout.class_dir) in str(err.value)


def test_macosx_folders_from_a_zip_are_ignored(layout):
    badfiles.macosx_clutter(layout.root, layout.class_dir)
    data, warned = load_quietly(layout)
    assert count(data) == layout.n and not warned
    assert not any("__MACOSX" in f or Path(f).name.startswith("._") for f in getattr(data, "files", []) + [
        f for part in getattr(data, "splits", {}).values() for f in part.files])


def test_symlink_loops_are_skipped_with_a_warning_and_do_not_hang(layout):
    name = badfiles.symlink_loops(layout.class_dir)
    data, warned = load_quietly(layout)
    assert count(data) == layout.n
    assert any(name in w and "link" in w for w in warned), warned


def test_spaces_and_non_ascii_in_paths(tmp_path):
    for kind in KINDS:
        lay = LAYOUTS[kind](tmp_path / "my data — ünïcödé 数据" / kind)
        name = lay.name(7, "png") if kind == "breast" else "scan 01 é 数据.png"
        badfiles.good(lay.class_dir / name, value=150)
        data, warned = load_quietly(lay)
        img = decoded(data, name)
        assert img is not None and count(data) == lay.n + 1 and not warned, kind
        assert np.allclose(img, 150, atol=2), kind


def test_a_class_folder_with_an_unexpected_name_is_refused_naming_it(layout):
    if layout.kind == "tiny-imagenet":     # a class folder (a wnid) that wnids.txt does not list
        expected = layout.class_dir.parent
        expected.rename(expected.parent / "n99999999")
    elif layout.kind == "breast":          # a patient folder holds 0/, 1/ and a '2/'
        expected = layout.class_dir.parent / "2"
        layout.class_dir.rename(expected)
        badfiles.good(layout.class_dir / layout.name(0, "png"))
    else:                                  # 'Mild Demented' where 'MildDemented' belongs (lung: its first class)
        expected = layout.class_dir
        layout.class_dir.rename(layout.class_dir.parent / "Mild Demented")
    if layout.kind == "breast":            # the IDC archive holds odd folders: skipped, and the notice names them
        ds = layout.load()
        notes = " ".join(getattr(ds, "notes", []) or [])
        assert f"'{expected.name}'" in notes and f"{expected.parent.name}/" in notes, notes   # which folder, where
        return
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        layout.load()
    assert expected.name in str(err.value), "the error names the folder"
    assert str(layout.root) in str(err.value), "and says where"


def test_the_dataset_folder_is_never_written_into(layout):
    """Load twice (decode, then from the cache) with the folder read-only: not one entry, size or mtime changes.
    (As root, chmod does not stop writes, so the listing comparison is what checks it.)"""
    badfiles.truncated_jpeg(layout.class_dir / layout.name(0, "jpg"))   # a skipped file must not be "fixed" either
    before = badfiles.snapshot(layout.root)
    modes = {p: p.stat().st_mode for p in [layout.root, *layout.root.rglob("*")] if not p.is_symlink()}
    try:
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        first, _ = load_quietly(layout)
        second, _ = load_quietly(layout)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert badfiles.snapshot(layout.root) == before
    assert count(first) == count(second) == layout.n
    cached = list(Path(os.environ["LABKIT_CACHE"]).rglob("*.pt"))
    assert cached, "the decoded images went to LABKIT_CACHE"


def test_a_read_only_standin_caches_elsewhere(tmp_path, monkeypatch):
    """A stand-in keeps its cache in <root>/.labkit_cache — unless the folder is read-only (e.g. a shared class
    copy): then the cache goes to LABKIT_CACHE and the stand-in is untouched."""
    from labkit.data.alzheimer import load_alzheimer
    from labkit.data.synth_mri import write_alzheimer_standin

    root = write_alzheimer_standin(tmp_path / "standin", n_train=8, n_test=4, size=(32, 32), progress=False)
    before = badfiles.snapshot(root)
    real_access = os.access
    monkeypatch.setattr(cache.os, "access",
                        lambda p, mode: False if Path(p).is_relative_to(root) else real_access(p, mode))
    data = load_alzheimer(data="auto", data_dir=root, image_size=16, progress=False)
    assert count(data) == 12 and data.synthetic
    assert badfiles.snapshot(root) == before and not (root / cache.CACHE_FOLDER).exists()
    assert list(Path(os.environ["LABKIT_CACHE"]).rglob("*.pt"))


def test_an_unwritable_cache_still_loads_with_a_warning(layout, monkeypatch):
    def no_room(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache.torch, "save", no_room)
    data, warned = load_quietly(layout)
    assert count(data) == layout.n
    assert any("could not write the image cache" in w for w in warned)
    assert not list(Path(os.environ["LABKIT_CACHE"]).rglob("*.tmp")), "no temporary file left behind"
