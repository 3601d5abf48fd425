"""Which linear maps an adapter config adapts, under which role, in which tying group, at what count.

The one answer every part of tinylab asks: `apply_tinylora`, the budget planner, the importance
scores, the budget widget, the CLI and the adapter file all select modules through `plan_modules`.

Roles. The default targets name the seven maps of a Llama block (q, k, v, o, gate, up, down).
Other architectures name the same maps otherwise, and some fuse several roles in one map:

    role       names, first present in the model wins
    q, k, v    q_proj/k_proj/v_proj, qkv_proj (phi3), query_key_value (GPT-NeoX, Falcon), Wqkv, c_attn;
               q_gate_proj (MiniCPM5: queries and output gates) is q; Wq/Wk/Wv (CTRL)
    o          o_proj, out_proj (OPT, BART), dense (GPT-NeoX, Phi), attn.c_proj (GPT-2), attn.Wo (ModernBERT)
    gate       gate_proj, gate_up_proj (phi3), w1 (old Mixtral), Wi (ModernBERT)
    up         up_proj, gate_up_proj, fc1 (OPT, Phi), fc_in (GPT-J), c_fc, dense_h_to_4h (GPT-NeoX), w3, Wi,
               ffn.0 (CTRL)
    down       down_proj, fc2, fc_out, c_proj, mlp.c_proj (GPT-2), dense_4h_to_h, w2, mlp.Wo (ModernBERT),
               ffn.2 (CTRL)

A module's `kind` is the last component of its name (phi3: "qkv_proj"), or its last two, in every
layer, where two maps of some layer share the last one under differently named parents (GPT-2's
"attn.c_proj" and "mlp.c_proj"; BART's "self_attn.q_proj" and "encoder_attn.q_proj", of which the
default targets take the self-attention's; numbered experts share their kind) or where the last one
is a number (CTRL's "ffn.0"): `module_kinds` decides it for everyone. `roles(kind)` gives the roles
it plays; a split kind plays a role only under a parent of that role's part of the block
("mlp.gate_proj" is the gate, an attention output gate "self_attn.gate_proj" is not). A module is
"in a block" when its name holds a layer index (`.<i>.`, `tinylab.model.decoder.layer_of`) in the
decoder's own stack of layers. A target names a kind, or the last components of module names
("c_proj": both of GPT-2's).

Tying: `tiled` groups `n_tie` consecutive modules in model order (the modules of layer 0, then
layer 1, ...); `structured` groups modules of one kind across `n_tie` consecutive layers;
`group_sizes` gives explicit consecutive groups. The count of trained numbers is groups x u.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig
from tinylab.model.conv1d import as_linear
from tinylab.model.decoder import (
    language_decoder,
    layer_numbers,
    layer_of,
    layer_offsets,
    nearest_stacks,
    stack_of,
)

__all__ = [
    "DEFAULT_TARGETS",
    "ROLE_NAMES",
    "ModuleInfo",
    "count_params",
    "kind_order",
    "layer_of",
    "linear_modules",
    "module_kinds",
    "plan_modules",
    "roles",
    "select_and_plan",
    "select_modules",
]

ROLE_NAMES = {
    "q_proj": ("q_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "q_gate_proj", "Wq"),
    "k_proj": ("k_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "Wk"),
    "v_proj": ("v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "Wv"),
    "o_proj": ("o_proj", "out_proj", "dense", "attn.c_proj", "attn.Wo"),
    "gate_proj": ("gate_proj", "gate_up_proj", "w1", "Wi"),
    "up_proj": ("up_proj", "gate_up_proj", "fc1", "fc_in", "c_fc", "dense_h_to_4h", "w3", "Wi", "ffn.0"),
    "down_proj": ("down_proj", "fc2", "fc_out", "c_proj", "mlp.c_proj", "dense_4h_to_h", "w2", "mlp.Wo", "ffn.2"),
}
"""Default role -> the module names other architectures give it, in order of preference."""
_ATTENTION, _MLP = ("self_attn.", "self_attention.", "attention.", "attn."), ("mlp.", "feed_forward.", "ffn.")
_PART = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), _ATTENTION) | dict.fromkeys(
    ("gate_proj", "up_proj", "down_proj"), _MLP)
"""Role -> the parents a split kind of it may have: BART's "self_attn.q_proj" (its cross-attention shares
the name) plays q; Beam's "mlp.gate_proj" plays gate, its "self_attn.gate_proj" (an attention gate) does not."""


class ModuleInfo(NamedTuple):
    """One adapted module: its `named_modules()` name, layer index, kind (last name part) and tying group."""

    name: str
    layer: int
    kind: str
    group: int


def roles(kind: str) -> tuple[str, ...]:
    """The default roles a module kind plays: ("q_proj", "k_proj", "v_proj") for phi3's "qkv_proj";
    a split kind plays its last name's under a parent of that role's part of the block (`_PART`)."""
    return tuple(role for role, names in ROLE_NAMES.items() if kind in _named(role))


def _named(role: str) -> tuple[str, ...]:
    """The kinds that play `role`, in order of preference: each name, then it under its part's parents."""
    return tuple(k for name in ROLE_NAMES[role] for k in (name, *(p + name for p in _PART[role])))


def kind_order(kinds) -> list[str]:
    """`kinds` sorted by their first role (q, k, v, o, gate, up, down), other kinds after, by name."""
    position = {role: i for i, role in enumerate(DEFAULT_TARGETS)}

    def key(kind: str):
        played = roles(kind)
        return (0, min(position[r] for r in played), kind) if played else (1, 0, kind)

    return sorted(set(kinds), key=key)


def module_kinds(names: Sequence[str]) -> dict[str, str]:
    """The kind of each module name in `names` (the in-block linear maps of one model): its last
    component, or `parent.last` where maps of one layer share the last component under parents of
    different names (GPT-2: "attn.c_proj", "mlp.c_proj"). Numbered parents (experts) share a kind.
    A last component split in one layer is split in every layer, so a map keeps one kind across the
    model (Beam: layer 0's "mlp.gate_proj" splits "self_attn.gate_proj" in the layers without it). A
    numbered map of a sequence is named with its parent (CTRL's "ffn.0" and "ffn.2")."""
    parents = defaultdict(set)  # (layer, last) -> the parents' own names
    for name in names:
        parent, _, last = name.rpartition(".")
        parents[(layer_of(name), last)].add(parent.rpartition(".")[2])
    split = {last for (_, last), shared in parents.items() if len(shared) > 1 and not any(p.isdigit() for p in shared)}
    kinds = {}
    for name in names:
        parent = name.rpartition(".")[0].rpartition(".")[2]
        last = name.rpartition(".")[2]
        numbered = last.isdigit() and not parent.isdigit()  # not a sequence inside numbered experts
        kinds[name] = f"{parent}.{last}" if last in split or numbered else last
    return kinds


def _matches(name: str, kind: str, target: str) -> bool:
    """A target names a module's kind, or the last components of its name."""
    return target == kind or name.endswith(f".{target}")


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear, int | None]]:
    """Every linear map (an `nn.Linear`, a transformers `Conv1D` seen through `as_linear`, or an
    already adapted module, as its base) of the model's language decoder (`tinylab.model.decoder`:
    not a vision tower, nor a tower's layers inside the decoder) with its layer number
    (`tinylab.model.decoder.layer_numbers`), in model order."""
    found, inside = [], ()
    prefix, number = language_decoder(model)[0], layer_numbers(model)
    for name, module in model.named_modules():
        if prefix and not name.startswith(prefix + "."):  # outside the language decoder
            continue
        if inside and name.startswith(inside):  # the parts of an adapted module
            continue
        if getattr(module, "adapts_linear", False):  # a TinyLoRALinear: report its frozen base
            found.append((name, module.base, number(name)))
            inside = (f"{name}.",)
        elif (linear := as_linear(module)) is not None:
            found.append((name, linear, number(name)))
    own = set(nearest_stacks(name for name, _, _ in found))
    return [(name, linear, layer) for name, linear, layer in found if layer is None or stack_of(name) in own]


def _num_layers(model: nn.Module, linears) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None or layer_offsets(model):  # no count, or stacks numbered in turn (HRM's counts its cache slots)
        n = 1 + max((layer for _, _, layer in linears if layer is not None), default=-1)
    return n


def _resolve_targets(targets: tuple[str, ...], kinds: list[str]) -> tuple[str, ...]:
    """The module kinds `targets` names in a model with these in-block linear kinds: the default 7
    map each role to its first present name (none when the model lacks the role), or to that name
    under a parent of the role's part where the name is split (BART-style decoders: the kind is
    `self_attn.q_proj`, and `encoder_attn.q_proj`, which a text forward never runs, stays frozen;
    Beam's MLP gate is `mlp.gate_proj`); other targets as given."""
    if tuple(targets) != DEFAULT_TARGETS:
        return tuple(targets)
    present = (next((k for k in _named(t) if k in kinds), None) for t in targets)
    return tuple(dict.fromkeys(a for a in present if a is not None))


def select_modules(model: nn.Module, config: TinyLoRAConfig, *, warn: bool = True) -> list[tuple[str, nn.Linear, int]]:
    """(name, linear, layer) of the modules `config` adapts, in model order; errors name the bad
    value and what exists. With the default targets, in-block linear maps left out are warned about."""
    return _choose(model, config, warn, stacklevel=4)[0]


def select_and_plan(model: nn.Module, config: TinyLoRAConfig, *,
                    warn: bool = True) -> tuple[list[tuple[str, nn.Linear, int]], list[ModuleInfo]]:
    """`select_modules` and `plan_modules` from one look at the model: the chosen (name, linear,
    layer) and their `ModuleInfo`s, in the same order (what attaching needs)."""
    chosen, kind_of = _choose(model, config, warn, stacklevel=4)
    return chosen, _infos(chosen, kind_of, config)


def _choose(model, config, warn: bool, stacklevel: int):
    """The chosen (name, linear, layer) and every in-block map's kind (`module_kinds`); a warning
    at `stacklevel` points at the public function's caller's caller (the user's line)."""
    linears = linear_modules(model)
    in_blocks = [(n, m, layer) for n, m, layer in linears if layer is not None]
    kind_of = module_kinds([n for n, _, _ in in_blocks])
    kinds = list(dict.fromkeys(kind_of.values()))
    targets = _resolve_targets(config.targets, kinds)
    missing = [t for t in targets if not any(_matches(n, kind_of[n], t) for n, _, _ in in_blocks)]
    if missing or not targets:
        raise ValueError(
            f"targets {missing or list(config.targets)} match no linear module in this model; its linear module "
            f"types are {kinds} (e.g. {[n for n, _, _ in in_blocks[:3]]})"
        )
    left = sorted(set(kinds) - set(targets)) if tuple(config.targets) == DEFAULT_TARGETS else []
    if left and warn:
        warnings.warn(f"default targets adapt {list(targets)}; this model's blocks also have linear maps {left}, "
                      "left frozen: pass targets=... to include them", stacklevel=stacklevel)
    n_layers = _num_layers(model, linears)
    if config.layers is not None:
        bad = [i for i in config.layers if i >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range: this model has layers 0..{n_layers - 1}")
    wanted_layers = None if config.layers is None else set(config.layers)
    chosen = [
        (n, m, layer)
        for n, m, layer in in_blocks
        if any(_matches(n, kind_of[n], t) for t in targets) and (wanted_layers is None or layer in wanted_layers)
    ]
    if not chosen:
        raise ValueError(f"no module matches targets={list(config.targets)} in layers={config.layers}")
    for n, m, _ in chosen:
        if config.r > min(m.in_features, m.out_features):
            raise ValueError(
                f"r={config.r} is too large for {n} ({m.out_features}x{m.in_features}): "
                f"allowed 1..{min(m.in_features, m.out_features)}"
            )
    return chosen, kind_of


def group_indexes(chosen: Sequence[tuple[str, nn.Linear, int]], config: TinyLoRAConfig,
                  kinds: Sequence[str]) -> list[int]:
    """Tying group of each chosen module (`kinds`: their kinds), numbered in order of first
    appearance in the model."""
    n = len(chosen)
    if config.group_sizes is not None:
        if sum(config.group_sizes) != n:
            raise ValueError(
                f"group_sizes sum to {sum(config.group_sizes)} but {n} modules are adapted: they must sum to {n}"
            )
        return [g for g, size in enumerate(config.group_sizes) for _ in range(size)]
    n_tie = n if config.n_tie == "all" else config.n_tie
    if n_tie > n:
        raise ValueError(f"n_tie={config.n_tie} is out of range: allowed 1..{n} (or 'all') for {n} adapted modules")
    if config.tie == "tiled":
        return [i // n_tie for i in range(n)]
    layers_of = {k: sorted({lay for kk, (_, _, lay) in zip(kinds, chosen) if kk == k}) for k in set(kinds)}
    keys = [(k, layers_of[k].index(lay) // n_tie) for k, (_, _, lay) in zip(kinds, chosen)]
    order = {key: j for j, key in enumerate(dict.fromkeys(keys))}
    return [order[key] for key in keys]


def _infos(chosen, kind_of: dict[str, str], config: TinyLoRAConfig) -> list[ModuleInfo]:
    """A `ModuleInfo` (name, layer, kind, tying group) for each chosen module."""
    kinds = [kind_of[name] for name, _, _ in chosen]
    return [ModuleInfo(name, layer, kind, g)
            for (name, _, layer), kind, g in zip(chosen, kinds, group_indexes(chosen, config, kinds))]


def plan_modules(model: nn.Module, config: TinyLoRAConfig, *, warn: bool = True) -> list[ModuleInfo]:
    """The modules `config` would adapt in `model`, with their tying groups; no SVD, nothing attached."""
    chosen, kind_of = _choose(model, config, warn, stacklevel=3)
    return _infos(chosen, kind_of, config)


def count_params(model: nn.Module, config: TinyLoRAConfig) -> int:
    """Exact number of trained scalars `config` gives on `model` (groups x u), without attaching."""
    return (max(m.group for m in plan_modules(model, config, warn=False)) + 1) * config.u
