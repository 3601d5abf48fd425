import json

import pandas as pd
import pytest
import torch
from testkit import DISTINCT_TASK_SOURCE  # a task whose reward differs within every group

from tinylab import load_adapter
from tinylab.cli import main
from tinylab.model.tiny import tiny_model


def test_info_json_counts(capsys):
    assert main(["info", "--model", "tiny-llama", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adaptable_modules"] == 14 and info["layers"] == 2
    assert info["attention_heads"] == 4 and info["kv_heads"] == 2
    assert info["lora_xs_params_r2"] == 56
    assert {b["params"] for b in info["budgets"]} >= {1, 13, 14, 56}


def test_info_text(capsys):
    assert main(["info", "--model", "tiny-qwen2"]) == 0
    out = capsys.readouterr().out
    assert "14 adaptable modules" in out and "4 query heads, 2 KV heads" in out


@pytest.mark.parametrize("n", [1, 7, 13, 14, 56])
def test_attach_gives_the_requested_count(capsys, n):
    assert main(["attach", "--params", str(n), "--model", "tiny-llama", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requested"] == n and result["achieved"] == n


@pytest.mark.parametrize("n", [0, 57])
def test_attach_out_of_range_is_a_clear_error(capsys, n):
    with pytest.raises(SystemExit) as exit_info:
        main(["attach", "--params", str(n), "--model", "tiny-llama"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tinylab attach: error: n_params={n} is out of range: allowed 1..56 for this model "
                   "(14 modules x r*r=4, the LoRA-XS size)")




def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_train_writes_adapter_history_and_config(tmp_path, capsys):
    (tmp_path / "distinct.py").write_text(DISTINCT_TASK_SOURCE)
    out = tmp_path / "out"
    assert main(["train", "--preset", "tiny-cpu", "--out", str(out), f"task={tmp_path / 'distinct.py'}:Distinct",
                 "steps=2", "u=2", f"checkpoint_dir={tmp_path / 'run'}"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"tinylab train: rank 0 of 1, writes {out}: vector [")
    vector = json.loads(line.partition(": vector ")[2])
    assert sorted(p.name for p in out.iterdir()) == ["adapter.tlra", "comparison.csv", "comparison.json",
                                                     "comparison.txt", "config.json", "history.csv"]
    config = json.loads((out / "config.json").read_text())
    assert (config["preset"], config["backend"], config["world_size"]) == ("tiny-cpu", "tinylab", 1)
    assert config["adapter"]["u"] == 2 and config["training"]["steps"] == 2 and config["task"].endswith(":Distinct")
    history = pd.read_csv(out / "history.csv")
    assert list(history["step"]) == [1, 2] and history["v_norm"].iloc[-1] == pytest.approx(torch.tensor(vector).norm())
    adapter = load_adapter(tiny_model("llama")[0], out / "adapter.tlra")
    assert adapter.num_params == 2 and torch.allclose(adapter.vector(), torch.tensor(vector))
    assert any(x != 0 for x in vector)


def test_train_takes_the_model_as_info_and_attach_do(tmp_path, capsys):
    """`train --model FOLDER` trains that model (the override model=FOLDER does the same); the two disagreeing
    is an error line before anything loads."""
    model, tok = tiny_model("gpt2", seed=3)
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "distinct.py").write_text(DISTINCT_TASK_SOURCE)
    out = tmp_path / "out"
    assert main(["train", "--preset", "tiny-cpu", "--model", str(tmp_path / "gpt2"), "--out", str(out), "--eval-n", "0",
                 f"task={tmp_path / 'distinct.py'}:Distinct", "steps=1", "u=2",
                 f"checkpoint_dir={tmp_path / 'run'}"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == str(tmp_path / "gpt2")
    assert load_adapter(tiny_model("gpt2", seed=3)[0], out / "adapter.tlra").num_params == 2
    err = _fails(["train", "--preset", "tiny-cpu", "--model", "tiny-llama", "--out", str(tmp_path / "o"),
                  "model=tiny-qwen2"], capsys)
    assert "--model 'tiny-llama' and the override model='tiny-qwen2' disagree" in err


def test_train_ends_with_the_held_out_comparison_printed_and_saved(tmp_path, capsys):
    """`tinylab train` closes with tinylab.compare on held-out examples, with the prompt control: the
    report on stdout and in comparison.txt, the numbers in comparison.json equal to a compare() of the
    saved adapter run afresh, one row per example in comparison.csv."""
    from tinylab import compare, tasks

    out = tmp_path / "out"
    assert main(["train", "--preset", "tiny-cpu", "--out", str(out), "--eval-n", "6", "steps=1", "lr=1.0"]) == 0
    printed = capsys.readouterr().out
    text = (out / "comparison.txt").read_text()
    assert printed == text and "adapted vs prompt control" in text and "McNemar p" in text
    record = json.loads((out / "comparison.json").read_text())
    assert (record["task"], record["split"], record["n"]) == ("compare", "test", 6)
    assert set(record["paired"]) == {"adapted_vs_base", "adapted_vs_prompt_control"}
    model, tok = tiny_model("llama")
    again = compare(model, tok, tasks.get("compare"), out / "adapter.tlra", n=6, controls=("prompt",), progress=False)
    assert record == json.loads(json.dumps(again.record()))
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 6 and {"base_reply", "adapted_reply", "prompt_reply"} <= set(table.columns)


def test_train_without_a_prompt_control_or_a_comparison(tmp_path, capsys):
    (tmp_path / "distinct.py").write_text(DISTINCT_TASK_SOURCE)
    task = f"task={tmp_path / 'distinct.py'}:Distinct"
    assert main(["train", "--preset", "tiny-cpu", "--out", str(tmp_path / "a"), "--eval-n", "500", task,
                 "steps=1", f"checkpoint_dir={tmp_path / 'run_a'}"]) == 0
    record = json.loads((tmp_path / "a" / "comparison.json").read_text())
    assert record["n"] == 6 and set(record["paired"]) == {"adapted_vs_base"}  # all 6 held-out examples
    assert "no prompt control: task 'distinct'" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny-cpu", "--out", str(tmp_path / "b"), "--eval-n", "0", task,
                 "steps=1", f"checkpoint_dir={tmp_path / 'run_b'}"]) == 0
    assert not list((tmp_path / "b").glob("comparison.*"))
    assert "--eval-n -1: allowed: 0" in _fails(["train", "--preset", "tiny-cpu", "--eval-n", "-1"], capsys)


def test_train_checks_everything_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import tinylab.model.loading

    def boom(*a, **k):
        raise AssertionError("no model may load for a bad command")

    monkeypatch.setattr(tinylab.model.loading, "load_model", boom)
    err = _fails(["train", "--preset", "tiny-cpu", "stpes=2"], capsys)
    assert "unknown override key 'stpes' (did you mean 'steps'?); allowed: " in err and "prompts_per_step" in err
    err = _fails(["train", "--preset", "tiny-gpu"], capsys)
    assert "unknown preset 'tiny-gpu'" in err and "tiny-cpu" in err
    err = _fails(["train", "--preset", "tiny-cpu", "group_size=1"], capsys)
    assert "group_size=1: must be an integer >= 2" in err
    err = _fails(["train", "--preset", "tiny-cpu", "--trl", "use_vllm=true"], capsys)
    assert "--backend tinylab runs in one process" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "WORLD_SIZE=2" in _fails(["train", "--preset", "tiny-cpu"], capsys)
    monkeypatch.delenv("WORLD_SIZE")
    err = _fails(["train", "--preset", "tiny-cpu", f"task={tmp_path / 'nope.py'}:Task"], capsys)
    assert "nope.py is not a file; allowed: a registered task (arithmetic, capitals" in err
    err = _fails(["train", "--preset", "tiny-cpu", "--trl", "vllm"], capsys)
    assert "--trl 'vllm' is not KEY=VALUE" in err
    err = _fails(["train", "--preset", "tiny-cpu", "--backend", "deepspeed"], capsys)
    assert "invalid choice: 'deepspeed'" in err
    err = _fails(["train", "--preset", "tiny-cpu", "seeds=abc"], capsys)
    assert "seeds entry='abc': must be an integer" in err
    err = _fails(["train", "--preset", "tiny-cpu", "lr_sweep=[0.1, -1]"], capsys)
    assert "lr_sweep entry=-1: must be a finite number > 0" in err
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    err = _fails(["train", "--preset", "tiny-cpu", "--out", str(blocked / "out")], capsys)  # under a file
    assert f"--out={str(blocked / 'out')!r} is not writable" in err


def test_a_model_that_cannot_load_is_an_error_line_not_a_traceback(tmp_path, capsys):
    err = _fails(["train", "--preset", "tiny-cpu", "--out", str(tmp_path / "o"), "model=tiny-foo"], capsys)
    assert "model='tiny-foo': no such tiny test model; allowed: tiny-llama" in err and "Traceback" not in err
    missing = tmp_path / "no" / "such" / "folder"
    err = _fails(["train", "--preset", "tiny-cpu", "--out", str(tmp_path / "o"), f"model={missing}"], capsys)
    assert f"model={str(missing)!r}: no such folder" in err
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    err = _fails(["train", "--preset", "tiny-cpu", "--out", str(tmp_path / "o"), f"checkpoint_dir={blocked / 'run'}"],
                 capsys)  # an OSError from the run folder check: one line, exit 2
    assert f"checkpoint_dir={str(blocked / 'run')!r} is not writable" in err


def test_train_trl_refuses_an_unknown_trl_field(tmp_path, capsys, monkeypatch):
    import tinylab.model.loading

    monkeypatch.setattr(tinylab.model.loading, "load_model", lambda *a, **k: 1 / 0)  # checked before any model loads
    (tmp_path / "distinct.py").write_text(DISTINCT_TASK_SOURCE)
    err = _fails(["train", "--preset", "tiny-cpu", "--backend", "trl", "--out", str(tmp_path / "out"),
                  f"task={tmp_path / 'distinct.py'}:Distinct", "--trl", "use_vlm=true"], capsys)
    assert "unknown field of TRL's GRPOConfig 'use_vlm' (did you mean 'use_vllm'?)" in err
    assert not (tmp_path / "out").exists()
