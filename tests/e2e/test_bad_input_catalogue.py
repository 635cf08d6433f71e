"""The bad-input catalogue, command line half: each case is something a user really does wrong, run
through `cpt-studio` in-process (the same `main` the console script calls), with the message the
user reads asserted word for word where it matters.

Every case must: exit with status 2, print no traceback, name the file, field or run involved, say
what to do, and leave an earlier run of the same workspace byte for byte as it was (its adapter,
checkpoints, config and events). docs/troubleshooting.md lists each case id with what to do; a test
below keeps the two in step. The studio half is tests/e2e/test_bad_input_studio.py.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from cpt_studio.engine import cli
from cpt_studio.engine.runs.store import Workspace

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


@dataclass
class Setup:
    """What a case gets to build its bad input from."""
    tmp: Path
    workspace: Path
    earlier_run: Path           # a finished run with a checkpoint and an adapter
    model: Path                 # a good tiny model folder (copy it before breaking it)
    corpus: Path                # a good corpus folder
    config: Callable            # tiny_config factory

    def config_file(self, text: str | None = None, **sections) -> Path:
        path = self.tmp / "run.yaml"
        if text is None:
            cfg = self.config(**sections)
            cfg.save(path)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def broken_model(self) -> Path:
        folder = self.tmp / "model"
        shutil.copytree(self.model, folder)
        return folder

    def train(self, *extra, **sections) -> list[str]:
        return ["train", str(self.config_file(**sections)), *extra]


@dataclass
class Case:
    id: str
    argv: Callable[[Setup], list[str]]
    says: tuple[str, ...]            # fragments of the message (stderr), each must appear


def _config_with(setup: Setup, old: str, new: str) -> list[str]:
    path = setup.config_file()
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in the saved config"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return ["train", str(path)]


def _model_without(setup: Setup, *patterns: str) -> list[str]:
    folder = setup.broken_model()
    for pattern in patterns:
        for f in folder.glob(pattern):
            f.unlink()
    return setup.train(model={"source": str(folder)})


def _truncated_weights(setup: Setup) -> list[str]:
    folder = setup.broken_model()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return setup.train(model={"source": str(folder)})


def _pickled_weights(setup: Setup) -> list[str]:
    folder = setup.broken_model()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return setup.train(model={"source": str(folder)})


def _corpus_of(setup: Setup, files: dict[str, bytes]) -> list[str]:
    folder = setup.tmp / "bad_corpus"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return setup.train(data={"train_files": [str(folder)]})


def _link_only_corpus(setup: Setup) -> list[str]:
    folder = setup.tmp / "links"
    folder.mkdir()
    outside = setup.tmp / "book.txt"
    outside.write_text("Some words outside the chosen folder. " * 50, encoding="utf-8")
    (folder / "book.txt").symlink_to(outside)
    return setup.train(data={"train_files": [str(folder)]})


def _earlier_run_id(setup: Setup) -> str:
    return setup.earlier_run.name


def _run_without_adapter(setup: Setup) -> list[str]:
    run = setup.workspace / "runs" / "no-adapter"
    shutil.copytree(setup.earlier_run, run)
    for name in ("adapter", "checkpoints"):
        shutil.rmtree(run / name, ignore_errors=True)
    return ["export", str(run)]


CASES = [
    # the config file itself
    Case("config-missing", lambda s: ["train", str(s.tmp / "nowhere.yaml")],
         ("nowhere.yaml", "not found")),
    Case("config-not-yaml", lambda s: ["train", str(s.config_file("model: [unclosed\n"))],
         ("run.yaml", "not valid YAML at line 2")),
    Case("config-python-tag",
         lambda s: ["train", str(s.config_file("name: !!python/object/apply:os.system ['true']\n"))],
         ("run.yaml", "!!python tag", "line 1")),
    Case("config-unknown-field", lambda s: _config_with(s, "max_steps:", "max_stepz: 3\n  max_steps:"),
         ("training.max_stepz", "unknown")),
    Case("config-wrong-type", lambda s: _config_with(s, "batch_size: 4", "batch_size: four"),
         ("training.batch_size", "whole number")),
    Case("config-batch-too-big", lambda s: s.train(training={"batch_size": 10 ** 12}),
         ("training.batch_size",)),
    Case("config-negative-lr", lambda s: s.train(training={"learning_rate": -1.0}),
         ("training.learning_rate",)),
    Case("config-zero-seq-len", lambda s: s.train(data={"seq_len": 0}), ("data.seq_len",)),
    Case("config-ratio-out-of-range", lambda s: s.train(training={"embedding_lr_ratio": 0.0}),
         ("training.embedding_lr_ratio",)),
    Case("override-unknown-key", lambda s: s.train("--set", "training.speed=11"),
         ("training.speed",)),
    Case("override-bad-value", lambda s: s.train("--set", "training.max_steps=lots"),
         ("training.max_steps",)),
    # the model
    Case("model-folder-missing", lambda s: s.train(model={"source": str(s.tmp / "no-model")}),
         ("no-model",)),
    Case("model-no-config", lambda s: _model_without(s, "config.json"), ("config.json",)),
    Case("model-truncated-weights", _truncated_weights, ("model.safetensors", "incomplete")),
    Case("model-pickled-weights", _pickled_weights, ("pytorch_model.bin", "safetensors")),
    Case("model-no-tokenizer", lambda s: _model_without(s, "tokenizer*", "special_tokens_map.json"),
         ("tokenizer",)),
    # the corpus
    Case("corpus-missing", lambda s: s.train(data={"train_files": [str(s.tmp / "no-corpus")]}),
         ("no-corpus",)),
    Case("corpus-empty-folder", lambda s: _corpus_of(s, {}), ("bad_corpus",)),
    Case("corpus-binary-file", lambda s: _corpus_of(s, {"data.txt": bytes(range(256)) * 64}),
         ("data.txt",)),
    Case("corpus-bad-jsonl", lambda s: _corpus_of(s, {"data.jsonl": b'{"text": "ok"}\n{oops\n'}),
         ("data.jsonl", "line 2")),
    Case("corpus-jsonl-without-text",
         lambda s: _corpus_of(s, {"data.jsonl": b'{"n": 1, "tags": ["a"]}\n' * 5}),
         ("data.jsonl", "text")),
    Case("corpus-only-links-outside", _link_only_corpus, ("book.txt", "outside")),
    Case("corpus-empty-files", lambda s: _corpus_of(s, {"a.txt": b"", "b.txt": b"  \n"}),
         ("bad_corpus",)),
    # runs
    Case("resume-unknown-run", lambda s: ["resume", "no-such-run"], ("no-such-run",)),
    Case("resume-path-outside", lambda s: ["resume", "../../etc"], ("../../etc",)),
    Case("export-unknown-run", lambda s: ["export", "no-such-run"], ("no-such-run",)),
    Case("export-no-adapter", _run_without_adapter, ("no-adapter", "adapter")),
    Case("export-out-exists", lambda s: ["export", _earlier_run_id(s), "--dtype", "fp32",
                                         "--out", str(s.corpus)],
         ("already exists", "--overwrite")),
]


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` but the run lock (a reader may take and drop it)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_message_and_changes_nothing(case, tmp_path, tiny_config, tiny_model_dir,
                                                      corpus_dir, earlier_run, capsys, monkeypatch):
    workspace, run = earlier_run
    monkeypatch.chdir(tmp_path)
    setup = Setup(tmp_path, workspace, run, tiny_model_dir(), corpus_dir,
                  lambda **sections: tiny_config(**sections))
    argv = case.argv(setup) + ["--workspace", str(workspace)]
    before = _digest(run)
    capsys.readouterr()
    code = cli.main(argv)
    said = capsys.readouterr()
    shown = said.err + said.out
    assert code == 2, f"exit {code}, said:\n{shown}"
    assert "Traceback" not in shown, shown
    print(f"--- {case.id}\n{shown}")        # shown with -rP: the catalogue as the user reads it
    for fragment in case.says:
        assert fragment in shown, f"{fragment!r} not in what the user reads:\n{shown}"
    assert "Hint:" in shown, f"no advice on what to do:\n{shown}"
    assert _digest(run) == before, "the earlier run changed"
    assert Workspace(workspace).get_run(run.name).status() == "finished"


def test_the_troubleshooting_page_covers_every_case():
    page = DOCS_PAGE.read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"`{c.id}`" not in page]
    assert not missing, f"docs/troubleshooting.md does not list: {missing}"
