"""Prompt tokenisation and encoding, with optional per-token input-embedding overrides.

DPL learns a replacement for the input embedding of chosen word tokens at every step. Rather than
growing the vocabulary with placeholder tokens (the original code's approach), we substitute the
vectors at the output of the token-embedding layer, before position embeddings are added. That
keeps the text encoder frozen and untouched, and gradients reach only the given vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from transformers import CLIPTokenizer

from dpl_edit.engine.model import LoadedModel
from dpl_edit.errors import DplError

TokenVectors = Mapping[tuple[int, int], torch.Tensor]
"""(prompt index, token position) -> replacement input-embedding vector."""


def prompt_tokens(tokenizer: CLIPTokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt with BOS/EOS and no padding; refuses prompts that do not fit."""
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = int(tokenizer.model_max_length)
    if len(ids) > limit:
        raise DplError(
            f"prompt '{prompt}' is {len(ids) - 2} tokens long; this model allows at most "
            f"{limit - 2}"
        )
    return ids


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Padded token ids [len(prompts), model_max_length]."""
    for prompt in prompts:
        prompt_tokens(tokenizer, prompt)
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip


def word_spans(tokenizer: CLIPTokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """Each whitespace-separated word of the prompt with its token positions (BOS is 0).

    CLIP's tokenizer never merges across whitespace, so tokenising word by word gives the same
    pieces as tokenising the whole prompt; a word may cover several positions.
    """
    spans, position = [], 1
    for word in prompt.split():
        count = len(tokenizer.tokenize(word))
        spans.append((word, list(range(position, position + count))))
        position += count
    return spans


def find_word(tokenizer: CLIPTokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of `word` in `prompt`; empty if it does not occur.

    A prompt word matches if the query's tokens appear inside it, so "dog" finds "dog," too.
    """
    query = tokenizer.tokenize(word)
    positions: list[int] = []
    if not query:
        return positions
    for prompt_word, span in word_spans(tokenizer, prompt):
        pieces = tokenizer.tokenize(prompt_word)
        for start in range(len(pieces) - len(query) + 1):
            if pieces[start : start + len(query)] == query:
                positions.extend(span[start : start + len(query)])
                break
    return positions


def word_token_positions(tokenizer: CLIPTokenizer, prompt: str, word: str) -> list[int]:
    """Like `find_word`, but a word that is not in the prompt is a user error."""
    prompt_tokens(tokenizer, prompt)
    positions = find_word(tokenizer, prompt, word)
    if not positions:
        raise DplError(f"word '{word}' is not in the prompt '{prompt}'")
    return positions


@contextmanager
def _overridden_token_embeddings(
    model: LoadedModel, token_vectors: TokenVectors | None
) -> Iterator[None]:
    """Temporarily replace token-embedding outputs at the given (prompt, position) slots."""
    if not token_vectors:
        yield
        return
    keys = list(token_vectors)
    rows = torch.tensor([k[0] for k in keys])
    cols = torch.tensor([k[1] for k in keys])

    def replace(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        vectors = torch.stack([token_vectors[k] for k in keys]).to(output)
        return output.index_put((rows.to(output.device), cols.to(output.device)), vectors)

    handle = model.text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_text(
    model: LoadedModel, prompts: Sequence[str], token_vectors: TokenVectors | None = None
) -> torch.Tensor:
    """Text-encoder hidden states [len(prompts), text_len, dim] for the UNet's cross-attention.

    Differentiable with respect to `token_vectors`; without them no graph is built.
    """
    ids = tokenize(model.tokenizer, prompts).to(model.device)
    for index, position in token_vectors or {}:
        if not (0 <= index < len(prompts) and 0 < position < ids.shape[1]):
            raise ValueError(f"token slot ({index}, {position}) is outside the prompts")
    needs_grad = any(v.requires_grad for v in (token_vectors or {}).values())
    with torch.set_grad_enabled(needs_grad), _overridden_token_embeddings(model, token_vectors):
        return model.text_encoder(ids)[0]
