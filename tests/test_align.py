"""Token alignment against hand-worked examples (P2P conventions), multi-token words included."""

from __future__ import annotations

import pytest
import torch

from dpl_edit.engine.align import refinement_mapper, replacement_mapper
from dpl_edit.engine.text import word_spans
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
    for k in range(3, L - 2):  # after the swap: sitting, EOS and padding two places on
        expected[k, k + 2] = 1.0
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
    for k in range(7, L - 1):  # EOS and padding stay one place on
        expected[k, k + 1] = 1.0
    torch.testing.assert_close(mapper, expected)


def _assert_unchanged_words_map_one_to_one(tok, source: str, target: str, swaps: int = 1) -> None:
    """Every word the swap leaves alone takes exactly its own counterpart's token maps."""
    mapper = replacement_mapper(source, target, tok, max_len=L)
    source_spans, target_spans = word_spans(tok, source), word_spans(tok, target)
    unchanged = 0
    for (word, src), (other, tgt) in zip(source_spans, target_spans, strict=True):
        if word != other:
            continue
        unchanged += 1
        assert len(src) == len(tgt)
        for s, t in zip(src, tgt, strict=True):
            assert mapper[s, t] == 1.0, (word, s, t)
            assert mapper[:, t].sum() == 1.0 and mapper[s].sum() == 1.0, word
    assert unchanged == len(source_spans) - swaps
    # Outside the swapped words (BOS, unchanged words, EOS, padding) every target token takes
    # exactly one source token's map.
    swapped = {t for (w, _), (o, tgt) in zip(source_spans, target_spans, strict=True) if w != o
               for t in tgt}  # fmt: skip
    kept = [t for t in range(L) if t not in swapped]
    assert mapper[:, kept].sum(dim=0).tolist() == [1.0] * len(kept)
    assert ((mapper[:, kept] == 0) | (mapper[:, kept] == 1)).all()
    eos_source = source_spans[-1][1][-1] + 1
    eos_target = target_spans[-1][1][-1] + 1
    assert mapper[0, 0] == 1.0 and mapper[eos_source, eos_target] == 1.0


def test_words_after_a_one_to_three_token_swap_keep_their_own_maps(tok):
    # The example: P2P's aligner gave "grass" the map of "on" and dropped "on" and "the".
    source, target = "a cat and a dog on the grass", "a cat and a hippopotamus on the grass"
    assert len(tok.tokenize("dog")) == 1 and len(tok.tokenize("hippopotamus")) == 3
    _assert_unchanged_words_map_one_to_one(tok, source, target)
    mapper = replacement_mapper(source, target, tok, max_len=L)
    grass_source, grass_target = word_spans(tok, source)[-1][1], word_spans(tok, target)[-1][1]
    assert mapper[grass_source[0], grass_target[0]] == 1.0


def test_words_after_a_three_to_one_token_swap_keep_their_own_maps(tok):
    source, target = "a cat and a hippopotamus on the grass", "a cat and a dog on the grass"
    _assert_unchanged_words_map_one_to_one(tok, source, target)


def test_words_between_and_after_two_unequal_swaps_keep_their_own_maps(tok):
    source, target = "a hippopotamus and a dog on the grass", "a cat and a armadillo on the grass"
    _assert_unchanged_words_map_one_to_one(tok, source, target, swaps=2)


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
