"""The headless CLI as a user (or the GUI's worker) runs it: a real subprocess, real files."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import signal
import subprocess
from pathlib import Path

from cpt_studio.engine.runs.events import RunFailed, RunFinished, StepMetrics, from_json
from cpt_studio.engine.runs.runner import cli_argv

CLI = cli_argv()   # what the GUI starts: `cpt-studio ...` whatever the working directory
REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, **kw)


def test_train_jsonl_then_runs_lists_it(tmp_path, tiny_config):
    cfg_path = tmp_path / "run.yaml"
    tiny_config(max_steps=4).save(cfg_path)
    ws = str(tmp_path / "ws")
    out = _run(["train", str(cfg_path), "--workspace", ws, "--events", "jsonl",
                "--set", "name=cli run"], stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    events = [from_json(line) for line in out.stdout.splitlines()]   # every line is an event
    assert isinstance(events[-1], RunFinished) and events[-1].step == 4
    listing = json.loads(_run(["runs", "--json", "--workspace", ws]).stdout)
    assert len(listing) == 1
    row = listing[0]
    assert row["name"] == "cli run" and row["status"] == "finished" and row["steps"] == 4
    assert abs(row["final_loss"] - events[-1].final_loss) < 1e-9
    table = _run(["runs", "--workspace", ws]).stdout
    assert "finished" in table and "cli run" in table
    # ... and `export` merges its adapter into one model folder, checked against the adapter.
    exported = _run(["export", row["id"], "--dtype", "fp32", "--workspace", ws])
    assert exported.returncode == 0, exported.stderr
    merged = Path(ws) / "runs" / row["id"] / "exports" / "merged-fp32"
    assert f"Merged model: {merged.resolve()}" in exported.stdout and "verified" in exported.stdout
    assert (merged / "model.safetensors").is_file() and (merged / "export_info.json").is_file()
    again = _run(["export", row["id"], "--dtype", "fp32", "--workspace", ws])
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr


def test_the_worker_trains_when_started_from_the_repo_root(tmp_path, tiny_config):
    """The GUI starts its worker in its own working directory, often this checkout. transformers
    >= 5.25 imports Hugging Face's `kernels` package; our kernels/ folder must not stand in for it."""
    needs_kernels = any(r.split(";")[0].strip().startswith("kernels")
                        for r in importlib.metadata.requires("transformers") or [])
    if needs_kernels:        # the trap is real here: a plain `python -c` from the root falls in it
        plain = subprocess.run([CLI[0], "-c", "import transformers.modeling_utils"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=300)
        assert plain.returncode != 0 and "kernels" in plain.stderr
        spec = importlib.util.find_spec("kernels")
        assert spec is not None and Path(spec.origin).parent != REPO_ROOT / "kernels"
    cfg_path = tmp_path / "run.yaml"
    tiny_config(max_steps=2).save(cfg_path)
    out = _run(["train", str(cfg_path), "--workspace", str(tmp_path / "ws"), "--events", "jsonl"],
               cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [from_json(line) for line in out.stdout.splitlines()]
    assert isinstance(events[-1], RunFinished) and events[-1].step == 2


def test_human_progress_output(tmp_path, tiny_config):
    cfg_path = tmp_path / "run.yaml"
    tiny_config(max_steps=3).save(cfg_path)
    out = _run(["train", str(cfg_path), "--workspace", str(tmp_path / "ws")])
    assert out.returncode == 0, out.stderr
    assert "step 3/3" in out.stdout and "tok/s" in out.stdout
    assert "Adapter:" in out.stdout


def test_sigkill_then_resume_finishes_from_last_checkpoint(tmp_path, tiny_config, train_until_killed):
    cfg_path = tmp_path / "run.yaml"
    tiny_config(max_steps=12).save(cfg_path)
    ws = str(tmp_path / "ws")
    run_id, killed = train_until_killed(cfg_path, ws, at_step=4)
    assert killed.returncode == -signal.SIGKILL
    listing = json.loads(_run(["runs", "--json", "--workspace", ws]).stdout)
    assert listing[0]["status"] == "interrupted"

    out = _run(["resume", run_id, "--workspace", ws, "--events", "jsonl"], stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    events = [from_json(line) for line in out.stdout.splitlines()]
    resumed = {e.step: e.loss for e in events if isinstance(e, StepMetrics)}
    assert min(resumed) == 5 and max(resumed) == 12    # from the step-4 checkpoint on
    assert isinstance(events[-1], RunFinished)
    listing = json.loads(_run(["runs", "--json", "--workspace", ws]).stdout)
    assert listing[0]["status"] == "finished" and listing[0]["steps"] == 12

    # The same config trained without the kill gives the very same losses (bitwise on CPU).
    out = _run(["train", str(cfg_path), "--workspace", str(tmp_path / "ws2"), "--events", "jsonl"],
               stdin=subprocess.DEVNULL)
    straight = {e.step: e.loss for e in map(from_json, out.stdout.splitlines())
                if isinstance(e, StepMetrics)}
    assert {step: straight[step] for step in resumed} == resumed


def test_ctrl_c_stops_and_saves(tmp_path, tiny_config):
    cfg_path = tmp_path / "run.yaml"
    tiny_config(max_steps=500, checkpoint={"every_steps": 0}).save(cfg_path)
    proc = subprocess.Popen(CLI + ["train", str(cfg_path), "--workspace", str(tmp_path / "ws")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    seen = ""
    while "/500 [" not in seen:            # the first step line: training has begun
        chunk = proc.stdout.read(1)
        assert chunk, "the CLI ended before training"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "Run stopped at step" in rest and "Adapter:" in rest
    adapter = next(line for line in rest.splitlines() if line.startswith("Adapter:")).split(": ", 1)[1]
    assert (tmp_path / "ws" / "runs").exists() and (Path(adapter) / "adapter_config.json").is_file()


def test_bad_config_field_is_named(tmp_path):
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text("training:\n  batch_size: many\n")
    out = _run(["train", str(cfg_path), "--workspace", str(tmp_path / "ws")])
    assert out.returncode == 2
    assert "training.batch_size" in out.stderr and "bad.yaml" in out.stderr


def test_bad_corpus_file_is_named(tmp_path, tiny_config):
    bad = tmp_path / "weights.txt"
    bad.write_bytes(b"\x00\x01binary\x00" * 100)
    cfg = tiny_config(max_steps=2, data={"train_files": [str(bad)]})
    cfg_path = tmp_path / "run.yaml"
    cfg.save(cfg_path)
    out = _run(["train", str(cfg_path), "--workspace", str(tmp_path / "ws"), "--events", "jsonl"],
               stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    failed = from_json(out.stdout.splitlines()[-1])
    assert isinstance(failed, RunFailed) and failed.kind == "corpus"
    assert "weights.txt" in failed.message and failed.hint
