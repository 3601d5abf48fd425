"""The field's own evaluator: lm-evaluation-harness (`lm-eval` 0.4.x) on a model with a TinyLoRA adapter.

Optional: `pip install "tinylab[eval]"`. lm-eval's Hugging Face wrapper (`HFLM`) accepts a model
object, so an adapted model (a TinyLoRA adapter attached, or an adapter file loaded for the run) is
evaluated as it is, on the model's device:

    results = tinylab.interop.lm_eval_harness.run_harness(model, tokenizer, [gsm8k_harness_task()], adapter="seed0.tlra",
                                          limit=100)
    results["results"]["gsm8k_tinylab"]["exact_match,strict-match"]

`gsm8k_harness_task(source)` is lm-eval's own `gsm8k` task (its strict-match and flexible-extract
filters, its exact_match metric, read from the installed lm-eval) over GSM8K's default source
(`$TINYLAB_GSM8K`, else the hub) or a local folder / JSONL file, so it runs offline. With
`prompt="paper"` (the default) the prompt is tinylab's (the question and the paper's instruction,
zero-shot, in the chat template), which is what `tinylab.evaluate(..., "gsm8k")` asks; the
scores then differ from tinylab's only where the readings differ (tinylab/tasks/gsm8k.py lists
how: the last "####" within 300 characters vs lm-eval's first, numbers vs strings).
`prompt="lm-eval"` keeps lm-eval's "Question: ...\\nAnswer:" text.

From the shell (lm-eval's own CLI cannot take a model object, so tinylab has an entry):

    tinylab harness --adapter seed0.tlra --limit 100      # JSON: lm-eval's strict and flexible scores

`benchmarks/evaluate.py --harness` prints how far lm-eval's and tinylab's GSM8K scores and replies
agree on the embedded model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tinylab.adapter.attach import check_adapter
from tinylab.basics.checks import check_choice, check_int
from tinylab.model.device import model_device
from tinylab.tasks.gsm8k import HUB_NAME, INSTRUCTION, default_source

__all__ = ["gsm8k_harness_task", "harness_model", "run_harness"]

_INSTALL = "lm-evaluation-harness is not installed; install the optional extra: pip install \"tinylab[eval]\""


def _lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return lm_eval


def harness_model(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's `HFLM` around `model` as it is (an attached adapter included), on the model's device."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    check_int("batch_size", batch_size, low=1)
    device = model_device(model)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                max_length=max_length)


def gsm8k_harness_task(source=None, *, name: str = "gsm8k_tinylab", prompt: str = "paper",
                       max_new_tokens: int = 256) -> dict:
    """lm-eval's gsm8k task config over `source` (None: `default_source()`; a folder holding
    train.jsonl / test.jsonl, or one JSONL file for every split), renamed `name`, zero-shot."""
    import yaml

    lm_eval = _lm_eval()
    check_choice("prompt", prompt, ("paper", "lm-eval"))
    check_int("max_new_tokens", max_new_tokens, low=1)
    with open(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config.pop("tag", None)
    source = default_source() if source is None else source
    if str(source) != HUB_NAME:
        path = Path(source).expanduser()
        if path.is_dir():
            files = {split: str(path / f"{split}.jsonl") for split in ("train", "test")}
        elif path.is_file():
            files = {"train": str(path), "test": str(path)}
        else:
            raise FileNotFoundError(f"GSM8K source {str(source)!r} does not exist; allowed: a folder with "
                                    "train.jsonl and test.jsonl, or one JSONL file")
        config.update(dataset_path="json", dataset_kwargs={"data_files": files})
        config.pop("dataset_name", None)
    if prompt == "paper":
        config["doc_to_text"] = "{{question}} " + INSTRUCTION
    config.update(task=name, num_fewshot=0)
    config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_new_tokens}
    return config


def run_harness(model, tokenizer, tasks: Sequence, *, adapter=None, limit: int | None = None, batch_size: int = 8,
                apply_chat_template: bool = True, log_samples: bool = False, **simple_evaluate_kwargs) -> dict:
    """`lm_eval.simple_evaluate` on `model` with `tasks` (names or configs such as `gsm8k_harness_task()`).

    `adapter`: None (the model as it is), an attached TinyLoRA handle, or an adapter file path
    (loaded for this run and removed afterwards). Returns lm-eval's results dict. Tasks given as
    configs alone run without lm-eval's index of its named tasks (unless `task_manager=` is passed).
    """
    lm_eval = _lm_eval()
    if limit is not None:
        check_int("limit", limit, low=1)
    handle = None
    if isinstance(adapter, (str, os.PathLike)):
        from tinylab.adapter.file_format import load_adapter

        handle = load_adapter(model, adapter)
    elif adapter is not None:
        check_adapter(adapter, model)
    tasks = list(tasks)
    if "task_manager" not in simple_evaluate_kwargs and all(isinstance(t, dict) for t in tasks):
        from lm_eval.tasks import TaskManager

        # configs alone: lm-eval's index of its own named tasks (seconds to build) is not read
        simple_evaluate_kwargs["task_manager"] = TaskManager(include_defaults=False)
    try:
        return lm_eval.simple_evaluate(model=harness_model(model, tokenizer, batch_size=batch_size), tasks=tasks,
                                       limit=limit, apply_chat_template=apply_chat_template, log_samples=log_samples,
                                       **simple_evaluate_kwargs)
    finally:
        if handle is not None:
            handle.remove()
