"""lm-evaluation-harness on an adapted tiny model, offline: a local GSM8K task over JSONL, the
adapter's effect seen through lm-eval's HFLM, and lm-eval's prompts and replies equal tinylab's."""

import json

import pytest
import torch

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.file_format import save_adapter
from tinylab.evaluation.report import evaluate
from tinylab.interop.lm_eval_harness import gsm8k_harness_task, run_harness
from tinylab.model.batch import render_prompts
from tinylab.model.tiny import tiny_model
from tinylab.tasks import GSM8K

ROWS = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?",
         "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"} for i in range(4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gsm8k")
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return folder


def _model():
    model, tokenizer = tiny_model("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # livelier weights: at the default scale every reply is the same token repeated
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.2)
    return model, tokenizer


def _replies(results):
    """lm-eval's prompt texts and replies, in the order of ROWS."""
    by_question = {s["doc"]["question"]: s for s in results["samples"]["gsm8k_tinylab"]}
    samples = [by_question[row["question"]] for row in ROWS]
    return [s["arguments"][0][0] for s in samples], [s["resps"][0][0] for s in samples]


def test_lm_eval_sees_the_adapter_and_asks_and_answers_as_tinylab(data, tmp_path):
    model, tokenizer = _model()
    task = gsm8k_harness_task(data, max_new_tokens=6)
    base = run_harness(model, tokenizer, [task], limit=4, log_samples=True)
    metrics = base["results"]["gsm8k_tinylab"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(metrics)
    prompts, base_replies = _replies(base)
    examples = GSM8K(source=data).examples("test", None, None)
    assert prompts == render_prompts(tokenizer, [e.prompt for e in examples])  # the same prompt text
    ours = evaluate(model, tokenizer, GSM8K(source=data), n=4, seed=None, max_new_tokens=6, progress=False)
    assert base_replies == list(ours.table["reply"])  # the same greedy replies

    adapter = apply_tinylora(model, u=2, n_tie="all", svd="exact")
    adapter.set_vector(torch.tensor([30.0, -20.0]))
    _, with_handle = _replies(run_harness(model, tokenizer, [task], adapter=adapter, limit=4, log_samples=True))
    assert with_handle != base_replies  # lm-eval evaluated the adapted model
    path = save_adapter(adapter, tmp_path / "a.tlra")
    adapter.remove()
    _, from_file = _replies(run_harness(model, tokenizer, [task], adapter=path, limit=4, log_samples=True))
    assert from_file == with_handle and not find_adapter(model)  # loaded for the run, removed after


def test_bad_sources_and_options_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GSM8K source .*nope' does not exist"):
        gsm8k_harness_task(tmp_path / "nope")
    with pytest.raises(ValueError, match="prompt='fewshot': allowed values are 'paper', 'lm-eval'"):
        gsm8k_harness_task(tmp_path, prompt="fewshot")
    task = gsm8k_harness_task(tmp_path, prompt="lm-eval")
    assert task["doc_to_text"] == "Question: {{question}}\nAnswer:" and task["num_fewshot"] == 0
    assert task["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "test.jsonl")


def test_cli_scores_an_adapter_file_as_run_harness_does(data, tmp_path, capsys):
    from tinylab.cli import main

    model, tokenizer = tiny_model("llama")  # what `--model tiny-llama` loads
    adapter = apply_tinylora(model, u=2, n_tie="all")
    adapter.set_vector(torch.tensor([30.0, -20.0]))
    path = save_adapter(adapter, tmp_path / "a.tlra")
    adapter.remove()
    task = gsm8k_harness_task(data, max_new_tokens=6)
    expected = run_harness(model, tokenizer, [task], adapter=path, limit=3)["results"]["gsm8k_tinylab"]
    assert main(["harness", "--model", "tiny-llama", "--data", str(data), "--adapter", str(path), "--limit", "3",
                 "--max-new-tokens", "6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapter"] == str(path) and printed["limit"] == 3
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert printed["scores"][metric] == pytest.approx(expected[metric])
