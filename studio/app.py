"""The desktop app: `cpt-studio` with no subcommand, or `python -P -m cpt_studio.studio.app`.

    cpt-studio [--workspace DIR] [Qt options such as -platform offscreen]

The workspace is --workspace DIR, else $CPT_STUDIO_HOME, else the platform's user-data folder.
"""
from __future__ import annotations

import argparse
import logging
import sys

from PySide6.QtWidgets import QApplication, QMessageBox

from cpt_studio.engine.errors import CptError
from cpt_studio.engine.runs.store import Workspace

from . import theme
from .main_window import MainWindow
from .runtime import configure_runtime
from .state import StudioState

APP_NAME = "CPT Studio"
ORG_NAME = "cpt-studio"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="cpt-studio", description="Continued pretraining studio.")
    parser.add_argument("--workspace", metavar="DIR", default=None,
                        help="Folder holding runs/, models/ and cache/ (default: $CPT_STUDIO_HOME or "
                             "the user-data folder).")
    return parser.parse_known_args(argv)        # the rest goes to Qt (-platform, -style, ...)


def make_app(qt_args: list[str]) -> QApplication:
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "cpt-studio", *qt_args])
    app.setApplicationName(APP_NAME)
    app.setApplicationDisplayName(APP_NAME)
    app.setOrganizationName(ORG_NAME)
    app.setDesktopFileName("cpt-studio")
    theme.apply_theme(app)
    return app


def main(argv: list[str] | None = None) -> int:
    args, qt_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_runtime()                         # before any page emits a signal
    app = make_app(qt_args)
    try:
        workspace = Workspace(args.workspace)
        workspace.runs_dir                      # creates the folders, or says why it cannot
    except CptError as exc:
        QMessageBox.critical(None, APP_NAME, str(exc))
        return 2
    window = MainWindow(StudioState(workspace))
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
