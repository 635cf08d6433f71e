"""Helpers for end-to-end runs of the real engine on a tiny model and a tiny corpus."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpt_studio.engine.config import RunConfig

CORPUS_LINES = [
    "La rapida bruna vulpo saltas super la maldiligenta hundo.",
    "Ĉiuj homoj estas denaske liberaj kaj egalaj laŭ digno kaj rajtoj.",
    "The quick brown fox jumps over the lazy dog.",
    "Continued pretraining teaches a model a new language or domain.",
]


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        text = "\n".join(CORPUS_LINES[(i + k) % 4] for k in range(12))
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def tiny_config(tiny_model_dir, corpus_dir):
    """Factory: a RunConfig for a tiny llama on the tiny corpus; keyword args override sections."""
    def make(max_steps: int = 8, arch: str = "llama", tied: bool = False, **sections) -> RunConfig:
        cfg = RunConfig(name="tiny")
        cfg.model.source = str(tiny_model_dir(arch, tied))
        cfg.model.precision = "fp32"
        cfg.adapter.r = 4
        cfg.adapter.alpha = 8
        cfg.data.train_files = [str(corpus_dir)]
        cfg.data.seq_len = 32
        cfg.data.eval_fraction = 0.1
        t = cfg.training
        t.max_steps, t.batch_size, t.learning_rate, t.warmup_steps = max_steps, 4, 2e-2, 2
        t.gradient_checkpointing = False
        t.kernels = "off"
        cfg.eval.every_steps = 4
        cfg.checkpoint.every_steps = 4
        for section, values in sections.items():
            for key, value in values.items():
                setattr(getattr(cfg, section), key, value)
        return cfg

    return make


@pytest.fixture
def window(qtbot, tmp_path_factory, tmp_path):
    """The real MainWindow with the real pages and a real RunController on a fresh workspace, its
    settings in a fresh folder (nothing from earlier launches)."""
    from PySide6.QtCore import QSettings

    from cpt_studio.engine.runs.store import Workspace
    from cpt_studio.studio.main_window import MainWindow
    from cpt_studio.studio.runtime import configure_runtime
    from cpt_studio.studio.state import StudioState

    configure_runtime()
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                      str(tmp_path_factory.mktemp("qsettings")))
    QSettings().clear()
    win = MainWindow(StudioState(Workspace(tmp_path / "workspace")))
    qtbot.addWidget(win)
    yield win
    controller = win.controller
    if controller.busy:          # a failed assertion mid-run: end the worker before the window closes
        controller.kill()
        qtbot.waitUntil(lambda: not controller.busy, timeout=30_000)
    controller.detach()
