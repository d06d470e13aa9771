"""Archive extraction (``labkit.data.images.extract_zip_once``): members that would escape the target folder
(zip-slip), symbolic links and zip bombs are refused with an error naming the archive and the member, before
anything is written; a damaged member leaves nothing half-extracted."""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import badfiles
import pytest

from labkit.data import images
from labkit.data.images import UnsafeArchiveError, extract_zip_once

pytestmark = pytest.mark.usefixtures("isolated_course")


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None,
             compression=zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name) if name.startswith(("/", "..")) else name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def leftovers(folder: Path) -> list[str]:
    """Everything beside the archive except the archive itself."""
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".zip")


GOOD = {"data/train/a/img0.txt": b"fine"}


@pytest.mark.parametrize("member", ["../evil.txt", "data/../../evil.txt", "/tmp/evil-labkit.txt",
                                    "C:/evil.txt", "data\\..\\..\\evil.txt"])
def test_zip_slip_members_are_refused(tmp_path, member):
    archive = make_zip(tmp_path / "inbox" / "set.zip", {**GOOD, member: b"owned"})
    with pytest.raises(UnsafeArchiveError) as err:
        extract_zip_once(archive, progress=False)
    assert str(archive) in str(err.value) and repr(member) in str(err.value)
    assert leftovers(archive.parent) == [], "nothing unpacked, no temporary folder left"
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil-labkit.txt").exists()


def test_symlink_members_are_refused(tmp_path):
    archive = make_zip(tmp_path / "box" / "set.zip", GOOD, symlinks={"data/train/a/passwd.png": "/etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match=r"'data/train/a/passwd.png' is a symbolic link") as err:
        extract_zip_once(archive, progress=False)
    assert str(archive) in str(err.value) and leftovers(archive.parent) == []


def test_a_zip_bomb_is_refused_by_its_compression_ratio(tmp_path):
    archive = make_zip(tmp_path / "box" / "bomb.zip", {**GOOD, "data/zeros.bin": bytes(8 * 2**20)})   # 8 MiB -> ~8 KiB
    assert archive.stat().st_size < 100_000
    with pytest.raises(UnsafeArchiveError, match=r"'data/zeros.bin'.*zip bomb") as err:
        extract_zip_once(archive, progress=False)
    assert str(archive) in str(err.value) and leftovers(archive.parent) == []


def test_an_archive_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "box" / "big.zip", {f"data/{i}.bin": bytes(range(256)) * 8 for i in range(4)},
                       compression=zipfile.ZIP_STORED)
    monkeypatch.setattr(images, "MAX_UNZIPPED_BYTES", 4096)
    with pytest.raises(UnsafeArchiveError, match="over labkit's limit") as err:
        extract_zip_once(archive, progress=False)
    assert str(archive) in str(err.value) and leftovers(archive.parent) == []
    monkeypatch.setattr(images, "MAX_UNZIPPED_BYTES", 2**20)
    assert sorted(p.name for p in (extract_zip_once(archive, progress=False) / "data").iterdir()) == \
        ["0.bin", "1.bin", "2.bin", "3.bin"]


def test_a_damaged_member_leaves_nothing_half_extracted(tmp_path):
    archive = make_zip(tmp_path / "box" / "set.zip", {"data/a.bin": bytes(range(256)) * 64, "data/b.bin": b"x" * 5000},
                       compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    at = raw.index(b"x" * 100)
    raw[at: at + 100] = b"y" * 100                # b.bin's bytes no longer match its CRC
    archive.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"'data/b.bin'") as err:
        extract_zip_once(archive, progress=False)
    assert str(archive) in str(err.value)
    assert leftovers(archive.parent) == [], "a.bin (already unpacked) was removed with the temporary folder"


def test_not_a_zip_is_named(tmp_path):
    archive = tmp_path / "box" / "set.zip"
    archive.parent.mkdir(exist_ok=True)
    archive.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ValueError, match="download it again") as err:
        extract_zip_once(archive, progress=False)
    assert str(archive) in str(err.value) and leftovers(archive.parent) == []


def test_a_mac_made_zip_unpacks_without_its_macosx_clutter(tmp_path):
    from labkit.data.alzheimer import CLASSES, load_alzheimer

    src = badfiles.alzheimer(tmp_path / "src").root
    members = {f"Alzheimer_s Dataset/{p.relative_to(src).as_posix()}": p.read_bytes()
               for p in sorted(src.rglob("*.jpg"))}
    members["__MACOSX/Alzheimer_s Dataset/train/._img0.jpg"] = b"\x00\x05\x16\x07" + bytes(60)
    make_zip(tmp_path / "data" / "alzheimer" / "Alzheimer_s Dataset.zip", members)
    data = load_alzheimer(data="real", data_dir=tmp_path / "data" / "alzheimer", image_size=16, progress=False)
    assert data.layout == "zip" and data.classes == sorted(CLASSES) and sum(len(p) for p in data.splits.values()) == 16
    assert not any(p.name == "__MACOSX" for p in (tmp_path / "data" / "alzheimer").rglob("*"))


def test_the_alzheimer_loader_refuses_an_unsafe_zip(tmp_path):
    from labkit.data.alzheimer import load_alzheimer

    root = tmp_path / "alzheimer"
    make_zip(root / "Alzheimer_s Dataset.zip", {"Alzheimer_s Dataset/train/a.jpg": b"x", "../../outside.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./\.\./outside.txt'"):
        load_alzheimer(data="real", data_dir=root, image_size=16, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["Alzheimer_s Dataset.zip"]
    assert not (tmp_path.parent / "outside.txt").exists()
