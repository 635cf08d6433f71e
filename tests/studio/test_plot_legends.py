"""Chart legends and the Runs table's labels: what the screenshots showed wrong once."""
import pytest

from cpt_studio.engine.runs.events import EvalMetrics, StepMetrics
from cpt_studio.studio.pages.model_source_picker import BUILTIN_LABEL
from cpt_studio.studio.pages.run_plots import RunPlots
from cpt_studio.studio.pages.runs_page import model_label

pytestmark = pytest.mark.usefixtures("no_leaked_widgets")


def legend_names(plots: RunPlots, chart: str) -> list[str]:
    return [label.text for _sample, label in plots.plots[chart].getPlotItem().legend.items]


def cpu_step(step: int) -> StepMetrics:
    return StepMetrics(step=step, epoch=0, loss=3.0, lr=1e-4, embedding_lr=1e-5, grad_norm=1.0,
                       tokens_seen=step * 512, tokens_per_s=100.0, step_s=1.0, ram=2e9)


def test_legends_list_only_drawn_series_in_a_fixed_order(qtbot):
    plots = RunPlots()
    qtbot.addWidget(plots)
    assert legend_names(plots, "mem") == []
    plots.add_eval(EvalMetrics(step=0, eval_set="heldout", eval_loss=3.5, perplexity=33.0))
    plots.add_step(cpu_step(1))
    plots.refresh()
    assert legend_names(plots, "mem") == ["RAM (worker)"]         # a CPU run: no GPU series listed
    assert legend_names(plots, "loss") == ["train (raw)", "train (smoothed)", "eval heldout"]
    assert legend_names(plots, "lr") == ["lr", "embedding lr"]
    plots.clear()
    assert legend_names(plots, "loss") == [] and legend_names(plots, "mem") == []


def test_legend_labels_take_the_theme_colour(qtbot):
    plots = RunPlots()
    qtbot.addWidget(plots)
    plots.add_step(cpu_step(1))
    plots.refresh()
    for dark, fg in ((True, "#d4d4d8"), (False, "#3f3f46")):
        plots.set_dark(dark)
        for _sample, label in plots.plots["loss"].getPlotItem().legend.items:
            # pyqtgraph writes the colour into the label's HTML only when it (re)draws the text
            assert f"color:{fg}" in label.item.toHtml().lower().replace(" ", "")


def test_runs_table_names_models_briefly():
    assert model_label("default") == BUILTIN_LABEL and model_label("") == BUILTIN_LABEL
    assert model_label("/models/llama-3-8b/") == "llama-3-8b"
    assert model_label("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
