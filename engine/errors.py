"""Errors a user can meet. Each carries a message a user understands and, where one exists, the fix."""
from __future__ import annotations

import traceback
from pathlib import Path


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
