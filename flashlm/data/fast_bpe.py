"""Encode with `tiktoken` using a trained FlashLM byte-level BPE: the same ids, several times faster.

A FlashLM tokenizer is a `tokenizers` BPE behind a ByteLevel pre-tokenizer (GPT-2's split regex,
no prefix space) with no normalizer. tiktoken runs the same algorithm when given the same regex and a
rank for every token's bytes equal to its id, provided ids grow in merge order (they do: the trainer
adds each merged token as it learns its merge). One difference can remain: tiktoken merges any
adjacent pair whose joined bytes are a token, while `tokenizers` only merges pairs on its merge list;
so `data prepare` checks tiktoken against `tokenizers` on the first chunk of a corpus and keeps
`tokenizers` if a single id differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from flashlm.tokenizer import bpe_merge_pairs, is_gpt2_byte_level

# tokenizers' ByteLevel(use_regex=True) split pattern, which is GPT-2's.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

BatchEncoder = Callable[[Sequence[str]], list[list[int]]]


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """ByteLevel's printable stand-in character for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def tiktoken_encoding(tokenizer_json: str) -> Any | None:
    """A `tiktoken.Encoding` equivalent to the tokenizer in ``tokenizer_json``, or None when it has
    another shape (SentencePiece imports, a normalizer, prefix spaces, merges out of id order) or
    tiktoken is not installed."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    plain_bpe = model.get("type") == "BPE" and not model.get("dropout") and not model.get("continuing_subword_prefix")
    plain_bpe = plain_bpe and not model.get("end_of_word_suffix") and not model.get("byte_fallback")
    if not (plain_bpe and is_gpt2_byte_level(spec)):
        return None
    to_byte = _unicode_to_byte()
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        if token in special:
            continue
        if any(ch not in to_byte for ch in token):
            return None
        ranks[bytes(to_byte[ch] for ch in token)] = token_id
    if len(ranks) < 256 or not _merges_in_id_order(spec, ranks, to_byte):
        return None
    return tiktoken.Encoding("flashlm-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})


def _merges_in_id_order(spec: dict, ranks: dict[bytes, int], to_byte: dict[str, int]) -> bool:
    last = -1
    for left, right in bpe_merge_pairs(spec):
        token_id = ranks.get(bytes(to_byte[ch] for ch in left + right))
        if token_id is None or token_id <= last:
            return False
        last = token_id
    return True


def tiktoken_batch_encoder(tokenizer_json: str, threads: int = 1) -> BatchEncoder | None:
    """A function texts -> ids through tiktoken, or None where `tiktoken_encoding` gives none.

    With ``threads`` > 1 the texts are cut into that many contiguous runs encoded side by side (tiktoken
    releases the GIL). One task per run, not per text: `Encoding.encode_ordinary_batch` submits every
    text to a fresh thread pool, whose overhead costs more than encoding a short document.
    """
    encoding = tiktoken_encoding(tokenizer_json)
    if encoding is None:
        return None
    encode = encoding.encode_ordinary
    if threads <= 1:
        return lambda texts: [encode(t) for t in texts]
    pool = ThreadPoolExecutor(threads, thread_name_prefix="flashlm-bpe")

    def encode_batch(texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        step = -(-len(texts) // threads)
        runs = pool.map(lambda start: [encode(t) for t in texts[start : start + step]], range(0, len(texts), step))
        return [ids for run in runs for ids in run]

    return encode_batch
