"""`cpt-studio` with one injected fault, for tests/e2e/test_fault_injection.py.

    CPT_FAULT="<call>:<path part>:<n>:<fault>" python fault_worker.py train run.yaml ...

At the n-th call of <call> on a file whose path contains <path part>, <fault> happens:

- kill: SIGKILL this process in the middle of the write: the file is cut to half its bytes first
  (what a power cut leaves of a file that was being written);
- enospc: the error a full disk raises at that call, of the type the real library raises.

Calls: fsync (os.fsync: the last step of every atomic write, of each events.jsonl line, of each
checkpoint and adapter file), safetensors (safetensors.torch.save_file: adapter and checkpoint
weights), torch_save (torch.save: optimizer, scheduler and RNG state), sqlite (the run index's
commits; the path part is matched against the database file). When the fault fires, a line
"FAULT <spec>" goes to stderr. Everything is patched before the engine is imported, so names the
engine and peft bind at import time are the patched ones.
"""
import errno
import os
import signal
import sqlite3
import sys
from pathlib import Path

CALL, PART, NTH, FAULT = (os.environ.get("CPT_FAULT") or "none:-:0:-").split(":")
NTH = int(NTH)
_seen = 0


def _hit(path) -> bool:
    """Count a call on a matching path; True when this one is the faulty one."""
    global _seen
    if PART not in str(path):
        return False
    _seen += 1
    if _seen != NTH:
        return False
    print(f"FAULT {CALL}:{PART}:{NTH}:{FAULT} {path}", file=sys.stderr, flush=True)
    return True


def _die_leaving_half(path) -> None:
    try:
        size = os.path.getsize(path)
        os.truncate(path, size // 2)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


if CALL == "fsync":
    real_fsync = os.fsync

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        except OSError:
            path = ""
        if _hit(path):
            if FAULT == "kill":
                _die_leaving_half(path)
            raise _no_space(path)
        return real_fsync(fd)

    os.fsync = fsync

elif CALL == "safetensors":
    import safetensors
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if _hit(filename):
            if FAULT == "kill":
                real_save_file(tensors, filename, metadata=metadata)
                _die_leaving_half(filename)
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_file

elif CALL == "torch_save":
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if _hit(f):
            if FAULT == "kill":
                real_save(obj, f, *args, **kwargs)
                _die_leaving_half(f)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    torch.save = save

elif CALL == "sqlite":
    class FaultyConnection(sqlite3.Connection):
        def commit(self):
            if _hit(self.path_for_faults):
                if FAULT == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise sqlite3.OperationalError("database or disk is full")
            return super().commit()

    real_connect = sqlite3.connect

    def connect(database, *args, **kwargs):
        conn = real_connect(database, *args, factory=FaultyConnection, **kwargs)
        conn.path_for_faults = str(database)
        return conn

    sqlite3.connect = connect

elif CALL != "none":          # no CPT_FAULT: the plain CLI (the test kills it from outside)
    sys.exit(f"unknown fault call {CALL!r}")

if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
    from cpt_studio.engine.cli import main

    sys.exit(main(sys.argv[1:]))
