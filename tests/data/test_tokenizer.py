"""The byte-level BPE tokenizer: special ids, round trips, save/load, transformers compatibility."""

from __future__ import annotations

import gzip
import json
import string

import pytest
import tokenizers
from corpora import real_data, stories
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlm.errors import ConfigError, DataError
from flashlm.tokenizer import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    Tokenizer,
)

UNICODE_SAMPLES = [
    "Größe, Straße und Übermut — naïve café.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "emoji 🙂👩‍👩‍👧 and combining e\u0301 and \u200b zero width",
    "tabs\tand   spaces\r\nwindows line\n\n\nparagraphs  ",
    "<pad><bos><eos><mask><sep> and <eos in the middle>",
    "",
]


def sample_lines(n: int = 200) -> list[str]:
    """Generated stories plus the same stories with German-style words swapped in (umlauts, ß)."""
    english = stories(n, seed=5)
    german = [s.replace("the", "die").replace("and", "und Größe") + " Straße, Mädchen." for s in english]
    return english + german


def real_lines(n: int = 200) -> list[str]:
    """Lines of Tiny Shakespeare and of German Multi30k captions (real text; skips without ../shared/data)."""
    shakespeare = real_data("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines()[:n]
    with gzip.open(real_data("multi30k/train.de.gz"), "rt", encoding="utf-8") as fh:
        german = [next(fh).rstrip("\n") for _ in range(n)]
    return shakespeare + german


def test_special_tokens_have_fixed_ids(trained_tokenizer):
    tok = trained_tokenizer
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<mask>", "<sep>")
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID) == (0, 1, 2, 3, 4)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.sep_id) == (0, 1, 2, 3, 4)
    assert [tok.backend.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.vocab_size == 512


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_unicode(trained_tokenizer, text):
    # No filtering: special-token strings in text are encoded as plain bytes, so they round-trip too.
    ids = trained_tokenizer.encode(text)
    assert trained_tokenizer.decode(ids) == text
    assert not set(ids) & trained_tokenizer.special_ids


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_of_tricky_strings(trained_tokenizer, text):
    assert trained_tokenizer.decode(trained_tokenizer.encode(text)) == text


def test_special_token_strings_in_text_are_not_special(trained_tokenizer):
    tok = trained_tokenizer
    ids = tok.encode("a story<eos>with <sep> inside")
    assert EOS_ID not in ids and SEP_ID not in ids
    assert tok.decode(ids) == "a story<eos>with <sep> inside"


def test_bos_eos_framing_and_skip_special(trained_tokenizer):
    tok = trained_tokenizer
    plain = tok.encode("Once upon a time")
    framed = tok.encode("Once upon a time", add_bos=True, add_eos=True)
    assert framed == [BOS_ID, *plain, EOS_ID]
    assert tok.decode(framed) == "Once upon a time"
    assert tok.decode(framed, skip_special=False) == "<bos>Once upon a time<eos>"
    assert tok.decode(iter(framed)) == "Once upon a time"  # any iterable of ints


def test_encode_batch_equals_encode(trained_tokenizer):
    tok = trained_tokenizer
    texts = sample_lines(50) + UNICODE_SAMPLES
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts[:3], add_eos=True) == [tok.encode(t, add_eos=True) for t in texts[:3]]


def test_merges_compress_real_text(trained_tokenizer):
    path = real_data("tinystories/tinystories_validation_head.txt")
    text = path.read_text(encoding="utf-8")[:20000]
    ids = trained_tokenizer.encode(text)
    assert len(text.encode("utf-8")) / len(ids) > 2.0  # a 512-token BPE already merges common words


@pytest.mark.parametrize("lines", [sample_lines, real_lines], ids=["generated", "real"])
def test_transformers_loads_the_file_and_encodes_identically(trained_tokenizer, tmp_path, lines):
    from transformers import PreTrainedTokenizerFast

    path = trained_tokenizer.save(tmp_path)
    texts = lines() + UNICODE_SAMPLES[:-2]  # without special-token strings
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf(texts, add_special_tokens=False)["input_ids"] == trained_tokenizer.encode_batch(texts)
    ids = trained_tokenizer.encode(texts[3])
    assert hf.decode(ids) == trained_tokenizer.decode(ids) == texts[3]
    # Special-token strings in text: identical with split_special_tokens=True (our behaviour) ...
    split = PreTrainedTokenizerFast(tokenizer_file=str(path), split_special_tokens=True)
    tricky = UNICODE_SAMPLES[-2]
    assert split(tricky, add_special_tokens=False)["input_ids"] == trained_tokenizer.encode(tricky)
    # ... while transformers' default maps them to the special ids.
    assert hf("x<eos>", add_special_tokens=False)["input_ids"][-1] == EOS_ID


def test_save_and_load_keep_the_fingerprint(trained_tokenizer, tmp_path):
    tok = trained_tokenizer
    in_dir = tok.save(tmp_path / "dir")
    as_file = tok.save(tmp_path / "custom.json")
    assert in_dir == tmp_path / "dir" / "tokenizer.json" and as_file.is_file()
    for source in (tmp_path / "dir", in_dir, as_file):
        loaded = Tokenizer.load(source)
        assert loaded.fingerprint == tok.fingerprint
        assert loaded.encode("The cat sat.") == tok.encode("The cat sat.")
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_fingerprint_ignores_padding_but_not_the_vocabulary(trained_tokenizer):
    padded = Tokenizer.from_str(trained_tokenizer.to_str())
    padded.backend.enable_padding(pad_id=0, pad_token="<pad>")
    assert padded.fingerprint == trained_tokenizer.fingerprint
    other = Tokenizer.train(iter(["a different corpus with different words"] * 20), 300, show_progress=False)
    assert other.fingerprint != trained_tokenizer.fingerprint


def test_train_from_iterator_and_from_files(tmp_path):
    docs = ["the quick brown fox jumps over the lazy dog"] * 30 + ["pack my box with five dozen jugs"] * 30
    from_iter = Tokenizer.train(iter(docs), 300, show_progress=False)
    (tmp_path / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs), encoding="utf-8")
    from_txt = Tokenizer.train(tmp_path / "a.txt", 300, show_progress=False, txt_mode="blank")
    from_jsonl = Tokenizer.train([str(tmp_path / "b.jsonl")], 300, show_progress=False, field="body")
    assert from_iter.fingerprint == from_txt.fingerprint == from_jsonl.fingerprint
    assert len(from_iter.encode("the quick brown fox")) < len("the quick brown fox") / 2


def test_vocab_size_below_bytes_and_specials_is_rejected():
    with pytest.raises(ConfigError, match="at least 261"):
        Tokenizer.train(iter(["hello"]), 200, show_progress=False)


def test_load_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer at") as missing:
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read tokenizer") as garbled:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(missing.value) and "\n" not in str(garbled.value)


def test_special_ids_resolve_by_name_for_sentencepiece_style_vocabularies():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.ascii_lowercase)}}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok = Tokenizer(backend)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.sep_id) == (0, 1, 2, None, None)
    assert tok.special_ids == {0, 1, 2}
    assert tok.encode("abc", add_bos=True, add_eos=True) == [1, 3, 4, 5, 2]
