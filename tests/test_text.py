"""Prompt encoding with token overrides, and word -> token positions."""

from __future__ import annotations

import pytest
import torch

from dpl_edit.engine.text import encode_text, tokenize, word_spans, word_token_positions
from dpl_edit.errors import DplError


def test_word_positions_single_and_multi_token(tiny_model):
    tok = tiny_model.tokenizer
    assert word_token_positions(tok, "a cat and a dog", "dog") == [5]
    # hippopotamus is three CLIP tokens: hippo, potam, us
    assert word_token_positions(tok, "a hippopotamus and a dog", "hippopotamus") == [2, 3, 4]
    assert word_token_positions(tok, "a hippopotamus and a dog", "dog") == [7]
    assert word_token_positions(tok, "a dog, and a big dog", "dog") == [2, 7]
    assert word_spans(tok, "a armadillo")[1] == ("armadillo", [2, 3])


def test_word_not_in_prompt(tiny_model):
    with pytest.raises(DplError, match="'lion' is not in the prompt"):
        word_token_positions(tiny_model.tokenizer, "a cat and a dog", "lion")


def test_prompt_too_long(tiny_model):
    too_long = " ".join(["cat"] * 15)  # 15 words + BOS + EOS > 16
    with pytest.raises(DplError, match="at most 14"):
        tokenize(tiny_model.tokenizer, [too_long])
    assert tokenize(tiny_model.tokenizer, [" ".join(["cat"] * 14)]).shape == (1, 16)


def test_encode_matches_plain_encoder_and_overrides_are_local(tiny_model):
    prompts = ["a cat and a dog", "a lion"]
    plain = encode_text(tiny_model, prompts)
    ids = tokenize(tiny_model.tokenizer, prompts)
    torch.testing.assert_close(plain, tiny_model.text_encoder(ids)[0])
    assert not plain.requires_grad

    table = tiny_model.text_encoder.get_input_embeddings().weight
    # Overriding a token with its own embedding changes nothing.
    same = encode_text(tiny_model, prompts, {(0, 2): table[ids[0, 2]]})
    torch.testing.assert_close(same, plain)

    vector = torch.randn(table.shape[1], requires_grad=True)
    changed = encode_text(tiny_model, prompts, {(0, 2): vector})
    # Causal text encoder: positions before the override and the other prompt are untouched.
    torch.testing.assert_close(changed[0, :2], plain[0, :2])
    torch.testing.assert_close(changed[1], plain[1])
    assert not torch.allclose(changed[0, 2:], plain[0, 2:])
    (changed * torch.randn_like(changed)).sum().backward()  # LayerNorm makes a plain sum constant
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert table.grad is None
