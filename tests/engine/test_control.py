"""The control channel: commands from the queue, the control file and stop signals."""
import os
import signal
import subprocess
import sys
import time

import pytest

from cpt_studio.engine.runs.control import ControlChannel


def test_commands_come_out_in_order_and_unknown_ones_are_ignored():
    channel = ControlChannel()
    channel.put("save_now")
    channel.put("dance")
    channel.put("stop")
    assert [channel.poll(), channel.poll(), channel.poll()] == ["save_now", "stop", None]


def test_control_file_command_is_read_on_poll():
    pending = ["stop_and_save"]
    channel = ControlChannel(lambda: pending.pop() if pending else None)
    assert channel.poll() == "stop_and_save"
    assert channel.poll() is None


def test_ctrl_c_becomes_stop_and_save_without_touching_the_queue_lock():
    channel = ControlChannel()
    channel.catch_signals()
    channel.begin_training()
    try:
        with channel._queue.mutex:            # as if poll() held the lock when Ctrl-C arrived
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):             # give the handler bytecodes to run on
                pass
        assert channel.poll() == "stop_and_save"
        assert channel.poll() is None
    finally:
        channel.restore_signals()


# Stop signals, each in a child process: a signal the code under test fails to catch ends that child,
# never pytest. The child must not start in the repo root (our kernels/ folder): cwd is tmp_path.
CHILD_HEAD = """
import os, signal, sys, time
from cpt_studio.engine.runs.control import ControlChannel, StopNow
sig = getattr(signal, sys.argv[1])
"""

NATIVE_HANG = """
import ctypes
# A native call that holds no GIL and that signals do not end (like a hung CUDA or NCCL wait):
# a second lock of a non-recursive mutex by the same thread.
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(128)
libc.pthread_mutex_init(mutex, None)
libc.pthread_mutex_lock(mutex)
print("stuck", flush=True)
libc.pthread_mutex_lock(mutex)
"""


def run_child(tmp_path, body: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", CHILD_HEAD + body, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stop_signal_during_training_means_stop_and_save_and_a_second_one_stops_at_once(
        tmp_path, name):
    out = run_child(tmp_path, """
channel = ControlChannel()
channel.catch_signals()
channel.begin_training()
os.kill(os.getpid(), sig)
time.sleep(0.2)                       # the handler runs here; it must not end the process
print(channel.poll(), channel.stop_signal, channel.poll())
try:
    os.kill(os.getpid(), sig)
    time.sleep(5)
    print("still running")
except StopNow as exc:
    print("StopNow", exc.exit_code)
finally:
    channel.restore_signals()
""", name)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stop_and_save", name, "None", "StopNow",
                                  str(128 + getattr(signal, name))]


def test_a_stop_signal_before_training_stops_at_once(tmp_path):
    out = run_child(tmp_path, """
channel = ControlChannel()
channel.catch_signals()
try:
    os.kill(os.getpid(), sig)         # loading the model: nothing to save yet
    time.sleep(5)
    print("still loading")
except StopNow as exc:
    print("StopNow", exc.exit_code)
finally:
    channel.restore_signals()
""", "SIGTERM")
    assert out.stdout.split() == ["StopNow", "143"], out.stderr


def test_a_stop_the_loop_does_not_take_up_in_time_ends_at_once(tmp_path):
    out = run_child(tmp_path, """
channel = ControlChannel()
channel.catch_signals(grace_s=0.3)
channel.begin_training()
os.kill(os.getpid(), sig)
started = time.monotonic()
try:
    while time.monotonic() - started < 10:    # a step (or an evaluation) that goes on and on
        pass
    print("never stopped")
except StopNow as exc:
    print("StopNow", exc.exit_code, time.monotonic() - started < 5)
finally:
    channel.restore_signals()
""", "SIGTERM")
    assert out.stdout.split() == ["StopNow", "143", "True"], out.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="the hang is simulated with pthreads")
@pytest.mark.parametrize("signals", [1, 2])
def test_a_main_thread_stuck_in_native_code_still_ends_in_bounded_time(tmp_path, signals):
    """One signal and a step that never ends (the stop deadline), or two signals (stop at once):
    the process ends with 128 + signal even though Python's handler can never run."""
    body = ("channel = ControlChannel()\n"
            "channel.catch_signals(grace_s=0.5, hard_exit_s=0.5)\n"
            "channel.begin_training()\n" + NATIVE_HANG)
    proc = subprocess.Popen([sys.executable, "-P", "-c", CHILD_HEAD + body, "SIGTERM"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stuck"
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 143, proc.stderr.read()
