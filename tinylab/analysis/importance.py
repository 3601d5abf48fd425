"""Where would trained numbers move the objective? Gradient importance per module and per weight.

`module_importance` attaches an untied probe adapter (one v per module, u = r*r, so v spans every
(r, r) matrix R) and measures the gradient of the objective wrt each module's R at v = 0, where the
adapted model is exactly the base model. Forward hooks on the probe modules (observation only,
removed in `finally`) give the gradient of every *row* of the batch in one forward + backward:

    h  = x Vh^T                  # [rows, T, r]   what the module feeds into R
    gz = (dL/dy) U               # [rows, T, r]   what comes back
    dL/dR = (h^T gz * S)^T       # [rows, r, r]   because z = h R^T diag(S), y += z U^T

Per-prompt gradients are the sums over each prompt's rows; they do not depend on the probe's random P
(the probe's own `v.grad` equals their sum contracted with P, which the tests check).

Objectives (gradients of quantities to *maximize*):
- "grpo": sample `n_samples` completions per prompt, reward them with the task (None counts as 0), group-
  normalise the rewards (A = (r - mean) / (std + 1e-4); 0 when a group's rewards are all equal) and take the
  token-level policy-gradient surrogate of `tinylab.train.grpo` (importance ratio 1 at v = 0):
  J_p = sum_{i in p} A_i sum_t log pi(o_i,t) / (completion tokens of the whole batch),
  so sum_p dJ_p/dR is exactly minus the gradient of GRPO's first-step loss.
- "sft": J_p = mean_t log pi(y_t) of the reference solution (`Example.solution`, else `answer`) and the
  end-of-sequence token.

Scores per module, from the per-prompt gradients G_p = dJ_p/dR (r x r):
  `grad`        |mean_p G_p|            the batch gradient's norm (what one step would follow)
  `grad_se`     its standard error      sqrt(sum of per-entry variances / n)
  `abs_mean`    mean_p |G_p|            `abs_std` its spread over prompts
  `fisher`      mean_p |G_p|^2          (empirical Fisher trace); `fisher_std` its spread
  `consistency` |mean G|^2 / mean |G|^2 in [0, 1]: 1 when every prompt pulls the same way

`weight_importance` gives the first-order Taylor score |W * dJ_p/dW| of the frozen weights, averaged over
prompts, summed per (layer, module, head) and per (layer, module). Each linear module's per-prompt gradient
is built inside its backward hook, reduced to head sums and dropped: one (out, in) gradient at a time.

Both run where the model is, in its dtype (fp32, bf16, fp16): every tensor is made on the model's device,
the hooks' products and all sums are fp32, and the results are on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from tinylab import tasks
from tinylab.adapter.attach import apply_tinylora, check_no_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.targets import select_and_plan
from tinylab.basics.checks import check_choice, check_int, check_number
from tinylab.model.attention import AttentionBlock, head_maps
from tinylab.model.batch import teacher_forced_batch
from tinylab.model.conv1d import original
from tinylab.model.device import model_device
from tinylab.model.eval_mode import eval_mode
from tinylab.model.generation import completion_logprobs, generate

__all__ = ["OBJECTIVES", "SCORES", "Importance", "WeightImportance", "module_importance", "weight_importance"]

log = logging.getLogger(__name__)

OBJECTIVES = ("grpo", "sft")
SCORES = ("fisher", "grad", "abs_mean", "consistency")
SPREAD = {"fisher": "fisher_std", "grad": "grad_se", "abs_mean": "abs_std", "consistency": None}


class Importance(NamedTuple):
    """Gradient importance of each adapted module's R at v = 0 (see the module docstring)."""

    table: object  # pandas DataFrame indexed by (layer, module), one column per score and spread
    per_prompt: object  # pandas DataFrame [prompt, (layer, module)]: |G_p| (Frobenius norm)
    gradients: torch.Tensor  # [n_prompts, n_modules, r, r] the raw per-prompt dJ_p/dR
    modules: tuple[str, ...]  # module names, in the order of `gradients`' second axis
    objective: str  # "grpo" or "sft"
    informative: int  # prompts whose gradient is not zero (grpo: groups with unequal rewards)
    rewards: tuple[tuple[float, ...], ...]  # grpo: each prompt's group rewards; sft: ()

    def scores(self, kind: str = "fisher"):
        """One score per (layer, module) as a pandas Series (what `plan_budget` takes)."""
        if kind not in SCORES:
            raise ValueError(f"kind={kind!r} is not a score; choose one of {list(SCORES)}")
        return self.table[kind]

    def ranked(self, kind: str = "fisher"):
        """The table sorted by `kind`, highest first."""
        return self.table.sort_values(kind, ascending=False)


class WeightImportance(NamedTuple):
    """Taylor importance |W * dJ/dW| of the frozen weights, mean over prompts."""

    table: object  # DataFrame indexed by (layer, module): `taylor` (sum), `taylor_per_weight`, `taylor_std`
    heads: object  # DataFrame indexed by (layer, module, head) for q/k/v (rows) and o (columns): `taylor` (`_per_head`)
    objective: str
    informative: int

    def scores(self, kind: str = "taylor"):
        """One score per (layer, module) as a pandas Series (what `plan_budget` takes)."""
        if kind not in ("taylor", "taylor_per_weight"):
            raise ValueError(f"kind={kind!r} is not a weight score; choose one of ['taylor', 'taylor_per_weight']")
        return self.table[kind]


class _Batch(NamedTuple):
    """Rows to score: prompt then completion, the weight of each row's summed log-probs, its prompt."""

    input_ids: torch.Tensor  # [R, P+L]
    attention_mask: torch.Tensor  # [R, P+L]
    completion_mask: torch.Tensor  # [R, L]
    weight: torch.Tensor  # [R] coefficient of the row's summed token log-probs in J_p
    prompt: torch.Tensor  # [R] long: index of the row's prompt
    rewards: tuple[tuple[float, ...], ...]
    temperature: float = 1.0  # grpo: log-probs of the distribution the completions were sampled from


def _check(objective, n_prompts, n_samples, batch_size, temperature):
    check_choice("objective", objective, OBJECTIVES)
    check_number("temperature", temperature, low=0, low_open=True)  # grpo samples from it
    check_int("n_prompts", n_prompts, low=1)
    check_int("n_samples", n_samples, low=2)
    check_int("batch_size", batch_size, low=1)


def _advantages(rewards: Sequence[float]) -> list[float]:
    """(r - group mean) / (group std + 1e-4), as `tinylab.train.grpo` with scale_rewards="group"."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [0.0 if std == 0 else (r - mean) / (std + 1e-4) for r in rewards]


def _grpo_batch(model, tokenizer, task, examples, n_samples, max_new_tokens, temperature, seed) -> _Batch:
    device = model_device(model)
    rollout = generate(model, tokenizer, [e.prompt for e in examples], n=n_samples,
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    answers = [e.answer for e in examples for _ in range(n_samples)]
    rewards = [0.0 if r is None else float(r) for r in task.reward(rollout.completions, answers)]
    if len(rewards) != len(answers):
        raise ValueError(f"task {getattr(task, 'name', task)!r} returned {len(rewards)} rewards for "
                         f"{len(answers)} completions")
    n_tokens = float(rollout.completion_mask.sum().clamp(min=1))
    groups = [tuple(rewards[p * n_samples:(p + 1) * n_samples]) for p in range(len(examples))]
    weight = [a / n_tokens for group in groups for a in _advantages(group)]
    prompt = torch.arange(len(examples), device=device).repeat_interleave(n_samples)  # [B*G]
    return _Batch(rollout.input_ids.to(device), rollout.attention_mask.to(device), rollout.completion_mask.to(device),
                  torch.tensor(weight, dtype=torch.float32, device=device), prompt, tuple(groups), float(temperature))


def _sft_batch(tokenizer, examples, device: torch.device) -> _Batch:
    eos = tokenizer.eos_token_id
    targets = [tokenizer(str(e.solution if e.solution is not None else e.answer), add_special_tokens=False)["input_ids"]
               + ([eos] if eos is not None else []) for e in examples]
    batch = teacher_forced_batch(tokenizer, [e.prompt for e in examples], targets, device)
    weight = 1.0 / batch.continuation_mask.sum(1).clamp(min=1).float()  # [B]
    prompt = torch.arange(len(examples), device=device)  # [B]
    return _Batch(batch.input_ids, batch.attention_mask, batch.continuation_mask, weight, prompt, ())


def _make_batch(model, tokenizer, task, objective, n_prompts, n_samples, max_new_tokens, temperature, seed):
    examples = task.examples("train", n_prompts, seed)
    if not examples:
        raise ValueError(f"task {getattr(task, 'name', task)!r} gave no training examples")
    if objective == "sft":
        return _sft_batch(tokenizer, examples, model_device(model))
    max_new_tokens = max_new_tokens or getattr(task, "max_new_tokens", 32)
    return _grpo_batch(model, tokenizer, task, examples, n_samples, max_new_tokens, temperature, seed)


def _backward(model, batch: _Batch, batch_size: int, state: dict) -> None:
    """Forward + backward of sum_rows weight * sum_t log pi, `batch_size` rows at a time.
    `state["rows"]` holds the prompt index of the rows in flight, for the hooks."""
    rows = batch.input_ids.shape[0]
    live = (batch.weight != 0).nonzero().squeeze(1)  # rows with zero weight add nothing
    for start in range(0, len(live), batch_size):
        idx = live[start:start + batch_size]
        ids, mask, cmask = batch.input_ids[idx], batch.attention_mask[idx], batch.completion_mask[idx]
        keep = int((mask.sum(0) > 0).nonzero()[0])  # drop all-padding columns on the left
        state["rows"] = batch.prompt[idx]
        logp = completion_logprobs(model, ids[:, keep:], mask[:, keep:], cmask, temperature=batch.temperature)
        if not logp.requires_grad:  # no adapted map on the text path
            raise ValueError("no adapted module takes part in the model's text forward; allowed: targets in its "
                             "language decoder's blocks (not an image encoder's)")
        (logp.sum(1) * batch.weight[idx]).sum().backward()
    state["rows"] = None
    if rows and not len(live):
        log.warning("every row has zero weight (all groups had equal rewards): the gradients are all zero")


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], on_output):
    """Forward hooks that hand (name, module, input, output) to `on_output`; removed in finally."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: on_output(name, mod, args[0], out)))
        yield
    finally:
        for h in handles:
            h.remove()


def _frame(values: dict[str, torch.Tensor], infos: list[tuple[str, int, str]], names=("layer", "module")):
    import pandas as pd

    index = pd.MultiIndex.from_tuples([(layer, kind) for _, layer, kind in infos], names=list(names))
    return pd.DataFrame({k: v.double().numpy() for k, v in values.items()}, index=index)


def module_importance(model: nn.Module, tokenizer, task, *, n_prompts: int = 16, objective: str = "grpo",
                      seed: int = 0, r: int = 2, n_samples: int = 4, max_new_tokens: int | None = None,
                      temperature: float = 1.0, batch_size: int = 16) -> Importance:
    """Gradient importance of every q,k,v,o,gate,up,down module's R at v = 0 (see module docstring).

    `task`: anything with `examples(split, n, seed)` and `reward(completions, answers)`. grpo uses
    `n_samples` completions of up to `max_new_tokens` (default `task.max_new_tokens`) per prompt.
    `batch_size`: rows per forward/backward. The model is left exactly as it was.
    """
    task = tasks.resolve(task)
    _check(objective, n_prompts, n_samples, batch_size, temperature)
    check_no_adapter(model, because="importance probes the base model")
    with eval_mode(model):
        batch = _make_batch(model, tokenizer, task, objective, n_prompts, n_samples, max_new_tokens, temperature, seed)
        n = len(batch.rewards) if objective == "grpo" else batch.input_ids.shape[0]
        probe = apply_tinylora(model, TinyLoRAConfig(r=r, u=r * r, n_tie=1, seed=seed))
        try:
            wrapped = dict(probe.named_modules())
            names = list(wrapped)
            slot = {name: i for i, name in enumerate(names)}
            # fp32 on the model's device whatever the model's dtype: the hooks' products are exact
            # to fp32 even when the model runs in bf16 or fp16
            grads = torch.zeros(n, len(names), r, r, dtype=torch.float32, device=model_device(model))  # [N, M, r, r]
            scale = torch.zeros(len(names), r, r, dtype=torch.float32, device=grads.device)  # [M, r, r]
            state = {"rows": None}

            def on_output(name, mod, x, y):
                if not y.requires_grad or state["rows"] is None:
                    return
                rows, US = state["rows"], mod.U.float() * mod.S.float()  # [b], (out, r)
                x = x.detach().reshape(len(rows), -1, x.shape[-1])  # [b, T, in]: OPT feeds fc1/fc2 flattened
                h = nn.functional.linear(x.float(), mod.Vh.float())  # [b, T, r]

                def on_grad(g):
                    g = g.detach().float().reshape(len(rows), -1, g.shape[-1])  # [b, T, out]
                    dM = torch.einsum("btr,bts->brs", h, g @ US).to(grads.device)  # [b, r, r] dJ/dM * S
                    grads[:, slot[name]].index_add_(0, rows, dM.transpose(1, 2))  # dJ/dR per prompt
                    scale[slot[name]] += torch.einsum("btr,bts->sr", h.abs(), g.abs() @ US.abs()).to(scale.device)

                y.register_hook(on_grad)

            with _hooks(wrapped, on_output), torch.enable_grad():
                _backward(model, batch, batch_size, state)
            probe_grad = {name: mod.v.grad for name, mod in wrapped.items()}
            probe_P = {name: mod.P.detach().clone() for name, mod in wrapped.items()}
            dtypes = {name: mod.U.dtype for name, mod in wrapped.items()}
        finally:
            probe.remove()
    infos = [(m.name, m.layer, m.kind) for m in probe.modules]
    _check_probe(grads, scale, names, probe_grad, probe_P, dtypes)
    return _summarise(grads.cpu().double(), infos, objective, batch.rewards)


def _check_probe(grads, scale, names, probe_grad, probe_P, dtypes) -> None:
    """The hooks' per-prompt gradients must add up to the probe's own v.grad (cheap self-check).

    The probe computes its v.grad in the model's dtype: each entry of dJ/d(U diag(S) R) = h^T g
    rounds h = x Vh^T and the product once each (relative error eps of the dtype each, with the
    sum over tokens accumulated in fp32), so the v.grad entry u may be off by up to about
    2 eps * sum |P_u| |U diag(S)|^T |h|^T |g|, which `scale` holds without P. The hooks' own
    fp32 error is far below that. 16x the bound leaves room for GPU matmuls that also round
    partial sums (e.g. split-K); a hook that missed a call, or saw one twice, is off by a whole
    term, far more than eps of it.
    """
    for i, name in enumerate(names):
        if probe_grad[name] is None:
            continue
        expected = torch.einsum("nrs,urs->u", grads[:, i], probe_P[name].float())  # (u,)
        bound = 16 * torch.finfo(dtypes[name]).eps * torch.einsum("rs,urs->u", scale[i], probe_P[name].abs().float())
        gap = (expected - probe_grad[name].float()).abs()  # (u,)
        if (gap > bound).any():
            worst = int((gap - bound).argmax())
            raise RuntimeError(f"per-prompt gradients of {name} do not add up to the probe's gradient: entry {worst} "
                               f"differs by {float(gap[worst]):.3g}, more than the {dtypes[name]} rounding bound "
                               f"{float(bound[worst]):.3g}; a module the probe wraps ran a path its hooks do not see")


def _summarise(grads: torch.Tensor, infos, objective: str, rewards) -> Importance:
    import pandas as pd

    n = grads.shape[0]
    flat = grads.flatten(2)  # [N, M, r*r]
    norms = flat.norm(dim=2)  # [N, M]
    mean = flat.mean(0)  # [M, r*r]
    var = flat.var(0, correction=1) if n > 1 else torch.zeros_like(mean)  # [M, r*r]
    sq = norms**2  # [N, M]
    std = (lambda t: t.std(0, correction=1)) if n > 1 else (lambda t: torch.zeros_like(t[0]))
    table = _frame({
        "fisher": sq.mean(0), "fisher_std": std(sq),
        "grad": mean.norm(dim=1), "grad_se": (var.sum(1) / n).sqrt(),
        "abs_mean": norms.mean(0), "abs_std": std(norms),
        "consistency": mean.norm(dim=1) ** 2 / sq.mean(0).clamp(min=1e-300),
    }, infos)
    columns = pd.MultiIndex.from_tuples([(layer, kind) for _, layer, kind in infos], names=["layer", "module"])
    per_prompt = pd.DataFrame(norms.numpy(), columns=columns)
    per_prompt.index.name = "prompt"
    informative = int((norms.sum(1) > 0).sum())
    return Importance(table, per_prompt, grads, tuple(name for name, _, _ in infos), objective, informative,
                      tuple(rewards))


def _per_head(block: AttentionBlock, parts: tuple[str, ...], taylor: torch.Tensor) -> torch.Tensor:
    """[N, out, in] Taylor scores of one attention map -> [N, units]: per head H the output map's columns
    or the query rows; per KV head a separate key or value map's rows; a fused map (q, k and v) per query
    head: its query rows plus its KV group's key and value rows shared evenly by the group's heads (the
    heads sum to the map's total either way). Rows and columns are `block`'s (`AttentionBlock.rows`)."""
    n, H, d = taylor.shape[0], block.n_heads, block.head_dim
    if parts == ("o",):
        return taylor.reshape(n, taylor.shape[1], H, d).sum((1, 3))  # [N, H]
    by_row = taylor.sum(2)  # [N, out]
    sums = {part: by_row[:, block.rows(part)[1].to(by_row.device)].sum(-1) for part in parts}  # [N, units]
    if len(parts) == 1:
        return sums[parts[0]]
    return sums["q"] + (sums["k"] + sums["v"]).repeat_interleave(block.group, dim=1) / block.group  # [N, H]


def weight_importance(model: nn.Module, tokenizer, task, *, n_prompts: int = 8, objective: str = "sft",
                      seed: int = 0, n_samples: int = 4, max_new_tokens: int | None = None,
                      temperature: float = 1.0, batch_size: int = 16) -> WeightImportance:
    """Taylor score |W * dJ_p/dW| of every q,k,v,o,gate,up,down weight, mean over prompts, per head.

    Same objectives and arguments as `module_importance`. Works with or without an adapter attached
    (it scores the weights of the model as it is); the model is left as it was."""
    task = tasks.resolve(task)
    import pandas as pd

    _check(objective, n_prompts, n_samples, batch_size, temperature)
    maps = head_maps(model)  # module name -> (block, parts) for the attention maps
    device = model_device(model)
    with eval_mode(model):
        batch = _make_batch(model, tokenizer, task, objective, n_prompts, n_samples, max_new_tokens, temperature, seed)
    n = len(batch.rewards) if objective == "grpo" else batch.input_ids.shape[0]
    chosen, planned = select_and_plan(model, TinyLoRAConfig(), warn=False)  # the default adapter's maps
    linears = {name: lin for name, lin, _ in chosen}
    infos = [(m.name, m.layer, m.kind) for m in planned]
    totals = {name: torch.zeros(n, dtype=torch.float32, device=device) for name in linears}  # [N] per module
    per_head: dict[str, torch.Tensor] = {}
    state = {"rows": None}

    def on_output(name, mod, x, y):
        if not y.requires_grad or state["rows"] is None:
            return
        x, W = x.detach(), linears[name].weight.detach()  # (out, in), also for a Conv1D's view
        rows = state["rows"].to(x.device)  # [b] on the module's device (a model split by device_map)
        x = x.reshape(len(rows), -1, x.shape[-1])  # [b, t, in]: OPT feeds fc1/fc2 flattened (b*t, in)

        def on_grad(g):
            g = g.reshape(len(rows), -1, g.shape[-1])  # [b, t, out]
            prompts = rows.unique()
            G = torch.stack([torch.einsum("bto,bti->oi", g[rows == p].float(), x[rows == p].float())
                             for p in prompts])  # [n_p, out, in] fp32, one module at a time
            taylor = (G * W.float()).abs()  # [n_p, out, in]
            totals[name].index_add_(0, prompts.to(device), taylor.sum((1, 2)).to(device))
            if name in maps:
                split = _per_head(*maps[name], taylor)  # [n_p, units]
                per_head.setdefault(name, torch.zeros(n, split.shape[1], dtype=torch.float32, device=device))
                per_head[name].index_add_(0, prompts.to(device), split.to(device))

        y.register_hook(on_grad)

    embed = model.get_input_embeddings()
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        # activations require grad from a copy of the embeddings' output on (CTRL scales it in place)
        grad_from_here = embed.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_().clone())
        try:
            hooked = {name: original(lin) for name, lin in linears.items()}  # a Conv1D, not a fresh view of it
            with _hooks(hooked, on_output), torch.enable_grad(), eval_mode(model):
                _backward(model, batch, batch_size, state)
        finally:
            grad_from_here.remove()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    sizes = {name: linears[name].weight.numel() for name in linears}
    totals = {name: t.cpu().double() for name, t in totals.items()}  # [N] each
    table = _frame({
        "taylor": torch.stack([totals[nm].mean() for nm, _, _ in infos]),
        "taylor_std": torch.stack([totals[nm].std() if n > 1 else totals[nm].new_zeros(()) for nm, _, _ in infos]),
        "taylor_per_weight": torch.stack([totals[nm].mean() / sizes[nm] for nm, _, _ in infos]),
    }, infos)
    rows = [(layer, kind, h, float(v)) for name, layer, kind in infos if name in per_head
            for h, v in enumerate(per_head[name].cpu().double().mean(0).tolist())]
    head_table = pd.DataFrame(rows, columns=["layer", "module", "head", "taylor"]).set_index(["layer", "module", "head"])
    informative = int(sum(t > 0 for t in torch.stack(list(totals.values())).sum(0)))
    return WeightImportance(table, head_table, objective, informative)
