"""How prompts and continuations become token batches: rendering, padding, teacher forcing.

Every module that turns text into model input asks this one: generation (`tinylab.model.generation`),
SFT batches, importance probes and head analyses, so a prompt is tokenized the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["TeacherBatch", "left_pad", "pad_token_id", "positions_of", "prompt_rows", "render_prompts", "right_pad",
           "teacher_forced_batch"]


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt)


def render_prompts(tokenizer, prompts: Sequence) -> list[str]:
    """Each prompt as the text the model sees: chat messages through the chat template (with the
    generation prompt), strings unchanged."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts must be a list of prompts (each a string or a list of chat messages)")
    texts = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
        elif is_chat(prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"prompt {i} is a list of chat messages but the tokenizer has no chat template; "
                    "pass plain strings or set tokenizer.chat_template"
                )
            texts.append(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
        else:
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}; allowed: a string or a list of chat messages")
    return texts


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def prompt_rows(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Token ids of each rendered prompt (chat template for message lists; special tokens for strings)."""
    texts = render_prompts(tokenizer, prompts)
    rows = [
        tokenizer(text, add_special_tokens=not is_chat(prompt))["input_ids"] for text, prompt in zip(texts, prompts)
    ]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt renders to zero tokens; give every prompt some text")
    return rows


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids, padded on the left to one width: (ids, attention mask), both [B, P], on `device`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")  # [B, P]
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")  # [B, P]
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids, padded on the right to one width: (ids, mask), both [B, L], on `device`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")  # [B, L]
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")  # [B, L]
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


class TeacherBatch(NamedTuple):
    """Prompts (left-padded) followed by given continuations (right-padded), ready for one forward."""

    input_ids: torch.Tensor  # [B, P+L] long
    attention_mask: torch.Tensor  # [B, P+L] long, 0 on padding
    continuation_mask: torch.Tensor  # [B, L] long, 1 on continuation tokens


def teacher_forced_batch(tokenizer, prompts: Sequence, continuations: Sequence[Sequence[int]],
                         device: torch.device | str = "cpu") -> TeacherBatch:
    """The one way a prompt and a continuation (token ids) become a batch, on `device`.

    Prompts are rendered as generation renders them (`prompt_rows`), so continuation token j sits at
    the position generation would have sampled it; score it with `tinylab.model.generation.completion_logprobs`.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations; give one each")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("a continuation has zero tokens; give every continuation at least one token")
    pad = pad_token_id(tokenizer)
    prompt_ids, prompt_mask = left_pad(prompt_rows(tokenizer, prompts), pad, device)  # [B, P]
    cont_ids, cont_mask = right_pad([list(c) for c in continuations], pad, device)  # [B, L]
    return TeacherBatch(torch.cat([prompt_ids, cont_ids], 1), torch.cat([prompt_mask, cont_mask], 1), cont_mask)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of a left-padded attention mask [B, T]: 0 at each row's first real token
    (padding takes 0 too), as generation and scoring number them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
