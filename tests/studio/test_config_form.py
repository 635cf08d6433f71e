"""Config editors on every page keep the config field's range, choices and help: the GUI accepts
exactly what a YAML config accepts, and no page narrows an editor by hand."""
from __future__ import annotations

import pytest

from cpt_studio.engine.runs.store import Workspace
from cpt_studio.studio.config_form import INT_MAX
from cpt_studio.studio.pages.corpus_page import CorpusPage
from cpt_studio.studio.pages.model_page import ModelPage
from cpt_studio.studio.pages.training_page import TrainingPage
from cpt_studio.studio.state import StudioState

PAGES = {"training": TrainingPage, "corpus": CorpusPage,
         "model": lambda state: ModelPage(state, auto_resolve=False)}


@pytest.fixture(params=sorted(PAGES))
def page(request, qtbot, tmp_path):
    page = PAGES[request.param](StudioState(Workspace(tmp_path / "ws")))
    qtbot.addWidget(page)
    yield page
    if hasattr(page, "tasks"):
        page.tasks.wait(30_000)


def test_every_editor_has_its_fields_bounds_choices_and_help(page):
    assert page.form.editors
    for dotted, ed in page.form.editors.items():
        meta, w = ed.field.metadata, ed.widget
        assert meta["help"] in w.toolTip(), dotted
        if ed.kind == "int":
            lo = -INT_MAX if meta["min"] is None else meta["min"]
            hi = INT_MAX if meta["max"] is None else min(meta["max"], INT_MAX)
            assert (w.minimum(), w.maximum()) == (lo, hi), dotted
        elif ed.kind == "float":
            lo = -1e9 if meta["min"] is None else meta["min"]
            hi = 1e9 if meta["max"] is None else meta["max"]
            assert (w.minimum(), w.maximum()) == (lo, hi), dotted
        elif ed.kind == "choice":
            assert tuple(w.itemText(i) for i in range(w.count())) == meta["choices"], dotted
