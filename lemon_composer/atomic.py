"""Write files and folders so that they appear whole or not at all (temporary name beside them, then rename).

Temporary names carry the writer's pid (``.<name>.tmp-<pid>-<hex>``), so a later start can tell the
leftovers of a dead writer (SIGKILL, power loss) from a live one's and sweep them (``sweep_stale``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: str | Path) -> None:
    """Remove what dead writers of ``out`` left beside it; restore ``out`` from a dead writer's backup.

    A writer that died between moving the old ``out`` aside and moving the new one in leaves no
    ``out`` and a ``.old-`` backup: the backup (the user's previous output) goes back in place.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}$")
    stale = [(m.group(1), path) for path in out.parent.iterdir()
             if (m := pattern.match(path.name)) and not (m.group(2) and _alive(int(m.group(2))))]
    for kind, path in sorted(stale, key=lambda kp: kp[0] == "tmp"):     # restore backups before deleting
        if kind == "old" and not out.exists():
            path.rename(out)
            log.warning("restored %s from the backup an interrupted writer left (%s)", out, path.name)
        else:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            log.warning("removed %s, left by an interrupted writer of %s", path.name, out)


@contextlib.contextmanager
def atomic_folder(out: str | Path, *, overwrite: bool, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any failure it is removed.

    An existing ``out`` is refused unless ``overwrite``, and is removed only after the new one is in place.
    """
    out = Path(out)
    sweep_stale(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{option}={out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        tmp.mkdir()
        yield tmp
        old = None
        if out.exists():
            old = _sibling(out, "old")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it.

    A reader never sees half a file, and an interrupted write leaves the old file (or nothing).
    """
    path = Path(path)
    sweep_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
