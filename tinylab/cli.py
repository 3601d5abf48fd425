"""The `tinylab` command: look at a model's adaptable modules, turn a budget into a config, train.

    tinylab info   [--model NAME]                    modules, layers, heads, counts for a few budgets
    tinylab attach --params N [--model NAME] [--json] the config that gives N params, and its count
    tinylab train  --preset NAME [--backend tinylab|trl] [--out DIR] [--eval-n N] [--trl KEY=VALUE ...] [key=value ...]

`train` loads the preset's model (`load_model`: on a GPU when there is one), attaches its adapter,
trains with `train_grpo` (backend tinylab, one process) or TRL's GRPOTrainer (backend trl: runs
under `torchrun` or `accelerate launch`, see docs/scaling.md), and writes into --out (rank 0 only):
`adapter.tlra` (the adapter file), `history.csv` (one row per step) and `config.json` (the preset
after overrides, the backend and the world size). Then it compares the trained adapter with the
base model on --eval-n held-out examples (`tinylab.compare`: greedy replies, paired statistics,
and the prompt control when the task has one), prints the report and writes it next to the adapter:
`comparison.txt` (the report), `comparison.json` (`Comparison.record()`) and `comparison.csv` (one
row per example: prompt, gold, each model's reply and scores). Every process logs one line to stderr:
`tinylab train: rank R of W, writes DIR|nothing: vector [...]`. `key=value` pairs are preset
overrides (checked as `tinylab.preset` checks them); `task=path/to/file.py:Name` (or
`module:Name`) trains on your own task class or factory; `--trl KEY=VALUE` sets a TRL GRPOConfig
field (e.g. `--trl use_vllm=true`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.targets import count_params, plan_modules
from tinylab.basics.atomic import writable_folder

__all__ = ["main", "model_info", "parse_args", "parse_trl"]


def _load(name: str | None):
    from tinylab.model.loading import load_model

    return load_model(name)  # also "tiny-llama" etc.: a random test model


def model_info(model) -> dict:
    """Facts about `model` for the budget: modules, layers, heads and counts for a few configs."""
    c = model.config
    modules = plan_modules(model, TinyLoRAConfig())
    n = len(modules)
    kinds = list(dict.fromkeys(m.kind for m in modules))
    heads = getattr(c, "num_attention_heads", None)
    budgets = [
        ("u=1, one vector for all modules", TinyLoRAConfig(n_tie="all")),
        ("u=13, one vector for all modules", TinyLoRAConfig(u=13, n_tie="all")),
        (f"u=1, tiled n_tie={max(1, math.ceil(n / 13))}", TinyLoRAConfig(n_tie=max(1, math.ceil(n / 13)))),
        ("u=1, one vector per layer (tiled)", TinyLoRAConfig(n_tie=len(kinds))),
        ("u=1, untied", TinyLoRAConfig()),
        ("u=4 (=r*r), untied", TinyLoRAConfig(u=4)),
    ]
    counts = []
    for label, config in budgets:
        counts.append({"budget": label, "params": count_params(model, config)})
    return {
        "model_type": getattr(c, "model_type", type(model).__name__),
        "layers": getattr(c, "num_hidden_layers", None),
        "hidden_size": getattr(c, "hidden_size", None),
        "attention_heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", heads),
        "head_dim": getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None),
        "module_types": kinds,
        "adaptable_modules": n,
        "total_params": sum(p.numel() for p in model.parameters()),
        "lora_xs_params_r2": n * 4,
        "budgets": counts,
    }


def _info(args) -> int:
    model, _ = _load(args.model)
    info = model_info(model)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    out = [
        f"model        {info['model_type']}, {info['total_params']:,} parameters",
        f"layers       {info['layers']} x {info['module_types']} = {info['adaptable_modules']} adaptable modules",
        f"attention    {info['attention_heads']} query heads, {info['kv_heads']} KV heads, head_dim {info['head_dim']}",
        f"LoRA-XS      {info['lora_xs_params_r2']:,} params at r=2 (the largest TinyLoRA budget)",
        "budgets (r=2):",
    ]
    out += [f"  {b['params']:>7,}  {b['budget']}" for b in info["budgets"]]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _attach(args) -> int:
    from tinylab.adapter.planner import plan_budget

    model, _ = _load(args.model)
    plan = plan_budget(model, args.params, strategy=args.strategy, u=args.u)
    config = plan.config or TinyLoRAConfig(u=plan.u, group_sizes=tuple(len(g) for g in plan.groups))
    adapter = apply_tinylora(model, config)  # the count printed is the attached adapter's own
    achieved = adapter.num_params
    adapter.remove()
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    result = {"requested": args.params, "achieved": achieved, "reason": plan.reason, "config": fields}
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(f"requested {args.params} params -> achieved {achieved} ({plan.reason})\n  {config}\n")
    return 0


def _task(name: str, options):
    """A task by registry name, or `file.py:Name` / `module:Name` called with the preset's task_options."""
    from tinylab import tasks

    if ":" not in name:
        return tasks.get(name, **options)
    where, _, attr = name.rpartition(":")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise ValueError(f"task={name!r}: {where} is not a file; allowed: a registered task "
                             f"({', '.join(tasks.names())}), path/to/file.py:Name or module:Name")
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        raise ValueError(f"task={name!r}: {where} has no {attr!r}")
    return tasks.get(getattr(module, attr)(**options))


def _record(p, backend: str, world_size: int) -> dict:
    """The preset after overrides as JSON-ready data (config.json)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if hasattr(value, "items"):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {"preset": p.name, **{k: plain(v) for k, v in p._asdict().items() if k != "name"},
            "backend": backend, "world_size": world_size}


def _train(args) -> int:
    from tinylab.adapter.attach import apply_tinylora
    from tinylab.model.loading import load_model
    from tinylab.train.presets import parse_overrides, preset

    overrides = parse_overrides(args.overrides)  # unknown keys fail before any model loads
    if args.model is not None:
        if overrides.get("model", args.model) != args.model:
            raise ValueError(f"--model {args.model!r} and the override model={overrides['model']!r} disagree; "
                             "allowed: one of them, or both the same")
        overrides["model"] = args.model
    p = preset(args.preset, **overrides)
    trl_fields = dict(parse_trl(pair) for pair in args.trl)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.backend == "tinylab" and (world > 1 or trl_fields):
        raise ValueError(f"--backend tinylab runs in one process (WORLD_SIZE={world}, --trl {args.trl}); "
                         "allowed: --backend trl under torchrun / accelerate launch, or one process without --trl")
    if args.backend == "trl":
        from tinylab.interop.trl_bridge import check_trl_fields

        check_trl_fields(trl_fields)
    task = _task(p.task, p.task_options)
    eval_n = _held_out(task, args.eval_n)  # a bad count fails here, before training
    if int(os.environ.get("RANK", 0)) == 0:
        writable_folder(args.out, "--out")  # an unwritable --out fails here, not after training
    model, tokenizer = load_model(p.model, dtype=p.dtype)
    adapter = apply_tinylora(model, p.adapter)
    if args.backend == "tinylab":
        from tinylab.train.grpo import train_grpo

        history = train_grpo(model, tokenizer, adapter, task, p.training).history
        rank, main_process = 0, True
    else:
        import tempfile

        from tinylab.interop.trl_bridge import grpo_trainer

        trainer = grpo_trainer(model, tokenizer, adapter, task, p.training, **trl_fields,
                               output_dir=tempfile.mkdtemp(prefix="tinylab-trl-"))  # nothing of TRL's in --out
        trainer.train()
        adapter, history = trainer.tinylab_adapter, trainer.tinylab_logs.history
        rank, world, main_process = trainer.args.process_index, trainer.args.world_size, trainer.is_world_process_zero()
    vector = adapter.vector()
    writes = args.out if main_process else "nothing"
    sys.stderr.write(f"tinylab train: rank {rank} of {world}, writes {writes}: vector {json.dumps(vector.tolist())}\n")
    if main_process:
        from tinylab import save_adapter
        from tinylab.basics.atomic import write_atomic

        out = Path(args.out)
        save_adapter(adapter, out / "adapter.tlra")
        write_atomic(out / "history.csv", lambda tmp: history.to_csv(tmp, index=False))
        record = json.dumps(_record(p, args.backend, world), indent=2) + "\n"
        write_atomic(out / "config.json", lambda tmp: Path(tmp).write_text(record))
        if eval_n:
            _compare_held_out(adapter, tokenizer, task, eval_n, out)
    return 0


def _held_out(task, wanted: int) -> int:
    """How many held-out ("test") examples the closing comparison evaluates: `wanted`, at most all."""
    if not isinstance(wanted, int) or wanted < 0:
        raise ValueError(f"--eval-n {wanted!r}: allowed: 0 (no comparison) or a positive number of held-out examples")
    return min(wanted, len(task.examples("test", None, None))) if wanted else 0


def _compare_held_out(adapter, tokenizer, task, n: int, out: Path) -> None:
    """Base vs adapted on `n` held-out examples, with the prompt control when the task has one:
    printed, and written next to the adapter (module docstring)."""
    from tinylab.basics.atomic import write_atomic
    from tinylab.evaluation.report import compare

    controls = ("prompt",) if callable(getattr(task, "control_prompt", None)) else ()
    result = compare(adapter.model, tokenizer, task, adapter, n=n, split="test", controls=controls, progress=False)
    text = result.report() + "\n"
    if not controls:
        text += f"(no prompt control: task {task.name!r} has no control_prompt method)\n"
    sys.stdout.write(text)
    record = json.dumps(result.record(), indent=2) + "\n"
    write_atomic(out / "comparison.txt", lambda tmp: Path(tmp).write_text(text))
    write_atomic(out / "comparison.json", lambda tmp: Path(tmp).write_text(record))
    write_atomic(out / "comparison.csv", lambda tmp: result.table.to_csv(tmp, index=False))


def _harness(args) -> int:
    """lm-evaluation-harness's GSM8K on the model, with an adapter file applied for the run."""
    from tinylab.interop.lm_eval_harness import gsm8k_harness_task, run_harness

    model, tokenizer = _load(args.model)
    task = gsm8k_harness_task(args.data, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    results = run_harness(model, tokenizer, [task], adapter=args.adapter, limit=args.limit,
                          batch_size=args.batch_size)
    scores = {k: v for k, v in results["results"][task["task"]].items() if isinstance(v, (int, float))}
    sys.stdout.write(json.dumps({"task": task["task"], "adapter": args.adapter, "limit": args.limit,
                                 "scores": scores}, indent=2) + "\n")
    return 0


def parse_trl(pair: str) -> tuple[str, object]:
    """`"use_vllm=true"` -> ("use_vllm", True); the key is checked against TRL's GRPOConfig fields later."""
    from tinylab.train.presets import parse_value

    key, sep, text = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--trl {pair!r} is not KEY=VALUE (e.g. --trl use_vllm=true)")
    return key.strip(), parse_value(text.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `main` reads it (argparse's usage error and exit 2 on a bad one)."""
    parser = argparse.ArgumentParser(prog="tinylab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="modules, layers, heads and parameter counts for a few budgets")
    info.add_argument("--model", default=None, help="local folder or hub id; default: embedded SmolLM2")
    info.add_argument("--json", action="store_true")
    attach = sub.add_parser("attach", help="the config that gives N trained parameters")
    attach.add_argument("--params", type=int, required=True, help="number of trained scalars")
    attach.add_argument("--model", default=None, help="local folder or hub id; default: embedded SmolLM2")
    attach.add_argument("--strategy", default="tiled", choices=["tiled", "top", "proportional"])
    attach.add_argument("--u", type=int, default=1)
    attach.add_argument("--json", action="store_true")
    train = sub.add_parser("train", help="train a preset's adapter, then compare it with the base model on held-out "
                                          "examples; writes adapter.tlra, history.csv, config.json, comparison.*")
    train.add_argument("--preset", required=True, help="a preset name (tinylab.train.presets.names())")
    train.add_argument("--model", default=None, help="local folder or hub id; default: the preset's (the same as "
                       "the override model=...)")
    train.add_argument("--backend", default="tinylab", choices=["tinylab", "trl"])
    train.add_argument("--out", default="tinylab-run", help="folder for the files (written by rank 0 only)")
    train.add_argument("--eval-n", type=int, default=128, metavar="N",
                       help="held-out examples for the closing comparison (at most the task's test split; 0: none)")
    train.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE", help="a TRL GRPOConfig field")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides, e.g. steps=2 lr=3e-3")
    harness = sub.add_parser("harness", help="GSM8K scored by lm-evaluation-harness on the (adapted) model")
    harness.add_argument("--adapter", default=None, help="a .tlra file applied for the run; default: the base model")
    harness.add_argument("--model", default=None, help="local folder or hub id; default: embedded SmolLM2")
    harness.add_argument("--data", default=None, help="GSM8K folder or JSONL file; default: $TINYLAB_GSM8K, else the hub")
    harness.add_argument("--limit", type=int, default=None, help="first N test problems")
    harness.add_argument("--prompt", default="paper", choices=["paper", "lm-eval"])
    harness.add_argument("--max-new-tokens", type=int, default=256)
    harness.add_argument("--batch-size", type=int, default=8)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser, so its usage line lists the allowed options
        {"info": info, "attach": attach, "train": train, "harness": harness}[args.command].error(
            f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return {"info": _info, "attach": _attach, "train": _train, "harness": _harness}[args.command](args)
    except (ValueError, TypeError, OSError) as err:  # bad input, a model that cannot load, a folder not writable
        sys.stderr.write(f"tinylab {args.command}: error: {err}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
