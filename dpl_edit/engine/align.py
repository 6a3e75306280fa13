"""Token alignment between a source and a target prompt, with Prompt-to-Prompt's conventions.

Word swap maps each source token to target tokens word by word, so that a swapped word's map is
injected into the new word's tokens even when the two words split into different numbers of
tokens. Refinement (inserting words) aligns the two token sequences globally and injects maps only
into target tokens that have a source counterpart. The outputs match P2P's `seq_aligner`, so they
can be checked against it, except after a word swap that changes the token count, where P2P
misaligns the rest of the prompt (see `replacement_mapper`).
"""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer

from dpl_edit.engine.text import prompt_tokens, word_spans
from dpl_edit.errors import DplError


def replacement_mapper(
    source: str, target: str, tokenizer: CLIPTokenizer, max_len: int = 77
) -> torch.Tensor:
    """[max_len, max_len] matrix M with target_map[..., j] = sum_i source_map[..., i] * M[i, j].

    Words are compared position by position. A swapped word whose token counts agree maps
    token to token; otherwise every source token feeds every target token with weight
    1/len(target tokens). Every other token maps to its counterpart in word order, all the way
    to the end: after a swap that changed the token count, the two sequences are offset, and
    each unchanged word (then EOS and padding) must still take its own word's map. P2P's
    `seq_aligner` maps each position to itself after the last swap instead, so there a word
    after a 1-to-3-token swap took the map of whatever sat two places earlier. Target positions
    that the offset leaves without a source (the source ran out first) take the same position
    of the source: padding takes padding, as P2P does.
    """
    source_words, target_words = source.split(), target.split()
    if len(source_words) != len(target_words):
        raise DplError(
            f"word swap needs prompts with the same number of words ({len(source_words)} vs "
            f"{len(target_words)}); use refinement (mode 'refine') to insert or remove words"
        )
    prompt_tokens(tokenizer, source)
    prompt_tokens(tokenizer, target)
    source_spans = [span for _, span in word_spans(tokenizer, source)]
    target_spans = [span for _, span in word_spans(tokenizer, target)]
    swaps = {
        source_spans[k][0]: (source_spans[k], target_spans[k])
        for k, (a, b) in enumerate(zip(source_words, target_words, strict=True))
        if a != b
    }
    mapper = torch.zeros(max_len, max_len)
    i = j = 0
    while i < max_len and j < max_len:
        if i in swaps:
            src, tgt = swaps[i]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1.0
            else:
                for t in tgt:
                    mapper[src, t] = 1.0 / len(tgt)
            i, j = i + len(src), j + len(tgt)
        else:
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
    for k in range(j, max_len):
        mapper[k, k] = 1.0
    return mapper


def _global_alignment(source: list[int], target: list[int]) -> list[int]:
    """For each target token, the aligned source index or -1 (Needleman-Wunsch).

    Scores: gap 0, match +1, mismatch -1. Among equal scores the traceback prefers a target
    insertion, then a source deletion, then the diagonal, as P2P does.
    """
    rows, cols = len(source) + 1, len(target) + 1
    score = [[0] * cols for _ in range(rows)]
    move = [[0] * cols for _ in range(rows)]  # 1 insert (left), 2 delete (up), 3 diagonal
    for j in range(1, cols):
        move[0][j] = 1
    for i in range(1, rows):
        move[i][0] = 2
    for i in range(1, rows):
        for j in range(1, cols):
            left, up = score[i][j - 1], score[i - 1][j]
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            best = max(left, up, diagonal)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    aligned = [-1] * len(target)
    i, j = len(source), len(target)
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_mapper(
    source: str, target: str, tokenizer: CLIPTokenizer, max_len: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas), each [max_len]: target token j takes source token mapper[j] if alphas[j].

    Inserted target tokens get mapper -1 and alpha 0 (their own maps are kept). Positions past
    the target's EOS map to themselves with alpha 1, so padding follows the source.
    """
    source_ids, target_ids = prompt_tokens(tokenizer, source), prompt_tokens(tokenizer, target)
    aligned = torch.tensor(_global_alignment(source_ids, target_ids), dtype=torch.int64)
    mapper = torch.arange(max_len, dtype=torch.int64)
    mapper[: len(aligned)] = aligned
    alphas = torch.ones(max_len)
    alphas[: len(aligned)] = (aligned != -1).float()
    return mapper, alphas
