"""The bad-input catalogue, studio half: the same mistakes made through the real window (offscreen,
real pages, real worker), over a workspace that already holds a finished run.

Each case asserts the message the user sees where the user looks for it (the page's error label, the
form's problem line, the corpus table, the Run or Runs page banner), then that the window is still
usable (every page opens, Start is offered again, no dialog is left open) and that the earlier run's
files are byte for byte as they were. The command-line half and the page listing every case id are
tests/e2e/test_bad_input_catalogue.py and docs/troubleshooting.md.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication  # noqa: E402

WAIT_MS = 120_000
STUDIO_CASES = ["studio-model-not-a-model", "studio-model-truncated", "studio-config-not-yaml",
                "studio-config-python-tag", "studio-config-out-of-range", "studio-corpus-binary",
                "studio-corpus-missing", "studio-corpus-link-loop", "studio-resume-no-checkpoint",
                "studio-run-fails-to-start", "studio-damaged-events", "studio-export-no-adapter", "studio-start-disk-full"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


@pytest.fixture
def studio(studio_window, earlier_run, qtbot, tiny_config):
    """(window, earlier run folder): the window over the workspace of the earlier run, set up for a
    tiny model (so that showing it does not start converting the built-in GGUF default); at the end
    of the test, the window must still be usable and the earlier run unchanged."""
    workspace, run = earlier_run
    before = _digest(run)
    win = studio_window(workspace)
    win.state.set_config(tiny_config(max_steps=4))
    win.show()
    yield win, run
    assert_usable(win, qtbot)
    assert _digest(run) == before, "the earlier run changed"
    assert win.state.workspace.get_run(run.name).status() == "finished"


def assert_usable(win, qtbot) -> None:
    qtbot.waitUntil(lambda: not win.controller.busy, timeout=WAIT_MS)
    for key in win.pages:
        win.show_page(key)
        assert win.current_page_key() == key and win.pages[key].isEnabled()
    assert win.pages["run"].start_btn.isEnabled()
    assert QApplication.activeModalWidget() is None


def wait_model(qtbot, page) -> None:
    qtbot.waitUntil(lambda: not page.tasks.is_busy(), timeout=WAIT_MS)


def corpus_cell(page, row: int, col: int = 5) -> str:
    item = page.table.item(row, col)
    return item.text() if item else ""


def wait_corpus(qtbot, page) -> None:
    qtbot.waitUntil(lambda: not page.tasks.is_busy() and all(
        corpus_cell(page, r) != "inspecting…" for r in range(page.table.rowCount())), timeout=WAIT_MS)


def broken_model(tiny_model_dir, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), folder)
    return folder


# ---- the model page -----------------------------------------------------------------------------
def test_studio_model_not_a_model(qtbot, studio, tmp_path):
    win, _ = studio
    page = win.pages["model"]
    win.show_page("model")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model", encoding="utf-8")
    page.choose_source("folder", str(folder))
    qtbot.waitUntil(lambda: page.error_label.isVisibleTo(page), timeout=WAIT_MS)
    assert str(folder) in page.error_label.text() and "config.json" in page.error_label.text()
    assert "Hint:" in page.error_label.text()


def test_studio_model_truncated(qtbot, studio, tmp_path, tiny_model_dir):
    win, _ = studio
    folder = broken_model(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])          # the header itself is cut
    page = win.pages["model"]
    win.show_page("model")
    page.choose_source("folder", str(folder))
    qtbot.waitUntil(lambda: page.error_label.isVisibleTo(page), timeout=WAIT_MS)
    assert "model.safetensors" in page.error_label.text(), page.error_label.text()
    assert "again" in page.error_label.text()


# ---- the training page --------------------------------------------------------------------------
def _load_config(win, path: Path) -> str:
    page = win.pages["training"]
    win.show_page("training")
    before = win.state.config
    assert not page.load_config_from(path)
    assert win.state.config == before, "a config that failed to load changed the form"
    return page.message.text()


def test_studio_config_not_yaml(studio, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training:\n  batch_size: [4\n", encoding="utf-8")
    text = _load_config(studio[0], path)
    assert "broken.yaml" in text and "not valid YAML at line" in text


def test_studio_config_python_tag(studio, tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n", encoding="utf-8")
    text = _load_config(studio[0], path)
    assert "tagged.yaml" in text and "!!python tag" in text


def test_studio_config_out_of_range(studio, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump({"training": {"batch_size": 10 ** 12}}), encoding="utf-8")
    text = _load_config(studio[0], path)
    assert "training.batch_size" in text and "maximum" in text


# ---- the corpus page ----------------------------------------------------------------------------
def test_studio_corpus_binary(qtbot, studio, tmp_path):
    win, _ = studio
    page = win.pages["corpus"]
    win.show_page("corpus")
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    page.add_paths([str(binary)])
    wait_corpus(qtbot, page)
    row = page.table.rowCount() - 1
    assert "not text" in corpus_cell(page, row)


def test_studio_corpus_missing(qtbot, studio, tmp_path):
    win, _ = studio
    page = win.pages["corpus"]
    win.show_page("corpus")
    page.add_paths([str(tmp_path / "gone")])
    wait_corpus(qtbot, page)
    row = page.table.rowCount() - 1
    assert "does not exist" in corpus_cell(page, row) or "not found" in corpus_cell(page, row), \
        corpus_cell(page, row)


def test_studio_corpus_link_loop(qtbot, studio, tmp_path):
    win, _ = studio
    page = win.pages["corpus"]
    win.show_page("corpus")
    folder = tmp_path / "c" / "d"
    folder.mkdir(parents=True)
    (folder / "some.txt").write_text("Words of the corpus. " * 40, encoding="utf-8")
    (folder / "l1").symlink_to(".")
    (folder / "l2").symlink_to("..")
    page.add_paths([str(folder)])
    wait_corpus(qtbot, page)
    row = page.table.rowCount() - 1
    assert corpus_cell(page, row, 4) == "1", [corpus_cell(page, row, c) for c in range(6)]


# ---- runs ---------------------------------------------------------------------------------------
def test_studio_resume_no_checkpoint(studio):
    win, run = studio
    copy = run.parent / "no-checkpoint"
    shutil.copytree(run, copy)
    try:
        shutil.rmtree(copy / "checkpoints")
        page = win.pages["runs"]
        win.show_page("runs")
        page.refresh()
        page.select([copy.name])
        page.resume_selected()
        assert not win.controller.busy and "no checkpoint" in page.banner.text()
    finally:
        shutil.rmtree(copy)


def test_studio_run_fails_to_start(qtbot, studio, tiny_config, tmp_path):
    win, _ = studio
    cfg = tiny_config(max_steps=4, data={"train_files": [str(tmp_path / "no-corpus")]})
    win.state.set_config(cfg)
    win.show_page("run")
    run_page = win.pages["run"]
    run_page.start_btn.click()
    qtbot.waitUntil(lambda: not win.controller.busy, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: run_page.banner.isVisible(), timeout=10_000)
    text = run_page.banner.text()
    assert "no-corpus" in text and "does not exist" in text, text
    assert "Check the path" in text


def test_studio_damaged_events(qtbot, studio):
    win, run = studio
    copy = run.parent / "damaged-events"
    shutil.copytree(run, copy)
    try:
        events = copy / "events.jsonl"
        lines = events.read_text(encoding="utf-8").splitlines(keepends=True)
        middle = len(lines) // 2
        events.write_text("".join(lines[:middle]) + '{"type": "step_met\x00\x00garbage\n'
                          + "".join(lines[middle:]), encoding="utf-8")
        page = win.pages["runs"]
        win.show_page("runs")
        page.refresh()
        name = win.state.workspace.get_run(run.name).load_config().name
        listed = [(page.table.item(r, 0).text(), page.table.item(r, 4).text())
                  for r in range(page.table.rowCount()) if page.table.item(r, 1).text() == name]
        assert listed == [("finished", "4"), ("finished", "4")], listed      # the copy and the run
    finally:
        shutil.rmtree(copy)


def test_studio_export_no_adapter(qtbot, studio):
    win, run = studio
    copy = run.parent / "no-adapter"
    shutil.copytree(run, copy)
    try:
        for name in ("adapter", "checkpoints"):
            shutil.rmtree(copy / name)
        page = win.pages["runs"]
        win.show_page("runs")
        page.refresh()
        page.select([copy.name])
        page.export_selected()          # refused before its dialog opens (a dialog would fail here)
        assert "no saved adapter" in page.banner.text(), page.banner.text()
        assert not page.tasks.is_busy("export")
    finally:
        shutil.rmtree(copy)


def test_studio_start_disk_full(studio, tiny_config, monkeypatch):
    """The settings file the worker reads cannot be written (a full /tmp): Start says so."""
    import errno

    from cpt_studio.engine.config import RunConfig

    win, _ = studio
    win.state.set_config(tiny_config(max_steps=4))

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(RunConfig, "save", full)
    run_page = win.pages["run"]
    win.show_page("run")
    run_page.start_btn.click()
    assert not win.controller.busy
    text = run_page.banner.text()
    assert "no space left on device" in text and "Free space at" in text, text
    monkeypatch.undo()


def test_every_studio_case_has_a_test_and_a_docs_entry():
    tests = {name[len("test_"):].replace("_", "-") for name in globals() if name.startswith("test_studio_")}
    assert tests == set(STUDIO_CASES)
    page = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    assert [c for c in STUDIO_CASES if f"`{c}`" not in page] == []
