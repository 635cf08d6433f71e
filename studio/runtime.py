"""Process-wide settings the GUI relies on, applied once at start-up by app.main (and the GUI tests):
`configure_runtime()`.

1. A shorter GIL switch interval (1 ms instead of 5 ms). The threads that read a worker's output hold
   the GIL while they parse; every Python callback the GUI thread makes from Qt (a paint, a timer
   slot) then waits up to one interval for it. A flood of events measured ~150 ms event-loop stalls
   at 5 ms on a 2-core machine (CPU time of the GUI thread in those stalls: ~40 ms).

2. A guard against a PySide6 defect.

PySide6 6.12.0 on CPython < 3.12 returns `None` and `True` without owning a reference: every call of a
void method (`label.setText(...)`, `app.processEvents()`) takes one reference away from `None`, every
`signal.emit()` one from `True` (measured with sys.getrefcount around 100 calls: -100 each; PySide6
6.11.2 on the same Python: 0). After some tens of thousands of calls the count reaches zero and the
interpreter aborts: "Fatal Python error: none_dealloc" (or bool_dealloc). CPython 3.12+ makes these
singletons immortal, so there the stray decrements do nothing.

The real fix is a PySide6 other than 6.12.0 on Python 3.11 (or Python >= 3.12). Until then, when the
probe sees references vanish, the singletons get a very large extra count (2**40), never used up; an
extra count on a static singleton that is never freed anyway is harmless.
"""
from __future__ import annotations

import ctypes
import logging
import sys

from PySide6.QtCore import QObject, Signal

log = logging.getLogger(__name__)
_applied = False


class _Probe(QObject):
    ping = Signal()


def pyside_loses_singleton_refs() -> bool:
    """Whether void calls or Signal.emit() drop references to None / True in this PySide6 build."""
    probe = _Probe()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(4):
        probe.setObjectName("probe")
        probe.ping.emit()
    return sys.getrefcount(None) < none_before or sys.getrefcount(True) < true_before


def configure_runtime() -> None:
    guard_singleton_refcounts()
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))


def guard_singleton_refcounts() -> bool:
    """Apply the guard when needed (idempotent); returns whether it was applied now."""
    global _applied
    if _applied or sys.implementation.name != "cpython" or sys.version_info >= (3, 12):
        return False
    if not pyside_loses_singleton_refs():
        return False
    for obj in (None, True, False):
        # ob_refcnt is the first field of every CPython object (non-debug builds).
        ctypes.c_ssize_t.from_address(id(obj)).value += 1 << 40
    _applied = True
    log.warning("PySide6 %s loses references to None/True on Python %d.%d; applied a guard "
                "(see cpt_studio.studio.runtime)", _pyside_version(), *sys.version_info[:2])
    return True


def _pyside_version() -> str:
    import PySide6
    return PySide6.__version__
