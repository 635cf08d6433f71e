"""Bad input never crashes or hangs: each case gets a message that names the file or field and says
what to do (issue 13, defects 1, 7 and 8 and their siblings).

- Corpus folders with links: never leave the chosen folder, never loop (the walk runs in a child
  process with a time limit, so a regression fails instead of hanging the suite).
- Names and files that break the usual assumptions: a file name that is not UTF-8, a truncated
  safetensors file, pickled weights, a model folder without its tokenizer.
- Settings that cannot fit: upper bounds in the config, and a refusal before the first step when
  one step needs more memory than the machine has.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_studio.engine.config import DataConfig, RunConfig
from cpt_studio.engine.data.corpus import expand_corpus_paths, read_documents
from cpt_studio.engine.data.packing import build_packed_data
from cpt_studio.engine.errors import ConfigError, CorpusError, ModelSourceError
from cpt_studio.engine.model.loading import load_base_model
from cpt_studio.engine.model.source import ResolvedModel

TEXT = "La rapida bruna vulpo saltas super la maldiligenta hundo. " * 20


# ---- 1. corpus folders with links ----------------------------------------------------------------
_EXPAND = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from cpt_studio.engine.data.corpus import expand_corpus_paths
from cpt_studio.engine.errors import CorpusError
try:
    print(json.dumps({"files": [str(p) for p in expand_corpus_paths(sys.argv[1:])]}))
except CorpusError as exc:
    print(json.dumps({"error": exc.message, "hint": exc.hint}))
"""


def expand_with_time_limit(*paths, limit: float = 30.0) -> tuple[dict, str]:
    """expand_corpus_paths in a child process that is killed after `limit` seconds.

    Returns (the result: {"files": [...]} or {"error", "hint"}, what was logged on stderr)."""
    try:
        done = subprocess.run([sys.executable, "-P", "-c", _EXPAND, *map(str, paths)],
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading the corpus {paths} did not finish within {limit} s (a link loop?)")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def corpus_folder(tmp_path) -> tuple[Path, Path]:
    """c/d/some.txt, and c/outside.txt beside the chosen folder d."""
    folder = tmp_path / "c" / "d"
    folder.mkdir(parents=True)
    (folder / "some.txt").write_text(TEXT)
    (tmp_path / "c" / "outside.txt").write_text("outside the chosen folder")
    return tmp_path / "c", folder


def test_a_folder_with_links_back_to_itself_is_read_once_and_never_loops(tmp_path):
    _, folder = corpus_folder(tmp_path)
    os.symlink(".", folder / "l1")
    os.symlink(".", folder / "l2")
    result, log = expand_with_time_limit(folder)
    assert result == {"files": [str(folder / "some.txt")]}
    assert "l1" in log and "l2" in log and "not followed" in log


def test_links_up_or_out_of_the_folder_are_not_followed(tmp_path):
    parent, folder = corpus_folder(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "far.txt").write_text("far away")
    os.symlink("..", folder / "loop")
    os.symlink(tmp_path / "other", folder / "elsewhere")
    os.symlink(parent / "outside.txt", folder / "outside.txt")
    result, log = expand_with_time_limit(folder)
    assert result == {"files": [str(folder / "some.txt")]}
    for name in ("loop", "elsewhere", "outside.txt"):
        assert f"'{name}'" in log
    assert "outside" in log


def test_a_link_to_a_file_inside_the_folder_is_read_once(tmp_path):
    _, folder = corpus_folder(tmp_path)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("second")
    os.symlink("some.txt", folder / "alias.txt")             # the same file again
    os.symlink("sub", folder / "sub_again")                  # a folder that is walked anyway
    result, _ = expand_with_time_limit(folder)
    assert result == {"files": [str(folder / "alias.txt"), str(folder / "sub" / "b.txt")]}
    assert [doc for p in result["files"] for doc in read_documents(Path(p))] == [TEXT.rstrip(),
                                                                                 "second"]


def test_a_folder_of_links_to_elsewhere_says_what_was_skipped_and_what_to_do(tmp_path):
    parent, folder = corpus_folder(tmp_path)
    (folder / "some.txt").unlink()
    os.symlink(parent / "outside.txt", folder / "book.txt")
    result, _ = expand_with_time_limit(folder)
    assert "book.txt" in result["error"] and "outside" in result["error"]
    assert "Copy the files into the folder" in result["hint"]


def test_a_pipe_named_like_a_corpus_file_never_blocks(tmp_path):
    _, folder = corpus_folder(tmp_path)
    os.mkfifo(folder / "pipe.txt")
    result, log = expand_with_time_limit(folder)
    assert result == {"files": [str(folder / "some.txt")]} and "'pipe.txt'" in log
    result, _ = expand_with_time_limit(folder / "pipe.txt")
    assert "pipe.txt" in result["error"] and "not a regular file" in result["error"]


def test_a_dataset_folder_that_lists_a_file_outside_itself_is_refused(tmp_path):
    import pyarrow as pa

    data = tmp_path / "ds"
    data.mkdir()
    table = pa.table({"text": ["stolen"]})
    for path in (data / "data-00000-of-00001.arrow", tmp_path / "outside.arrow"):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (data / "dataset_info.json").write_text("{}")
    listed = {"_data_files": [{"filename": "../outside.arrow"}]}
    (data / "state.json").write_text(json.dumps(listed))
    with pytest.raises(CorpusError) as err:
        list(read_documents(data))
    assert "../outside.arrow" in err.value.message and "outside" in err.value.message
    assert "save_to_disk" in err.value.hint


# ---- 7. names and files that broke the usual assumptions -----------------------------------------
NOT_UTF8 = os.fsdecode(b"caf\xe9.txt")     # a Latin-1 name: surrogate escapes in Python


def test_a_corpus_file_name_that_is_not_utf8_is_read_and_named_printably(tmp_path, tiny_tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / NOT_UTF8).write_text(TEXT)
    (folder / "ok.txt").write_text(TEXT)
    messages = []
    data = build_packed_data(DataConfig(train_files=[str(folder)], seq_len=16), tiny_tokenizer,
                             tmp_path / "cache", progress=lambda f, m: messages.append(m))
    assert data.stats["documents"] == 2
    for message in messages:
        message.encode("utf-8")            # events and logs are UTF-8: no lone surrogates
    assert any("caf\\xe9.txt" in m for m in messages)


def test_a_bad_corpus_file_whose_name_is_not_utf8_is_named_printably(tmp_path):
    path = tmp_path / NOT_UTF8
    path.write_bytes(b"Caf\xe9 au lait")
    with pytest.raises(CorpusError) as err:
        list(read_documents(path))
    shown = str(err.value)
    shown.encode("utf-8")
    assert "caf\\xe9.txt" in shown and "UTF-8" in shown


def folder_of(path: Path) -> ResolvedModel:
    return ResolvedModel("hf_folder", str(path), "", path.name)


def copy_model(tiny_model_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), target)
    return target


def test_a_truncated_safetensors_file_is_named_with_what_to_do(tmp_path, tiny_model_dir):
    model = copy_model(tiny_model_dir, tmp_path)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder_of(model), "fp32", "cpu")
    assert str(weights) in err.value.message and "incomplete" in err.value.message
    assert "deserializing" not in str(err.value)
    assert "again" in err.value.hint


@pytest.mark.parametrize("payload", ["tensors", "objects"])
def test_pickled_weights_are_refused_in_our_words(tmp_path, tiny_model_dir, payload):
    import argparse

    import torch
    from safetensors.torch import load_file

    model = copy_model(tiny_model_dir, tmp_path)
    state = load_file(str(model / "model.safetensors"))
    if payload == "objects":                 # torch's own refusal would advise weights_only=False
        state["_meta"] = argparse.Namespace(origin="somewhere")
    torch.save(state, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder_of(model), "fp32", "cpu")
    shown = str(err.value)
    assert "pytorch_model.bin" in err.value.message and "pickle" in err.value.message
    assert "safetensors" in err.value.hint
    assert "weights_only" not in shown and "trust the source" not in shown


@pytest.mark.parametrize("left", ["nothing", "tokenizer_config", "sentencepiece_config"])
def test_a_model_folder_without_its_tokenizer_says_which_files_to_add(tmp_path, tiny_model_dir,
                                                                       left):
    model = copy_model(tiny_model_dir, tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    if left != "nothing":
        if left == "sentencepiece_config":   # transformers 5 builds an empty Llama tokenizer here
            config["tokenizer_class"] = "LlamaTokenizer"
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder_of(model), "fp32", "cpu")
    shown = str(err.value)
    assert str(model) in err.value.message and "no tokenizer" in err.value.message
    assert "tokenizer.json" in err.value.message          # what is missing
    assert "Copy" in err.value.hint and "tokenizer.json" in err.value.hint
    for jargon in ("sentencepiece", "tiktoken", "backend", "instantiate"):
        assert jargon not in shown.lower()


# ---- 8. settings that cannot fit -----------------------------------------------------------------
@pytest.mark.parametrize("field, value, limit", [
    ("training.batch_size", 10 ** 12, "65536"),
    ("training.grad_accum", 10 ** 12, "65536"),
    ("training.max_steps", 10 ** 30, "1000000000"),
    ("training.seed", 10 ** 20, "4294967295"),
    ("training.epochs", 1e12, "10000"),
])
def test_absurd_settings_are_refused_naming_the_field_and_the_limit(field, value, limit):
    section, name = field.split(".")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({section: {name: value}})
    assert limit in err.value.problems[field] and "maximum" in err.value.problems[field]
    assert field in str(err.value)


def test_a_micro_batch_of_too_many_tokens_is_refused_with_the_way_out():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"training": {"batch_size": 8192}, "data": {"seq_len": 4096}})
    problem = err.value.problems["training.batch_size"]
    assert "tokens" in problem and "grad_accum" in problem and "seq_len" in problem


def tiny_run(tmp_path, tiny_model_dir, batch_size: int) -> RunConfig:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    cfg = RunConfig(name="big-batch")
    cfg.model.source, cfg.model.precision = str(tiny_model_dir("llama")), "fp32"
    cfg.adapter.r = 4
    cfg.data.train_files, cfg.data.seq_len = [str(corpus)], 64
    cfg.training.batch_size, cfg.training.max_steps, cfg.training.warmup_steps = batch_size, 2, 0
    cfg.eval.every_steps = cfg.checkpoint.every_steps = 0
    return cfg


def test_a_step_that_needs_more_memory_than_the_machine_has_is_refused_before_it_runs(
        tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from cpt_studio.engine.runs.store import Workspace
    from cpt_studio.engine.train.setup import setup_training

    import psutil

    # The machine as psutil reports it, with 8 MB of RAM free.
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: real._replace(available=8 * 1024 ** 2, free=8 * 1024 ** 2))
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ConfigError) as err:
        setup_training(tiny_run(tmp_path, tiny_model_dir, 4096), ws, lambda e: None,
                       torch.device("cpu"))
    problem = err.value.problems["training.batch_size"]
    assert "one training step needs about" in problem and "RAM" in problem
    assert "8 MB of RAM" in problem
    assert "Lower training.batch_size to" in err.value.hint and "grad_accum" in err.value.hint
    # A batch that fits starts as before.
    setup = setup_training(tiny_run(tmp_path, tiny_model_dir, 2), ws, lambda e: None,
                           torch.device("cpu"))
    assert setup.sampler.batch_size == 2


def test_the_memory_the_machine_has_is_read_from_the_system():
    import psutil
    import torch

    from cpt_studio.engine.train.estimate import available_memory

    free = available_memory(torch.device("cpu"))
    assert 0 < free <= psutil.virtual_memory().total


def test_a_full_disk_while_the_corpus_is_tokenized_names_the_folder_and_leaves_nothing(
        tmp_path, tiny_tokenizer, monkeypatch):
    """The tokens go to disk as they are made (the RAM holds one batch): a full disk there is a
    clean DiskFullError naming the cache folder, and no partial token file is left behind."""
    import errno

    from cpt_studio.engine.data import token_store
    from cpt_studio.engine.errors import DiskFullError

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(TEXT * 40)
    real_append, calls = token_store.TokenFileWriter.append, []

    def append(self, ids):
        calls.append(len(ids))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, ids)

    monkeypatch.setattr(token_store.TokenFileWriter, "append", append)
    with pytest.raises(DiskFullError) as err:
        build_packed_data(DataConfig(train_files=[str(folder)], seq_len=16), tiny_tokenizer,
                          tmp_path / "cache")
    assert "the tokenized corpus" in err.value.message and str(tmp_path / "cache") in err.value.message
    assert "Free space at" in err.value.hint
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_step_that_may_not_fit_is_let_through_with_a_warning(tmp_path, tiny_model_dir, caplog,
                                                              monkeypatch):
    import torch

    from cpt_studio.engine.model.source import describe_model, resolve_model_source
    from cpt_studio.engine.train import estimate
    from cpt_studio.engine.train.plan import resolve

    cfg = tiny_run(tmp_path, tiny_model_dir, 8)
    info = describe_model(resolve_model_source(cfg.model.source, tmp_path))
    plan = resolve(cfg, "cpu", info)
    need = sum(estimate.step_memory(info, cfg, plan, 8).values())
    monkeypatch.setattr(estimate, "available_memory", lambda device: need + 1)
    with caplog.at_level("INFO", logger="cpt_studio.engine.train.estimate"):
        estimate.check_step_memory(info, cfg, plan, 8, torch.device("cpu"))    # no refusal
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and "lower training.batch_size" in warnings[0]
