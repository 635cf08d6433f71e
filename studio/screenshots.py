"""Regenerate the README screenshots (docs/screenshots/) from a REAL short run of the embedded default.

    python -P -m cpt_studio.studio.screenshots --out docs/screenshots [--workspace DIR] [--time-limit S]

Opens the main window offscreen at 1400x900 on the built-in SmolLM2-135M (its GGUF is converted once
into the workspace: about a minute on a CPU) and the sample Esperanto corpus with the demo's settings
(8 steps, eval and a sample every 4), starts a real run of the engine worker and saves one PNG per
page, each a grab of the whole window:

    model.png     the described model and its VRAM estimate
    corpus.png    the corpus files, a preview and the token count
    training.png  the generated settings form
    run.png       the live charts once steps and an eval have arrived
    runs.png      the run and one continued from its adapter (4 more steps), curves overlaid

Without --workspace a temporary workspace is used and deleted afterwards; pass a dedicated folder
to keep the converted model for the next time (its earlier runs are listed on the Runs page too).
It ends by itself (about 3-4 minutes on a 2-core CPU, less on a GPU) or fails after --time-limit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = 1400, 900
PAGES = ("model", "corpus", "training", "run", "runs")


def screenshot_config():
    """The demo's settings, shortened: 8 steps, eval (and the sample prompt) every 4 steps."""
    from cpt_studio.engine.demo import demo_config
    cfg = demo_config(max_steps=8)
    cfg.name = "esperanto demo"
    cfg.training.warmup_steps = 2
    cfg.eval.every_steps = 4
    cfg.checkpoint.every_steps = 4
    return cfg


class Shooter:
    """Drives the window through the pages and saves the grabs; every wait has one shared deadline."""

    def __init__(self, app, window, out: Path, time_limit_s: float):
        self.app, self.window, self.out = app, window, out
        self.deadline = time.monotonic() + time_limit_s
        self.events: list = []
        self.saved: list[Path] = []
        window.controller.event_received.connect(self.events.append)

    # ---- waiting --------------------------------------------------------------------------------
    def wait(self, condition, what: str) -> None:
        """Run the event loop until condition() holds; TimeoutError past the deadline."""
        from PySide6.QtCore import QEventLoop
        while not condition():
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"gave up waiting for {what}")
            self.app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.05)       # leave the CPU to the worker and the background threads

    def settle(self, seconds: float = 0.6) -> None:
        """Let timers (throttled plot and label refreshes) and paints run for a moment."""
        end = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() > end, "the window to settle")

    def log(self, text: str) -> None:
        print(f"[screenshots] {text}", flush=True)

    # ---- grabbing -------------------------------------------------------------------------------
    def grab(self, page: str) -> Path:
        self.window.show_page(page)
        self.settle()
        path = self.out / f"{page}.png"
        image = self.window.grab().toImage()
        if not image.save(str(path), "PNG", 9):
            raise OSError(f"could not write {path}")
        self.saved.append(path)
        self.log(f"{path} ({path.stat().st_size // 1024} KB)")
        return path

    # ---- the pages ------------------------------------------------------------------------------
    def shoot(self) -> list[Path]:
        from cpt_studio.engine.runs.events import EvalMetrics, RunStarted, Sample, StepMetrics

        w, pages = self.window, self.window.pages
        c = w.controller

        self.log("describing the built-in model (its GGUF is converted once: about a minute on CPU)…")
        w.show_page("model")
        self.wait(lambda: pages["model"].info is not None or not pages["model"].error_label.isHidden(),
                  "the model to be described")
        if pages["model"].info is None:
            raise RuntimeError(f"the model could not be read: {pages['model'].error_label.text()}")
        self.grab("model")

        corpus = pages["corpus"]
        w.show_page("corpus")
        self.wait(lambda: not corpus.tasks.is_busy(), "the corpus files to be inspected")
        corpus.table.selectRow(0)
        self.log("counting tokens…")
        corpus.count_tokens()
        self.wait(lambda: corpus.count_button.isEnabled(), "the token count")
        if corpus.token_stats is None:
            raise RuntimeError(f"counting tokens failed: {corpus.count_label.text()}")
        self.grab("corpus")

        self.grab("training")

        self.log("training (8 steps, eval every 4)…")
        w.start_run()
        if not c.busy:
            raise RuntimeError(f"the run did not start: {pages['run'].banner.text()}")

        def seen(kind, pred=lambda e: True) -> bool:
            return any(isinstance(e, kind) and pred(e) for e in self.events)

        total = 8
        self.wait(lambda: seen(RunStarted) or not c.busy, "the worker to start")
        started = next((e for e in self.events if isinstance(e, RunStarted)), None)
        if started is not None and started.total_steps:
            total = started.total_steps
        # A live view: past the mid-run eval (and its sample), not yet at the end.
        self.wait(lambda: not c.busy or (seen(EvalMetrics, lambda e: e.step >= total // 2)
                                         and seen(Sample, lambda e: e.step >= total // 2)
                                         and seen(StepMetrics, lambda e: e.step >= total - 2)),
                  "steps and an eval")
        pages["run"].refresh()
        self.grab("run")
        self.wait(lambda: not c.busy, "the run to end")
        status = pages["run"].phase_label.text()
        self.log(f"run ended: {status}")
        if not status.startswith("Finished"):
            raise RuntimeError(f"the run did not finish: {status} {pages['run'].banner.text()}")

        first = c.run_id
        self.log("continuing from its adapter (4 more steps)…")
        run = c.workspace.get_run(first)
        config = run.load_config()
        config.training.max_steps = 4
        c.continue_from(run.adapter_dir, config=config, name="esperanto demo (continued)")
        self.wait(lambda: not c.busy, "the continued run to end")
        if not pages["run"].phase_label.text().startswith("Finished"):
            raise RuntimeError(f"the continued run did not finish: {pages['run'].phase_label.text()} "
                               f"{pages['run'].banner.text()}")

        runs = pages["runs"]
        w.show_page("runs")
        runs.refresh()
        runs.select([first, c.run_id])
        self.grab("runs")
        return self.saved


def _quiet_qt_warnings() -> None:
    """Drop the offscreen plugin's "does not support propagateSizeHints()" noise; keep the rest."""
    from PySide6.QtCore import qInstallMessageHandler

    def handler(_mode, _context, message: str) -> None:
        if "propagateSizeHints" not in message:
            print(message, file=sys.stderr)

    qInstallMessageHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -P -m cpt_studio.studio.screenshots",
                                     description="Regenerate the README screenshots from a real short run.")
    parser.add_argument("--out", default="docs/screenshots", help="Folder for the PNGs (default: %(default)s).")
    parser.add_argument("--workspace", metavar="DIR", default=None,
                        help="Workspace to use and keep (default: a temporary one, deleted afterwards).")
    parser.add_argument("--time-limit", type=float, default=600.0, metavar="S",
                        help="Give up after this many seconds (default: %(default)s).")
    args = parser.parse_args(argv)

    os.environ["QT_QPA_PLATFORM"] = "offscreen"       # the same pictures whatever the desktop
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from cpt_studio.engine.runs.store import Workspace

    from .app import make_app
    from .main_window import MainWindow
    from .runtime import configure_runtime
    from .state import StudioState

    configure_runtime()
    _quiet_qt_warnings()
    settings_dir = tempfile.mkdtemp(prefix="cpt-studio-shots-settings-")
    temp_ws = None if args.workspace else tempfile.mkdtemp(prefix="cpt-studio-shots-")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    window = None
    try:
        app = make_app([])
        QSettings.setDefaultFormat(QSettings.Format.IniFormat)   # never the user's own window state
        QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, settings_dir)
        workspace = Workspace(args.workspace or temp_ws)
        window = MainWindow(StudioState(workspace, screenshot_config()))
        window.resize(WIDTH, HEIGHT)
        window.show()
        shooter = Shooter(app, window, out, args.time_limit)
        try:
            saved = shooter.shoot()
        except (TimeoutError, RuntimeError, OSError) as exc:
            print(f"screenshots failed: {exc}", file=sys.stderr)
            return 1
        print(f"Saved {len(saved)} screenshots in {out} ({time.monotonic() - started:.0f} s):")
        for path in saved:
            print(f"  {path}")
        return 0
    finally:
        if window is not None:
            if window.controller.busy:
                window.controller.kill()
                deadline = time.monotonic() + 30
                while window.controller.busy and time.monotonic() < deadline:
                    QApplication.processEvents()
                    time.sleep(0.05)
            window.controller.detach()
            window.pages["model"].tasks.wait(30_000)
            window.pages["corpus"].tasks.wait(30_000)
            window.hide()
        shutil.rmtree(settings_dir, ignore_errors=True)
        if temp_ws:
            shutil.rmtree(temp_ws, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
