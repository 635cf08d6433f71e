"""Training page: generated editors write the config, two learning rates, targets, YAML, CLI."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from PySide6.QtGui import QGuiApplication

from cpt_studio.engine.config import RunConfig, iter_fields
from cpt_studio.engine.runs.runner import cli_command_text
from cpt_studio.engine.runs.store import Workspace
from cpt_studio.studio.pages.training_page import TrainingPage
from cpt_studio.studio.state import StudioState

LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def page(qtbot, tmp_path):
    page = TrainingPage(StudioState(Workspace(tmp_path / "ws")))
    qtbot.addWidget(page)
    return page


def editor(page, name):
    return page.form.editors[name].widget


def field_of(dotted: str):
    return next(f for name, f, _tp in iter_fields() if name == dotted)


def test_editors_come_from_field_metadata(page):
    r = editor(page, "adapter.r")
    assert (r.minimum(), r.maximum()) == (1, 4096)
    assert "LoRA rank" in r.toolTip()
    schedule = editor(page, "training.schedule")
    assert [schedule.itemText(i) for i in range(schedule.count())] == ["cosine", "linear", "constant"]
    embed = editor(page, "adapter.embed_tokens")
    assert [embed.itemText(i) for i in range(embed.count())] == ["off", "full", "lora"]
    assert {"eval.every_steps", "checkpoint.every_steps", "checkpoint.keep_last",
            "training.gradient_checkpointing"} <= set(page.form.editors)


def test_changing_a_spin_box_writes_the_config(page):
    editor(page, "training.batch_size").setValue(8)
    assert page.state.config.training.batch_size == 8
    editor(page, "checkpoint.keep_last").setValue(5)
    assert page.state.config.checkpoint.keep_last == 5
    editor(page, "adapter.lm_head").setCurrentText("lora")
    assert page.state.config.adapter.lm_head == "lora"
    editor(page, "training.gradient_checkpointing").setChecked(False)
    assert page.state.config.training.gradient_checkpointing is False
    # and the other way: a config change elsewhere shows up in the editor
    page.state.set_field("training", "max_steps", 321)
    assert editor(page, "training.max_steps").value() == 321


def test_ratio_updates_embedding_lr_label_and_config(page):
    page.state.set_field("training", "learning_rate", 2e-4)
    assert page.ratio.value() == RunConfig().training.embedding_lr_ratio
    assert "embedding lr = 2.0e-05" in page.embedding_lr_label.text()
    page.ratio.setValue(4)
    assert page.state.config.training.embedding_lr_ratio == 4
    assert "embedding lr = 5.0e-05" in page.embedding_lr_label.text()
    editor(page, "training.learning_rate").setValue(1e-3)
    assert page.state.config.training.learning_rate == pytest.approx(1e-3)
    assert "embedding lr = 2.5e-04" in page.embedding_lr_label.text()
    # set directly: the ratio no longer applies
    page.direct_lr.setValue(3e-6)
    assert page.state.config.training.embedding_learning_rate == pytest.approx(3e-6)
    assert "embedding lr = 3.0e-06" in page.embedding_lr_label.text()
    assert not page.ratio.isEnabled()
    editor(page, "training.learning_rate").stepBy(1)            # arrows double a learning rate
    assert page.state.config.training.learning_rate == pytest.approx(2e-3)
    editor(page, "adapter.dropout").stepBy(1)                   # ... and add to other numbers
    assert page.state.config.adapter.dropout == pytest.approx(0.01)
    page.direct_lr.setValue(0)                   # "auto"
    assert page.state.config.training.embedding_learning_rate is None


def test_sample_prompts_one_per_line(page):
    editor(page, "eval.sample_prompts").setPlainText("La vetero\n\nMia nomo estas\n")
    assert page.state.config.eval.sample_prompts == ["La vetero", "Mia nomo estas"]


def test_cross_field_problem_gets_red_outline_and_message(page):
    editor(page, "training.max_steps").setValue(5)
    editor(page, "training.warmup_steps").setValue(50)
    msg = page.form.error_text("training.warmup_steps")
    assert "max_steps" in msg
    assert page.form.is_marked("training.warmup_steps")
    assert "training.warmup_steps" in page.problems_label.text()
    editor(page, "training.warmup_steps").setValue(2)
    assert page.form.error_text("training.warmup_steps") == ""
    assert not page.form.is_marked("training.warmup_steps")


def test_target_checkboxes_reflect_the_model(page):
    assert page.targets.boxes == {}
    page.state.model_info = SimpleNamespace(linear_module_names=LLAMA, tied_embeddings=True)
    page.state.config_changed.emit("model")
    assert list(page.targets.boxes) == list(LLAMA)
    assert page.targets.checked() == list(LLAMA)            # [] = all
    assert not editor(page, "adapter.lm_head").isEnabled()   # tied: follows embed_tokens
    page.targets.boxes["down_proj"].setChecked(False)
    assert page.state.config.adapter.target_modules == list(LLAMA[:-1])
    page.targets.boxes["down_proj"].setChecked(True)
    assert page.state.config.adapter.target_modules == []
    for name in LLAMA:                                       # the last one stays checked
        page.targets.boxes[name].setChecked(False)
    assert page.state.config.adapter.target_modules == ["down_proj"]


def test_hand_placed_editors_keep_the_config_field_bounds(page):
    """The ratio and the direct embedding lr sit in rows built by the page; their range, default
    and help must still be the config field's, so the GUI and a YAML config accept the same
    values (the ratio once stopped at 20 while configs allowed 1000)."""
    for dotted, widget in (("training.embedding_lr_ratio", page.ratio),
                           ("training.embedding_learning_rate", page.direct_lr)):
        f = field_of(dotted)
        assert (widget.minimum(), widget.maximum()) == (f.metadata["min"], f.metadata["max"])
        assert f.metadata["help"] in widget.toolTip()
    page.ratio.setValue(500)                      # past the old GUI-only limit of 20
    assert page.state.config.training.embedding_lr_ratio == 500
    assert not page.form.check()


def test_target_checkboxes_from_a_real_tiny_model(page, tiny_model_dir):
    from cpt_studio.engine.model.source import describe_model, resolve_model_source
    info = describe_model(resolve_model_source(str(tiny_model_dir("qwen2")),
                                               page.state.workspace.models_dir))
    page.state.model_info = info
    page.state.config_changed.emit("model")
    assert set(page.targets.boxes) == set(info.linear_module_names)
    assert "q_proj" in page.targets.boxes


def test_save_and_load_round_trip(page, tmp_path):
    editor(page, "adapter.r").setValue(64)
    page.ratio.setValue(5)
    editor(page, "eval.sample_prompts").setPlainText("Saluton")
    path = page.save_config_to(tmp_path / "mine.yaml")
    saved = page.state.config
    page.state.set_config(RunConfig())
    assert editor(page, "adapter.r").value() == 16
    assert page.load_config_from(path)
    assert page.state.config == saved
    assert editor(page, "adapter.r").value() == 64
    assert page.ratio.value() == 5


def test_invalid_yaml_names_the_field(page, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"training": {"learning_rate": "fast", "batch_size": 0}}))
    before = page.state.config
    assert not page.load_config_from(bad)
    text = page.message.text()
    assert "training.learning_rate" in text and "training.batch_size" in text
    assert page.state.config == before
    (tmp_path / "broken.yaml").write_text("training: [unclosed")
    assert not page.load_config_from(tmp_path / "broken.yaml")
    assert "YAML" in page.message.text()


def test_copy_cli_command_saves_first(page, tmp_path):
    command = page.copy_cli_command()
    assert command.startswith("cpt-studio train ")
    path = page.state.workspace.root / "configs" / "run.yaml"
    assert str(path) in command and path.is_file()
    assert QGuiApplication.clipboard().text() == command
    assert RunConfig.load(path) == page.state.config
    mine = page.save_config_to(tmp_path / "mine.yaml")
    assert str(mine) in page.copy_cli_command()
    editor(page, "adapter.r").setValue(8)                    # changed since: saved again
    assert str(mine) not in page.copy_cli_command()


def test_cli_command_is_the_runners_text(page, monkeypatch):
    """The page copies the engine's command text: one implementation for the GUI and the runner;
    --workspace only when the workspace is not the default one."""
    root = page.state.workspace.root
    command = page.cli_command()
    path = root / "configs" / "run.yaml"
    assert command == cli_command_text(path, root)
    assert command.endswith(f"--workspace {root}")
    monkeypatch.setenv("CPT_STUDIO_HOME", str(root))        # now it is the default workspace
    assert page.cli_command() == f"cpt-studio train {path}"
