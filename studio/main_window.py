"""The main window: a side bar of pages (Model, Corpus, Training, Run, Runs) over one StudioState.

Window geometry and the last page are kept in QSettings. Ctrl+Return starts a run, Ctrl+. stops it.
When a run ends the user hears about it through the system tray (or the status bar without one).
"""
from __future__ import annotations


from PySide6.QtCore import QSettings, QSize, Qt
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMainWindow, QMessageBox,
                               QStackedWidget, QSystemTrayIcon, QWidget)

from . import theme
from .pages.corpus_page import CorpusPage
from .pages.model_page import ModelPage
from .pages.run_page import RunPage
from .pages.runs_page import RunsPage
from .pages.training_page import TrainingPage
from .run_controller import RunController


def page_classes() -> list[type]:
    """The pages in side-bar order. Each is `Page(state, parent=None)` with `title` and `icon_name`;
    pages with `uses_run_controller = True` also get the window's RunController."""
    return [ModelPage, CorpusPage, TrainingPage, RunPage, RunsPage]


class MainWindow(QMainWindow):
    def __init__(self, state, controller: RunController | None = None, parent=None):
        super().__init__(parent)
        self.state = state
        self.controller = controller or RunController(state.workspace, parent=self)
        self.setWindowTitle("CPT Studio")
        self.dark = theme.system_is_dark()
        self.sidebar = QListWidget(objectName="sidebar")
        self.sidebar.setIconSize(QSize(26, 26))
        self.sidebar.setFixedWidth(150)
        self.stack = QStackedWidget()
        self.pages: dict[str, QWidget] = {}
        for cls in page_classes():
            if getattr(cls, "uses_run_controller", False):
                page = cls(state, controller=self.controller, parent=self)
            else:
                page = cls(state, parent=self)
            key = cls.icon_name
            self.pages[key] = page
            item = QListWidgetItem(cls.title)
            item.setData(Qt.ItemDataRole.UserRole, key)
            self.sidebar.addItem(item)
            self.stack.addWidget(page)
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)
        central = QWidget()
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        row.addWidget(self.sidebar)
        row.addWidget(self.stack, 1)
        self.setCentralWidget(central)
        self.workspace_label = QLabel(f"Workspace: {state.workspace.root}", objectName="muted")
        self.statusBar().addPermanentWidget(self.workspace_label)
        self._tray: QSystemTrayIcon | None = None
        self._add_shortcuts()
        self.controller.state_changed.connect(self._on_run_state)
        self.controller.run_ended.connect(self._on_run_ended)
        state.run_selected.connect(self._on_run_selected)
        runs = self.pages.get("runs")
        if hasattr(runs, "open_page"):
            runs.open_page.connect(self.show_page)
        QGuiApplication.styleHints().colorSchemeChanged.connect(self._on_color_scheme)
        self.set_dark(self.dark)
        self._restore_settings()

    # ---- pages ----------------------------------------------------------------------------------
    def show_page(self, key: str) -> None:
        keys = list(self.pages)
        if key in keys:
            self.sidebar.setCurrentRow(keys.index(key))

    def _on_run_selected(self, _run_id: str) -> None:
        self.show_page("run")

    def current_page_key(self) -> str:
        return list(self.pages)[max(0, self.stack.currentIndex())]

    def _add_shortcuts(self) -> None:
        start = QAction("Start run", self)
        start.setShortcuts([QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter")])
        start.triggered.connect(self.start_run)
        stop = QAction("Stop run", self)
        stop.setShortcut(QKeySequence("Ctrl+."))
        stop.triggered.connect(self.stop_run)
        for action in (start, stop):
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            self.addAction(action)
        self.start_action, self.stop_action = start, stop

    def start_run(self) -> None:
        self.show_page("run")
        self.pages["run"].start_run()

    def stop_run(self) -> None:
        self.pages["run"].stop_run()

    # ---- run notifications ----------------------------------------------------------------------
    def _on_run_state(self, state: str) -> None:
        text = {"starting": "Starting the worker…", "running": f"Training {self.controller.run_id}",
                "stopping": "Stopping…"}.get(state)
        if text:
            self.statusBar().showMessage(text)

    def _on_run_ended(self, status: str, message: str) -> None:
        title = f"Run {status}"
        first_line = message.splitlines()[0] if message else ""
        self.statusBar().showMessage(f"{title}: {first_line}", 30000)
        if QSystemTrayIcon.isSystemTrayAvailable() and QSystemTrayIcon.supportsMessages():
            if self._tray is None:
                self._tray = QSystemTrayIcon(theme.icon("run", self.dark), self)
                self._tray.setToolTip("CPT Studio")
            self._tray.show()
            level = QSystemTrayIcon.MessageIcon.Critical if status == "failed" else QSystemTrayIcon.MessageIcon.Information
            self._tray.showMessage(title, first_line, level, 10000)

    # ---- theme and settings ---------------------------------------------------------------------
    def _on_color_scheme(self, _scheme) -> None:
        self.set_dark(theme.apply_theme(QGuiApplication.instance()))

    def set_dark(self, dark: bool) -> None:
        self.dark = dark
        for i, page in enumerate(self.pages.values()):
            self.sidebar.item(i).setIcon(theme.icon(page.icon_name, dark))
            if hasattr(page, "set_dark"):
                page.set_dark(dark)

    def _restore_settings(self) -> None:
        s = QSettings()
        geometry = s.value("window/geometry")
        if geometry is None or not self.restoreGeometry(geometry):
            screen = self.screen().availableGeometry()
            self.resize(min(1320, int(screen.width() * 0.9)), min(860, int(screen.height() * 0.9)))
        self.show_page(str(s.value("window/page", "model")))

    def _save_settings(self) -> None:
        s = QSettings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/page", self.current_page_key())

    def ask_about_running_run(self) -> str:
        """Closing while a run goes: "keep" (it trains on, re-attach later), "stop_and_save" or "cancel"."""
        box = QMessageBox(QMessageBox.Icon.Question, "A run is going",
                          "The run keeps training if you close CPT Studio; open the Runs page later to "
                          "watch it again.", parent=self)
        keep = box.addButton("Keep training", QMessageBox.ButtonRole.AcceptRole)
        save = box.addButton("Stop and save", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        return {keep: "keep", save: "stop_and_save"}.get(box.clickedButton(), "cancel")

    def closeEvent(self, event) -> None:
        if self.controller.busy:
            choice = self.ask_about_running_run()
            if choice == "cancel":
                event.ignore()
                return
            if choice == "stop_and_save":
                self.controller.stop_and_save()
            self.controller.detach()
        self._save_settings()
        super().closeEvent(event)


if __name__ == "__main__":
    import sys
    from cpt_studio.studio.app import main
    sys.exit(main(sys.argv[1:]))
