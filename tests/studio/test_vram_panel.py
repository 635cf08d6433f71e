"""The VRAM panel's "What will run": the GPU plan beside the estimate, following the config."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cpt_studio.engine.config import RunConfig
from cpt_studio.studio.pages.vram_panel import VramPanel


@dataclass
class Info:
    """A ModelInfo-shaped stand-in (a small untied Llama)."""
    model_type: str = "llama"
    n_params: int = 1_000_000_000
    vocab_size: int = 32_000
    hidden_size: int = 2048
    n_layers: int = 16
    tied_embeddings: bool = False
    linear_module_names: list = field(default_factory=lambda: ["q_proj", "v_proj"])


@pytest.fixture
def panel(qtbot):
    panel = VramPanel()
    qtbot.addWidget(panel)
    return panel


def test_the_plan_is_shown_and_follows_the_config(panel):
    assert panel.plan_lines() == [] and not panel.plan_view.isVisibleTo(panel)
    cfg = RunConfig()
    panel.set_estimate_inputs(Info(), cfg)
    lines = panel.plan_lines()
    assert lines[0] == "Device: CUDA, llama model" and panel.plan_view.isVisibleTo(panel)
    assert any(line.startswith("Embeddings optimizer: fused8bit") for line in lines)
    before = panel.total_label.text()
    cfg.training.embedding_optimizer = "adamw"        # what the model page does on config_changed
    panel.set_estimate_inputs(Info(), cfg)
    assert "Embeddings optimizer: adamw — set in the config" in panel.plan_lines()
    assert any(line.startswith("Trained embedding copies: fp32") for line in panel.plan_lines())
    assert panel.total_label.text() != before           # the estimate read the same plan


def test_settings_that_cannot_hold_say_why_instead_of_an_estimate(panel):
    cfg = RunConfig()
    cfg.training.embedding_optimizer, cfg.training.embedding_weights = "adamw", "bf16"
    panel.set_estimate_inputs(Info(), cfg)
    assert panel.badge_text() == "" and panel.plan_lines() == []
    assert "training.embedding_weights: bf16 needs embedding_optimizer fused8bit" in panel.note.text()
    cfg.training.embedding_weights = "auto"
    panel.set_estimate_inputs(Info(), cfg)
    assert panel.badge_text() in ("fits", "tight", "won't fit") and panel.plan_lines()
