"""Which prompt tokens does the reference answer depend on? Integrated gradients on the embeddings.

A thin wrapper over captum's `LLMGradientAttribution(LayerIntegratedGradients(model,
embedding layer))` (captum >= 0.7): for each answer token, integrated gradients of its
log-probability (given the prompt and the answer tokens before it) wrt the prompt's token
embeddings, from a baseline of `baseline_id` embeddings to the real ones, summed over the
embedding dimension. `scores` is the sum over answer tokens: the attribution of the whole
answer's log-probability. Parameter importance lives in `tinylab.analysis.importance`; captum has none.

Runs where the model is, in its dtype: captum's own tensors are made on the model's device, and the
returned attributions are fp32 on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from tinylab.basics.checks import check_int
from tinylab.model.batch import pad_token_id, render_prompts
from tinylab.model.device import model_device
from tinylab.model.eval_mode import eval_mode
from tinylab.model.generation import token_logprobs

__all__ = ["TokenAttribution", "token_attribution"]


class TokenAttribution(NamedTuple):
    """Attribution of a reference answer's log-probability to the prompt's tokens."""

    tokens: list[str]  # [n_in] prompt tokens as the tokenizer writes them (rendered chat template)
    scores: torch.Tensor  # [n_in] attribution of the whole answer's log-probability to each token
    answer_tokens: list[str]  # [n_out] the answer's tokens
    per_answer_token: torch.Tensor  # [n_out, n_in] attribution of each answer token's log-probability
    delta: float  # IG completeness gap: |sum of scores - (logp(answer) - logp(answer | baseline))|


def token_attribution(model: nn.Module, tokenizer, prompt, answer: str, *, n_steps: int = 16,
                      baseline_id: int | None = None, skip_tokens: list[int] | list[str] | None = None,
                      internal_batch_size: int | None = None) -> TokenAttribution:
    """Integrated-gradients attribution of `answer` (a string) to the tokens of `prompt`.

    `prompt`: a string or chat messages (rendered with the chat template and generation prompt).
    `n_steps`: integration steps (captum's default is 50; more is more exact and slower).
    `baseline_id`: the token whose embedding is the baseline (default: the pad token, else the
    end-of-sequence token, else 0).
    `skip_tokens`: token ids or strings left out of the attribution (e.g. template markers).
    """
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    if not isinstance(answer, str) or not answer:
        raise ValueError(f"answer={answer!r} is not allowed: a non-empty string")
    check_int("n_steps", n_steps, low=1)
    if internal_batch_size is not None:
        check_int("internal_batch_size", internal_batch_size, low=1)
    text = render_prompts(tokenizer, [prompt])[0]
    baseline_id = pad_token_id(tokenizer) if baseline_id is None else check_int("baseline_id", baseline_id, low=0)
    device = model_device(model)
    with torch.device("cpu"):  # captum's input lives on the CPU (its mask is built with map_, a CPU-only op)
        inp = TextTokenInput(text, tokenizer, baselines=baseline_id, skip_tokens=skip_tokens)
    answer_ids = torch.tensor(tokenizer.encode(answer, add_special_tokens=False), device=device)  # [n_out]
    # captum moves the input to the model's device but makes its own tensors (baselines, the
    # integration path's scales) on torch's default device: make that the model's for the call
    with eval_mode(model), torch.device(device):
        ig = LayerIntegratedGradients(model, model.get_input_embeddings())
        try:
            result = LLMGradientAttribution(ig, tokenizer).attribute(inp, target=answer, n_steps=n_steps,
                                                                     internal_batch_size=internal_batch_size)
        except RuntimeError as err:  # captum's path points are leaves: a forward writing into them fails
            if "leaf Variable" not in str(err):
                raise
            raise ValueError(f"{type(model).__name__} writes into its input embeddings in place (CTRL scales them), "
                             "where integrated gradients set their own; allowed: models whose forward leaves "
                             "the embeddings' output as it is") from err
        delta = _completeness_gap(model, inp, answer_ids, baseline_id, result.seq_attr)
    return TokenAttribution(list(result.input_tokens), result.seq_attr.detach().float().cpu(),
                            list(result.output_tokens), result.token_attr.detach().float().cpu(), delta)


@torch.no_grad()
def _completeness_gap(model, inp, answer_ids, baseline_id, seq_attr) -> float:
    """IG's completeness check: attributions should sum to f(input) - f(baseline)."""
    ids = inp.inp_tensor.to(answer_ids.device)  # [1, n]
    base = ids.clone()
    if inp.itp_mask is not None:
        base[inp.itp_mask.to(ids.device)] = baseline_id
    else:
        base[:] = baseline_id

    def logp(prompt_ids):
        full = torch.cat([prompt_ids, answer_ids[None]], dim=1)  # [1, n + n_out]
        logits = model(full).logits[0, prompt_ids.shape[1] - 1:-1]  # [n_out, V]
        return float(token_logprobs(logits, answer_ids).sum())

    return abs(float(seq_attr.sum()) - (logp(ids) - logp(base)))
