"""Attaching TinyLoRA to a model, and the handle on an attached adapter (`TinyLoRA`).

`apply_tinylora` replaces each adapted `nn.Linear` by a `TinyLoRALinear` (`tinylab.adapter.layer`)
whose trained vector is shared by its tying group; `TinyLoRA` holds the vectors and the switches
(disabled, merged, unmerged, kept vector, remove).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.layer import TinyLoRALinear, projection
from tinylab.adapter.svd import svds, weight_fingerprint
from tinylab.adapter.targets import ModuleInfo, select_and_plan
from tinylab.model.conv1d import original

__all__ = ["TinyLoRA", "apply_tinylora", "check_adapter", "check_no_adapter", "find_adapter"]


class TinyLoRA:
    """Handle on an attached adapter: its trained vectors, its modules, and switches."""

    def __init__(self, model: nn.Module, config: TinyLoRAConfig, modules: list[ModuleInfo], vectors, wrapped,
                 saved_requires_grad: dict[str, bool], fingerprints: dict[str, str]):
        self.model = model
        self.config = config
        self.modules = modules
        self.vectors = vectors  # nn.ParameterList, one (u,) fp32 vector per tying group
        self._wrapped = wrapped  # name -> TinyLoRALinear
        self._saved_requires_grad = saved_requires_grad
        self.fingerprints = fingerprints  # module name -> weight fingerprint
        self.attached = True

    # --- counting and parameters
    @property
    def num_params(self) -> int:
        return len(self.vectors) * self.config.u

    @property
    def num_groups(self) -> int:
        return len(self.vectors)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.vectors)

    def named_modules(self) -> Iterator[tuple[str, TinyLoRALinear]]:
        return iter(self._wrapped.items())

    def vector(self) -> torch.Tensor:
        """All trained numbers as one detached fp32 vector, groups in order."""
        return torch.cat([v.detach().reshape(-1).float().cpu() for v in self.vectors])  # (n,), from any devices

    @torch.no_grad()
    def set_vector(self, values: torch.Tensor | Sequence[float]) -> None:
        values = torch.as_tensor(values, dtype=torch.float32, device="cpu").reshape(-1)  # (n,)
        if values.numel() != self.num_params:
            raise ValueError(f"got {values.numel()} values; this adapter has {self.num_params} parameters")
        if self.merged:
            raise RuntimeError("unmerge() before changing v")
        for i, v in enumerate(self.vectors):
            v.copy_(values[i * self.config.u : (i + 1) * self.config.u])

    def groups(self) -> dict[int, list[str]]:
        """Tying group -> the module names sharing its vector."""
        out: dict[int, list[str]] = {}
        for m in self.modules:
            out.setdefault(m.group, []).append(m.name)
        return out

    # --- switches
    @property
    def merged(self) -> bool:
        return any(m.merged_R is not None for m in self._wrapped.values())

    @contextlib.contextmanager
    def disabled(self):
        """The base model: the adapter contributes nothing inside the block (never a second copy)."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        previous = {n: m.enabled for n, m in self._wrapped.items()}
        for m in self._wrapped.values():
            m.enabled = False
        try:
            yield self.model
        finally:
            for n, m in self._wrapped.items():
                m.enabled = previous[n]
            if was_merged:
                self.merge()

    @contextlib.contextmanager
    def unmerged(self) -> Iterator[None]:
        """The adapter unmerged inside the block (its vectors may change), merged again after if it was."""
        was_merged = self.merged
        self.unmerge()
        try:
            yield
        finally:
            if was_merged:
                self.merge()

    @contextlib.contextmanager
    def kept_vector(self) -> Iterator[torch.Tensor]:
        """Inside the block the vector is yours to change (`set_vector`, or the vectors in place); on
        leaving, also on an error or a KeyboardInterrupt, it is put back exactly, and a merged
        adapter is merged again. Yields a copy of the vector as found: (num_params,) fp32 on the CPU.
        """
        check_adapter(self)
        saved = self.vector()  # (num_params,) fp32, cpu
        with self.unmerged():
            try:
                yield saved.clone()
            finally:
                self.set_vector(saved)

    def merge(self) -> None:
        """Add U diag(S) R Vh into each weight (fast generation); unmerge() restores the exact originals.

        While merged, a copy of each adapted weight is held (as many bytes as the adapted weights).
        """
        check_adapter(self)
        for m in self._wrapped.values():
            m.merge()

    def unmerge(self) -> None:
        for m in self._wrapped.values():
            m.unmerge()

    def remove(self) -> nn.Module:
        """Put the original modules back and restore every parameter's requires_grad."""
        if not self.attached:
            return self.model
        self.unmerge()
        for name, wrapper in self._wrapped.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, original(wrapper.base))
        for name, p in self.model.named_parameters():
            if name in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[name])
        self.attached = False
        return self.model

    def __repr__(self) -> str:
        return (f"TinyLoRA({self.num_params} params, {len(self.modules)} modules, {self.num_groups} groups, "
                f"{self.config})")


def check_adapter(adapter, model: nn.Module | None = None) -> TinyLoRA:
    """`adapter` itself when it is a TinyLoRA handle attached (to `model`, when given).

    TypeError for anything else than a handle; ValueError for a removed adapter or one attached to
    another model: the one check, with the one message, that every function taking an adapter makes.
    """
    if not isinstance(adapter, TinyLoRA):
        raise TypeError(f"adapter must be a TinyLoRA handle (from apply_tinylora or load_adapter), "
                        f"got {type(adapter).__name__}")
    if not adapter.attached or (model is not None and adapter.model is not model):
        raise ValueError("this adapter is not attached to this model: attach one with "
                         "tinylab.apply_tinylora(model, ...) or tinylab.load_adapter(model, path)")
    return adapter


def find_adapter(model: nn.Module) -> bool:
    """True when a TinyLoRA adapter is attached to `model`."""
    return any(isinstance(m, TinyLoRALinear) for m in model.modules())


def check_no_adapter(model: nn.Module, *, because: str | None = None, instead: str | None = None) -> None:
    """The one check, with the one message, that `model` has no TinyLoRA adapter yet: a ValueError
    saying why it matters (`because`) and what to do (`instead`, or remove the adapter)."""
    if find_adapter(model):
        why = f" ({because})" if because else ""
        what = f"{instead}, or call adapter.remove() first" if instead else "call adapter.remove() first"
        raise ValueError(f"this model already has a TinyLoRA adapter{why}: {what}")


def apply_tinylora(model: nn.Module, config: TinyLoRAConfig | None = None, **overrides) -> TinyLoRA:
    """Attach TinyLoRA to `model` in place; afterwards only the adapter's vectors require grad.

    `overrides` are TinyLoRAConfig fields (`apply_tinylora(model, u=13, n_tie="all")`). The model
    may be on any device and in any float dtype: the SVD is computed on the CPU in fp32/fp64 (and
    cached), then U, S, Vh move to each weight's device and dtype; P is drawn on the CPU and moved;
    each trained vector is fp32 on the device of its group's first module. Weights on the "meta"
    device (offloaded by a `device_map`) cannot be read and are refused.
    """
    if config is None:
        config = TinyLoRAConfig()
    if not isinstance(config, TinyLoRAConfig):
        raise TypeError(f"config must be a TinyLoRAConfig, got {type(config).__name__}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(TinyLoRAConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown TinyLoRAConfig fields {unknown}; allowed: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    check_no_adapter(model)

    chosen, infos = select_and_plan(model, config)
    group_of = [info.group for info in infos]
    offloaded = [name for name, linear, _ in chosen if linear.weight.device.type == "meta"]
    if offloaded:
        raise ValueError(f"{len(offloaded)} adapted weights are on the meta device (e.g. {offloaded[0]}): they were "
                         "offloaded (device_map with disk/CPU offload) or never loaded; load the model onto real "
                         "devices (device_map='auto' without offload, or one device) before apply_tinylora")
    first_device = {}
    for (_, linear, _), group in zip(chosen, group_of):
        first_device.setdefault(group, linear.weight.device)
    vectors = nn.ParameterList(
        [nn.Parameter(torch.zeros(config.u, dtype=torch.float32, device=first_device[g]))  # (u,) fp32
         for g in range(len(first_device))]
    )
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    fingerprints = {name: weight_fingerprint(linear.weight) for name, linear, _ in chosen}
    factors = svds([(linear.weight, fingerprints[name]) for name, linear, _ in chosen], config.r, config.svd)
    wrapped = {}
    for (name, linear, _), group, (U, S, Vh) in zip(chosen, group_of, factors):
        P = projection(config.seed, name, config.u, config.r)
        wrapper = TinyLoRALinear(linear, U, S, Vh, P, vectors[group])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        wrapped[name] = wrapper
    return TinyLoRA(model, config, infos, vectors, wrapped, saved, fingerprints)
