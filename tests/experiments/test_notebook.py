import dataclasses

import pytest

from tinylab.experiments.notebook import notebook_setup, quick_mode
from tinylab.train.presets import preset


def test_quick_mode_applies_the_quick_overrides_only_in_quick_mode(monkeypatch):
    base = preset("cpu-demo").training
    monkeypatch.setenv("TINYLAB_QUICK", "1")
    lab = notebook_setup("cpu-demo", quick=dict(steps=2, prompts_per_step=3), full=dict(steps=99), load=False)
    assert lab.quick and quick_mode()
    assert (lab.training.steps, lab.training.prompts_per_step) == (2, 3)
    assert dataclasses.replace(lab.training, steps=base.steps, prompts_per_step=base.prompts_per_step) == base
    assert lab.pick(quick="q", full="f") == "q"
    assert "quick mode: True" in lab.describe() and "2 steps x 3 prompts" in lab.describe()

    monkeypatch.setenv("TINYLAB_QUICK", "0")
    lab = notebook_setup("cpu-demo", quick=dict(steps=2), full=dict(steps=99), load=False)
    assert not lab.quick and lab.training.steps == 99 and lab.pick(quick="q", full="f") == "f"
    assert lab.task.name == preset("cpu-demo").task and lab.model is None


def test_unknown_override_names_the_allowed_fields(monkeypatch):
    monkeypatch.setenv("TINYLAB_QUICK", "1")
    with pytest.raises(ValueError, match=r"unknown GRPOConfig field\(s\) \['stepz'\].*allowed: .*steps"):
        notebook_setup("cpu-demo", quick=dict(stepz=2), load=False)
