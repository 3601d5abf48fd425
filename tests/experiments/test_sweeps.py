"""The budget sweep: points, workers, resuming from its folder, and GRPO-vs-SFT paired differences."""

import json

import pandas as pd
import pytest

from tinylab.evaluation.paired_stats import paired
from tinylab.experiments.sweeps import SweepPoint, budget_sweep, method_differences

SWEEP = dict(budgets=[1, 4], seeds=[0], n_eval=3)
SAME = ["method", "budget", "params", "seed", "steps", "status", "strict", "flexible", "formatted",
        "strict_outcomes", "vector"]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, budget_sweep("tiny-cpu", **SWEEP, out=out)


def test_every_point_is_trained_with_the_budget_the_planner_gives(in_process):
    _, results = in_process
    assert list(zip(results["method"], results["budget"])) == [("GRPO", 1), ("SFT", 1), ("GRPO", 4), ("SFT", 4)]
    assert list(results["params"]) == [1, 1, 4, 4]
    assert [len(v) for v in results["vector"]] == [1, 1, 4, 4]
    assert set(results["status"]) == {"finished"} and set(results["steps"]) == {2}
    # SFT's loss moves v on a random model; GRPO's all-zero rewards leave it at 0
    assert all(any(x != 0 for x in v) for v in results[results["method"] == "SFT"]["vector"])
    assert all(len(o) == 3 for o in results["strict_outcomes"])


def test_two_worker_processes_give_the_same_rows_as_one(in_process, tmp_path):
    _, results = in_process
    side_by_side = budget_sweep("tiny-cpu", **SWEEP, workers=2, threads=1, out=tmp_path)
    pd.testing.assert_frame_equal(side_by_side[SAME], results[SAME])


def test_a_second_call_reads_finished_points_back_and_trains_nothing(in_process):
    out, results = in_process
    called = []
    again = budget_sweep("tiny-cpu", **SWEEP, out=out, on_row=called.append)
    assert called == []
    pd.testing.assert_frame_equal(again[SAME], results[SAME])
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["method"] == "GRPO"
    assert sorted(p.name for p in out.glob("*.tlra")) == sorted(
        SweepPoint(m, b, 0).name + ".tlra" for m in ("GRPO", "SFT") for b in (1, 4))
    narrower = budget_sweep("tiny-cpu", **(SWEEP | dict(budgets=[4])), out=out, on_row=called.append)
    assert called == [] and list(narrower["budget"]) == [4, 4]
    assert (out / "results.jsonl").read_text().splitlines() == lines  # the budget-1 rows are still there


def test_a_new_point_keeps_the_rows_of_points_the_call_did_not_ask_for(tmp_path):
    budget_sweep("tiny-cpu", budgets=[1], seeds=[0], methods=["SFT"], n_eval=2, out=tmp_path)
    budget_sweep("tiny-cpu", budgets=[4], seeds=[0], methods=["SFT"], n_eval=2, out=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in rows] == [("SFT", 1), ("SFT", 4)]


def test_an_unfinished_attempt_is_kept_beside_the_new_run(tmp_path):
    stale = tmp_path / "runs" / SweepPoint("SFT", 1, 0).name
    stale.mkdir(parents=True)
    (stale / "history.jsonl").write_text("{}\n")
    rows = budget_sweep("tiny-cpu", budgets=[1], seeds=[0], methods=["SFT"], n_eval=2, out=tmp_path)
    assert list(rows["status"]) == ["finished"]
    kept = tmp_path / "runs" / f"{stale.name}.interrupted-1"
    assert (kept / "history.jsonl").read_text() == "{}\n"


def test_a_folder_with_other_settings_is_refused_naming_them(in_process):
    out, _ = in_process
    with pytest.raises(ValueError, match="n_eval"):
        budget_sweep("tiny-cpu", budgets=[1], seeds=[0], n_eval=5, out=out)


@pytest.mark.parametrize("bad, match", [
    (dict(methods=["PPO"]), "PPO"),
    (dict(budgets=[0]), "budgets"),
    (dict(budgets=[]), "at least one budget"),
    (dict(workers=0), "workers"),
])
def test_bad_input_names_the_value(bad, match):
    kwargs = dict(budgets=[1], seeds=[0], n_eval=2) | bad
    with pytest.raises(ValueError, match=match):
        budget_sweep("tiny-cpu", **kwargs)


def test_method_differences_pair_the_two_methods_prompt_by_prompt():
    grpo = [True, True, False, True, False, True]
    sft = [False, True, False, False, False, True]
    rows = [dict(method=m, budget=13, params=13, seed=s, strict_outcomes=o)
            for s in (0, 1) for m, o in (("GRPO", grpo if s == 0 else sft), ("SFT", sft if s == 0 else grpo))]
    d = method_differences(pd.DataFrame(rows))
    expected = paired(sft, grpo)
    assert list(d["seed"]) == [0, 1]
    assert d["diff"].iloc[0] == pytest.approx(2 / 6) and d["gained"].iloc[0] == 2 and d["lost"].iloc[0] == 0
    assert (d["low"].iloc[0], d["high"].iloc[0], d["p_value"].iloc[0]) == (expected.low, expected.high,
                                                                         expected.p_value)
    assert d["diff"].iloc[1] == pytest.approx(-2 / 6)
    with pytest.raises(ValueError, match="GRPO"):
        method_differences(pd.DataFrame(rows[1:2]))
