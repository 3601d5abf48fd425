"""Sampling completions and scoring their tokens: the two model calls every RL step makes.

`generate` renders the prompts (chat template with the generation prompt, or the raw string),
left-pads them, runs each unique prompt through the model once, copies its KV cache `n` times
(into a preallocated `StaticCache` where the model allows, so a decoded token is written in place;
a hybrid model's recurrent state, which transformers cannot copy, is made by running each prompt
once per completion instead)
and samples the `n` completions token by token from a seeded `torch.Generator` (so a seed gives
the same completions in any process and leaves the global RNG alone). A completion stops at the
first end-of-sequence token, which it keeps (the policy has to learn to stop, too).

Where the randomness lives: the generator is always a CPU generator, and each token is drawn on
the CPU from the fp32 probabilities copied there (`draw`: one uniform number per row). A seed
therefore gives the same random stream whatever the model's device and whatever torch's default
device; the completions agree across devices as far as the models' logits agree (a GPU's bf16
logits differ from a CPU's fp32 ones in the last bits, and a token can flip where two are nearly
tied). The price on a GPU is one [rows, vocab] fp32 copy to the host per generated token; everything else
(the model calls, the cache, the masks) stays on the model's device.

`completion_logprobs` scores completion tokens under the model with the positions generation
used, so the two agree up to float rounding; where the model's logits are its output head's plain
output, through the fused head of `tinylab.model.head_logprobs`, which never holds [tokens, vocab] logits.

Shapes: B prompts, G = n completions each, P prompt tokens (left-padded), L completion tokens
(right-padded). Row order of every output is prompt-major: prompt 0's n completions, then
prompt 1's, ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from tinylab.basics.checks import check_int, check_number
from tinylab.model.batch import left_pad, pad_token_id, positions_of, prompt_rows, render_prompts
from tinylab.model.device import model_device
from tinylab.model.eval_mode import eval_mode
from tinylab.model.head_logprobs import head_scorer
from tinylab.model.kv_cache import (
    cache_argument,
    decoding_cache,
    decoding_mask,
    prefill,
    repeat_rows,
    static_length,
)

__all__ = ["Rollout", "completion_logprobs", "draw", "generate", "greedy_from_prefill", "render_prompts",
           "stop_token_ids", "token_logprobs"]  # render_prompts: tinylab.model.batch's, re-exported


class Rollout(NamedTuple):
    """Completions sampled for a batch of prompts (rows are prompt-major: p0 x n, p1 x n, ...)."""

    completions: list[str]  # [B*G] decoded text, special tokens removed
    prompt_ids: torch.Tensor  # [B*G, P] long, left-padded
    completion_ids: torch.Tensor  # [B*G, L] long, right-padded; the EOS token is kept
    completion_mask: torch.Tensor  # [B*G, L] long, 1 up to and including EOS
    prompt_mask: torch.Tensor  # [B*G, P] long, 0 on left padding
    token_entropy: torch.Tensor | None = None  # [B*G, L] fp32: entropy (nats) of the distribution each
    # completion token was drawn from (softmax of logits / temperature), 0 where masked; None when greedy

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [B*G, P+L]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # [B*G, P+L]


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The token ids that end a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an end-of-sequence token")
    return sorted(ids)


def _context_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator):
    """(one token per row [B], the entropy in nats of the distribution it was drawn from [B] fp32), on
    the logits' device: argmax and no entropy (None) at temperature 0, else drawn on the CPU from the
    CPU `generator` (`draw`) from softmax(logits / temperature), whose entropy is
    logsumexp(z) - sum(p * z)."""
    if temperature == 0:
        return logits.argmax(-1), None  # [B]
    scaled = logits.float() if temperature == 1 else logits.float() / temperature  # [B, V]
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    entropy = torch.logsumexp(scaled, dim=-1) - torch.linalg.vecdot(probs, scaled)  # [B]
    return draw(probs.cpu(), generator).to(logits.device), entropy  # [B], [B]


def draw(probs: torch.Tensor, generator: torch.Generator, block: int = 256) -> torch.Tensor:
    """One index per row of `probs` [B, V] (CPU, non-negative, rows need not sum to 1), drawn with
    probability proportional to its entry, from one uniform number per row of the CPU `generator`:
    the inverse of the cumulative distribution, in fp64, in two levels (sums of blocks of `block`
    entries, then the chosen block's entries). `torch.multinomial` draws one random number per entry
    and row instead, most of a decoding step's sampling time at a 50k vocabulary. An entry of 0 is
    never drawn; a row with a NaN or inf entry, or summing to 0, is a ValueError. Returns [B] long
    on the CPU."""
    rows, size = probs.shape
    blocks = -(-size // block)
    padded = probs if size == blocks * block else nn.functional.pad(probs, (0, blocks * block - size))  # [B, nb*block]
    padded = padded.reshape(rows, blocks, block)  # [B, nb, block]
    cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, nb]
    total = cdf[:, -1]  # [B]: NaN or inf if any entry is (a diverged model's logits)
    if not (torch.isfinite(total) & (total > 0)).all():
        bad = int((~(torch.isfinite(total) & (total > 0))).nonzero()[0])
        raise ValueError(f"row {bad} of the probabilities sums to {float(total[bad])}; allowed: finite, non-negative "
                         "entries with a positive sum (non-finite logits?)")
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64, device="cpu") * cdf[:, -1:]  # [B, 1]
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=blocks - 1)  # [B, 1]: first block with cdf > u
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(u))  # [B, 1]
    share = ((u - before) / (cdf.gather(1, b) - before)).clamp_(0, 1)  # [B, 1]: where u falls in block b
    inner = padded.gather(1, b[:, :, None].expand(rows, 1, block)).squeeze(1).cumsum(-1, dtype=torch.float64)  # [B, block]
    t = torch.searchsorted(inner, share * inner[:, -1:], right=True)  # [B, 1]: first entry with cdf > u
    last = (inner < inner[:, -1:]).sum(-1, keepdim=True)  # [B, 1]: the block's last non-zero entry
    return (b * block + torch.minimum(t, last)).squeeze(-1)  # [B]


@torch.no_grad()
def _generate_chunk(model, ids, mask, n, max_new_tokens, temperature, generator, stops, pad_id,
                    prefilled=None):
    """Prefill the unique prompts once and repeat their cache n times (or take `prefilled`, with
    n = 1: the cache and last logits [b, V] of that prefill, already run), then decode token by token. Every row
    stays in the batch to the end: a model wrapped per row (`AdapterBank.rows`) needs its rows fixed."""
    cache_kw = cache_argument(model)
    if prefilled is None:
        keep = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row
        ids, mask = ids[:, keep:], mask[:, keep:]  # [b, p]
        out, cache = prefill(model, ids, mask)
        if n > 1 and not repeat_rows(cache, n):  # a recurrent state that cannot be copied: one row per completion
            ids, mask, n = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), 1  # [b*n, p]
            out, cache = prefill(model, ids, mask)
        prefilled = cache, out.logits[:, -1]  # [b, V]
    cache, logits = prefilled
    cache = decoding_cache(model, cache, max_new_tokens)
    full_length = static_length(cache)  # None unless the cache is static
    logits = logits.repeat_interleave(n, dim=0)  # [b*n, V]
    mask = mask.repeat_interleave(n, dim=0)  # [b*n, p]
    position = positions_of(mask)[:, -1:]  # [b*n, 1]
    stops = torch.tensor(stops, dtype=torch.long, device=mask.device)  # [s]
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)  # [b*n]
    tokens, entropies = [], []
    for t in range(max_new_tokens):
        token, entropy = _sample(logits, temperature, generator)  # [b*n], [b*n] or None
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        entropies.append(entropy)
        done = done | torch.isin(token, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [b*n, p+t+1]
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=decoding_mask(mask, full_length), position_ids=position,
                    use_cache=True, **{cache_kw: cache})
        logits = out.logits[:, -1]  # [b*n, V]
    completion = torch.stack(tokens, dim=1)  # [b*n, l]
    is_stop = torch.isin(completion, stops)  # [b*n, l]
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # tokens after the first stop token
    completion_mask = (~after_stop).long()  # [b*n, l]
    completion = completion.masked_fill(after_stop, pad_id)
    entropy = None if temperature == 0 else torch.stack(entropies, dim=1).masked_fill(after_stop, 0.0)  # [b*n, l]
    return completion, completion_mask, entropy


def generate(model: nn.Module, tokenizer, prompts: Sequence, *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, seed: int | None = None, batch_size: int | None = None) -> Rollout:
    """Sample `n` completions for every prompt (temperature 0 is greedy).

    `prompts`: strings or lists of chat messages. `seed`: seeds a private `torch.Generator`
    (None draws one from the global RNG). `batch_size`: completions decoded together, rounded
    down to whole groups of `n` (at least one group); None decodes everything at once.
    """
    check_int("n", n, low=1)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_number("temperature", temperature, low=0)  # 0 = greedy
    if batch_size is not None:
        check_int("batch_size", batch_size, low=1)
    prompts = list(prompts) if not isinstance(prompts, str) else prompts
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    ids, mask = left_pad(prompt_rows(tokenizer, prompts), pad_id, device)  # [B, P] on the model's device
    context = _context_length(model)
    longest = int(mask.sum(1).max())
    if context is not None and longest >= context:
        raise ValueError(
            f"a prompt of {longest} tokens leaves no room in the model's context of {context} tokens; allowed: "
            f"prompts of at most {context - 1} tokens (shorten the prompt)"
        )
    if context is not None and longest + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{context} tokens; shorten the prompt or lower max_new_tokens to at most {context - longest}"
        )
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
    generator = torch.Generator(device="cpu").manual_seed(int(seed))  # CPU, whatever the model's device
    stops = stop_token_ids(model, tokenizer)
    per_chunk = len(prompts) if batch_size is None else max(1, batch_size // n)
    with eval_mode(model):
        parts = [
            _generate_chunk(model, ids[i:i + per_chunk], mask[i:i + per_chunk], n, max_new_tokens, temperature,
                            generator, stops, pad_id)
            for i in range(0, len(prompts), per_chunk)
        ]
    width = max(c.shape[1] for c, _, _ in parts)
    completion_ids = torch.cat([nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c, _, _ in parts])
    completion_mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1]), value=0) for _, m, _ in parts])
    entropy = None if temperature == 0 else torch.cat(
        [nn.functional.pad(e, (0, width - e.shape[1]), value=0.0) for _, _, e in parts])  # [B*G, L]
    texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad_id), skip_special_tokens=True)
    return Rollout(
        completions=texts,
        prompt_ids=ids.repeat_interleave(n, dim=0),  # [B*G, P]
        completion_ids=completion_ids,  # [B*G, L]
        completion_mask=completion_mask,  # [B*G, L]
        prompt_mask=mask.repeat_interleave(n, dim=0),  # [B*G, P]
        token_entropy=entropy,  # [B*G, L] or None (greedy)
    )


def greedy_from_prefill(model: nn.Module, tokenizer, cache, logits: torch.Tensor, mask: torch.Tensor, *,
                        max_new_tokens: int, decoded: torch.Tensor | None = None) -> list[str]:
    """Greedy replies continuing a prefill the caller already ran (e.g. in the forward that scored
    the same prompts): `cache` holds the left-padded prompts' keys and values, `mask` [B, P] is their
    attention mask and `logits` [B, V] the last prompt position's. The same decoding as
    `generate(..., temperature=0)`, without running the prompts again; `cache` is spent (decoding may
    grow it, or copy it into a `decoding_cache`).

    `decoded` [B, m] (m < max_new_tokens): the first m reply tokens, already in the prefill (its last m
    positions, which `mask` [B, P+m] covers; none of them a stop token) and `logits` the last one's:
    the greedy tokens a teacher-forced forward found equal to the tokens it was given. The replies
    are these tokens and what decoding adds after them, `max_new_tokens` in all."""
    check_int("max_new_tokens", max_new_tokens, low=1)
    if logits.dim() != 2 or mask.dim() != 2 or logits.shape[0] != mask.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)}: expected [B, V] and [B, P]")
    stops, pad_id = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    if decoded is None:
        decoded = torch.zeros(mask.shape[0], 0, dtype=torch.long, device=mask.device)  # [B, 0]
    m = decoded.shape[1] if decoded.dim() == 2 and decoded.shape[0] == mask.shape[0] else -1
    if not 0 <= m < max_new_tokens or m >= mask.shape[1]:
        raise ValueError(f"decoded {tuple(decoded.shape)}: expected [B, m] with B = {mask.shape[0]} rows and "
                         f"m < max_new_tokens = {max_new_tokens} tokens, the last m of the prefill")
    if torch.isin(decoded, torch.tensor(stops, device=decoded.device)).any():
        raise ValueError(f"decoded holds a stop token {stops}: a reply ends there, nothing is decoded after it")
    with eval_mode(model):
        ids, kept, _ = _generate_chunk(model, None, mask, 1, max_new_tokens - m, 0.0, None, stops, pad_id,
                                       prefilled=(cache, logits))  # [B, l]
    ids, kept = torch.cat([decoded, ids], dim=1), torch.cat([torch.ones_like(decoded), kept], dim=1)  # [B, m+l]
    return tokenizer.batch_decode(ids.masked_fill(kept == 0, pad_id), skip_special_tokens=True)


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, *, temperature: float = 1.0, group_size: int = 1) -> torch.Tensor:
    """Log-probability of each completion token under `model` (differentiable), zero where masked.

    `input_ids` / `attention_mask`: [B, P+L] prompt then completion (as `Rollout.input_ids`);
    `completion_mask`: [B, L]. Returns [B, L]. Logits are divided by `temperature` (> 0), the
    distribution the tokens were sampled from. `group_size` > 1: consecutive rows share their
    prompt (as `generate(..., n=group_size)` returns them); each prompt then runs through the model
    once and its KV cache (gradients included) is repeated for the group, which saves the
    prompt's share of the compute G-1 times over. Same values up to float rounding. A model whose
    cache holds a recurrent state that cannot be repeated (a hybrid model's linear-attention or
    state-space layers) runs every row whole instead. Where `head_logprobs.head_scorer` takes the
    model, the forward hands over its last hidden states and no [B, L, V] logits are made or kept.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [B, P+L]")
    B, L = completion_mask.shape
    if B != input_ids.shape[0] or not 0 < L < input_ids.shape[1]:
        raise ValueError(f"completion_mask {tuple(completion_mask.shape)} does not fit input_ids "
                         f"{tuple(input_ids.shape)}: expected [B, L] with 0 < L < P+L")
    check_number("temperature", temperature, low=0, low_open=True)  # log-probabilities need > 0
    check_int("group_size", group_size, low=1)
    if B % group_size:
        raise ValueError(f"group_size={group_size!r}: must divide the {B} rows (consecutive rows share a prompt)")
    positions = positions_of(attention_mask)  # [B, P+L]
    score = _scoring(model)
    with score.outputs():
        logprobs = None
        if group_size > 1:  # None where the prompt's cache cannot be shared (a hybrid model's recurrent state)
            logprobs = _shared_prompt_logprobs(model, input_ids, attention_mask, positions, L, group_size,
                                               temperature, score)
        if logprobs is None:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                        logits_to_keep=L + 1)
            outputs = out.logits[:, -(L + 1):-1]  # [B, L, V or d]: a model may give more than it was asked for (TrOCR)
            logprobs = score.logprobs(outputs, input_ids[:, -L:], temperature)  # [B, L]
    return logprobs * completion_mask.to(logprobs.dtype)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature), fp32 whatever the logits' dtype: logits
    [..., V], targets [...] long -> [...]. One fused log-softmax and pick (`F.cross_entropy`), whose
    backward is one pass over the logits. Targets [..., k] (the logits' rank): k targets under each
    row's one distribution -> [..., k]."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if targets.dim() == logits.dim():
        return logits.log_softmax(-1).gather(-1, targets)  # [..., k]
    flat = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return -flat.view(targets.shape)


class _Plain:
    """Scoring from the model's logits (`token_logprobs`), for a model `head_scorer` does not take."""

    outputs = staticmethod(contextlib.nullcontext)
    logprobs = staticmethod(token_logprobs)


def _scoring(model: nn.Module):
    """How `completion_logprobs` turns the forward's outputs into log-probabilities: the fused head
    (`tinylab.model.head_logprobs`: `outputs()` makes the forward give the head's input, no [N, V] logits)
    where the model allows it, else its logits."""
    return head_scorer(model) or _Plain


def _shared_prompt_logprobs(model, input_ids, attention_mask, positions, L, g, temperature, score) -> torch.Tensor | None:
    """Log-probabilities of the last L tokens [B, L], running each group's shared prompt once; None
    when the prompt's cache cannot be repeated for the group."""
    P = input_ids.shape[1] - L
    prompt_ids, prompt_mask = input_ids[::g, :P], attention_mask[::g, :P]  # [B/G, P]
    if not (torch.equal(input_ids[:, :P], prompt_ids.repeat_interleave(g, dim=0))
            and torch.equal(attention_mask[:, :P], prompt_mask.repeat_interleave(g, dim=0))):
        raise ValueError(f"group_size={g} but rows within a group have different prompts; "
                         "pass group_size=1 or rows in prompt-major order")
    out, cache = prefill(model, prompt_ids, prompt_mask)
    if L > 1 and not repeat_rows(cache, g):
        return None  # a recurrent state (hybrid model): the caller runs every row whole
    B = input_ids.shape[0]
    first = out.logits[:, -1]  # [B/G, V or d]: the group's shared outputs for completion token 0
    first = score.logprobs(first, input_ids[:, P].view(-1, g), temperature).view(B, 1)  # [B, 1]: G targets a row
    if L == 1:
        return first
    out = model(input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
                position_ids=positions[:, P:-1], use_cache=True, **{cache_argument(model): cache})
    rest = score.logprobs(out.logits, input_ids[:, P + 1:], temperature)  # [B, L-1]
    return torch.cat([first, rest], dim=1)  # [B, L]
