"""Atomic file writes: temp file in the same folder, fsync, rename. A reader sees old or new, never half.

Temp names carry the writer's pid (`.<name>.tmp-<pid>-<random>`), so what a killed writer left
can be told from what a live one is writing (engine/runs/leftovers.py removes the former).
Also `file_sha256`, the checksum the checkpoint manifests and the corpus cache keys use.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entry table so a rename inside it survives a crash."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def publish_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temp folder into place (replacing an older one of the same name).

    The older folder steps aside as `.<name>.old` for the moment between two renames; if the
    second rename fails it is put back, and a writer killed in between leaves it for
    `restore_replaced_dir`.
    """
    for f in Path(tmp_dir).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp_dir)
    if final_dir.exists():
        trash = replaced_dir(final_dir)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        try:
            os.replace(tmp_dir, final_dir)
        except BaseException:
            os.replace(trash, final_dir)    # the older folder stays what the name holds
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def replaced_dir(final_dir: Path) -> Path:
    """Where `publish_dir_atomic` keeps the folder it replaces, between its two renames."""
    return final_dir.with_name(f".{final_dir.name}.old")


def restore_replaced_dir(final_dir: Path) -> str:
    """Finish a `publish_dir_atomic` that was killed between its renames; call only as the writer.

    `.<name>.old` without `<name>`: the older folder is the only copy, renamed back ("restored").
    Both present: the new one was published, the old one is removed ("removed"). Else "".
    """
    old = replaced_dir(final_dir)
    if not old.is_dir():
        return ""
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        return "removed"
    os.replace(old, final_dir)
    fsync_dir(final_dir.parent)
    return "restored"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
