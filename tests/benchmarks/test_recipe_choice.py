"""benchmarks/recipe_choice.py: the recipe is chosen on validation outcomes, by the mean paired
difference against the base model, never for a recipe whose replies list many capitals."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _payload(path: Path, split: str, trained_by_seed: dict[int, list[bool]], named: float = 0.5) -> str:
    base = [True] * 4 + [False] * 16  # 20% right before training
    seeds = [{"seed": s, "steps": 15, "sets": [{"set": split, "rows": {
        "base": {"flexible": base, "named": [0.5] * 20},
        "trained": {"flexible": trained, "named": [named] * 20}}}]} for s, trained in trained_by_seed.items()]
    path.write_text(json.dumps({"args": {"lr": 0.005}, "strata": {}, "seeds": seeds}))
    return str(path)


@pytest.fixture
def choose(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import recipe_choice

    def run(*specs):
        recipe_choice.main(["--results", "none", *[a for spec in specs for a in ("--recipe", spec)]])
        return capsys.readouterr().out

    return run


def test_the_higher_mean_gain_wins_and_its_margin_is_judged_against_the_seed_spread(tmp_path, choose):
    small = _payload(tmp_path / "a.json", "validation", {0: [True] * 5 + [False] * 15, 1: [True] * 6 + [False] * 14})
    large = _payload(tmp_path / "b.json", "validation", {0: [True] * 12 + [False] * 8, 1: [True] * 13 + [False] * 7})
    out = choose(f"small={small}", f"large={large}")
    assert "chosen on validation (flexible, mean difference vs base): large (+42.5 points)" in out
    assert "more than the spread" in out
    assert "seed 0 60.0% (+40.0" in out


def test_a_recipe_that_lists_capitals_is_not_chosen(tmp_path, choose):
    honest = _payload(tmp_path / "a.json", "validation", {0: [True] * 5 + [False] * 15, 1: [True] * 5 + [False] * 15})
    lister = _payload(tmp_path / "b.json", "validation", {0: [True] * 20, 1: [True] * 20}, named=3.0)
    out = choose(f"lister={lister}", f"honest={honest}")
    assert "chosen on validation (flexible, mean difference vs base): honest" in out


def test_no_gain_anywhere_is_said_and_test_outcomes_are_refused(tmp_path, choose):
    worse = _payload(tmp_path / "a.json", "validation", {0: [False] * 20, 1: [True] * 2 + [False] * 18})
    out = choose(f"worse={worse}")
    assert "no recipe raised flexible above the base model on validation" in out
    test = _payload(tmp_path / "t.json", "test", {0: [True] * 20, 1: [True] * 20})
    with pytest.raises(SystemExit, match="not 'validation'"):
        choose(f"peeking={test}")


def test_a_malformed_recipe_is_named(choose):
    with pytest.raises(SystemExit, match="--recipe 'lr5e-3': allowed form NAME=FILE"):
        choose("lr5e-3")
