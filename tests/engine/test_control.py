"""The control channel: commands from the queue, the control file and Ctrl-C."""
import os
import signal

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
    channel.catch_sigint()
    try:
        with channel._queue.mutex:            # as if poll() held the lock when Ctrl-C arrived
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):             # give the handler bytecodes to run on
                pass
        assert channel.poll() == "stop_and_save"
        assert channel.poll() is None
    finally:
        channel.restore_sigint()
