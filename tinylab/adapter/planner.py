"""Turn "N trained numbers" into a placement: which modules get a vector, how they are tied, u.

Pure functions of the model's module list (and, for `top` / `proportional`, an importance score
per (layer, module type)); nothing here touches weights.

    plan = plan_budget(model, 13)                 # the paper's tiled tying, u = 1 first
    adapter = apply_tinylora(model, plan.config)  # attach it
    plan.achieved, plan.reason                    # 13, "exact: ..."

Strategies (M = number of modules the default config adapts: `tinylab.adapter.targets` resolves the 7 roles
to each architecture's names, e.g. phi3's fused qkv_proj and gate_up_proj, so M is what
`apply_tinylora` attaches to):

- `tiled`: the paper's uniform tiled tying over all M modules. Finds (u, n_tie) with
  ceil(M / n_tie) * u == n_params, smallest u first ("bring u down to 1 before raising n_tie"),
  then the smallest n_tie. One config.
- `top`: the budget goes on the most important modules. The adapted set must be expressible by
  one `TinyLoRAConfig`, i.e. a product `layers x targets`; among exact placements it prefers
  untied vectors (smallest n_tie), then the smallest u, then the product set with the largest
  summed importance. One config.
- `proportional`: every module is adapted; consecutive modules (model order) are tied in groups
  whose summed importance is about equal, so important modules get a vector of their own and
  unimportant ones share. Groups of different sizes go into `TinyLoRAConfig.group_sizes`.

Every plan is one `TinyLoRAConfig` (`apply_tinylora` attaches one adapter per model, so a list of
configs could not be attached anyway) plus its `groups`: the module names sharing each vector.

The achieved count equals `n_params` whenever some placement of the strategy reaches it (with u
free, tiled and top always can: one shared vector of u = n_params is a valid placement);
otherwise it is the nearest achievable count, and `reason` says why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

from torch import nn

from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.targets import ModuleInfo, plan_modules
from tinylab.basics.checks import check_choice, check_int, is_int

__all__ = ["STRATEGIES", "BudgetPlan", "lora_xs_size", "plan_budget"]

STRATEGIES = ("tiled", "top", "proportional")


class BudgetPlan(NamedTuple):
    """Where `achieved` trained numbers go. Attach with `apply_tinylora(model, plan.config)`."""

    config: TinyLoRAConfig  # the placement as one adapter config
    requested: int  # n_params asked for
    achieved: int  # trained numbers of this placement: len(groups) * u
    strategy: str  # "tiled" | "top" | "proportional"
    u: int  # length of each trained vector
    groups: tuple[tuple[str, ...], ...]  # module names sharing each vector, in model order
    reason: str  # how the count was reached, or why it differs from `requested`

    @property
    def exact(self) -> bool:
        return self.achieved == self.requested

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the adapted modules, in model order."""
        return tuple(name for group in self.groups for name in group)

    def nbytes(self, dtype: str = "bf16") -> int:
        """Size of the trained numbers: 2 bytes each in bf16, 4 in fp32."""
        sizes = {"bf16": 2, "fp32": 4}
        if dtype not in sizes:
            raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {list(sizes)}")
        return self.achieved * sizes[dtype]


def _modules(model: nn.Module, r: int):
    """The modules the default config adapts at rank r (`tinylab.adapter.targets`), in model (tiling) order."""
    return plan_modules(model, TinyLoRAConfig(r=check_int("r", r, low=1)), warn=False)


def lora_xs_size(model: nn.Module, r: int = 2) -> int:
    """The LoRA-XS count: one trainable (r, r) matrix per adapted module, n_modules * r * r."""
    return len(_modules(model, r)) * r * r


def _check_count(n_params, upper: int, n_modules: int, r: int) -> int:
    allowed = f"allowed 1..{upper} for this model ({n_modules} modules x r*r={r * r}, the LoRA-XS size)"
    if not is_int(n_params):
        raise ValueError(f"n_params={n_params!r} is not an integer: {allowed}")
    if not 1 <= n_params <= upper:
        raise ValueError(f"n_params={n_params} is out of range: {allowed}")
    return int(n_params)


def _as_scores(importance, modules: list[ModuleInfo]) -> dict[tuple[int, str], float]:
    """{(layer, type): score >= 0} from an Importance or WeightImportance (its default score), a Series
    or a mapping."""
    if hasattr(importance, "scores") and callable(importance.scores):
        importance = importance.scores()
    if hasattr(importance, "to_dict") and not isinstance(importance, Mapping):
        importance = importance.to_dict()
    if not isinstance(importance, Mapping):
        raise TypeError(
            f"importance must be an Importance, a WeightImportance, a pandas Series or a mapping "
            f"{{(layer, type): score}}, got {type(importance).__name__}"
        )
    by_name = {m.name: (m.layer, m.kind) for m in modules}
    scores = {}
    for key, value in importance.items():
        key = by_name.get(key, key)
        if isinstance(key, tuple) and len(key) == 2:
            scores[(int(key[0]), str(key[1]))] = float(value)
    missing = [(m.layer, m.kind) for m in modules if (m.layer, m.kind) not in scores]
    if missing:
        raise ValueError(f"importance has no score for {len(missing)} modules, e.g. {missing[:3]} (layer, type)")
    bad = {k: v for k, v in scores.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"importance scores must be finite and >= 0; got {list(bad.items())[:3]}")
    return scores


def _tile(names: list[str], n_tie: int) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(names[i : i + n_tie]) for i in range(0, len(names), n_tie))


def _fits(n_params: int, size: int, n_tie: int, u_min: int, r: int) -> tuple[int, int] | None:
    """(count, u) of the exact placement of `size` modules tiled by `n_tie`, if one exists."""
    n_groups = -(-size // n_tie)
    smallest_group = size - (n_groups - 1) * n_tie
    if n_params % n_groups:
        return None
    u = n_params // n_groups
    # u beyond smallest_group * r*r adds no direction the group's R matrices could take
    if u < u_min or u > smallest_group * r * r:
        return None
    return n_params, u


def _nearest(n_params: int, size: int, n_tie: int, u_min: int, r: int) -> tuple[int, int]:
    """The achievable (count, u) closest to n_params for `size` modules tiled by `n_tie`."""
    n_groups = -(-size // n_tie)
    u_max = max(u_min, (size - (n_groups - 1) * n_tie) * r * r)
    u = min(max(round(n_params / n_groups), u_min), u_max)
    return n_groups * u, u


def _plan_tiled(modules, n_params, u_min, r) -> BudgetPlan:
    names = [m.name for m in modules]
    size = len(names)
    best = None
    for n_tie in range(1, size + 1):
        hit = _fits(n_params, size, n_tie, u_min, r)
        if hit and (best is None or (hit[1], n_tie) < (best[1], best[0])):
            best = (n_tie, hit[1])
    if best is None:  # only when u_min forces more numbers than asked for
        n_tie = size
        achieved, u = _nearest(n_params, size, n_tie, u_min, r)
        reason = f"nearest: u >= {u_min} cannot give {n_params}; one shared vector of u={u} gives {achieved}"
    else:
        n_tie, u = best
        achieved = n_params
        reason = f"exact: ceil({size}/{n_tie}) = {-(-size // n_tie)} vectors x u={u} (tiled over all {size} modules)"
    config = TinyLoRAConfig(r=r, u=u, n_tie=n_tie, tie="tiled")
    return BudgetPlan(config, n_params, achieved, "tiled", u, _tile(names, n_tie), reason)


def _best_products(modules, scores) -> dict[int, tuple[float, tuple[str, ...], tuple[int, ...]]]:
    """For each set size, the product `layers x types` with the largest summed score."""
    kinds = list(dict.fromkeys(m.kind for m in modules))
    layers = sorted({m.layer for m in modules})
    present = {(m.layer, m.kind) for m in modules}
    best: dict[int, tuple[float, tuple[str, ...], tuple[int, ...]]] = {}
    for k in range(1, len(kinds) + 1):
        for types in itertools.combinations(kinds, k):
            # layers that hold every chosen type, best first
            usable = [lay for lay in layers if all((lay, t) in present for t in types)]
            per_layer = sorted(usable, key=lambda lay: -sum(scores[(lay, t)] for t in types))
            total = 0.0
            for a, lay in enumerate(per_layer, start=1):
                total += sum(scores[(lay, t)] for t in types)
                size = a * k
                if size not in best or total > best[size][0]:
                    best[size] = (total, types, tuple(sorted(per_layer[:a])))
    return best


def _plan_top(modules, n_params, u_min, r, scores) -> BudgetPlan:
    n_layers = len({m.layer for m in modules})
    candidates = []  # (missed by, n_tie, u, -score, size)
    for size, (total, _, _) in _best_products(modules, scores).items():
        for n_tie in range(1, size + 1):
            hit = _fits(n_params, size, n_tie, u_min, r)
            achieved, u = hit if hit else _nearest(n_params, size, n_tie, u_min, r)
            candidates.append((abs(achieved - n_params), n_tie, u, -total, size, achieved))
    missed, n_tie, u, neg_total, size, achieved = min(candidates)
    total, types, layers = _best_products(modules, scores)[size]
    chosen_layers = set(layers)
    names = [m.name for m in modules if m.layer in chosen_layers and m.kind in types]
    config = TinyLoRAConfig(
        r=r, u=u, n_tie=n_tie, tie="tiled", targets=types,
        layers=None if len(chosen_layers) == n_layers else layers,
    )
    share = total / max(sum(scores.values()), 1e-30)
    where = f"{len(layers)} layers x {list(types)} ({size} modules, {share:.0%} of the importance)"
    if missed:
        reason = f"nearest: no product of layers x types tiles to {n_params} with u >= {u_min}; {where}"
    else:
        reason = f"exact: {-(-size // n_tie)} vectors x u={u}, n_tie={n_tie} on {where}"
    return BudgetPlan(config, n_params, achieved, "top", u, _tile(names, n_tie), reason)


def _equal_mass_groups(weights: list[float], n_groups: int) -> list[int]:
    """Start index of each of `n_groups` consecutive, non-empty groups of about equal summed weight.

    Each group aims at an equal share of the weight still unassigned and closes before the item
    that would overshoot its share more than stopping short does, so a heavy item opens its own group.
    """
    total = sum(weights)
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    n = len(weights)
    starts, acc = [0], weights[0]  # acc: weight of items 0..i-1 at the loop's item i
    group_start_acc = 0.0
    for i in range(1, n):
        left = n_groups - len(starts) + 1  # groups still open, counting the current one
        if left == 1:
            break
        target = group_start_acc + (total - group_start_acc) / left
        must_cut = n - i == left - 1  # exactly one item left per remaining group
        if must_cut or acc >= target or abs(acc - target) < abs(acc + weights[i] - target):
            starts.append(i)
            group_start_acc = acc
        acc += weights[i]
    return starts


def _plan_proportional(modules, n_params, u_min, r, scores) -> BudgetPlan:
    size = len(modules)
    weights = [scores[(m.layer, m.kind)] for m in modules]
    best = None
    for u in range(u_min, n_params + 1):
        if n_params % u == 0 and n_params // u <= size:
            n_groups = n_params // u
            starts = _equal_mass_groups(weights, n_groups) + [size]
            if u <= min(b - a for a, b in zip(starts, starts[1:])) * r * r:
                best = (u, starts)
                break
    if best is None:
        u = u_min
        starts = _equal_mass_groups(weights, max(1, min(size, round(n_params / u)))) + [size]
        reason = f"nearest: u >= {u_min} cannot give {n_params} over {size} modules"
    else:
        u, starts = best
        reason = f"exact: {len(starts) - 1} vectors x u={u}, groups of equal summed importance"
    groups = tuple(tuple(m.name for m in modules[a:b]) for a, b in zip(starts, starts[1:]))
    achieved = len(groups) * u
    sizes = [len(g) for g in groups]
    if all(k == sizes[0] for k in sizes[:-1]) and sizes[-1] <= sizes[0]:  # plain tiled tying
        config = TinyLoRAConfig(r=r, u=u, n_tie=sizes[0], tie="tiled")
    else:
        config = TinyLoRAConfig(r=r, u=u, group_sizes=tuple(sizes))
        reason += f" (group sizes {min(sizes)}..{max(sizes)})"
    return BudgetPlan(config, n_params, achieved, "proportional", u, groups, reason)


def plan_budget(model: nn.Module, n_params: int, *, importance=None, strategy: str = "tiled", u: int = 1,
                r: int = 2) -> BudgetPlan:
    """Place `n_params` trained numbers on `model`'s q,k,v,o,gate,up,down modules.

    `importance`: an `Importance` (from `tinylab.analysis.importance`, its default score is used), a pandas
    Series indexed by (layer, type), or a mapping {(layer, type) or module name: score >= 0};
    needed by `top` and `proportional`. `u`: the smallest vector length to use; the planner raises
    it only when no smaller u reaches `n_params` exactly (u = 13 with n_params = 13 gives one
    shared 13-vector). `r`: the rank of the SVD directions. See the module docstring for the
    strategies. Raises ValueError for n_params outside 1..lora_xs_size(model, r).
    """
    check_choice("strategy", strategy, STRATEGIES)
    if not is_int(u) or u < 1:
        raise ValueError(f"u={u!r} is not allowed: u must be an integer >= 1")
    modules = _modules(model, r)
    n_params = _check_count(n_params, len(modules) * r * r, len(modules), r)
    if strategy == "tiled":
        return _plan_tiled(modules, n_params, int(u), r)
    if importance is None:
        raise ValueError(f"strategy={strategy!r} needs importance= (e.g. tinylab.analysis.importance.module_importance(...))")
    scores = _as_scores(importance, modules)
    if strategy == "top":
        return _plan_top(modules, n_params, int(u), r, scores)
    return _plan_proportional(modules, n_params, int(u), r, scores)
