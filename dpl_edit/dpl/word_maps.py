"""One attention map per chosen word, from per-token cross-attention maps.

DPL's losses and its background estimation both talk about "the map of word k". The original
code assumes one CLIP token per word; here a word is a *group* of token indices (a word that BPE
splits into several pieces has several), and every consumer combines a group the same way, by
the rule in `word_maps`. Keeping the rule in one place means the losses, the background labels
and any drawing of learned maps can never disagree about what a multi-token word attends to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpl_edit.engine.graphs import device_index

WordTokenGroups = Sequence[Sequence[int]]
"""Per chosen word, the indices of its tokens in the text sequence (SOT is index 0).

Example: for "a cat and a hedgehog" where "hedgehog" splits into "hedge" + "hog",
`[[2], [5, 6]]`. Order matters: it is the order of the per-word outputs.
"""


def check_word_token_groups(groups: WordTokenGroups, text_len: int) -> None:
    """Reject groups that no valid prompt can produce (a caller bug, hence `ValueError`).

    Word tokens live strictly between SOT (index 0) and the last slot (`text_len - 1`, which the
    balancing loss drops and which is always EOT or padding for a word that fits the prompt).
    A token shared by two words would make their maps identical, so that is rejected too.
    """
    if len(groups) == 0:
        raise ValueError("at least one word is needed")
    seen: set[int] = set()
    for group in groups:
        if len(group) == 0:
            raise ValueError("every word needs at least one token index")
        for index in group:
            if not 1 <= index <= text_len - 2:
                raise ValueError(
                    f"token index {index} is outside the word range 1..{text_len - 2} "
                    f"of a {text_len}-token text"
                )
            if index in seen:
                raise ValueError(f"token index {index} belongs to more than one word")
            seen.add(index)


def combine_token_maps(maps: torch.Tensor, groups: WordTokenGroups) -> torch.Tensor:
    """Sum each group's token maps: `maps` [res, res, tokens] -> [words, res, res], unchecked.

    Why a sum: the maps are probabilities over tokens, so the sum is the probability mass the
    word receives as a whole -- what a single-token word would get if BPE had not split it. It
    keeps every value in [0, 1], so the balancing loss's target (a smoothed peak of 1) means the
    same for one-token and multi-token words, and its pieces are not pushed to compete with each
    other. For the cosine losses a sum and a mean are equivalent (cosine ignores scale). For a
    single-token word it is exactly the original code's map.

    Used directly by the balancing loss, whose token axis is shifted; everyone else goes through
    `word_maps`, which validates first.
    """
    return torch.stack(
        [
            maps.index_select(-1, device_index(tuple(group), maps.device)).sum(dim=-1)
            for group in groups
        ]
    )


def word_maps(maps: torch.Tensor, groups: WordTokenGroups) -> torch.Tensor:
    """Per-word maps [words, res, res] from cross-attention `maps` [res, res, text_len].

    `maps` are softmax probabilities over the text tokens (SOT included) at each pixel, averaged
    over layers and heads. See `combine_token_maps` for the combination rule.
    """
    if maps.ndim != 3:
        raise ValueError(f"expected maps of shape [res, res, text_len], got {tuple(maps.shape)}")
    check_word_token_groups(groups, maps.shape[-1])
    return combine_token_maps(maps, groups)
