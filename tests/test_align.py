"""Token alignment against hand-worked examples (P2P conventions), multi-token words included."""

from __future__ import annotations

import pytest
import torch

from dpl_edit.engine.align import refinement_mapper, replacement_mapper
from dpl_edit.errors import DplError
from dpl_edit.world.tokenizer import build_clip_tokenizer

L = 16


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer(model_max_length=L)


def test_single_token_swap_is_identity(tok):
    mapper = replacement_mapper("a cat and a dog", "a cat and a lion", tok, max_len=L)
    torch.testing.assert_close(mapper, torch.eye(L))


def test_swap_into_a_three_token_word(tok):
    # dog = 1 token at position 2; hippopotamus = hippo, potam, us at positions 2, 3, 4.
    mapper = replacement_mapper("a dog sitting", "a hippopotamus sitting", tok, max_len=L)
    expected = torch.zeros(L, L)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2, 2:5] = 1.0 / 3.0
    for k in range(5, L):  # after the last swapped word P2P maps positions to themselves
        expected[k, k] = 1.0
    torch.testing.assert_close(mapper, expected)


def test_swap_between_multi_token_words_keeps_words_in_order(tok):
    # armadillo = 2 tokens (2, 3), hippopotamus = 3 tokens (2, 3, 4); then "and a dog" -> "and a lion"
    source, target = "a armadillo and a dog", "a hippopotamus and a lion"
    mapper = replacement_mapper(source, target, tok, max_len=L)
    expected = torch.zeros(L, L)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2:4, 2:5] = 1.0 / 3.0
    expected[4, 5] = expected[5, 6] = 1.0  # "and a" between swaps: source i -> target j
    expected[6, 7] = 1.0  # dog -> lion, the last swap
    for k in range(8, L):
        expected[k, k] = 1.0
    torch.testing.assert_close(mapper, expected)


def test_equal_token_counts_map_token_to_token(tok):
    mapper = replacement_mapper("a armadillo", "a hippopotamus", tok, max_len=L)
    assert mapper[2, 2:5].tolist() == pytest.approx([1 / 3] * 3)
    same = replacement_mapper("a armadillo", "a armadillo", tok, max_len=L)
    torch.testing.assert_close(same, torch.eye(L))


def test_different_word_counts_suggest_refinement(tok):
    with pytest.raises(DplError, match="refine"):
        replacement_mapper("a cat", "a big cat", tok, max_len=L)


def test_refinement_insertion(tok):
    # [BOS, a, cat, EOS] vs [BOS, a, big, cat, EOS]: "big" is inserted.
    mapper, alphas = refinement_mapper("a cat", "a big cat", tok, max_len=L)
    assert mapper.tolist() == [0, 1, -1, 2, 3] + list(range(5, L))
    assert alphas.tolist() == [1, 1, 0, 1, 1] + [1] * (L - 5)


def test_refinement_prefers_gaps_to_mismatches(tok):
    # gap 0 beats mismatch -1, so "cat" is deleted and "dog" inserted rather than substituted.
    mapper, alphas = refinement_mapper("a cat", "a dog", tok, max_len=L)
    assert mapper.tolist()[:4] == [0, 1, -1, 3]
    assert alphas.tolist()[:4] == [1, 1, 0, 1]


def test_refinement_with_multi_token_insertion(tok):
    mapper, alphas = refinement_mapper("a dog", "a big hippopotamus dog", tok, max_len=L)
    # target: BOS a big hippo potam us dog EOS
    assert mapper.tolist()[:8] == [0, 1, -1, -1, -1, -1, 2, 3]
    assert alphas.tolist()[:8] == [1, 1, 0, 0, 0, 0, 1, 1]
    assert mapper.shape == alphas.shape == (L,)
