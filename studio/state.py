"""The one piece of shared GUI state: the config being edited and the workspace it runs in.

Pages read and write the config through `StudioState`; every change emits `config_changed`, so the
Model, Corpus and Training pages and the Run page's "Start" stay in step without knowing each other.
"""
from __future__ import annotations

import copy
import dataclasses

from PySide6.QtCore import QObject, Signal

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.store import Workspace


class StudioState(QObject):
    """Holds the RunConfig being edited and the Workspace; emits config_changed(section)."""

    config_changed = Signal(str)      # section name ("model", "data", ...) or "" for everything
    run_selected = Signal(str)        # a run id the user picked (History -> Run page)

    def __init__(self, workspace: Workspace, config: RunConfig | None = None, parent=None):
        super().__init__(parent)
        self.workspace = workspace
        self._config = config or RunConfig()
        self.model_info = None        # engine.model.source.ModelInfo of the chosen model, once described
        self.resolved_model = None    # engine.model.source.ResolvedModel, once resolved

    @property
    def config(self) -> RunConfig:
        """A copy: edit through set_field / set_config so listeners hear about it."""
        return copy.deepcopy(self._config)

    def set_config(self, config: RunConfig) -> None:
        self._config = copy.deepcopy(config)
        self.config_changed.emit("")

    def set_field(self, section: str, name: str, value) -> None:
        """Set `config.<section>.<name>` (section "" = a top-level field) and notify."""
        holder = self._config if not section else getattr(self._config, section)
        if getattr(holder, name) == value:
            return
        if dataclasses.is_dataclass(holder):
            setattr(holder, name, value)
        self.config_changed.emit(section)
