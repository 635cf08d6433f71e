"""What `cpt-studio runs` says about a run whose events.jsonl took damage, and whose events say who
wrote them: a real worker killed, a garbage line in the middle of its log, a real resume."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cpt_studio.engine.runs.runner import cli_argv

CLI = cli_argv()
GARBAGE = b"\x00\x00garbage{\"type\":\"StepMe\n"     # a stray edit, or bytes a disk error left


def _runs(ws: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["runs", "--workspace", ws, *args], capture_output=True, text=True,
                          timeout=300)


def test_a_damaged_line_costs_one_line_and_every_event_names_its_writer(tmp_path, tiny_config,
                                                                        train_until_killed):
    cfg_path = tmp_path / "run.yaml"
    tiny_config(max_steps=8).save(cfg_path)
    ws = str(tmp_path / "ws")
    run_id, first = train_until_killed(cfg_path, ws, at_step=4)
    assert json.loads(_runs(ws, "--json").stdout)[0]["status"] == "interrupted"   # now indexed

    events_path = Path(ws) / "runs" / run_id / "events.jsonl"
    lines = events_path.read_bytes().splitlines(keepends=True)
    events_path.write_bytes(b"".join(lines[:3]) + GARBAGE + b"".join(lines[3:]))
    resume = subprocess.Popen(CLI + ["resume", run_id, "--workspace", ws, "--events", "jsonl"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    _out, resume_err = resume.communicate(timeout=300)
    assert resume.returncode == 0, resume_err[-3000:]

    listed = _runs(ws, "--json")
    row = json.loads(listed.stdout)[0]
    assert (row["status"], row["steps"]) == ("finished", 8) and row["skipped_lines"] == 1
    table = _runs(ws).stdout.splitlines()
    assert [line.split()[1:3] for line in table if line.startswith(run_id)] == [["finished", "8"]]
    assert f"note: {run_id}: 1 damaged line(s) in its events.jsonl were skipped" in table[-1]
    # The user is told which line was left out (by whichever command read it first).
    assert f"{events_path}, line 4: not a valid event" in resume_err + listed.stderr

    # Every event carries the pid of the process that wrote it: the killed worker's up to the
    # kill, then the resume's (from its first loading Phase on), never 0.
    pids = [json.loads(line)["pid"] for line in events_path.read_bytes().splitlines(keepends=True)
            if line != GARBAGE]
    by_first = pids.index(resume.pid)
    assert by_first > 3 and pids == [first.pid] * by_first + [resume.pid] * (len(pids) - by_first)
