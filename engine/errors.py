"""Errors a user can meet. Each carries a message a user understands and, where one exists, the fix."""
from __future__ import annotations


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
