"""Many TinyLoRA adapters on one base model: a table of vectors and mixed batches.

Adapters that share a base model and a `TinyLoRAConfig` (targets, r, u, tying, projection seed)
share every frozen tensor: U, S, Vh from the base weights and P from the seed. Only v differs, so
K adapters are one `[K, n_vectors, u]` fp32 table (13 numbers an adapter at u = 13, n_tie = "all"),
and a batch with a different adapter in every row costs, per adapted map,

    h  = x Vh^T                     # (B, T, r)   once for the whole batch
    g_b = h_b R_b^T                 # (B, T, r)   one batched r x r product, R_b = sum_i v_{b,i} P_i
    y  = x W^T + g (U diag(S))^T    # (B, T, out) once for the whole batch

Rows whose adapter is None get no update at all (their outputs are the base model's, bit for bit).
`AdapterBank.rows(adapters)` replaces the adapted maps by such modules for the length of a
`with` block and puts the originals back after it, also on error; `forward` and `generate` are
that block around one model call (left padding and positions as `tinylab.evaluate` uses them).
An adapter attached to the model with `apply_tinylora` is stepped around inside the block.

The replaced module is `tinylab.adapter.bank_layer.BankLinear`; export to LoRA servers (PEFT, vLLM, LoRAX) is
`tinylab.export_lora` (`tinylab.interop.lora_export`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from tinylab.adapter.attach import TinyLoRA, apply_tinylora
from tinylab.adapter.bank_layer import BankLinear, Factors, bare, plain, swapped
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import (
    AdapterFileError,
    adapter_fingerprint,
    base_fingerprint,
    config_from_json,
    config_to_json,
    model_arch,
    read_adapter,
    save_adapter,
)
from tinylab.basics.atomic import write_atomic

__all__ = ["AdapterBank"]

_FORMAT = "tinylab-adapter-bank"
_FORMAT_VERSION = "1"
_SEED_NAME = {"seed": "projection seed"}


class AdapterBank:
    """K TinyLoRA adapters on one base model and one config, held as one `[K, n_vectors, u]` fp32 table.

    `add(name, vector | TinyLoRA handle | .tlra path)`, `remove(name)`, `names`, `len(bank)`,
    `save(path)` / `AdapterBank.load(model, path)`. Serve a batch with a different adapter in every
    row (None: the base model) through `forward`, `generate`, or `with bank.rows(adapters): model(...)`.
    An adapter made for another base model, config or projection seed is refused with a ValueError
    naming the difference, and a refused `add` leaves the bank unchanged.
    """

    def __init__(self, model: nn.Module, config: TinyLoRAConfig | None = None):
        config = TinyLoRAConfig() if config is None else config
        if not isinstance(config, TinyLoRAConfig):
            raise TypeError(f"config must be a TinyLoRAConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        with bare(model):
            self.arch = model_arch(model)
            self.fingerprint = base_fingerprint(model, config)  # portable: fp32 and bf16 alike
            self._exact_fingerprint = base_fingerprint(model, config, portable=False)
            handle = apply_tinylora(model, config)
            try:
                self._factors = [
                    Factors(m.name, m.group, module.Vh.detach().clone(),
                             (module.U.float() * module.S.float()).T.to(module.U.dtype).contiguous(),
                             module.P.detach().float().clone())
                    for m, (_, module) in zip(handle.modules, handle.named_modules())
                ]
                self.n_vectors = handle.num_groups
            finally:
                handle.remove()
        self.device = self._factors[0].Vh.device
        self._groups = torch.tensor([f.group for f in self._factors], dtype=torch.long, device=self.device)  # (M,)
        self._P = torch.stack([f.P for f in self._factors])  # (M, u, r, r) fp32
        self._table = torch.zeros((0, self.n_vectors, config.u), dtype=torch.float32, device=self.device)
        self._size = 0
        self._names: list[str] = []
        self._index: dict[str, int] = {}

    # --- the table
    @property
    def num_params(self) -> int:
        """Numbers in one adapter: n_vectors x u."""
        return self.n_vectors * self.config.u

    @property
    def names(self) -> list[str]:
        """The adapters' names, in the order they were added."""
        return list(self._names)

    @property
    def table(self) -> torch.Tensor:
        """The vectors, `[K, n_vectors, u]` fp32 on the model's device (a view: do not write to it)."""
        return self._table[: self._size]

    @property
    def allocated_bytes(self) -> int:
        """Bytes the table holds, with its room for more adapters (it grows by doubling)."""
        return self._table.numel() * self._table.element_size()

    def __len__(self) -> int:
        return self._size

    def __contains__(self, name) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"AdapterBank({self._size} adapters of {self.num_params} numbers, {self.arch}, {self.config})"

    def vector(self, name: str) -> torch.Tensor:
        """The adapter's numbers as one (n_vectors * u,) fp32 CPU vector (`TinyLoRA.set_vector` takes it)."""
        return self.table[self._position(name)].reshape(-1).cpu().clone()

    def _position(self, name) -> int:
        if name not in self._index:
            raise ValueError(f"name={name!r} is not in this bank; allowed: {_listing(self._names)}")
        return self._index[name]

    def add(self, name: str, adapter) -> None:
        """Add an adapter under `name`: a vector of n_vectors * u numbers (or [n_vectors, u]), a
        TinyLoRA handle, or the path of a `.tlra` file (`save_adapter`). Checked before the bank changes."""
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"name={name!r} is not allowed: a non-empty string without '/', '\\' or NUL "
                             "(it names the adapter's file when the bank is saved as a folder)")
        if name in self._index:
            raise ValueError(f"name={name!r} is already in the bank; remove({name!r}) it first or pick another name")
        values = self._values_of(name, adapter).to(self.device).view(self.n_vectors, self.config.u)  # (n_vectors, u)
        if self._size == self._table.shape[0]:  # room for twice as many: adding K adapters copies O(K) numbers
            grown = torch.zeros((max(8, 2 * self._size), self.n_vectors, self.config.u), dtype=torch.float32,
                                device=self.device)
            grown[: self._size] = self._table[: self._size]
            self._table = grown
        self._table[self._size] = values
        self._index[name] = self._size
        self._names.append(name)
        self._size += 1

    def remove(self, name: str) -> None:
        """Drop the adapter `name`; the others keep their order."""
        i = self._position(name)
        self._table[i : self._size - 1] = self._table[i + 1 : self._size].clone()
        self._size -= 1
        del self._names[i]
        self._index = {n: j for j, n in enumerate(self._names)}

    def _values_of(self, name: str, adapter) -> torch.Tensor:
        """The adapter's numbers as a checked (n,) fp32 CPU vector; a ValueError names what does not fit."""
        if isinstance(adapter, TinyLoRA):
            if getattr(adapter, "source", None) not in (None, "tinylab"):
                raise ValueError(f"adapter {name!r} was imported from {adapter.source} with its own factors and "
                                 "projections; a bank holds adapters that share tinylab's (same config and seed)")
            self._check_fits(name, adapter.config, model_arch(adapter.model), adapter_fingerprint(adapter))
            values = adapter.vector()
        elif isinstance(adapter, (str, os.PathLike)):
            config, header, values = read_adapter(adapter)
            self._check_fits(name, config, header["arch"], header["fp"])
        else:
            try:
                values = torch.as_tensor(adapter, dtype=torch.float32, device="cpu")
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"adapter {name!r}: {type(adapter).__name__} is not allowed; give a vector of "
                                 f"{self.num_params} numbers, a TinyLoRA handle or a .tlra path ({err})") from err
            if values.dim() == 2 and tuple(values.shape) != (self.n_vectors, self.config.u):
                raise ValueError(f"adapter {name!r} has shape {tuple(values.shape)}; allowed: ({self.num_params},) "
                                 f"or ({self.n_vectors}, {self.config.u})")
        values = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1)  # (n,)
        if values.numel() != self.num_params:
            raise ValueError(f"adapter {name!r} has {values.numel()} numbers; allowed: {self.num_params} "
                             f"(n_vectors={self.n_vectors} x u={self.config.u} for this config on this model)")
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"adapter {name!r} holds {values[i].item()} at index {i}; allowed: finite numbers")
        return values

    def _check_fits(self, name: str, config: TinyLoRAConfig, arch: str, fingerprint: str) -> None:
        if config != self.config:
            diff = [f"{_SEED_NAME.get(k, k)} {v!r} (the bank's: {self.config.__dict__[k]!r})"
                    for k, v in config.__dict__.items() if v != self.config.__dict__[k]]
            raise ValueError(f"adapter {name!r} was made with another config: {'; '.join(diff)}; allowed: "
                             f"adapters of {self.config}")
        if arch != self.arch or fingerprint not in (self.fingerprint, self._exact_fingerprint):
            raise ValueError(f"adapter {name!r} was made for another base model (arch {arch}, weights "
                             f"{fingerprint}); this bank's model is {self.arch} with weights {self.fingerprint}")

    # --- files
    def save(self, path: str | os.PathLike) -> Path:
        """A path ending in `.safetensors`: one file with the table, and the names, config and base
        fingerprint as metadata (written atomically, no pickle). Any other path: a folder with one
        `.tlra` file per adapter (`tinylab.load_adapter` reads each). Returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix == ".safetensors":
            metadata = {"format": _FORMAT, "version": _FORMAT_VERSION, "names": json.dumps(self._names),
                        "config": json.dumps(config_to_json(self.config)), "arch": self.arch, "fp": self.fingerprint}
            table = self.table.detach().cpu().contiguous()  # [K, n_vectors, u]
            return write_atomic(path, lambda tmp: save_file({"table": table}, tmp, metadata=metadata))
        if path.exists() and not path.is_dir():
            raise ValueError(f"path={str(path)!r} is a file; give a folder (one .tlra file per adapter) or a path "
                             "ending in .safetensors (one file)")
        path.mkdir(parents=True, exist_ok=True)
        with bare(self.model):
            handle = apply_tinylora(self.model, self.config)
            try:
                for name in self._names:
                    handle.set_vector(self.vector(name))
                    save_adapter(handle, path / f"{name}.tlra")
            finally:
                handle.remove()
        return path

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike) -> AdapterBank:
        """The bank `save` wrote: a `.safetensors` file, or a folder of `.tlra` files (names = file stems)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.tlra"))
            if not files:
                raise ValueError(f"{path} holds no .tlra files; allowed: a folder of adapter files or a .safetensors bank")
            bank = cls(model, read_adapter(files[0])[0])
            for file in files:
                bank.add(file.stem, file)
            return bank
        return cls._load_file(model, path)

    @classmethod
    def _load_file(cls, model: nn.Module, path: Path) -> AdapterBank:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata, keys = f.metadata() or {}, list(f.keys())
                table = f.get_tensor("table") if keys == ["table"] else None
        except (OSError, SafetensorError) as err:
            raise AdapterFileError(f"cannot read adapter bank {path}: {err}") from err
        if metadata.get("format") != _FORMAT or table is None:
            raise AdapterFileError(f"{path} is not an adapter bank (expected metadata format={_FORMAT!r} and one "
                                   f"tensor 'table'; found format={metadata.get('format')!r}, tensors {keys})")
        try:
            config = config_from_json(json.loads(metadata["config"]), str(path))
            names = json.loads(metadata["names"])
        except (KeyError, ValueError) as err:
            raise AdapterFileError(f"{path}: damaged metadata ({type(err).__name__}: {err})") from err
        bank = cls(model, config)
        bank._check_fits(str(path), config, metadata.get("arch"), metadata.get("fp"))
        if not isinstance(names, list) or len(names) != table.shape[0] or table.dim() != 3:
            raise AdapterFileError(f"{path}: {len(names)} names for a table of shape {tuple(table.shape)}; "
                                   f"allowed: one name per row of a [K, {bank.n_vectors}, {config.u}] table")
        for name, values in zip(names, table):
            bank.add(name, values)
        return bank

    # --- serving
    def _row_indices(self, adapters: Sequence, batch: int | None) -> list[int]:
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise ValueError(f"adapters={adapters!r} is not allowed: give a list with one adapter name (or None) "
                             "per row of the batch")
        if batch is not None and len(adapters) != batch:
            raise ValueError(f"adapters names {len(adapters)} rows but the batch has {batch}; allowed: one name "
                             "(or None for the base model) per row")
        if len(adapters) == 0:
            raise ValueError("adapters is empty; allowed: one name (or None) per row of a non-empty batch")
        out = []
        for row, name in enumerate(adapters):
            if name is not None and (not isinstance(name, str) or name not in self._index):
                raise ValueError(f"adapters[{row}]={name!r} is not in this bank; allowed: None (the base model) or "
                                 f"{_listing(self._names)}")
            out.append(-1 if name is None else self._index[name])
        return out

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
        """Inside the block, row b of every batch the model sees takes the adapter `adapters[b]`
        (None: the base model, exactly). The model must be called with len(adapters) rows.
        The adapted maps are replaced for the block and put back after it, also on error."""
        index = self._row_indices(adapters, None)
        selected = [b for b, i in enumerate(index) if i >= 0]
        if not selected:
            with bare(self.model):
                yield self.model
            return
        rows = torch.tensor([index[b] for b in selected], dtype=torch.long, device=self.device)  # (B_a,)
        V = self._table[rows][:, self._groups]  # (B_a, M, u) fp32: each map's vector, per adapted row
        Rt = torch.einsum("bmu,murs->mbsr", V, self._P)  # (M, B_a, r, r): R_b^T per map
        keep = None if len(selected) == len(index) else torch.tensor(selected, dtype=torch.long, device=self.device)
        modules = dict(self.model.named_modules())
        replacements = {
            f.name: BankLinear(plain(modules[f.name]), f, Rt[m].to(f.Vh.dtype), len(index), keep)
            for m, f in enumerate(self._factors)
        }
        with bare(self.model), swapped(self.model, replacements):
            yield self.model

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, adapters: Sequence[str | None]):
        """One forward pass of the model on a left-padded batch [B, T], row b with adapter `adapters[b]`.

        Position ids count the attended tokens of each row (as `tinylab.evaluate`'s generation does), so
        a left-padded row gets the logits it gets alone. Returns the model's output (`.logits` [B, T, V])."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; allowed: [B, T] token ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # [B, T]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}; allowed: the same [B, T]")
        self._row_indices(adapters, input_ids.shape[0])
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        with self.rows(adapters) as model:
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)

    @torch.no_grad()
    def generate(self, prompts_or_ids, adapters: Sequence[str | None], *, tokenizer=None,
                 attention_mask: torch.Tensor | None = None, **generation_kwargs):
        """Greedy replies, row b with adapter `adapters[b]`, in one batched pass with a KV cache.

        - prompts (strings or chat messages) with `tokenizer=`: `tinylab.model.generation.generate` (left padding,
          one completion a prompt, `temperature=0.0` unless given; keyword arguments go to it, e.g.
          `max_new_tokens`); returns its `Rollout`.
        - token ids [B, P] (left-padded, with `attention_mask`): the model's own `generate`
          (`do_sample=False` unless given; keyword arguments go to it); returns its ids [B, P + L].
        """
        if isinstance(prompts_or_ids, torch.Tensor):
            if prompts_or_ids.dim() != 2:
                raise ValueError(f"token ids of shape {tuple(prompts_or_ids.shape)}; allowed: [B, P]")
            self._row_indices(adapters, prompts_or_ids.shape[0])
            generation_kwargs.setdefault("do_sample", False)
            with self.rows(adapters) as model:
                return model.generate(input_ids=prompts_or_ids, attention_mask=attention_mask, **generation_kwargs)
        from tinylab.model.generation import generate

        if tokenizer is None:
            raise ValueError("prompts need tokenizer=...; allowed: prompts with a tokenizer, or token ids [B, P]")
        prompts = [prompts_or_ids] if isinstance(prompts_or_ids, str) else list(prompts_or_ids)
        self._row_indices(adapters, len(prompts))
        if generation_kwargs.get("n", 1) != 1 or generation_kwargs.get("batch_size") is not None:
            raise ValueError("n and batch_size are not allowed here: one completion a row, all rows in one batch")
        generation_kwargs.setdefault("temperature", 0.0)
        with self.rows(adapters) as model:
            return generate(model, tokenizer, prompts, **generation_kwargs)


def _listing(names: list[str], limit: int = 8) -> str:
    if not names:
        return "no names (the bank is empty: add() adapters first)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"one of [{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"
