"""Pieces of the Runs page: overlaid loss curves, the config diff, the "continue training" and the
"export merged model" dialogs."""
from __future__ import annotations

import re
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QLabel, QLineEdit, QPushButton, QTableWidget, QTableWidgetItem,
                               QVBoxLayout)

# engine.model.export imports no torch at module level: the GUI starts light
from cpt_studio.engine.model.export import DTYPES as EXPORT_DTYPES
from cpt_studio.engine.model.export import default_out_dir

from .run_plots import PALETTE, palette_is_dark, style_plot

_STEP_RE = re.compile(r"^step-(\d+)$")


def flatten(data: dict, prefix: str = "") -> dict:
    """{"training": {"learning_rate": 1e-4}} -> {"training.learning_rate": 1e-4}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """Fields whose values differ between two configs (missing = None), by dotted name."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


class ConfigDiffDialog(QDialog):
    """A table of the fields that differ between two runs' configs."""

    def __init__(self, name_a: str, config_a: dict, name_b: str, config_b: dict, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Config differences")
        self.rows = config_diff(config_a, config_b)
        self.table = QTableWidget(len(self.rows), 3)
        self.table.setHorizontalHeaderLabels(["Field", name_a, name_b])
        for r, (key, va, vb) in enumerate(self.rows):
            for c, value in enumerate((key, va, vb)):
                item = QTableWidgetItem("–" if value is None else str(value))
                item.setToolTip(item.text())
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setStretchLastSection(True)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("The configs are identical." if not self.rows else
                             f"{len(self.rows)} field(s) differ:"))
        lay.addWidget(self.table)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.resize(720, 380)


class LossOverlay(pg.PlotWidget):
    """Train loss (lines) and held-out eval loss (points) of several runs on one chart."""

    def __init__(self, parent=None):
        super().__init__(parent, title="Loss of the selected runs")
        self.getPlotItem().setLabel("bottom", "step")
        self.getPlotItem().setLabel("left", "loss")
        self.getPlotItem().setDownsampling(auto=True, mode="peak")
        self.getPlotItem().setClipToView(True)
        self.legend = self.getPlotItem().addLegend(offset=(-5, 5), labelTextSize="8pt",
                                                   brush=pg.mkBrush(128, 128, 128, 24))
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.set_dark(palette_is_dark(self))

    def set_dark(self, dark: bool) -> None:
        style_plot(self, dark)

    def show_runs(self, runs: list[tuple[str, str, list[dict], list[dict]]]) -> None:
        """runs: (run id, name, step rows, eval rows) each."""
        self.clear()
        self.legend.clear()
        self.curves.clear()
        for i, (run_id, name, steps, evals) in enumerate(runs):
            colour = PALETTE[i % len(PALETTE)]
            xs = [r["step"] for r in steps]
            ys = [r["loss"] if r["loss"] is not None else float("nan") for r in steps]
            self.curves[run_id] = self.plot(xs, ys, pen=pg.mkPen(colour, width=1.5), name=name,
                                            connect="finite")
            held = [r for r in evals if r["eval_set"] == "heldout"]
            if held:
                self.plot([r["step"] for r in held], [r["eval_loss"] for r in held], pen=None,
                          symbol="o", symbolSize=6, symbolBrush=colour, symbolPen=colour,
                          name=f"{name} (eval)")


def list_step_folders(run_path: Path) -> list[Path]:
    """checkpoints/step-<N> folders, newest first. A step-N folder only exists once complete (atomic
    rename), so listing is enough here and spares the GUI importing torch through engine.runs.checkpoints."""
    root = Path(run_path) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)), reverse=True)


class ContinueDialog(QDialog):
    """Continue training from a run's adapter or a checkpoint, with a fresh or the saved optimizer."""

    def __init__(self, run_path: Path, run_name: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Continue training")
        self.source = QComboBox()
        adapter = Path(run_path) / "adapter"
        if adapter.is_dir():
            self.source.addItem("Final adapter (adapter/)", str(adapter))
        for step in list_step_folders(run_path):
            self.source.addItem(f"Checkpoint {step.name}", str(step))
        self.with_optimizer = QCheckBox("Also load the optimizer state saved in the checkpoint")
        self.name = QLineEdit(f"{run_name} (continued)")
        self.note = QLabel(wordWrap=True, objectName="muted")
        form = QFormLayout(self)
        form.addRow("Start from", self.source)
        form.addRow("", self.with_optimizer)
        form.addRow("New run name", self.name)
        form.addRow(self.note)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Continue")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        form.addRow(self.buttons)
        self.source.currentIndexChanged.connect(self._update)
        self._update()

    def _update(self) -> None:
        path = self.source.currentData()
        is_ckpt = bool(path) and _STEP_RE.match(Path(path).name) is not None
        self.with_optimizer.setEnabled(is_ckpt)
        if not is_ckpt:
            self.with_optimizer.setChecked(False)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(bool(path))
        self.note.setText("This run has no adapter or checkpoint yet." if not path else
                          "A new run starts from these weights with the same settings; the schedule "
                          "starts over. A fresh optimizer is the usual choice for new data.")

    def result_values(self) -> tuple[str, bool, str]:
        """(init_from path, load optimizer state, new run name)."""
        return self.source.currentData(), self.with_optimizer.isChecked(), self.name.text().strip()


def has_weights(run_path: Path) -> bool:
    """Whether a run saved anything to export or continue from: adapter/ or a checkpoint."""
    return (Path(run_path) / "adapter" / "adapter_config.json").is_file() or bool(list_step_folders(run_path))


class ExportDialog(QDialog):
    """Export a run's newest adapter merged into its base: dtype, output folder, overwrite."""

    # what each of the engine's export dtypes (engine.model.export.DTYPES, in its order) means
    DTYPE_NOTES = {"bf16": "half the size of fp32; what most tools load",
                   "fp32": "exact merge, twice the size"}

    def __init__(self, run_path: Path, run_name: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Export merged model")
        self.run_path = Path(run_path)
        self.dtype = QComboBox()
        for value in EXPORT_DTYPES:
            note = self.DTYPE_NOTES.get(value)
            self.dtype.addItem(f"{value} ({note})" if note else value, value)
        self.out = QLineEdit(str(default_out_dir(self.run_path, self.dtype.currentData())))
        self.out.setToolTip("The folder to create. It must not exist yet, unless it holds an earlier "
                            "export and Overwrite is ticked.")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(browse)
        self.overwrite = QCheckBox("Overwrite an earlier export in this folder")
        note = QLabel(f"Merges the newest adapter of {run_name!r} (its final adapter or latest "
                      "checkpoint) into the base model's original weights, saves one model folder "
                      "(safetensors + tokenizer) and checks it against the adapter. It runs on the "
                      "CPU and needs about the model's size in RAM and on disk.",
                      wordWrap=True, objectName="muted")
        form = QFormLayout(self)
        form.addRow(note)
        form.addRow("Precision", self.dtype)
        form.addRow("Output folder", out_row)
        form.addRow("", self.overwrite)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        form.addRow(self.buttons)
        self._default = self.out.text()
        self.dtype.currentIndexChanged.connect(self._on_dtype)
        self.out.textChanged.connect(self._update)
        self.resize(640, 0)

    def _on_dtype(self) -> None:
        if self.out.text().strip() == self._default:    # follow the dtype until the user edits it
            self._default = str(default_out_dir(self.run_path, self.dtype.currentData()))
            self.out.setText(self._default)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Put the export in", str(self.run_path))
        if folder:
            self.out.setText(str(Path(folder) / Path(self._default).name))

    def _update(self) -> None:
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(bool(self.out.text().strip()))

    def result_values(self) -> tuple[str, str, bool]:
        """(dtype, output folder, overwrite)."""
        return self.dtype.currentData(), self.out.text().strip(), self.overwrite.isChecked()
