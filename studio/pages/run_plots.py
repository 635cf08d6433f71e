"""Live training charts: loss (raw, smoothed, eval per set), perplexity, both learning rates, grad norm,
tokens/s and memory. Values go into growing numpy buffers; `refresh()` pushes only what changed to
pyqtgraph, and the page calls it a few times a second at most.
"""
from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QGridLayout, QWidget

from cpt_studio.engine.runs.events import EvalMetrics, StepMetrics

GIB = 1024 ** 3
PALETTE = ("#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#14b8a6", "#ec4899", "#84cc16")
EVAL_SYMBOLS = ("o", "t", "s", "d", "star", "+")


class Series:
    """Growing x/y float buffers (capacity doubles); a step logged again replaces the later points."""

    def __init__(self, capacity: int = 512):
        self._x = np.empty(capacity)
        self._y = np.empty(capacity)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self.n]

    def append(self, x: float, y: float) -> bool:
        """Add a point; returns True when earlier points were dropped (a resumed run went back)."""
        rewound = False
        if self.n and x <= self._x[self.n - 1]:
            self.n = int(np.searchsorted(self._x[: self.n], x, side="left"))
            rewound = True
        if self.n == len(self._x):
            self._x = np.resize(self._x, 2 * self.n)
            self._y = np.resize(self._y, 2 * self.n)
        self._x[self.n], self._y[self.n] = x, y
        self.n += 1
        return rewound

    def clear(self) -> None:
        self.n = 0


def _gib(value):
    return None if value is None else value / GIB


# (plot key, title, y label, [(series key, legend name, colour index, width)])
PLOTS = (
    ("loss", "Loss", "loss", [("loss", "train (raw)", 0, 1), ("loss_ema", "train (smoothed)", 0, 2)]),
    ("ppl", "Eval perplexity", "perplexity", []),
    ("lr", "Learning rates", "lr", [("lr", "lr", 2, 1), ("embedding_lr", "embedding lr", 4, 1)]),
    ("grad", "Grad norm", "norm", [("grad_norm", "grad norm", 3, 1)]),
    ("speed", "Throughput", "tokens/s", [("tokens_per_s", "tokens/s", 5, 1)]),
    ("mem", "Memory", "GiB", [("gpu_alloc", "GPU allocated", 0, 1), ("gpu_reserved", "GPU reserved", 1, 1),
                              ("ram", "RAM (worker)", 6, 1)]),
)
RISING = ("speed", "mem")
_STEP_FIELDS = (("lr", "lr", None), ("embedding_lr", "embedding_lr", None), ("grad_norm", "grad_norm", None),
                ("tokens_per_s", "tokens_per_s", None), ("gpu_alloc", "gpu_mem_allocated", _gib),
                ("gpu_reserved", "gpu_mem_reserved", _gib), ("ram", "ram", _gib))


class RunPlots(QWidget):
    """A grid of linked charts fed with StepMetrics / EvalMetrics."""

    def __init__(self, smoothing: float = 0.9, parent=None):
        super().__init__(parent)
        self.smoothing = smoothing
        self.series: dict[str, Series] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.plots: dict[str, pg.PlotWidget] = {}
        self._dirty: set[str] = set()
        self._ema, self._ema_n = 0.0, 0
        self._eval_sets: list[str] = []
        self._plot_of: dict[str, str] = {}     # curve key -> chart key
        self._names: dict[str, str] = {}       # curve key -> legend name
        self._in_legend: set[str] = set()      # curves listed in their chart's legend (once they have data)
        self._x_max = 0.0
        self._next_plot = 0
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setSpacing(4)
        for i, (key, title, ylabel, lines) in enumerate(PLOTS):
            w = pg.PlotWidget(title=title)
            item = w.getPlotItem()
            item.setLabel("left", ylabel)
            item.setDownsampling(auto=True, mode="peak")
            item.setClipToView(True)
            # Top right, where falling curves (loss, grad norm, a decaying lr) leave room; rising ones
            # (throughput, memory) end at the top right, so theirs goes bottom right.
            corner = (-5, -5) if key in RISING else (-5, 5)
            item.addLegend(offset=corner, labelTextSize="8pt", brush=pg.mkBrush(128, 128, 128, 24))
            w.setMinimumHeight(150)
            self.plots[key] = w
            grid.addWidget(w, i // 3, i % 3)
            for skey, name, colour, width in lines:
                self._add_curve(key, skey, name, pg.mkPen(PALETTE[colour], width=width))
        for key in ("lr", "mem"):       # "lr (x1e-06)" and "GiB (x0.001)" read badly: plain numbers
            self.plots[key].getPlotItem().getAxis("left").enableAutoSIPrefix(False)
        self.curves["loss"].setAlpha(0.45, False)
        self._total_line = pg.InfiniteLine(angle=0, movable=False, label="card total {value:.0f} GiB",
                                           pen=pg.mkPen("#888", style=pg.QtCore.Qt.PenStyle.DashLine),
                                           labelOpts={"position": 0.3, "color": "#888"})
        self._total_line.setVisible(False)
        self.plots["mem"].addItem(self._total_line)
        self.set_dark(palette_is_dark(self))

    def _add_curve(self, plot: str, key: str, name: str, pen, symbol=None) -> None:
        self.series[key] = Series()
        self._plot_of[key] = plot
        self._names[key] = name
        kwargs = dict(symbol=symbol, symbolSize=7, symbolPen=pen, symbolBrush=pen.color()) if symbol else {}
        # No name here: a curve joins the legend with its first point, so a CPU run's memory chart
        # does not list GPU series it never draws.
        self.curves[key] = self.plots[plot].plot([], [], pen=pen, connect="finite", **kwargs)

    # ---- feeding --------------------------------------------------------------------------------
    def add_step(self, ev: StepMetrics) -> None:
        s = ev.step
        if self.series["loss"].append(s, ev.loss):
            self._rebuild_ema()
        else:
            self._push_ema(s, ev.loss)
        self._dirty.update(("loss", "loss_ema"))
        for key, attr, convert in _STEP_FIELDS:
            value = getattr(ev, attr)
            if value is not None:
                self.series[key].append(s, convert(value) if convert else value)
                self._dirty.add(key)
        if ev.gpu_mem_total and self._total_line.value() != ev.gpu_mem_total / GIB:
            self._total_line.setVisible(True)
            self._total_line.setValue(ev.gpu_mem_total / GIB)
            self._total_line.label.valueChanged()   # a hidden line's label does not follow on its own

    def add_eval(self, ev: EvalMetrics) -> None:
        name = ev.eval_set
        if name not in self._eval_sets:
            i = len(self._eval_sets)
            self._eval_sets.append(name)
            pen = pg.mkPen(PALETTE[(i + 1) % len(PALETTE)], width=2)
            symbol = EVAL_SYMBOLS[i % len(EVAL_SYMBOLS)]
            self._add_curve("loss", f"eval:{name}", f"eval {name}", pen, symbol)
            self._add_curve("ppl", f"ppl:{name}", name, pen, symbol)
        self.series[f"eval:{name}"].append(ev.step, ev.eval_loss)
        self.series[f"ppl:{name}"].append(ev.step, ev.perplexity)
        self._dirty.update((f"eval:{name}", f"ppl:{name}"))

    def _push_ema(self, step: float, loss: float) -> None:
        if not math.isfinite(loss):
            self.series["loss_ema"].append(step, math.nan)
            return
        b = self.smoothing
        self._ema = b * self._ema + (1 - b) * loss
        self._ema_n += 1
        self.series["loss_ema"].append(step, self._ema / (1 - b ** self._ema_n))   # debiased

    def _rebuild_ema(self) -> None:
        raw = self.series["loss"]
        self.series["loss_ema"].clear()
        self._ema, self._ema_n = 0.0, 0
        for x, y in zip(raw.x.tolist(), raw.y.tolist()):
            self._push_ema(x, y)

    def set_total_steps(self, total: int) -> None:
        """Fix the step axis to 0..total: axes that do not move every update redraw far less."""
        self._x_max = 0.0
        self._fit_x(max(1, total), exact=True)

    def _fit_x(self, x: float, exact: bool = False) -> None:
        if x <= self._x_max:
            return
        # Without a known end, grow in steps of 1.5x so the axis changes only now and then.
        self._x_max = float(x) if exact else float(max(10.0, math.ceil(x * 1.5)))
        for w in self.plots.values():
            w.getPlotItem().setXRange(0, self._x_max, padding=0.02)

    def _set_curve(self, key: str) -> None:
        s = self.series[key]
        if s.n:
            self._fit_x(s.x[-1])
            if key not in self._in_legend:
                self._in_legend.add(key)
                self._relist_legend(self._plot_of[key])
        self.curves[key].setData(s.x, s.y)

    def _relist_legend(self, plot: str) -> None:
        """The chart's legend: its curves that have data, in the order the curves were made."""
        legend = self.plots[plot].getPlotItem().legend
        legend.clear()
        for key, curve in self.curves.items():
            if key in self._in_legend and self._plot_of[key] == plot:
                legend.addItem(curve, self._names[key])

    def refresh(self) -> None:
        """Push every changed buffer to its curve (cheap when nothing changed)."""
        for key in self._dirty:
            self._set_curve(key)
        self._dirty.clear()

    def refresh_next(self) -> bool:
        """Update the curves of one chart, the next with changes in turn; returns whether more wait.

        One chart per call keeps each repaint short (a full pass over six charts costs up to ~100 ms
        on a busy 2-core machine), so the event loop stays responsive while a run floods metrics.
        """
        plots = list(self.plots)
        for i in range(1, len(plots) + 1):
            plot = plots[(self._next_plot + i) % len(plots)]
            keys = [k for k in self._dirty if self._plot_of[k] == plot]
            if keys:
                for key in keys:
                    self._set_curve(key)
                    self._dirty.discard(key)
                self._next_plot = plots.index(plot)
                break
        return bool(self._dirty)

    def clear(self) -> None:
        for key, s in self.series.items():
            s.clear()
            self._dirty.add(key)
        self._ema, self._ema_n = 0.0, 0
        self._total_line.setVisible(False)
        self._total_line.setValue(0)
        self.refresh()
        self._in_legend.clear()
        for w in self.plots.values():
            w.getPlotItem().legend.clear()
        self._x_max = 0.0
        for w in self.plots.values():
            w.getPlotItem().enableAutoRange(x=True)

    def set_dark(self, dark: bool) -> None:
        for w in self.plots.values():
            style_plot(w, dark)


def palette_is_dark(widget) -> bool:
    return widget.palette().window().color().lightness() < 128


def style_plot(w: pg.PlotWidget, dark: bool) -> None:
    """Background, title and axis colours of one chart for the light or dark theme."""
    fg = "#d4d4d8" if dark else "#3f3f46"
    w.setBackground("#1e1e22" if dark else "#ffffff")
    item = w.getPlotItem()
    item.titleLabel.setText(item.titleLabel.text, color=fg)
    for axis in ("left", "bottom"):
        item.getAxis(axis).setTextPen(fg)
        item.getAxis(axis).setPen(fg)
    if item.legend is not None:
        item.legend.setLabelTextColor(fg)
        # setLabelTextColor only stores the colour for later entries: redraw the existing labels
        # (else they keep pyqtgraph's default grey, hard to read on the light theme).
        for _sample, label in item.legend.items:
            label.setText(label.text, color=fg)


if __name__ == "__main__":      # python -P -m cpt_studio.studio.pages.run_plots: made-up curves
    from cpt_studio.studio.preview import preview_page

    def _sample_plots(_state):
        plots = RunPlots()
        for step in range(1, 200):
            plots.add_step(StepMetrics(step=step, epoch=0, loss=2 + 1 / step, lr=1e-4,
                                       embedding_lr=1e-5, grad_norm=1.0, tokens_seen=0,
                                       tokens_per_s=1e4, step_s=0.1))
        plots.refresh()
        return plots

    preview_page(_sample_plots, size=(1100, 500))
