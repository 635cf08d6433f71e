"""GUI test fixtures: offscreen Qt, QSettings in a temp folder, a fake worker, a leak check.

- `workspace`, `studio_state`: an empty Workspace under tmp_path and a StudioState on it.
- `fake_worker(*args)`: a `make_worker` for RunController that runs tests/studio/fake_worker.py.
- `controller`: a RunController on the fake worker's sample replay; any run is ended at teardown.
- `no_leaked_widgets`: fails a test that leaves a visible top-level window behind (opt in with
  `pytestmark = pytest.mark.usefixtures("no_leaked_widgets")`).
"""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QCoreApplication, QEvent, QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from cpt_studio.engine.runs.runner import WorkerProcess  # noqa: E402
from cpt_studio.engine.runs.store import Workspace  # noqa: E402

HERE = Path(__file__).parent
FAKE_WORKER = HERE / "fake_worker.py"
SAMPLE_EVENTS = HERE / "data" / "sample_events.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _isolated_settings(tmp_path_factory):
    """Window geometry etc. go to a temp folder, never to the user's real settings; and the
    process settings the app applies at start-up (studio/runtime.py)."""
    from cpt_studio.studio.runtime import configure_runtime
    configure_runtime()
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                      str(tmp_path_factory.mktemp("qsettings")))
    yield


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "workspace")


@pytest.fixture
def studio_state(qapp, workspace):
    from cpt_studio.studio.state import StudioState
    return StudioState(workspace)


@pytest.fixture
def fake_worker():
    """fake_worker(*args) -> make_worker(argv) that ignores argv and runs the fake worker instead."""
    def factory(*args):
        def make(_argv):
            return WorkerProcess([sys.executable, str(FAKE_WORKER), *map(str, args)])
        return make
    return factory


@pytest.fixture
def end_runs(qtbot):
    """Register controllers; at teardown any run still going is killed and its reader thread ended."""
    controllers = []
    yield controllers.append
    for c in controllers:
        if c.busy:
            c.kill()
            qtbot.waitUntil(lambda: not c.busy, timeout=10000)
        c.detach()


@pytest.fixture
def no_leaked_widgets(qapp):
    before = set(QApplication.topLevelWidgets())
    yield
    QApplication.processEvents()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    leaked = [w for w in QApplication.topLevelWidgets() if w not in before and w.isVisible()]
    for w in leaked:
        w.close()
    assert not leaked, f"test left top-level widgets open: {[type(w).__name__ for w in leaked]}"
