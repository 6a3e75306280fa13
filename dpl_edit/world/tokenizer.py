"""Stable-Diffusion-compatible CLIP tokenizers built offline from the open_clip BPE file.

No tokenizer can be downloaded here, so we build one from `data/bpe_simple_vocab_16e6.txt.gz`
(MIT licence, see `data/LICENSE-open_clip`). The full vocabulary is exactly SD 1.x's (49408
tokens). A *reduced* vocabulary keeps only the merges needed for a given word list, in their
original order, so those words split into the same pieces as with SD's tokenizer (BPE always
applies the lowest-ranked pair present, and a subset of merges keeps every rank order), while
the embedding table of a small model stays tiny. Unknown words still tokenize, byte by byte.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # the slice open_clip and SD use


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table; its order is the id order."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def _all_merges() -> tuple[tuple[str, str], ...]:
    path = resources.files("dpl_edit") / "data" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _N_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


def _word_merges(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges BPE applies to one word (already mapped to byte characters)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used: set[tuple[str, str]] = set()
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.add(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def build_clip_tokenizer(
    words: list[str] | None = None, model_max_length: int = 77
) -> CLIPTokenizer:
    """Build SD's CLIP tokenizer, or a reduced one that splits `words` exactly as SD does."""
    merges = list(_all_merges())
    if words is not None:
        ranks = {m: i for i, m in enumerate(merges)}
        byte_chars = _bytes_to_unicode()
        keep: set[tuple[str, str]] = set()
        for word in words:
            for piece in word.lower().split():
                encoded = "".join(byte_chars[b] for b in piece.encode("utf-8"))
                keep |= _word_merges(encoded, ranks)
        merges = [m for m in merges if m in keep]
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in merges],
        model_max_length=model_max_length,
    )
