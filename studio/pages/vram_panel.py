"""The VRAM estimate box of the Model page: a target GPU, the total with a colored badge, the terms,
and "What will run": the Plan (engine/train/plan.py) a run on a GPU follows, each decision with
its reason.

The numbers come from `engine.train.estimate`, which reads that same Plan; this widget only picks
the card and shows them.
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QVBoxLayout

from cpt_studio.engine.errors import ConfigError
from cpt_studio.engine.train.estimate import (GIB, estimate_vram, fit_badge, format_bytes, gpu_name,
                                        gpu_total_memory)
from cpt_studio.engine.train.plan import resolve

# Cards people train on, by memory; shown when this machine has no GPU (or to plan for another).
COMMON_GPUS = [
    ("8 GB (RTX 3070 / 4060)", 8),
    ("12 GB (RTX 3060 / 4070)", 12),
    ("16 GB (RTX 4080 / A4000)", 16),
    ("24 GB (RTX 3090 / 4090 / L4)", 24),
    ("32 GB (RTX 5090)", 32),
    ("48 GB (RTX A6000 / L40S)", 48),
    ("80 GB (A100 / H100)", 80),
    ("141 GB (H200)", 141),
]
DEFAULT_GPU_GB = 24
BADGE_COLORS = {"fits": "#2e7d32", "tight": "#ef6c00", "won't fit": "#c62828"}


class VramPanel(QGroupBox):
    """Shows estimate_vram(info, cfg, plan) against the chosen GPU, and the plan's lines."""

    def __init__(self, parent=None):
        super().__init__("GPU memory estimate", parent)
        self._info = None
        self._cfg = None
        self.gpu_combo = QComboBox()
        self.gpu_combo.setToolTip("The card to check the estimate against.")
        total, name = gpu_total_memory(), gpu_name()
        if total:
            self.gpu_combo.addItem(f"This GPU: {name} ({total / GIB:.0f} GB)", total)
        for label, gb in COMMON_GPUS:
            self.gpu_combo.addItem(label, gb * GIB)
        if not total:
            self.gpu_combo.setCurrentIndex([gb for _, gb in COMMON_GPUS].index(DEFAULT_GPU_GB))
        self.gpu_combo.currentIndexChanged.connect(self._show)

        self.total_label = QLabel("—")
        self.total_label.setStyleSheet("font-size: 15pt; font-weight: 600;")
        self.badge = QLabel()
        self.badge.setMinimumWidth(90)
        self.badge.setAlignment(Qt.AlignCenter)
        self.badge.hide()
        self.note = QLabel("Describe a model to see its estimate.")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: palette(placeholder-text);")
        self.parts = QFormLayout()
        self.plan_title = QLabel("<b>What will run</b> (on a GPU)")
        self.plan_title.hide()
        self.plan_view = QLabel()
        self.plan_view.setTextFormat(Qt.PlainText)
        self.plan_view.setWordWrap(True)
        self.plan_view.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.plan_view.setToolTip("What each `auto` setting becomes on a GPU, and why. The run "
                                  "records its own plan when it starts (RunStarted).")
        self.plan_view.hide()

        top = QHBoxLayout()
        top.addWidget(QLabel("Target GPU:"))
        top.addWidget(self.gpu_combo, 1)
        totals = QHBoxLayout()
        totals.addWidget(self.total_label)
        totals.addWidget(self.badge)
        totals.addStretch(1)
        box = QVBoxLayout(self)
        box.addLayout(top)
        box.addLayout(totals)
        box.addLayout(self.parts)
        box.addWidget(self.note)
        box.addWidget(self.plan_title)
        box.addWidget(self.plan_view)

    def gpu_total(self) -> int:
        return int(self.gpu_combo.currentData())

    def plan_lines(self) -> list[str]:
        text = self.plan_view.text()
        return text.split("\n") if text else []

    def _show_plan(self, lines: list[str]) -> None:
        self.plan_view.setText("\n".join(lines))
        self.plan_title.setVisible(bool(lines))
        self.plan_view.setVisible(bool(lines))

    def badge_text(self) -> str:
        return self.badge.text() if not self.badge.isHidden() else ""

    def set_estimate_inputs(self, info, cfg) -> None:
        """Recompute for a model (None = clear) and the current config."""
        self._info, self._cfg = info, cfg
        self._show()

    def _show(self, *_args) -> None:
        while self.parts.rowCount():
            self.parts.removeRow(0)
        if self._info is None or self._cfg is None:
            self.total_label.setText("—")
            self.badge.hide()
            self.note.setText("Describe a model to see its estimate.")
            self._show_plan([])
            return
        try:
            plan = resolve(self._cfg, "cuda", self._info)
        except ConfigError as exc:   # an explicit setting that cannot hold: say so before Start
            self.total_label.setText("—")
            self.badge.hide()
            self.note.setText("These settings cannot run on a GPU: " + "; ".join(
                f"{name}: {why}" for name, why in exc.problems.items()))
            self._show_plan([])
            return
        self._show_plan(plan.lines())
        est = estimate_vram(self._info, self._cfg, plan)
        for label, value in est.parts():
            self.parts.addRow(label + ":", QLabel(format_bytes(value)))
        gpu = self.gpu_total()
        badge = fit_badge(est.total, gpu)
        self.total_label.setText(f"≈ {format_bytes(est.total)} of {gpu / GIB:.0f} GB")
        self.badge.setText(badge)
        self.badge.setStyleSheet(
            f"background: {BADGE_COLORS[badge]}; color: white; font-weight: 600; "
            "border-radius: 4px; padding: 3px 10px;")
        self.badge.show()
        t, d = self._cfg.training, self._cfg.data
        self.note.setText(
            f"Rough estimate (±25%) for batch {t.batch_size} × {d.seq_len} tokens, gradient "
            f"checkpointing {'on' if t.gradient_checkpointing else 'off'}, "
            f"{est.precision} base; 'tight' = above 85% of the card.")
