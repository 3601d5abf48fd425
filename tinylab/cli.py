"""The `tinylab` command: look at a model's adaptable modules and turn a budget into a config.

    tinylab info   [--model NAME]                    modules, layers, heads, counts for a few budgets
    tinylab attach --params N [--model NAME] [--json] the config that gives N params, and its count
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from tinylab.adapter import TinyLoRAConfig, apply_tinylora
from tinylab.targets import count_params, plan_modules

__all__ = ["main", "model_info"]


def _load(name: str | None):
    from tinylab.models import TINY_ARCHS, load_model, tiny_model

    if name and name.startswith("tiny-") and name[5:] in TINY_ARCHS:  # e.g. tiny-llama: random test model
        return tiny_model(name[5:])
    return load_model(name)


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
    from tinylab.budget import plan_budget

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


def main(argv: list[str] | None = None) -> int:
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
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser, so its usage line lists the allowed options
        {"info": info, "attach": attach}[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return {"info": _info, "attach": _attach}[args.command](args)
    except (ValueError, TypeError) as err:
        parser.exit(2, f"tinylab {args.command}: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
