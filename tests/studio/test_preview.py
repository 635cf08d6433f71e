"""Every page can be previewed on its own (`python -P -m cpt_studio.studio.pages.<page>`) and the
preview closes by itself under CPT_STUDIO_PREVIEW_MS, exiting 0."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PySide6.QtWidgets import QLabel

from cpt_studio.studio import preview

FAST_PAGES = ("corpus_page", "run_page", "run_plots", "runs_page", "training_page")


def _preview_env(tmp_path) -> dict:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", CPT_STUDIO_HOME=str(tmp_path / "home"),
               **{preview.CLOSE_AFTER_ENV: "200"})
    env.pop("PYTHONPATH", None)
    return env


def _start(page: str, tmp_path) -> subprocess.Popen:
    # -P and a cwd outside the checkout: the repo root must not be on sys.path (kernels/ shadows
    # the `kernels` package transformers imports)
    return subprocess.Popen([sys.executable, "-P", "-m", f"cpt_studio.studio.pages.{page}"],
                            cwd=tmp_path, env=_preview_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _check(procs: dict[str, subprocess.Popen], timeout: float) -> None:
    for page, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"the {page} preview did not close by itself:\n{out[-2000:]}")
        assert proc.returncode == 0, f"{page} preview exited {proc.returncode}:\n{out[-2000:]}"
        assert "Traceback" not in out, f"{page}:\n{out[-2000:]}"


def test_each_page_previews_on_its_own_and_closes(tmp_path):
    procs = {}
    for page in FAST_PAGES:
        (tmp_path / page).mkdir()
        procs[page] = _start(page, tmp_path / page)
    _check(procs, timeout=120)


@pytest.mark.slow
def test_model_page_previews_on_its_own_and_closes(tmp_path):
    """Slow (~25 s on 2 cores): the page first converts the embedded default GGUF to a HF folder."""
    _check({"model_page": _start("model_page", tmp_path)}, timeout=300)


def test_preview_page_shows_the_factorys_widget_and_exits_with_the_loop(qapp, tmp_path, monkeypatch):
    monkeypatch.setenv(preview.CLOSE_AFTER_ENV, "50")
    monkeypatch.setattr("cpt_studio.studio.theme.apply_theme", lambda app: False)  # keep the tests' look
    shown = []

    def factory(state):
        shown.append(state.workspace.root)
        label = QLabel("preview")
        return label

    with pytest.raises(SystemExit) as exit_info:
        preview.preview_page(factory, workspace=tmp_path / "ws", size=(300, 200))
    assert exit_info.value.code == 0
    assert shown == [(tmp_path / "ws").resolve()]
