"""Errors a user can meet. Each carries a message a user understands and, where one exists, the fix."""
from __future__ import annotations

import errno
import shutil
import traceback
from pathlib import Path
from typing import Callable


class CptError(Exception):
    """Base of every error CPT Studio shows to a user.

    Attributes:
        message: what went wrong, naming the file, field or module involved.
        hint: what to do about it (may be empty).
        kind: a short machine-readable category used in RunFailed events.
    """

    kind = "error"

    def __init__(self, message: str, hint: str = ""):
        message, hint = printable(message), printable(hint)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nHint: {self.hint}" if self.hint else self.message


class ConfigError(CptError):
    """One or more config fields are invalid; `problems` maps dotted field name -> message."""

    kind = "config"

    def __init__(self, problems: dict[str, str], source: str = "", hint: str = ""):
        self.problems = {printable(name): printable(msg) for name, msg in problems.items()}
        where = f" in {source}" if source else ""
        lines = [f"  {name}: {msg}" for name, msg in self.problems.items()]
        super().__init__(
            f"Invalid configuration{where}:\n" + "\n".join(lines),
            hint or "Fix the fields listed above and start again.",
        )


class CorpusError(CptError):
    """A corpus file or folder cannot be read as training text."""

    kind = "corpus"


class ModelSourceError(CptError):
    """A model source (folder, .gguf, hub id, adapter) cannot be resolved or loaded."""

    kind = "model"


class CheckpointError(CptError):
    """A checkpoint or adapter folder is missing, incomplete or corrupt."""

    kind = "checkpoint"


class WorkspaceError(CptError):
    """A run name or path is unusable (escapes the workspace, already exists, disk full, ...)."""

    kind = "workspace"


class DiskFullError(WorkspaceError):
    """A write failed because the disk (or the user's disk quota) is full."""

    kind = "disk_full"


# What a full disk looks like once a library has wrapped the OSError: safetensors' SafetensorError
# ("I/O error: No space left on device (os error 28)"), peft / transformers re-raising it.
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# torch.save reports a full disk as "PytorchStreamWriter failed writing file" or "unexpected pos":
# a RuntimeError saying nothing of the disk. Less free space than this at the folder means full.
_NEARLY_FULL_BYTES = 64 << 20


def is_disk_full(exc: BaseException, folder: str | Path | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk or the quota is full.

    With `folder`, a RuntimeError or a library error raised while writing there also counts when
    the folder's disk has almost no space left: call this before removing what the failed write
    left behind, or the space is free again.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc).lower() for text in _DISK_FULL_TEXTS):
            return True
        if folder is not None and _opaque_write_error(exc) and _free_bytes(folder) < _NEARLY_FULL_BYTES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_error(exc: BaseException, what: str, folder: str | Path,
                then: str | Callable[[], str] = "try again") -> CptError | None:
    """The error a user sees for a write that failed with `exc`; None when it is not about the disk.

    what: what was being written ("checkpoint step-8", "the final adapter").
    folder: where; the hint says to free space there.
    then: what to do once there is space ("resume the run: it goes on from step-4"), or a
        function giving it (called only when the error is about the disk).

    A full disk or quota gives a DiskFullError; any other OSError (permissions, a read-only or
    vanished disk) a WorkspaceError; anything else (a bug, a stop signal) None, to be re-raised.
    Call it before removing the failed write's temp files (see `is_disk_full`).
    """
    if not isinstance(exc, Exception) or isinstance(exc, CptError):
        return None
    full = is_disk_full(exc, folder)
    if not full and _torch_write_failed(exc):      # torch names no cause: a disk that filled and
        free = _free_bytes(folder)                 # emptied again, a quota, a vanished mount...
        left = f" ({free / 1e6:,.0f} MB free now)" if free < 1 << 62 else ""
        then = then() if callable(then) else then
        return WorkspaceError(f"Could not write {what} in {folder}: the file write failed{left}.",
                              f"Check that {folder} has free space and is writable, then {then}.")
    if not full and not isinstance(exc, OSError):
        return None
    then = then() if callable(then) else then
    if full:
        quota = getattr(exc, "errno", None) == errno.EDQUOT or "quota" in str(exc).lower()
        free = _free_bytes(folder)
        left = f" ({free / 1e6:,.0f} MB free)" if free < 1 << 62 and not quota else ""
        reason = "disk quota exceeded" if quota else f"no space left on device{left}"
        return DiskFullError(f"Could not write {what} in {folder}: {reason}.",
                             f"Free space at {folder}, then {then}.")
    reason = exc.strerror or str(exc)
    return WorkspaceError(f"Could not write {what} in {folder}: {reason}.",
                          f"Check that {folder} exists and is writable, then {then}.")


def _opaque_write_error(exc: BaseException) -> bool:
    """torch's RuntimeError and safetensors' SafetensorError: a failed write without its errno."""
    return isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError"


def _torch_write_failed(exc: BaseException) -> bool:
    """torch.save's own words for a write that the disk refused (it keeps the errno to itself)."""
    return isinstance(exc, RuntimeError) and ("PytorchStreamWriter failed writing" in str(exc)
                                              or "file write failed" in str(exc))


def _free_bytes(folder: str | Path) -> int:
    """Free bytes on the disk of `folder` (or its nearest existing parent); huge when unknown."""
    path = Path(folder)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 1 << 62


def printable(text: str) -> str:
    """`text` with the bytes of a file name that is not UTF-8 shown as escapes (`caf\\xe9.txt`).

    Python reads such a name into lone surrogates (PEP 383), which no UTF-8 writer accepts: the
    events, the log and the terminal would crash on the message that names the file.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:       # surrogates that stand for a name's bytes become those bytes, shown as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # any other lone surrogate: \udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


PICKLE_REFUSED = ("the file is a pickle holding more than tensors and numbers, which CPT Studio "
                  "does not load (reading such a pickle can run code hidden in it)")


def refused_pickle(exc: BaseException) -> bool:
    """True for torch.load(weights_only=True) refusing a pickle."""
    return type(exc).__name__ == "UnpicklingError" or "weights_only" in str(exc)


def exception_text(exc: BaseException) -> str:
    """What an unexpected exception is and where it came from, in one line.

    `ValueError: Unsupported device type 'meta' (raised in kernels/layer.py:203)`; an ImportError
    names the module it could not import and the file Python took that module from.
    """
    first = str(exc).strip().splitlines()
    if refused_pickle(exc):
        first = [PICKLE_REFUSED]     # torch's own text advises weights_only=False: never shown
    text = f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
    if isinstance(exc, ImportError) and exc.name:
        found = f" (Python took it from {exc.path})" if exc.path else ""
        return f"{text} [while importing the module {exc.name!r}{found}]"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        return f"{text} (raised in {_short_path(frames[-1].filename)}:{frames[-1].lineno})"
    return text


def import_hint(exc: BaseException) -> str:
    """What to do about an ImportError (or a module that could not be loaded)."""
    path = getattr(exc, "path", None) or ""
    if path and "site-packages" not in path and "dist-packages" not in path:
        return (f"{path} is not an installed package but a file that happens to have the module's "
                "name: start CPT Studio from another folder, or remove that path from PYTHONPATH.")
    return ("A package is missing or does not match the others: run ./install.sh again (it "
            "installs the tested versions), or see the log for the full traceback.")


def _short_path(filename: str) -> str:
    """A traceback file name from its package on (site-packages/ and the like dropped)."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1:])
    return "/".join(parts[-2:])   # a source checkout: folder/file.py
