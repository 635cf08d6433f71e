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


def write_corpus(folder: Path) -> Path:
    """Six small documents of the lines above in `folder` (created)."""
    folder.mkdir(parents=True)
    for i in range(6):
        text = "\n".join(CORPUS_LINES[(i + k) % 4] for k in range(12))
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


def make_tiny_config(model_dir: Path, corpus: Path, max_steps: int = 8, **sections) -> RunConfig:
    """A RunConfig for a tiny model on a tiny corpus; keyword args override sections."""
    cfg = RunConfig(name="tiny")
    cfg.model.source = str(model_dir)
    cfg.model.precision = "fp32"
    cfg.adapter.r = 4
    cfg.adapter.alpha = 8
    cfg.data.train_files = [str(corpus)]
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


def pytest_terminal_summary(terminalreporter, config):
    """The fault-injection counts (tests/e2e/test_fault_injection.py), also when every test passed."""
    lines = config.__dict__.get("cpt_fault_report", [])
    if lines:
        terminalreporter.section("fault injection")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def tiny_config(tiny_model_dir, corpus_dir):
    """Factory: a RunConfig for a tiny llama on the tiny corpus; keyword args override sections."""
    def make(max_steps: int = 8, arch: str = "llama", tied: bool = False, **sections) -> RunConfig:
        return make_tiny_config(tiny_model_dir(arch, tied), corpus_dir, max_steps, **sections)

    return make


@pytest.fixture
def train_until_killed():
    """train_until_killed(config path, workspace, at_step) -> (run id, the ended Popen): `cpt-studio
    train` as the GUI's worker runs it, SIGKILLed as soon as it reports checkpoint step-<at_step>."""
    import os
    import signal
    import subprocess

    from cpt_studio.engine.runs.events import CheckpointSaved, from_json
    from cpt_studio.engine.runs.runner import cli_argv

    def run(cfg_path: Path, workspace: str, at_step: int = 4):
        proc = subprocess.Popen(cli_argv() + ["train", str(cfg_path), "--workspace", workspace,
                                              "--events", "jsonl"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        run_id = None
        for line in proc.stdout:
            event = from_json(line)
            run_id = run_id or getattr(event, "run_id", None)
            if isinstance(event, CheckpointSaved) and event.step == at_step:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.stdout.close()
        proc.wait(timeout=60)
        return run_id, proc

    return run


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(workspace, run folder) of a finished 4-step run with a checkpoint and an adapter, trained
    once per test module through the CLI; tests that must leave it alone compare its bytes."""
    from cpt_studio.engine import cli

    root = tmp_path_factory.mktemp("earlier")
    cfg = make_tiny_config(tiny_model_dir(), write_corpus(root / "corpus"), max_steps=4,
                           checkpoint={"every_steps": 2}, eval={"every_steps": 0})
    cfg.name = "earlier"
    cfg.save(root / "earlier.yaml")
    workspace = root / "workspace"
    assert cli.main(["train", str(root / "earlier.yaml"), "--workspace", str(workspace)]) == 0
    (run,) = (workspace / "runs").iterdir()
    return workspace, run


@pytest.fixture
def studio_window(qtbot, tmp_path_factory):
    """Factory: studio_window(workspace folder) -> the real MainWindow with the real pages and a real
    RunController on that workspace, its settings in a fresh folder (nothing from earlier launches).
    Any run still going at teardown is killed before the window closes."""
    from PySide6.QtCore import QSettings

    from cpt_studio.engine.runs.store import Workspace
    from cpt_studio.studio.main_window import MainWindow
    from cpt_studio.studio.runtime import configure_runtime
    from cpt_studio.studio.state import StudioState

    windows = []

    def make(workspace: Path):
        configure_runtime()
        QSettings.setDefaultFormat(QSettings.Format.IniFormat)
        QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                          str(tmp_path_factory.mktemp("qsettings")))
        QSettings().clear()
        win = MainWindow(StudioState(Workspace(workspace)))
        qtbot.addWidget(win)
        windows.append(win)
        return win

    yield make
    for win in windows:
        controller = win.controller
        if controller.busy:      # a failed assertion mid-run: end the worker before the window closes
            controller.kill()
            qtbot.waitUntil(lambda: not controller.busy, timeout=30_000)
        controller.detach()


@pytest.fixture
def window(studio_window, tmp_path):
    """The real MainWindow on a fresh workspace under tmp_path."""
    return studio_window(tmp_path / "workspace")
