"""What killed writers leave in a run folder, removed by the next writer under the run lock.

    with RunLock(run, "resume"):
        removed = remove_leftovers(run)      # the paths removed or put back

A writer killed mid-save (SIGKILL, a crash, the machine going down) leaves hidden work files:
`.adapter.tmp-<pid>/` (a final adapter: as big as the adapter, 183 MB on SmolLM2 with trained
embeddings), `checkpoints/.step-N.tmp-<pid>-<random>/`, `exports/.merged-<dtype>.tmp-<pid>-<random>/`,
`.<file>.tmp-<pid>-<random>` (an atomic file write), `.control.taken-<pid>`. Those whose process is
gone are removed; a live process's never are (a pid reused by a live process keeps its files until
that process ends too). `.adapter.old`, `exports/.<name>.old` and `checkpoints/.step-N.old` (a replace
cut between its two renames; no pid) are settled as only the run's one writer may: put back when the
folder they replaced is missing, else removed.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ..atomic import restore_replaced_dir
from .checkpoints import clean_temp_folders
from .store import RunDir, process_alive

log = logging.getLogger(__name__)

# .adapter.tmp-123, .config.yaml.tmp-123-k2j4, .merged-bf16.tmp-123-x8, .control.taken-123
_PID_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|taken)-(?P<pid>\d+)(?:-[^/]*)?$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old$")


def remove_leftovers(run: RunDir) -> list[Path]:
    """Remove (or put back) what dead writers left in `run`; call it holding the run's lock."""
    handled = []
    for folder in (run.path, run.exports_dir):
        if folder.is_dir():
            handled += _settle(folder)
    handled += clean_temp_folders(run.checkpoints_dir, writer=True)
    for path in handled:
        log.info("run %s: removed what an interrupted writer left: %s", run.id, path.name)
    return handled


def _settle(folder: Path) -> list[Path]:
    handled = []
    for path in folder.iterdir():
        try:
            if _settle_one(folder, path):
                handled.append(path)
        except OSError as exc:      # left for the next writer; never a reason to refuse the run
            log.warning("could not remove %s: %s", path, exc.strerror or exc)
    return handled


def _settle_one(folder: Path, path: Path) -> bool:
    match = _PID_RE.match(path.name)
    if match:
        pid = int(match["pid"])
        if pid == os.getpid() or process_alive(pid):
            return False
        _remove(path)
        return True
    match = _OLD_RE.match(path.name)
    if match and path.is_dir() and not path.is_symlink():
        return bool(restore_replaced_dir(folder / match["name"]))
    return False


def remove_dead_temp_dirs(final: Path) -> list[Path]:
    """Half-written `.<final name>.tmp-<pid>-*` folders beside `final` (a GGUF conversion, a merged
    export) whose writer process is gone, removed; the same pid rule as a run folder's leftovers.
    Returns the folders removed."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        match = _PID_RE.match(tmp.name)
        if not tmp.is_dir() or tmp.is_symlink():
            continue
        if match and (int(match["pid"]) == os.getpid() or process_alive(int(match["pid"]))):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
