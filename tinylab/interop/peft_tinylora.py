"""Convert TinyLoRA adapters to and from Hugging Face PEFT's `tinylora` checkpoints.

The two parameterizations of the same update, per adapted module:

    ours:  W' = W + U diag(S) R Vh                 R  = sum_i v_i P_i      # (r, r)
    PEFT:  W' = W + B R' A                         R' = sum_i v_i P'_i     # (r, r)
           A = diag(sqrt S) Vh  (r, in),   B = U diag(sqrt S)  (out, r)

so R' = S^1/2 R S^-1/2 and, with the same v, P'_i = diag(sqrt S) P_i diag(1/sqrt S).

Export writes our own U, S, Vh (canonical SVD signs) as A and B, and the converted P, so PEFT
loads exactly our update whatever signs its own SVD would have picked. Import goes the other way:
for each module, a = |rows of A|, b = |columns of B|, then U = B / b, Vh = A / a, S = a * b and
P = diag(1/a) P' diag(a) (for PEFT's balanced factors a = b = sqrt S, i.e. P = S^-1/2 P' S^1/2).

Tying. PEFT ties consecutive modules by a ratio: with N modules,
`num_groups = round(N * (1 - weight_tying))`, `group_size = N // num_groups`, module i in group
`min(i // group_size, num_groups - 1)` (the last group absorbs the rest). Ours (tiled): group
`i // n_tie` (the last group is the short one), or explicit `group_sizes`. Export keeps the groups
when some `weight_tying` reproduces them (untied, fully tied, n_tie dividing N such as N = 14,
n_tie = 7, ...); otherwise (e.g. N = 210, n_tie = 16, or structured tying) it writes an untied
checkpoint (`weight_tying = 0`) in which each module's v is a copy of its group's: the same
function, but training it in PEFT would untie the copies. Import always keeps PEFT's groups:
`n_tie` when they are tiled n_tie groups, else `group_sizes` (e.g. 3, 3, 3, 5).

An imported adapter carries the checkpoint's factors and P, not tinylab's seeded ones; it is
marked `adapter.source == "peft"`, and `tinylab.adapter.file_format.save_adapter` refuses it (a tinylab
file stores only v and re-creates P from the seed). Export it with `export_peft` instead.
Only JSON and safetensors are read or written; a pickled `adapter_model.bin` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from tinylab.adapter.attach import TinyLoRA, apply_tinylora, check_adapter, check_no_adapter
from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig
from tinylab.adapter.targets import linear_modules, module_kinds, plan_modules
from tinylab.model.conv1d import LinearView, as_linear

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "export_peft", "import_peft", "peft_groups", "peft_target_fields"]

log = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's prefix of module keys in a saved state dict
_V_PREFIX = "base_model.tinylora_v."  # PEFT's shared vectors: base_model.tinylora_v.{group}


def peft_groups(n_modules: int, weight_tying: float) -> list[int]:
    """The tying group of each of `n_modules` target modules under PEFT's `weight_tying` ratio.

    Mirrors `peft.tuners.tinylora.model.TinyLoraModel._create_and_replace` (PEFT 0.21).

    >>> peft_groups(14, 0.5)
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    >>> peft_groups(7, 0.7)  # 2 groups of 3, the last absorbs the rest
    [0, 0, 0, 1, 1, 1, 1]
    """
    if not 0.0 <= weight_tying <= 1.0:
        raise ValueError(f"weight_tying={weight_tying!r} is not allowed: PEFT allows 0.0 .. 1.0")
    num_groups = max(1, round(n_modules * (1.0 - weight_tying)))
    group_size = max(1, n_modules // num_groups)
    return [min(i // group_size, num_groups - 1) for i in range(n_modules)]


# ---------------------------------------------------------------------------------------------
# Export


def _tying_ratio(groups: list[int]) -> float | None:
    """A `weight_tying` under which PEFT reproduces `groups` (numbered by first appearance), or None."""
    n, g = len(groups), max(groups) + 1
    for ratio in (1.0 - g / n, (n - g) / n):
        if 0.0 <= ratio <= 1.0 and peft_groups(n, ratio) == groups:
            return ratio
    return None


def peft_target_fields(adapter: TinyLoRA) -> dict:
    """target_modules / layers_to_transform under which PEFT picks exactly our modules, in our order,
    and fan_in_fan_out (True for transformers Conv1D maps, which store their weights (in, out)).

    The readable form (module types, plus layer indexes if not all) when PEFT's matcher agrees on
    this model; otherwise the explicit list of module names.
    """
    from peft import TinyLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    ours = [m.name for m in adapter.modules]
    kinds = list(dict.fromkeys(m.kind for m in adapter.modules))
    layers = adapter.config.layers
    fields = {"target_modules": kinds, "layers_to_transform": None if layers is None else sorted(layers)}
    probe = TinyLoraConfig(**fields, r=adapter.config.r, u=adapter.config.u)
    candidates = [n for n, _, _ in linear_modules(adapter.model)]
    candidates += [n for n, m in adapter.model.named_modules() if isinstance(m, nn.Embedding)]
    order = {n: i for i, (n, _) in enumerate(adapter.model.named_modules())}
    matched = sorted((n for n in candidates if check_target_module_exists(probe, n)), key=order.__getitem__)
    conv1d = any(isinstance(module.base, LinearView) for _, module in adapter.named_modules())  # (in, out) weights
    if matched == ours:
        return {**fields, "fan_in_fan_out": conv1d}
    return {"target_modules": ours, "layers_to_transform": None, "fan_in_fan_out": conv1d}


def export_peft(adapter: TinyLoRA, folder: str | os.PathLike) -> Path:
    """Write `adapter` as a PEFT TinyLoRA checkpoint folder; returns the folder.

    The folder holds `adapter_config.json` and `adapter_model.safetensors` laid out as PEFT's
    `save_pretrained` writes them, so `peft.PeftModel.from_pretrained(base_model, folder)` gives
    the same logits as the adapted model (to fp32 rounding). Groups are kept when PEFT's
    `weight_tying` can express them, else the checkpoint is untied with copied vectors (module docstring).
    """
    from peft import TinyLoraConfig
    from safetensors.torch import save_file

    check_adapter(adapter)
    groups = [m.group for m in adapter.modules]
    ratio = _tying_ratio(groups)
    if ratio is None:
        log.info("PEFT's weight_tying cannot express these %d groups: exporting untied copies", max(groups) + 1)
    vectors = [v.detach().float().cpu() for v in adapter.vectors]  # each (u,)

    tensors: dict[str, torch.Tensor] = {}
    for i, (name, module) in enumerate(adapter.named_modules()):
        dtype = module.base.weight.dtype
        U, Vh = module.U.double().cpu(), module.Vh.double().cpu()  # (out, r), (r, in)
        root = module.S.double().cpu().sqrt()  # (r,)
        P = module.P.double().cpu()  # (u, r, r)
        safe = torch.where(root > 0, root, 1.0)  # (r,): a zero singular value's direction adds nothing
        key = f"{_PREFIX}{name}"
        tensors[f"{key}.tinylora_A"] = (root[:, None] * Vh).to(dtype).contiguous()  # (r, in)
        tensors[f"{key}.tinylora_B"] = (U * root).to(dtype).contiguous()  # (out, r)
        tensors[f"{key}.tinylora_P"] = (safe[:, None] * P / safe).float().contiguous()  # (u, r, r)
        if ratio is None:
            tensors[f"{_V_PREFIX}{i}"] = vectors[groups[i]].clone()  # (u,)
    if ratio is not None:
        for g, v in enumerate(vectors):
            tensors[f"{_V_PREFIX}{g}"] = v.clone()  # (u,)

    peft_config = TinyLoraConfig(
        r=adapter.config.r,
        u=adapter.config.u,
        weight_tying=0.0 if ratio is None else ratio,
        projection_seed=adapter.config.seed,
        save_projection=True,
        init_weights=True,
        inference_mode=True,
        base_model_name_or_path=getattr(adapter.model, "name_or_path", None) or None,
        **peft_target_fields(adapter),
    )
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    if config_dict.get("task_type") is None:  # what PeftModel.save_pretrained adds for a plain PeftModel
        config_dict["auto_mapping"] = {"base_model_class": type(adapter.model).__name__,
                                       "parent_library": type(adapter.model).__module__}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return folder


# ---------------------------------------------------------------------------------------------
# Import


def _read_peft_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the folder PEFT's save_pretrained wrote")
    config_path, weights_path = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a PEFT checkpoint folder")
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{folder} holds only a pickled adapter_model.bin; tinylab reads safetensors only "
                             "(re-save it with save_pretrained(..., safe_serialization=True))")
        raise FileNotFoundError(f"{weights_path} is missing: not a PEFT checkpoint folder")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "TINYLORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{config_path} has peft_type={kind!r}; only 'TINYLORA' checkpoints can be imported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"bias={cfg['bias']!r} is not supported: the checkpoint trains biases; allowed: 'none'")
    if cfg.get("modules_to_save"):
        raise ValueError(f"modules_to_save={cfg['modules_to_save']!r} is not supported; allowed: None")
    return cfg, load_file(str(weights_path))


def _peft_projection(seed: int, index: int, u: int, r: int) -> torch.Tensor:
    """PEFT's P' when the checkpoint did not save it (save_projection=False): seeded by seed + module index."""
    g = torch.Generator(device="cpu").manual_seed(seed + index)
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=g, device="cpu")  # (u, r, r)


def _factors(name: str, A: torch.Tensor, B: torch.Tensor, P_peft: torch.Tensor):
    """(U, S, Vh, P) with B R' A = U diag(S) R Vh for every v; fp64."""
    A, B, P_peft = A.double(), B.double(), P_peft.double()  # (r, in), (out, r), (u, r, r)
    a, b = torch.linalg.vector_norm(A, dim=1), torch.linalg.vector_norm(B, dim=0)  # (r,), (r,)
    if ((a == 0) != (b == 0)).any():
        raise ValueError(f"{name}: a row of tinylora_A and the matching column of tinylora_B must be both zero "
                         f"or both non-zero (row norms {a.tolist()}, column norms {b.tolist()})")
    a_safe, b_safe = torch.where(a > 0, a, 1.0), torch.where(b > 0, b, 1.0)  # (r,), (r,)
    U = B / b_safe  # (out, r)
    Vh = A / a_safe[:, None]  # (r, in)
    P = P_peft * a_safe / a_safe[:, None]  # (u, r, r): diag(1/a) P' diag(a)
    return U, a * b, Vh, P


@torch.no_grad()
def _load_into(adapter: TinyLoRA, state: dict[str, torch.Tensor], cfg: dict, v_keys: list[str],
               peft_group: list[int]) -> None:
    """Overwrite the freshly attached modules' U, S, Vh, P and the vectors with the checkpoint's."""
    r, u = adapter.config.r, adapter.config.u
    for i, (name, module) in enumerate(adapter.named_modules()):
        key = f"{_PREFIX}{name}"
        A, B = state.get(f"{key}.tinylora_A"), state.get(f"{key}.tinylora_B")  # (r, in), (out, r)
        P_peft = state.get(f"{key}.tinylora_P")  # (u, r, r)
        if P_peft is None:
            P_peft = _peft_projection(int(cfg.get("projection_seed", 42)), i, u, r)
        expect = {"A": (r, module.in_features), "B": (module.out_features, r), "P": (u, r, r)}
        got = {"A": tuple(A.shape) if A is not None else None, "B": tuple(B.shape) if B is not None else None,
               "P": tuple(P_peft.shape)}
        if got != expect:
            raise ValueError(f"{name}: tensor shapes {got} do not match the model and config, expected {expect}")
        U, S, Vh, P = _factors(name, A, B, P_peft)
        module.U.copy_(U)
        module.S.copy_(S)
        module.Vh.copy_(Vh)
        module.P.copy_(P)
    for g, vec in enumerate(adapter.vectors):
        first = next(i for i, m in enumerate(adapter.modules) if m.group == g)
        values = state[v_keys[peft_group[first]]]  # (u,)
        if tuple(values.shape) != (u,):
            raise ValueError(f"{v_keys[peft_group[first]]} has shape {tuple(values.shape)}, expected ({u},)")
        vec.copy_(values.float())


def _our_tying(groups: list[int]) -> dict:
    """TinyLoRAConfig fields giving exactly PEFT's consecutive `groups`: n_tie when tiled, else group_sizes."""
    sizes = [groups.count(g) for g in range(max(groups) + 1)]
    if len(sizes) == 1:
        return {"n_tie": "all"}
    if [i // sizes[0] for i in range(len(groups))] == groups:
        return {"n_tie": sizes[0]}
    return {"group_sizes": tuple(sizes)}


def _our_targets(kinds: list[str]) -> tuple[str, ...]:
    return DEFAULT_TARGETS if set(kinds) == set(DEFAULT_TARGETS) else tuple(kinds)


def import_peft(model: nn.Module, folder: str | os.PathLike) -> TinyLoRA:
    """Attach the PEFT TinyLoRA checkpoint in `folder` to `model` as a tinylab adapter.

    Reads `adapter_config.json` and `adapter_model.safetensors` only. The adapter computes the
    same function as `peft.PeftModel.from_pretrained(model, folder)` (to fp32 rounding); its
    modules carry the checkpoint's factors and projections, and `adapter.source == "peft"`.
    """
    folder = Path(folder)
    check_no_adapter(model)
    cfg, state = _read_peft_folder(folder)
    r, u = cfg.get("r"), cfg.get("u")
    if not isinstance(r, int) or not isinstance(u, int) or r < 1 or u < 1:
        raise ValueError(f"{folder / PEFT_CONFIG_FILE}: r={r!r}, u={u!r}; both must be integers >= 1")
    suffix = ".tinylora_A"
    in_file = {k[len(_PREFIX):-len(suffix)] for k in state if k.startswith(_PREFIX) and k.endswith(suffix)}
    if not in_file:
        raise ValueError(f"{folder / PEFT_WEIGHTS_FILE} holds no '*.tinylora_A' tensor: not a TinyLoRA checkpoint")
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    unknown = sorted(n for n in in_file if n not in modules)
    if unknown:
        raise ValueError(f"the checkpoint adapts modules this model does not have: {unknown[:5]}")
    names = sorted(in_file, key=order.__getitem__)  # PEFT's module index order
    not_linear = [n for n in names if as_linear(modules[n]) is None]
    if not_linear:
        raise ValueError(f"only linear maps (nn.Linear, transformers Conv1D) can be imported; the checkpoint adapts "
                         f"{not_linear[:5]}")

    n = len(names)
    v_keys = sorted((k for k in state if k.startswith(_V_PREFIX)), key=lambda k: int(k[len(_V_PREFIX):]))
    peft_group = peft_groups(n, float(cfg.get("weight_tying", 0.0)))
    if len(v_keys) != max(peft_group) + 1:
        raise ValueError(f"the checkpoint has {len(v_keys)} vectors but weight_tying={cfg.get('weight_tying')} "
                         f"over {n} modules gives {max(peft_group) + 1} groups")

    layer_of = {name: layer for name, _, layer in linear_modules(model)}
    kind_of = module_kinds([name for name, layer in layer_of.items() if layer is not None])
    kinds = list(dict.fromkeys(kind_of.get(name, name.rsplit(".", 1)[-1]) for name in names))
    all_layers = sorted({lay for lay in layer_of.values() if lay is not None})
    used_layers = sorted({layer_of[name] for name in names if layer_of[name] is not None})
    layers = None if used_layers == all_layers else tuple(used_layers)
    selection = TinyLoRAConfig(r=r, u=u, targets=_our_targets(kinds), layers=layers,
                               seed=int(cfg.get("projection_seed", 0)))
    planned = [m.name for m in plan_modules(model, selection)]
    if planned != names:
        raise ValueError(f"the checkpoint adapts {n} modules that no TinyLoRAConfig(targets, layers) selects "
                         f"exactly (targets {kinds}, layers {used_layers}); tinylab would adapt {len(planned)}")
    adapter = apply_tinylora(model, dataclasses.replace(selection, **_our_tying(peft_group)))
    try:
        _load_into(adapter, state, cfg, v_keys, peft_group)
    except BaseException:
        adapter.remove()
        raise
    adapter.source = "peft"
    adapter.peft_config = cfg
    return adapter
