"""Atomic file writing: a result file is either complete or absent, never half-written."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

#: Errors that mean "this file cannot be written here": disk full, quota, read-only, no permission.
NO_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Works for files and folders (a folder is written whole, then renamed into place; an old one
    is replaced). On an exception the temporary is removed and ``path`` is left as it was; a full
    disk, a quota or a read-only folder becomes an ``OSError`` that names ``path`` and says so.
    """
    final = Path(path)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        tmp.unlink()
        yield tmp
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        if err.errno not in NO_WRITE or str(final) in str(err):
            raise
        state = "left as it was" if final.exists() else "not written"
        raise OSError(err.errno, f"could not write {final}: {err.strerror or err}; {final.name} was {state}. "
                                 "Free some disk space or write to another folder") from err
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None and tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before it replaces an older file)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NumPy/torch scalars become numbers)."""
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
