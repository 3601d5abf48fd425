"""TrainingPanel driven headlessly (ipywidgets' dummy comm, no kernel): as a callback of real runs."""

import dataclasses
import math

import pytest
import torch
from testkit import WordTask
from tinylab.widgets.training import TrainingPanel

from tinylab import resume
from tinylab.adapter.attach import apply_tinylora
from tinylab.model.tiny import tiny_model
from tinylab.train.grpo import GRPOConfig, train_grpo
from tinylab.train.records import step_log
from tinylab.train.sft import SFTConfig, train_sft

CONFIG = GRPOConfig(prompts_per_step=2, group_size=3, max_new_tokens=4, lr=0.05, steps=3, seed=0)


@pytest.fixture
def tiny():
    model, tok = tiny_model("llama", seed=0)
    return model, tok, apply_tinylora(model, u=4, n_tie="all")


def test_panel_plots_every_step_of_a_grpo_run(tiny, tmp_path):
    model, tok, adapter = tiny
    panel = TrainingPanel("toy", max_samples=2)
    run = train_grpo(model, tok, adapter, WordTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)),
                     callbacks=[panel])
    reward, correct, formatted, spread, length, longest, vnorm = panel.figure.data
    assert list(reward.x) == [1, 2, 3] and list(vnorm.x) == [1, 2, 3]
    assert list(reward.y) == pytest.approx(list(run.history["reward_mean"]))
    assert list(reward.error_y.array) == pytest.approx(list(run.history["reward_std"]))
    assert list(vnorm.y) == pytest.approx(list(run.history["v_norm"])) and vnorm.y[-1] > 0
    for trace, column in ((correct, "correct_rate"), (formatted, "format_rate"), (spread, "zero_spread"),
                          (length, "completion_len"), (longest, "completion_len_max")):
        assert list(trace.x) == [1, 2, 3] and list(trace.y) == pytest.approx(list(run.history[column])), column
    # the samples table shows the last step's completions, escaped, at most max_samples of them
    shown = run.logs[-1].samples[:2]
    assert panel.samples.value.count("<tr>") == 1 + len(shown)
    assert "step 3" in panel.samples.value
    assert "finished" in panel.status.value and panel.stop_button.disabled
    assert panel.status.value.startswith("<b>toy</b>")  # the title heads the status line
    assert f"entropy {run.logs[-1].entropy:.2f} nats/token" in panel.status.value


def test_stop_button_stops_the_run_after_the_current_step_and_resume_continues(tiny, tmp_path):
    model, tok, adapter = tiny
    panel = TrainingPanel()

    def press_stop_after_first_step(entry):
        if entry.step == 1:
            panel.stop_button.click()

    config = dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path / "run"))
    run = train_grpo(model, tok, adapter, WordTask(), config, callbacks=[panel, press_stop_after_first_step])
    assert run.status == "stopped" and run.step == 1
    assert panel.stop_button.disabled and "stopped" in panel.status.value
    assert list(panel.figure.data[0].x) == [1]

    resumed = resume(run.checkpoint_dir, model, tok, WordTask(), adapter=adapter, callbacks=[panel])
    assert resumed.status == "finished" and resumed.step == 3
    assert list(panel.figure.data[0].x) == [1, 2, 3]  # the same panel carries on where it stopped


def test_sft_run_plots_the_loss_in_the_reward_slot(tiny, tmp_path):
    model, tok, adapter = tiny
    panel = TrainingPanel()
    run = train_sft(model, tok, adapter, WordTask(), SFTConfig(batch_size=2, steps=2, lr=0.05,
                                                              checkpoint_dir=str(tmp_path)), callbacks=[panel])
    first = panel.figure.data[0]
    assert first.name == "loss" and list(first.y) == pytest.approx(list(run.history["loss"]))
    assert panel.figure.layout.annotations[0].text == "loss (SFT)"
    assert "loss" in panel.status.value and "entropy" not in panel.status.value  # SFT samples nothing


def test_unmeasured_fields_are_gaps_and_html_is_escaped():
    panel = TrainingPanel()
    panel(step_log(1, "grpo", reward_mean=0.5, reward_std=0.1, v_norm=0.2, samples=(("<script>x</script>", 1.0),)))
    assert panel.figure.data[1].y == (None,)  # correct_rate was not measured: NaN -> gap
    assert "<script>" not in panel.samples.value and "&lt;script&gt;" in panel.samples.value
    # a new run in the same panel starts the plot over
    panel(step_log(1, "grpo", reward_mean=0.7, reward_std=0.0, v_norm=0.1))
    assert list(panel.figure.data[0].y) == [0.7]
    assert math.isclose(panel.figure.data[6].y[0], 0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_samples"):
        TrainingPanel(max_samples=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panel_follows_a_run_off_the_default_device(gpu_stand_in, dtype, tmp_path):
    """The panel plots a GRPO run whose model is off torch's default device (the GPU stand-in)."""
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    adapter = apply_tinylora(model, u=4, n_tie="all")
    panel = TrainingPanel("toy")
    with gpu_stand_in():
        run = train_grpo(model, tok, adapter, WordTask(),
                         dataclasses.replace(CONFIG, steps=2, checkpoint_dir=str(tmp_path)), callbacks=[panel])
    reward, *_, vnorm = panel.figure.data
    assert list(reward.x) == [1, 2] and list(vnorm.y) == pytest.approx(list(run.history["v_norm"]))
    assert "finished" in panel.status.value
