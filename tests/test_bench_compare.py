"""bench/compare.py with Unsloth as a third side (issue 12): the table, the vs_unsloth.json records
(written only when all three sides ran ok, replacing the record of the same shape and card), a
side's own failure message, and bench/unsloth_train.py without unsloth installed."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import compare  # noqa: E402
import unsloth_train  # noqa: E402

RECORD_KEYS = {"shape", "card", "date", "unsloth_version", "baseline_tok_s", "unsloth_tok_s",
               "ours_tok_s", "unsloth_peak_gib", "ours_peak_gib", "loss_diff_pct",
               "ours_args"}   # the keys, and our side's settings beyond the defaults


def side(name, tok_s, peak, loss, card="NVIDIA H100 80GB HBM3", sha="abc", **extra):
    versions = {"card": card, "torch": "2.11.0"}
    if name == "unsloth":
        versions.update(unsloth="2026.10.9", unsloth_zoo="2026.10.9")
    return {"side": name, "status": "ok", "quant": True, "versions": versions,
            "tokens_per_s": tok_s, "peak_allocated_gib": peak, "mean_loss_timed": loss,
            "losses": [loss, loss], "batches_sha256": sha, **extra}


def three(**over):
    results = {"baseline": side("baseline", 24000.0, 16.91, 12.0),
               "unsloth": side("unsloth", 40000.0, 5.21, 12.001),
               "engine": side("engine", 36000.0, 3.74, 12.006)}
    results.update(over)
    return results


def args_for(tmp_path, **over):
    ns = argparse.Namespace(shape="p2", sides=["baseline", "unsloth", "engine"], vs_unsloth=None,
                            no_quant=False, out=str(tmp_path), steps=20, warmup=3, kernels="auto")
    for key, value in over.items():
        setattr(ns, key, value)
    return ns


@pytest.fixture
def default_file(tmp_path, monkeypatch):
    """compare.VS_UNSLOTH pointed into tmp_path: the repo's file is never touched by the tests."""
    path = tmp_path / "results" / "vs_unsloth.json"
    monkeypatch.setattr(compare, "VS_UNSLOTH", path)
    return path


def test_a_record_from_three_sides_that_ran_ok():
    record, why = compare.vs_unsloth_record(three(), "p2", date="2026-12-06 10:00 UTC")
    assert why == "" and set(record) == RECORD_KEYS
    assert record["shape"] == "p2" and record["card"] == "NVIDIA H100 80GB HBM3"
    assert record["unsloth_version"] == "2026.10.9" and record["date"] == "2026-12-06 10:00 UTC"
    assert (record["baseline_tok_s"], record["unsloth_tok_s"], record["ours_tok_s"]) == \
        (24000.0, 40000.0, 36000.0)
    assert (record["unsloth_peak_gib"], record["ours_peak_gib"]) == (5.21, 3.74)
    assert record["loss_diff_pct"] == pytest.approx(0.05)   # ours vs the baseline, in percent
    assert record["ours_args"] == ""


@pytest.mark.parametrize("results", [
    three(unsloth={"side": "unsloth", "status": "failed", "error": "No module named 'unsloth'"}),
    three(unsloth={"side": "unsloth", "status": "not run"}),
    three(unsloth={**side("unsloth", 1.0, 1.0, 12.0), "status": "oom"}),
    {k: v for k, v in three().items() if k != "unsloth"},
    three(engine={"side": "engine", "status": "failed", "error": "exit code 1"}),
])
def test_no_record_unless_all_three_ran_ok(results):
    record, why = compare.vs_unsloth_record(results, "p2")
    assert record is None and why.startswith("not ok")


def test_no_record_from_different_batches():
    record, why = compare.vs_unsloth_record(three(unsloth=side("unsloth", 1.0, 1.0, 12.0, sha="x")),
                                            "p2")
    assert record is None and "batches" in why


def test_a_record_replaces_the_one_of_the_same_shape_and_card(tmp_path):
    path = tmp_path / "vs_unsloth.json"
    old = {"shape": "p2", "card": "H100", "date": "old", "ours_tok_s": 1.0}
    other_card = {"shape": "p2", "card": "H200", "date": "old", "ours_tok_s": 2.0}
    other_shape = {"shape": "p1", "card": "H100", "date": "old", "ours_tok_s": 3.0}
    path.write_text(json.dumps([old, other_card, other_shape]))
    new = {"shape": "p2", "card": "H100", "date": "new", "ours_tok_s": 4.0}
    compare.update_vs_unsloth(path, new)
    assert json.loads(path.read_text()) == [new, other_card, other_shape]
    newer = {"shape": "p1", "card": "H200", "date": "new", "ours_tok_s": 5.0}
    compare.update_vs_unsloth(path, newer)
    assert json.loads(path.read_text()) == [new, other_card, other_shape, newer]


def test_the_first_record_makes_the_file(tmp_path):
    path = tmp_path / "results" / "vs_unsloth.json"
    compare.update_vs_unsloth(path, {"shape": "p1", "card": "H100"})
    assert json.loads(path.read_text()) == [{"shape": "p1", "card": "H100"}]


def test_record_vs_unsloth_writes_the_default_file_from_a_gpu_run(tmp_path, default_file):
    compare.record_vs_unsloth(args_for(tmp_path), three())
    first = json.loads(default_file.read_text())
    assert len(first) == 1 and first[0]["ours_tok_s"] == 36000.0
    compare.record_vs_unsloth(args_for(tmp_path), three(engine=side("engine", 50000.0, 3.7, 12.0)))
    second = json.loads(default_file.read_text())
    assert len(second) == 1 and second[0]["ours_tok_s"] == 50000.0   # replaced, not appended


@pytest.mark.parametrize("case", ["unsloth failed", "cpu", "no quant", "not asked", "off"])
def test_record_vs_unsloth_leaves_the_default_file_alone(tmp_path, default_file, case):
    results, args = three(), args_for(tmp_path)
    if case == "unsloth failed":
        results["unsloth"] = {"side": "unsloth", "status": "failed", "error": "exit code 1"}
    elif case == "cpu":
        results = {k: {**r, "versions": {**r["versions"], "card": "cpu"}} for k, r in results.items()}
    elif case == "no quant":
        args.no_quant = True
    elif case == "not asked":
        args.sides = ["baseline", "engine"]
    else:
        args.vs_unsloth = ""
    assert compare.record_vs_unsloth(args, results) is None
    assert not default_file.exists()


def test_a_path_given_takes_a_cpu_record(tmp_path, default_file):
    path = tmp_path / "cpu.json"
    results = {k: {**r, "versions": {**r["versions"], "card": "cpu"}} for k, r in three().items()}
    compare.record_vs_unsloth(args_for(tmp_path, vs_unsloth=str(path), no_quant=True), results)
    assert json.loads(path.read_text())[0]["card"] == "cpu" and not default_file.exists()


def test_the_table_has_an_unsloth_column_and_ours_over_unsloth(tmp_path):
    results = three()
    sides, others = compare.table_columns(results)
    assert sides == ["baseline", "unsloth", "engine"] and others == ["baseline", "unsloth"]
    rows = {row[0]: row[1:] for row in compare.compare_rows(results)}
    assert rows["tokens/s"] == ("24,000", "40,000", "36,000", "1.50x", "0.90x")
    assert rows["peak allocated GiB"][3:] == ("0.22x", "0.72x")
    assert rows["mean loss, timed steps"][3:] == ("+0.0500%", "+0.0417%")
    assert rows["same batches (sha256)"][3:] == ("yes", "yes")
    compare.write_compare(args_for(tmp_path, shape="tiny"), results, show=False)
    md = (tmp_path / "compare_tiny.md").read_text()
    assert "| | baseline | Unsloth | ours | ours / baseline | ours / Unsloth |" in md
    assert "unsloth 2026.10.9 · unsloth_zoo 2026.10.9" in md
    saved = json.loads((tmp_path / "compare_tiny.json").read_text())
    assert set(saved) == {"shape", "baseline", "unsloth", "engine"}


def test_a_failed_unsloth_side_shows_its_message(tmp_path):
    results = three(unsloth={"side": "unsloth", "status": "failed",
                             "error": "unsloth import: ModuleNotFoundError: No module named 'unsloth'"})
    rows = {row[0]: row[1:] for row in compare.compare_rows(results)}
    assert rows["tokens/s"] == ("24,000", "-", "36,000", "1.50x", "-")
    assert rows["Unsloth status"][:3] == ("", "failed", "")
    assert "No module named 'unsloth'" in rows["Unsloth status"][3]


def test_without_unsloth_the_table_is_as_before():
    results = {k: v for k, v in three().items() if k != "unsloth"}
    rows = compare.compare_rows(results)
    assert all(len(row) == 4 for row in rows)   # label, baseline, ours, ours / baseline
    assert rows[0] == ("tokens/s", "24,000", "36,000", "1.50x")


def test_sides_take_commas_or_spaces():
    assert compare.sides_arg("baseline,unsloth,engine") == ["baseline", "unsloth", "engine"]
    assert compare.sides_arg("unsloth") == ["unsloth"]
    with pytest.raises(argparse.ArgumentTypeError):
        compare.sides_arg("baseline,unslot")


def test_run_side_keeps_the_message_a_failed_side_wrote(tmp_path, monkeypatch):
    fake = tmp_path / "fake_side.py"
    fake.write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--json-out') + 1]\n"
        "json.dump({'side': 'unsloth', 'status': 'failed', 'error': 'no unsloth here'}, open(out, 'w'))\n"
        "sys.exit(1)\n")
    monkeypatch.setitem(compare.SIDES, "unsloth", str(fake))   # HERE / an absolute path = the path
    args = argparse.Namespace(shape="tiny", no_quant=True, kernels="auto")
    result = compare.run_side("unsloth", tmp_path, args, compare.Clock(0, 60), [])
    assert result["status"] == "failed" and result["error"] == "no unsloth here"


def test_unsloth_side_groups_like_the_baseline():
    import torch

    named = [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
              torch.nn.Parameter(torch.zeros(16, 64))),
             ("base_model.model.model.embed_tokens.modules_to_save.default.weight",
              torch.nn.Parameter(torch.zeros(100, 64))),
             ("base_model.model.model.embed_tokens.original_module.weight",
              torch.nn.Parameter(torch.zeros(100, 64), requires_grad=False)),
             ("base_model.model.lm_head.modules_to_save.default.weight",
              torch.nn.Parameter(torch.zeros(100, 64)))]
    groups = unsloth_train.param_groups(named)
    assert [g["lr"] for g in groups] == [unsloth_train.common.LR, unsloth_train.common.EMBEDDING_LR]
    assert [len(g["params"]) for g in groups] == [1, 2]


def test_unsloth_side_without_unsloth_says_failed(tmp_path, monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'unsloth'")

    monkeypatch.setattr(unsloth_train, "import_unsloth", missing)
    out = tmp_path / "r.json"
    rc = unsloth_train.main(["--model", str(tmp_path), "--shape", "tiny", "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and result["status"] == "failed" and result["side"] == "unsloth"
    assert "No module named 'unsloth'" in result["error"] and "unsloth" in result["versions"]


def test_unsloth_train_help_needs_no_unsloth():
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-P", str(BENCH / "unsloth_train.py"), "--help"],
                          capture_output=True, text=True, env=env, cwd=str(BENCH), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--json-out" in done.stdout and "Unsloth" in done.stdout
    assert "unsloth" not in sys.modules   # importing the module did not import unsloth either


@pytest.mark.parametrize("variants", [["flash=--sdpa-backend", "flash"], ["nothing="]])
def test_an_engine_variant_split_by_the_shell_is_refused(variants, monkeypatch, capsys, tmp_path):
    """`EXTRA="--engine-variants flash=--sdpa-backend flash"` reaches compare.py split in two: the
    first part has an option without its value, the second no arguments at all (the default run
    again, under the variant's name). Both must stop the call before any side runs."""
    monkeypatch.setattr(sys, "argv", ["compare.py", "--shape", "tiny", "--sides", "engine",
                                      "--out", str(tmp_path), "--engine-variants", *variants])
    monkeypatch.setattr(compare, "ensure_model", lambda *a: pytest.fail("a side was started"))
    with pytest.raises(SystemExit) as stop:
        compare.main()
    assert stop.value.code == 2
    assert "flash=--sdpa-backend=flash" in capsys.readouterr().err
