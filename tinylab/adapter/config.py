"""`TinyLoRAConfig`: where the trained scalars go and how many there are (a frozen dataclass)."""

from __future__ import annotations

import dataclasses

from tinylab.basics.checks import is_int

__all__ = ["DEFAULT_TARGETS", "TinyLoRAConfig"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The 7 maps adapted by default, under the Llama names; `tinylab.adapter.targets` maps other
architectures' names onto these roles."""

_TIE_STYLES = ("tiled", "structured")
_SVD_METHODS = ("exact", "lowrank")


@dataclasses.dataclass(frozen=True)
class TinyLoRAConfig:
    """Where the trained scalars go and how many there are. `dataclasses.replace` is the sweep API."""

    r: int = 2
    """Rank of the frozen SVD directions; R is (r, r). The paper uses 2. At least 1, at most min(out, in)."""
    u: int = 1
    """Length of each trained vector v. May exceed r*r (the paper sweeps up to 64 at r = 2)."""
    n_tie: int | str = 1
    """Modules sharing one v: 1 (untied) .. number of adapted modules, or "all" for one shared v."""
    tie: str = "tiled"
    """"tiled" (consecutive modules in model order) or "structured" (same type across layers)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Last component of the linear modules' names to adapt. The default 7 also take the names other
    architectures give the same maps (phi3's fused qkv_proj and gate_up_proj, OPT's out_proj, fc1,
    fc2, ...); roles the model lacks are skipped, and in-block linear maps left out are warned about."""
    layers: tuple[int, ...] | None = None
    """Layer indexes to adapt; None means all layers."""
    seed: int = 0
    """Seed of the random projections P (with each module's name)."""
    svd: str = "exact"
    """"exact" (top-r singular triplets to fp32 precision) or "lowrank" (randomized, seeded)."""
    group_sizes: tuple[int, ...] | None = None
    """Explicit tiled groups: sizes of consecutive groups in model order, summing to the number of
    adapted modules (e.g. the budget planner's "proportional" placement). Overrides n_tie and tie."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if self.targets is not None and not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None and not isinstance(self.layers, tuple):
            if is_int(self.layers):
                object.__setattr__(self, "layers", (self.layers,))
            else:
                object.__setattr__(self, "layers", tuple(self.layers))
        if not is_int(self.r) or self.r < 1:
            raise ValueError(f"r={self.r!r} is not allowed: r must be an integer >= 1 (the paper uses 2)")
        if not is_int(self.u) or self.u < 1:
            raise ValueError(f"u={self.u!r} is not allowed: u must be an integer >= 1 (the paper sweeps 1..64)")
        if self.n_tie != "all" and (not is_int(self.n_tie) or self.n_tie < 1):
            raise ValueError(
                f"n_tie={self.n_tie!r} is not allowed: n_tie must be an integer >= 1 "
                "(at most the number of adapted modules) or 'all'"
            )
        if self.tie not in _TIE_STYLES:
            raise ValueError(f"tie={self.tie!r} is not allowed: choose one of {list(_TIE_STYLES)}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets={self.targets!r} is not allowed: give a non-empty list of module names")
        if self.layers is not None:
            if not self.layers or not all(is_int(i) and i >= 0 for i in self.layers):
                raise ValueError(
                    f"layers={self.layers!r} is not allowed: give None (all) or non-negative layer indexes"
                )
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} is not allowed: seed must be an integer")
        if self.group_sizes is not None:
            if not isinstance(self.group_sizes, tuple):
                object.__setattr__(self, "group_sizes", tuple(self.group_sizes))
            if not self.group_sizes or not all(is_int(k) and k >= 1 for k in self.group_sizes):
                raise ValueError(
                    f"group_sizes={self.group_sizes!r} is not allowed: give None or positive integers "
                    "summing to the number of adapted modules"
                )
        if self.svd not in _SVD_METHODS:
            raise ValueError(f"svd={self.svd!r} is not allowed: choose one of {list(_SVD_METHODS)}")
        for name in ("r", "u", "seed") + (("n_tie",) if self.n_tie != "all" else ()):
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy integers become ints (JSON)
        for name in ("layers", "group_sizes"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
