"""Durable files: fsynced writes, atomic replacement of whole folders, recovery after a crash,
and sweeping stale temp files.

:func:`write_text_durable` and :func:`fsync_file` flush a file to stable storage;
:func:`temp_file` and :func:`temp_folder` make the hidden temporaries a save writes into before
it renames them into place, with ordinary (shareable) permissions.

A model folder holds two files (``config.json``, ``weights.safetensors``) that must change
together. Replacing them one after the other leaves a window in which the folder holds the new
weights with the old config. :func:`replace_folder` closes it: the new model is written into a
fresh hidden folder next to the target, then the target is renamed away and the new folder
renamed into its place::

    <parent>/.<name>.new-<random>.tmp    the new model, complete and fsynced before any rename
    <parent>/.<name>.old-<random>.tmp    the previous model, between the two renames

Whatever the moment of a crash, one of these holds: the target is the old model (crash before
the first rename), the target is the new model (after the second), or the target is missing and
the old model is whole in ``.old-...``. :func:`recover` puts it back; loading a model calls it,
and so does the next save. The next save also :func:`sweep`\\ s the hidden leftovers.

Everything goes through ``os.replace``, ``os.rename`` and ``shutil.rmtree`` looked up at call
time, so tests can inject a failure at each step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "check_regular_file",
    "fsync_dir",
    "fsync_file",
    "recover",
    "replace_folder",
    "sweep",
    "sweep_older",
    "temp_file",
    "temp_folder",
    "unlink_quietly",
    "write_text_durable",
]

logger = logging.getLogger(__name__)

#: Names of temporary files a crashed in-place save may leave inside a model folder.
_INSIDE_PATTERNS = (".weights.*.tmp", ".config.*.tmp", ".weights.*.bak")


def _siblings(target: Path, kind: str) -> list[Path]:
    """Hidden ``.<name>.<kind>-*.tmp`` entries next to ``target``, newest first."""
    try:
        found = list(target.parent.glob(f".{_glob_escape(target.name)}.{kind}-*.tmp"))
    except OSError:
        return []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=mtime, reverse=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory so a rename inside it is durable (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file that was written by another library to stable storage."""
    with open(path, "r+b") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def write_text_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8, ``\\n`` line ends), then flush and fsync."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def umask() -> int:
    """The process's current umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file(folder: Path, prefix: str) -> Path:
    """Create an empty temporary file ``<prefix>XXXXXXXX.tmp`` in ``folder``; return its path.

    The file gets the ordinary permissions of a new file (0666 minus the umask), not
    mkstemp's private 0600, so a saved model can be shared like any other file.
    """
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o666 & ~umask())
    return Path(name)


def temp_folder(folder: Path, prefix: str, suffix: str) -> Path:
    """A temporary folder in ``folder`` with ordinary permissions (0777 minus the umask)."""
    name = tempfile.mkdtemp(dir=folder, prefix=prefix, suffix=suffix)
    os.chmod(name, 0o777 & ~umask())
    return Path(name)


def unlink_quietly(path: Path | None) -> None:
    """Delete the file ``path`` if there is one; errors are ignored."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def recover(target: Path, complete: Callable[[Path], bool] = lambda p: True) -> Path | None:
    """Put back the previous folder a crashed :func:`replace_folder` left aside.

    Only when ``target`` is missing. Returns the folder to read (``target`` once restored,
    or the hidden copy itself if it cannot be renamed, e.g. on read-only media), or None
    when there is nothing to recover.
    """
    if os.path.lexists(target):
        return None
    for old in _siblings(target, "old"):
        if not old.is_dir() or not complete(old):
            continue
        try:
            os.rename(old, target)
        except OSError as e:
            logger.warning("cannot restore %s from %s (%s); reading it from there", target, old, e)
            return old
        logger.warning("restored %s from %s (a save was interrupted)", target, old.name)
        fsync_dir(target.parent)
        return target
    return None


def sweep(target: Path, extra: Iterable[Path] = ()) -> int:
    """Delete the temp files and folders crashed saves of ``target`` left behind.

    Call it only while no other save of ``target`` runs. A missing target is first
    :func:`recover`\\ ed, so the previous model is never swept away. Returns the number removed.
    """
    recover(target)
    stale: list[Path] = [*extra]
    for kind in ("new", "old"):
        stale += _siblings(target, kind)
    with contextlib.suppress(OSError):
        # temp names of a fresh folder save and of single-file saves: .<name>.XXXXXXXX.tmp
        stale += [
            p for p in target.parent.glob(f".{_glob_escape(target.name)}.*.tmp") if p not in stale
        ]
    if target.is_dir():
        for pattern in _INSIDE_PATTERNS:
            with contextlib.suppress(OSError):
                stale += list(target.glob(pattern))
    n = 0
    for p in stale:
        try:
            n += _remove(p)
        except OSError as e:
            logger.warning("could not remove the stale temp file %s: %s", p, e)
    if n:
        logger.info("removed %d stale temp file(s) of %s", n, target)
    return n


def sweep_older(paths: Iterable[Path], seconds: float) -> int:
    """Delete the given temp entries that were last modified more than ``seconds`` ago."""
    now, n = time.time(), 0
    for p in paths:
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime >= seconds:
                n += _remove(p)
    return n


def _remove(p: Path) -> int:
    """Delete a file or folder; 1 if removed, 0 if it was already gone."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            os.unlink(p)
    except FileNotFoundError:
        return 0
    return 1


def replace_folder(target: Path, new: Path) -> None:
    """Swap the complete folder ``new`` in for the folder ``target``, atomically as a whole.

    ``new`` must sit in ``target``'s parent (one file system) and be fully written and
    fsynced. On an error the previous ``target`` is put back and ``new`` is left to the caller.
    """
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}.tmp"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(target.parent)
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new model is in place; the old copy goes at the next save
        logger.warning("could not remove the previous model %s: %s", old, e)


def check_regular_file(path: Path) -> None:
    """Raise ``OSError`` unless ``path`` is a regular file (a named pipe would block ``open``)."""
    import stat

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise OSError(f"{path} is {kind}, not a regular file")
