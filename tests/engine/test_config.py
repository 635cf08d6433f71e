"""Config: YAML round trip, field help, overrides, and messages that name each bad field."""
import pytest

from cpt_studio.engine.config import RunConfig, apply_overrides, field_help, iter_fields
from cpt_studio.engine.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(name="law-de")
    cfg.training.learning_rate = 3e-4
    cfg.adapter.target_modules = ["q_proj", "v_proj"]
    cfg.eval.sample_prompts = ["Der Vertrag", "Ĉu vi parolas"]
    path = tmp_path / "run.yaml"
    cfg.save(path)
    assert "schema_version: 1" in path.read_text()
    assert RunConfig.load(path) == cfg


def test_every_field_has_help():
    for name, f, _ in iter_fields():
        assert f.metadata.get("help"), f"{name} has no help text"
    assert "rank" in field_help("adapter", "r").lower()


def test_embedding_lr_from_ratio_or_direct():
    cfg = RunConfig()
    cfg.training.learning_rate = 2e-4
    cfg.training.embedding_lr_ratio = 4
    assert cfg.embedding_lr == pytest.approx(5e-5)
    cfg.training.embedding_learning_rate = 1e-6
    assert cfg.embedding_lr == 1e-6


def test_bad_fields_are_each_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learning_rate: fast\n  schedule: zigzag\n  batch_size: 0\n"
                    "adapter:\n  rank: 8\n")
    with pytest.raises(ConfigError) as info:
        RunConfig.load(path)
    problems = info.value.problems
    assert "fast" in problems["training.learning_rate"]
    assert "cosine" in problems["training.schedule"]          # lists what is allowed
    assert "minimum" in problems["training.batch_size"]
    assert "unknown field" in problems["adapter.rank"]
    assert str(path) in str(info.value)


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        RunConfig.load(path)
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.load(tmp_path / "missing.yaml")


def test_overrides_apply_and_reject_unknown_keys():
    cfg = apply_overrides(RunConfig(), ["training.learning_rate=1e-4", "adapter.lm_head=lora",
                                        "data.seq_len=256"])
    assert cfg.training.learning_rate == 1e-4 and cfg.adapter.lm_head == "lora"
    assert cfg.data.seq_len == 256
    with pytest.raises(ConfigError, match="training.lr"):
        apply_overrides(RunConfig(), ["training.lr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(RunConfig(), ["training.learning_rate"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="warmup_steps"):
        RunConfig.from_dict({"training": {"max_steps": 5, "warmup_steps": 10}})
    with pytest.raises(ConfigError, match="schema_version"):
        RunConfig.from_dict({"schema_version": 99})
