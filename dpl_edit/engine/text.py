"""Prompt tokenisation and encoding, with optional per-token input-embedding overrides, and the
per-step word vectors (`DynamicTokens`) that DPL learns and every later encoding substitutes.

DPL learns a replacement for the input embedding of chosen word tokens at every step. Rather than
growing the vocabulary with placeholder tokens (the original code's approach), we substitute the
vectors at the output of the token-embedding layer, before position embeddings are added. That
keeps the text encoder frozen and untouched, and gradients reach only the given vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import torch
from transformers import CLIPTokenizer

from dpl_edit.engine.graphs import device_index
from dpl_edit.engine.model import LoadedModel
from dpl_edit.engine.timers import timed
from dpl_edit.errors import DplError

PUNCTUATION = ".,;:!?\"'()[]"


def bare_word(word: str) -> str:
    """A prompt word as a vocabulary entry: lower case, surrounding punctuation dropped.

    CLIP's tokenizer lower-cases and splits punctuation off, so "Circle," is the word "circle".
    """
    return word.strip(PUNCTUATION).lower()


def has_word(text: str) -> bool:
    """Whether `text` holds a word (a letter or digit): "..." describes nothing to edit."""
    return any(character.isalnum() for character in text)


def check_prompt(model: LoadedModel, prompt: str) -> list[int]:
    """The prompt's token ids, after refusing what the model cannot take: a prompt without a
    word, an over-long prompt, or a word outside the vocabulary the model declares (BPE would
    split it into pieces the model never saw, and the result would be garbage rather than an
    error)."""
    if not has_word(prompt):  # nothing to edit later: P2P edits the prompt's words
        raise DplError(f"the prompt {prompt!r} has no words; describe the image in words")
    check_vocabulary(model, [prompt])
    return prompt_tokens(model.tokenizer, prompt)


FIXED_VOCABULARY_HINT = (
    "a model with a fixed vocabulary, such as the bundled ones (64x64 coloured shapes), draws "
    "only these; to edit other pictures, give a Stable Diffusion folder with --model FOLDER"
)


def check_vocabulary(model: LoadedModel, prompts: Sequence[str]) -> None:
    """Refuse every word of `prompts` (in their order) outside the model's declared vocabulary
    in one error, so that a user fixes both prompts of an edit in one go."""
    known = set(model.defaults.vocabulary)
    if not known:
        return
    unknown: dict[str, str] = {}  # word -> the first prompt that has it
    for prompt in prompts:
        for word in prompt.split():
            bare = bare_word(word)
            if bare and bare not in known:
                unknown.setdefault(bare, prompt)
    if unknown:
        listed = ", ".join(f"'{word}' in '{prompt}'" for word, prompt in unknown.items())
        which = "word" if len(unknown) == 1 else "words"
        verb = "is" if len(unknown) == 1 else "are"
        raise DplError(
            f"the {which} {listed} {verb} not in this model's vocabulary; it knows: "
            f"{', '.join(sorted(known))}; {FIXED_VOCABULARY_HINT}"
        )


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
    return _padded_ids(tokenizer, tuple(prompts)).clone()


@lru_cache(maxsize=256)
def _padded_ids(tokenizer: CLIPTokenizer, prompts: tuple[str, ...]) -> torch.Tensor:
    """`tokenize`, worked out once per tokenizer and prompts: DPL encodes the same prompt at
    each of its ~1000 token updates, and an edit twice per step."""
    for prompt in prompts:
        prompt_tokens(tokenizer, prompt)
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip


@cache
def _ids_on(
    tokenizer: CLIPTokenizer, prompts: tuple[str, ...], device: torch.device
) -> torch.Tensor:
    """`tokenize` on `device`, made once and never written to: no host-to-device copy per
    encoding (which a CUDA graph capture refuses), and kept for as long as the process runs,
    since a captured graph reads it where it lies."""
    return _padded_ids(tokenizer, prompts).to(device)


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
    rows = tuple(k[0] for k in keys)
    cols = tuple(k[1] for k in keys)

    def replace(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        vectors = torch.stack([token_vectors[k] for k in keys]).to(output)
        where = (device_index(rows, output.device), device_index(cols, output.device))
        return output.index_put(where, vectors)

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
    ids = _ids_on(model.tokenizer, tuple(prompts), model.device)
    for index, position in token_vectors or {}:
        if not (0 <= index < len(prompts) and 0 < position < ids.shape[1]):
            raise ValueError(f"token slot ({index}, {position}) is outside the prompts")
    needs_grad = any(v.requires_grad for v in (token_vectors or {}).values())
    with (
        torch.set_grad_enabled(needs_grad),
        _overridden_token_embeddings(model, token_vectors),
        timed("text_encode"),
    ):
        return model.text_encoder(ids)[0]


@dataclass
class DynamicTokens:
    """Per-step input-embedding vectors learned for chosen words (filled in by DPL).

    `vectors[i]` holds, for step i, one row per sub-token of each word, words in order. Any
    prompt containing a word gets these rows at each of the word's occurrences, which is how the
    target prompt of an edit reuses the vectors learned on the source prompt.
    """

    words: list[str]
    positions: list[list[int]]
    """Source-prompt positions of each word's sub-tokens (for the record and for DPL's losses)."""
    vectors: torch.Tensor

    def token_vectors(
        self, tokenizer: Any, prompts: Sequence[str], step: int
    ) -> dict[tuple[int, int], torch.Tensor]:
        """(prompt index, position) -> vector at `step`, for every learned word in each prompt."""
        slots = _word_slots(tokenizer, tuple(self.words), tuple(prompts))
        return {(index, position): self.vectors[step, row] for index, position, row in slots}


@lru_cache(maxsize=256)
def _word_slots(
    tokenizer: CLIPTokenizer, words: tuple[str, ...], prompts: tuple[str, ...]
) -> tuple[tuple[int, int, int], ...]:
    """(prompt index, position, vector row) of every occurrence of every word's sub-tokens.

    The layout is the same at every step, so it is worked out once: tokenising the prompts
    anew at every token update and edit step cost about a tenth of an edit's time.
    """
    slots = []
    for index, prompt in enumerate(prompts):
        row = 0
        for word in words:
            count = len(tokenizer.tokenize(word))
            for k, position in enumerate(find_word(tokenizer, prompt, word)):
                slots.append((index, position, row + k % count))
            row += count
    return tuple(slots)


def step_embeddings(
    model: LoadedModel,
    prompts: Sequence[str],
    dynamic: DynamicTokens | None,
    step: int,
    cache: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Conditional embeddings of `prompts` at a step: with that step's dynamic tokens if any.

    Without dynamic tokens the encoding never changes, so it is computed once into `cache`.
    """
    if dynamic is None:
        if "static" not in cache:
            cache["static"] = encode_text(model, prompts)
        return cache["static"]
    vectors = dynamic.token_vectors(model.tokenizer, prompts, step)
    return encode_text(model, prompts, {k: v.to(model.device) for k, v in vectors.items()})
