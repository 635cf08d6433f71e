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
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nHint: {self.hint}" if self.hint else self.message


class ConfigError(CptError):
    """One or more config fields are invalid; `problems` maps dotted field name -> message."""

    kind = "config"

    def __init__(self, problems: dict[str, str], source: str = ""):
        self.problems = dict(problems)
        where = f" in {source}" if source else ""
        lines = [f"  {name}: {msg}" for name, msg in self.problems.items()]
        super().__init__(
            f"Invalid configuration{where}:\n" + "\n".join(lines),
            "Fix the fields listed above and start again.",
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


def exception_text(exc: BaseException) -> str:
    """What an unexpected exception is and where it came from, in one line.

    `ValueError: Unsupported device type 'meta' (raised in kernels/layer.py:203)`; an ImportError
    names the module it could not import and the file Python took that module from.
    """
    first = str(exc).strip().splitlines()
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
