import json

import pytest

from tinylab.cli import main


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


def test_attach_out_of_range_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["attach", "--params", "0", "--model", "tiny-llama"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "0" in err and "1" in err and "56" in err
