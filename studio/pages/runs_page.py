"""The Runs page: every run with its status and final numbers; rename, delete, duplicate, compare,
diff configs, resume, continue from an adapter, export a merged model, and watch a run that is
still going. The export runs in a background task; its outcome shows in the page's banner.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QAction, QColor, QDesktopServices
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QInputDialog, QLabel, QMessageBox,
                               QProgressBar, QSplitter, QTableWidget, QTableWidgetItem, QToolBar, QVBoxLayout,
                               QWidget)

from cpt_studio.engine.errors import CptError
from cpt_studio.engine.model.export import export_merged, resolve_export_source
from cpt_studio.engine.runs.index import RunIndex

from ..background_tasks import BackgroundTasks
from ..run_controller import RunController
from .model_source_picker import BUILTIN_LABEL
from .run_widgets import Banner
from .runs_widgets import (ConfigDiffDialog, ContinueDialog, ExportDialog, LossOverlay, has_weights,
                           list_step_folders)

COLUMNS = ("Status", "Name", "Model", "Corpus", "Steps", "Final loss", "Eval loss", "Created")
NUMBER_COLUMNS = (4, 5, 6)
MAX_COLUMN_WIDTH = 260
log = logging.getLogger(__name__)
STATUS_COLOURS = {"running": "#2563eb", "finished": "#15803d", "stopped": "#b45309", "failed": "#dc2626",
                  "interrupted": "#dc2626", "created": "#71717a"}


class _Item(QTableWidgetItem):
    """Sorts by the value it was made from, not by its text."""

    def __init__(self, text: str, key):
        super().__init__(text)
        self.key = key

    def __lt__(self, other):
        a, b = self.key, getattr(other, "key", None)
        if a is None or b is None:
            return a is None and b is not None
        return a < b


class RunsPage(QWidget):
    title = "Runs"
    icon_name = "runs"
    uses_run_controller = True
    open_page = Signal(str)            # ask the window to show another page ("training", "run")

    def __init__(self, state, controller: RunController | None = None, parent=None):
        super().__init__(parent)
        self.state = state
        self.controller = controller or RunController(state.workspace, parent=self)
        self.index = RunIndex(state.workspace)
        self.summaries = {}
        self.banner = Banner()
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.setWordWrap(False)          # one line per run; long names are elided, whole in the tooltip
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.setSortingEnabled(True)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.table.itemDoubleClicked.connect(self.show_in_run_page)
        self.overlay = LossOverlay()
        self.buttons: dict[str, QAction] = {}
        bar = QToolBar()
        bar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        for key, text, tip, slot in (
                ("refresh", "Refresh", "Read the run folders again", self.refresh),
                ("show", "Show", "Show this run on the Run page (live when it still trains)", self.show_in_run_page),
                ("rename", "Rename…", "Change the run's display name", self.rename_selected),
                ("duplicate", "Duplicate", "Copy this run's settings to the Training page", self.duplicate_selected),
                ("delete", "Delete…", "Delete the selected runs and their checkpoints", self.delete_selected),
                ("diff", "Diff configs", "Show the settings that differ between two runs", self.diff_selected),
                ("resume", "Resume", "Go on exactly from the last checkpoint", self.resume_selected),
                ("continue", "Continue from…", "Train a new run from this run's adapter or a checkpoint",
                 self.continue_selected),
                ("export", "Export…", "Merge this run's newest adapter into its base model and save it "
                 "as one model folder (checked against the adapter)", self.export_selected),
                ("folder", "Open folder", "Open the run folder in the file manager", self.open_folder)):
            action = QAction(text, self, toolTip=tip)
            action.triggered.connect(slot)
            self.buttons[key] = action
            bar.addAction(action)
            if key in ("refresh", "delete"):
                bar.addSeparator()
        self.tasks = BackgroundTasks(self, max_threads=1)
        self.tasks.finished.connect(self._on_exported)
        self.tasks.failed.connect(self._on_export_failed)
        self.tasks.progress_changed.connect(self._on_export_progress)
        self.tasks.busy_changed.connect(self._on_export_busy)
        self.export_progress = QProgressBar(maximumHeight=14, textVisible=False)
        self.export_progress.setRange(0, 0)
        self.export_status = QLabel(objectName="muted")
        self.export_row = QWidget()
        row = QHBoxLayout(self.export_row)
        row.setContentsMargins(4, 0, 4, 0)
        row.addWidget(self.export_status, 1)
        row.addWidget(self.export_progress, 1)
        self.export_row.hide()
        self._exporting = ""                 # name of the run being exported
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.overlay)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.addWidget(bar)
        lay.addWidget(self.banner)
        lay.addWidget(self.export_row)
        lay.addWidget(split, 1)
        self.controller.run_ended.connect(self._on_run_changed)
        self.controller.run_started.connect(self._on_run_changed)
        self.controller.state_changed.connect(self._update_actions)
        self.refresh()

    # ---- listing --------------------------------------------------------------------------------
    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.refresh()

    def _on_run_changed(self, *_args) -> None:
        if self.isVisible():
            self.refresh()

    def refresh(self) -> None:
        selected = set(self.selected_ids())
        try:
            runs = self.index.list_runs()
        except (CptError, OSError) as exc:
            self.banner.show_message("error", "Cannot read the runs", str(exc))
            return
        self.summaries = {r.id: r for r in runs}
        self.table.setSortingEnabled(False)
        self.table.blockSignals(True)
        self.table.setRowCount(len(runs))
        for row, r in enumerate(runs):
            cells = (_Item(r.status, r.status), _Item(r.name, r.name.lower()), _Item(model_label(r.model), r.model),
                     _Item(r.corpus, r.corpus), _Item(str(r.steps), r.steps), _loss_item(r.final_loss),
                     _loss_item(r.eval_loss),
                     _Item(time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), r.created))
            cells[0].setForeground(QColor(STATUS_COLOURS.get(r.status, "#71717a")))
            cells[0].setData(Qt.ItemDataRole.UserRole, r.id)
            for col, item in enumerate(cells):
                item.setToolTip(f"{r.id}\n{r.model if col == 2 else item.text()}")
                if col in NUMBER_COLUMNS:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, col, item)
            if r.skipped_lines:
                cells[0].setToolTip(f"{cells[0].toolTip()}\n{_skipped_note(r.skipped_lines)}")
        self.table.setSortingEnabled(True)
        for col in (0, 2, 3, 7):
            self.table.resizeColumnToContents(col)
            self.table.setColumnWidth(col, min(self.table.columnWidth(col), MAX_COLUMN_WIDTH))
        self.table.clearSelection()
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).data(Qt.ItemDataRole.UserRole) in selected:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self._on_selection()

    def selected_ids(self) -> list[str]:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.table.item(r, 0).data(Qt.ItemDataRole.UserRole) for r in rows]

    def select(self, run_ids: list[str]) -> None:
        self.table.clearSelection()
        mode = self.table.selectionMode()
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).data(Qt.ItemDataRole.UserRole) in run_ids:
                self.table.selectRow(row)
        self.table.setSelectionMode(mode)

    def _on_selection(self) -> None:
        ids = self.selected_ids()
        self._update_actions()
        self.overlay.show_runs([(i, self.summaries[i].name, self.index.step_metrics(i, refresh=False),
                                 self.index.eval_metrics(i, refresh=False)) for i in ids if i in self.summaries])

    def _update_actions(self, *_args) -> None:
        ids = self.selected_ids()
        one = len(ids) == 1
        status = self.summaries[ids[0]].status if one and ids[0] in self.summaries else ""
        for key in ("show", "rename", "duplicate", "continue", "folder"):
            self.buttons[key].setEnabled(one)
        self.buttons["delete"].setEnabled(bool(ids) and "running" not in
                                          {self.summaries[i].status for i in ids if i in self.summaries})
        self.buttons["diff"].setEnabled(len(ids) == 2)
        self.buttons["resume"].setEnabled(one and status not in ("running", "created") and not self.controller.busy)
        self.buttons["continue"].setEnabled(one and status != "running" and not self.controller.busy)
        self.buttons["export"].setEnabled(one and not self.tasks.is_busy("export")
                                          and has_weights(self.state.workspace.runs_dir / ids[0]))

    def set_dark(self, dark: bool) -> None:
        self.overlay.set_dark(dark)

    # ---- actions --------------------------------------------------------------------------------
    def _one(self) -> str | None:
        ids = self.selected_ids()
        return ids[0] if len(ids) == 1 else None

    def _fail(self, title: str, exc: Exception) -> None:
        self.banner.show_message("error", title, getattr(exc, "message", str(exc)), getattr(exc, "hint", ""))

    def show_in_run_page(self, *_args) -> None:
        run_id = self._one()
        if run_id:
            self.state.run_selected.emit(run_id)
            self.open_page.emit("run")

    def rename_selected(self) -> None:
        run_id = self._one()
        if not run_id:
            return
        name, ok = QInputDialog.getText(self, "Rename run", "New name:", text=self.summaries[run_id].name)
        if ok and name.strip():
            try:
                self.state.workspace.rename_run(run_id, name)
            except CptError as exc:
                return self._fail("Cannot rename the run", exc)
            self.refresh()

    def delete_selected(self) -> None:
        ids = self.selected_ids()
        if not ids:
            return
        names = "\n".join(f"• {self.summaries[i].name}" for i in ids if i in self.summaries)
        answer = QMessageBox.question(self, "Delete runs", f"Delete {len(ids)} run(s) with their checkpoints "
                                      f"and adapters? This cannot be undone.\n\n{names}")
        if answer != QMessageBox.StandardButton.Yes:
            return
        for run_id in ids:
            try:
                self.state.workspace.delete_run(run_id)
            except CptError as exc:
                self._fail("Cannot delete the run", exc)
        self.refresh()

    def duplicate_selected(self) -> None:
        run_id = self._one()
        if not run_id:
            return
        try:
            config = self.state.workspace.get_run(run_id).load_config()
        except CptError as exc:
            return self._fail("Cannot read the run's settings", exc)
        self.state.set_config(dataclasses.replace(config, name=f"{config.name} copy"))
        self.open_page.emit("training")

    def diff_selected(self) -> ConfigDiffDialog | None:
        ids = self.selected_ids()
        if len(ids) != 2:
            return None
        runs = [self.state.workspace.get_run(i) for i in ids]
        dialog = ConfigDiffDialog(runs[0].name, runs[0].raw_config(), runs[1].name, runs[1].raw_config(), self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        return dialog

    def resume_selected(self) -> None:
        run_id = self._one()
        if not run_id:
            return
        summary = self.summaries[run_id]
        run = self.state.workspace.get_run(run_id)
        if not list_step_folders(run.path):
            return self._fail("Cannot resume", CptError(f"Run {summary.name!r} has no checkpoint yet.",
                                                         "Use Continue from… to start from its adapter, or "
                                                         "Duplicate to train it again."))
        max_steps = None
        if summary.status == "finished":    # extending a finished run needs a new end
            steps, ok = QInputDialog.getInt(self, "Train further", "Train until step:",
                                            max(summary.steps * 2, 1), summary.steps + 1, 10_000_000)
            if not ok:
                return
            max_steps = steps
        self._launch(lambda: self.controller.resume(run_id, max_steps=max_steps))

    def continue_selected(self) -> None:
        run_id = self._one()
        if not run_id:
            return
        run = self.state.workspace.get_run(run_id)
        dialog = ContinueDialog(run.path, run.name, self)
        if dialog.exec() != ContinueDialog.DialogCode.Accepted:
            return
        source, with_optimizer, name = dialog.result_values()
        self._launch(lambda: self.controller.continue_from(source, with_optimizer, name=name or None))

    def export_selected(self) -> None:
        run_id = self._one()
        if not run_id or self.tasks.is_busy("export"):
            return
        run = self.state.workspace.get_run(run_id)
        try:
            resolve_export_source(run.path, self.state.workspace)   # something to export at all?
        except CptError as exc:
            self._fail(f"Cannot export {run.name}", exc)
            return
        dialog = ExportDialog(run.path, run.name, self)
        if dialog.exec() != ExportDialog.DialogCode.Accepted:
            return
        dtype, out, overwrite = dialog.result_values()
        self._exporting = run.name
        self.banner.hide()
        self.export_status.setText(f"Exporting {run.name} ({dtype})…")
        self.export_progress.setRange(0, 0)
        self.tasks.submit("export", export_merged, str(run.path), Path(out).expanduser(), self.state.workspace,
                          dtype=dtype, overwrite=overwrite, with_progress=True)
        self._update_actions()

    def _on_export_busy(self, busy: bool) -> None:
        self.export_row.setVisible(busy)
        self._update_actions()

    def _on_export_progress(self, _tag: str, fraction: float, message: str) -> None:
        self.export_progress.setRange(0, 1000)
        self.export_progress.setValue(int(fraction * 1000))
        if message:
            self.export_status.setText(f"Exporting {self._exporting}: {message}")

    def _on_exported(self, _tag: str, result) -> None:
        self.banner.show_message("info", f"Exported {self._exporting} as a merged {result.dtype} model",
                                 f"{result.path}\n{result.n_params:,} parameters, {result.seconds:.0f} s; "
                                 f"{result.summary()}")

    def _on_export_failed(self, _tag: str, exc) -> None:
        if not isinstance(exc, CptError):
            log.error("export of %s failed", self._exporting, exc_info=exc)
            exc = CptError(f"{type(exc).__name__}: {exc}", "Nothing was kept; the traceback is in the log.")
        self._fail(f"Could not export {self._exporting}", exc)

    def _launch(self, start) -> None:
        try:
            start()
        except CptError as exc:
            return self._fail("Cannot start the run", exc)
        self.open_page.emit("run")

    def open_folder(self) -> None:
        run_id = self._one()
        if run_id:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.state.workspace.get_run(run_id).path)))


def model_label(source: str) -> str:
    """How the table names a run's model.source: the built-in default by name, a local folder or file
    by its last part (the whole source is in the tooltip), a hub id as it is."""
    if not source or source == "default":
        return BUILTIN_LABEL
    path = Path(source)
    if path.is_absolute() or source.startswith(("~", ".")):
        return path.name or source
    return source


def _loss_item(value) -> _Item:
    return _Item("–" if value is None else f"{value:.4f}", value)


def _skipped_note(count: int) -> str:
    lines = "1 damaged line" if count == 1 else f"{count} damaged lines"
    return (f"events.jsonl has {lines}: skipped, the status and steps come from the other events. "
            "The warning in the log names each line; delete those lines to silence it.")


if __name__ == "__main__":      # python -P -m cpt_studio.studio.pages.runs_page [WORKSPACE]
    import sys

    from cpt_studio.studio.preview import preview_page
    preview_page(RunsPage, workspace=sys.argv[1] if len(sys.argv) > 1 else None, size=(1100, 700))
