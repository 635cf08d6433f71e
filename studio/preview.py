"""Open one page (or any widget) on its own, outside the main window, for a quick look.

    if __name__ == "__main__":       # at the end of a page module
        from cpt_studio.studio.preview import preview_page
        preview_page(TrainingPage)

    cd /tmp && python -P -m cpt_studio.studio.pages.training_page

The page gets a StudioState on the default workspace ($CPT_STUDIO_HOME, else the user-data folder)
unless `workspace` names one, the app's theme and runtime settings, and a window of `size`.
CPT_STUDIO_PREVIEW_MS=N closes it after N milliseconds, so a smoke check can open every page
headless (QT_QPA_PLATFORM=offscreen) and see it exit 0.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QWidget

CLOSE_AFTER_ENV = "CPT_STUDIO_PREVIEW_MS"


def preview_page(factory: Callable[..., QWidget], *, workspace: str | Path | None = None,
                 size: tuple[int, int] = (1400, 900)) -> NoReturn:
    """Show `factory(state)` in its own window and run the event loop; exits the process with the
    loop's exit code."""
    from cpt_studio.engine.runs.store import Workspace

    from . import theme
    from .runtime import configure_runtime
    from .state import StudioState

    configure_runtime()
    app = QApplication.instance() or QApplication(sys.argv)
    theme.apply_theme(app)
    state = StudioState(Workspace(workspace))
    widget = factory(state)
    widget.resize(*size)
    widget.show()
    close_after = os.environ.get(CLOSE_AFTER_ENV, "").strip()
    if close_after:
        QTimer.singleShot(int(close_after), app.closeAllWindows)
    code = app.exec()
    del widget, state
    sys.exit(code)
