"""Train, load and save the byte-level BPE tokenizer; the special tokens and their ids.

The tokenizer is a Hugging Face `tokenizers` BPE with a ByteLevel pre-tokenizer and decoder, so every
Unicode string round-trips: ``decode(encode(s)) == s``. Trained tokenizers reserve ids 0-4 for
``<pad> <bos> <eos> <mask> <sep>``; the saved ``tokenizer.json`` loads unchanged in
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.

FlashLM frames every document ``<bos> … <eos>`` (the shards, generation, serving and evaluation all put
``<bos>`` first, as Gemma and Llama do). A trained ``tokenizer.json`` says so itself: its post-processor
(`add_bos_post_processor`) puts ``<bos>`` before a text whenever special tokens are added, so
``transformers``' ``tokenizer("text")`` starts with it too. `encode` never runs the post-processor:
``add_bos``/``add_eos`` decide.

Special-token strings in raw text (a document that literally contains ``"<eos>"``) are encoded as
ordinary text, never as the special id: only ``add_bos``/``add_eos`` (and the data pipeline) insert
special ids, so user text cannot forge document boundaries. ``transformers`` does the same when
given ``split_special_tokens=True``; with its default (False) it maps such strings to the special ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from flashlm.errors import CheckpointError, ConfigError, DataError, first_line

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>", "<sep>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus one token for every byte

# Role -> token names to look for, in order (FlashLM names first, then SentencePiece/Llama names).
_ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("<pad>", "<unk>"),
    "bos": ("<bos>", "<s>"),
    "eos": ("<eos>", "</s>"),
    "mask": ("<mask>",),
    "sep": ("<sep>",),
}


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with FlashLM's special-token conventions."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self._tok = backend
        self._tok.encode_special_tokens = True  # special-token strings in text stay text
        self._ids = {role: _first_id(backend, names) for role, names in _ROLE_NAMES.items()}

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        files_or_iterator: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = True,
        txt_mode: str = "line",
        field: str = "text",
    ) -> Tokenizer:
        """Train a byte-level BPE on files (a path, or a list/tuple of paths) or an iterator of texts.

        Files are read with `flashlm.data.corpus.iter_documents` (``txt_mode``/``field`` as there).
        """
        from flashlm.data.corpus import iter_documents

        if vocab_size < MIN_VOCAB_SIZE:
            need = f"{MIN_VOCAB_SIZE} (5 specials + 256 bytes)"
            raise ConfigError(f"vocab_size must be at least {need}, got {vocab_size}")
        documents = iter_documents(files_or_iterator, txt_mode=txt_mode, field=field)
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(documents, trainer=trainer)
        add_bos_post_processor(backend)
        tok = cls(backend)
        assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.sep_id] == list(range(5))
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a ``tokenizer.json`` file or a directory that contains one."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(f"no tokenizer at {file}; train one with `flashlm tokenizer train`")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(file)))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"cannot read tokenizer {file}: {first_line(exc)}") from None

    @classmethod
    def from_str(cls, json_str: str) -> Tokenizer:
        """Build from the JSON text of a ``tokenizer.json``."""
        return cls(tokenizers.Tokenizer.from_str(json_str))

    def save(self, dir_or_file: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (into a directory, or to a path ending in ``.json``); return its path."""
        path = Path(dir_or_file)
        if path.suffix != ".json":
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        tmp.replace(path)
        return path

    def to_str(self) -> str:
        """The ``tokenizer.json`` text."""
        return self._tok.to_str(pretty=True)

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by ``<bos>``/``<eos>``."""
        return self._frame(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (multi-threaded inside `tokenizers`)."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special`` is False."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_continuation(self, context: Sequence[int], ids: Iterable[int], window: int = 8) -> str:
        """Text of ``ids`` as it reads after ``context`` (the prompt and what came before).

        Decoded alone, a continuation can lose its first character: SentencePiece-style decoders strip
        the leading "▁" space of a text. Decoding the last ``window`` context tokens with it and removing
        their own text keeps it.
        """
        ids = [int(i) for i in ids]
        tail = [int(i) for i in context[-window:]] if window > 0 else []
        if not tail:
            return self.decode(ids)
        before = self.decode(tail)
        joined = self.decode(tail + ids)
        return joined[len(before) :] if joined.startswith(before) else self.decode(ids)

    def check_fits(self, vocab_size: int, where: str | os.PathLike) -> None:
        """Raise a one-line CheckpointError when this tokenizer has ids a model with `vocab_size` embeddings
        lacks (found here rather than as an IndexError in the middle of a generation)."""
        if self.vocab_size > vocab_size:
            raise CheckpointError(
                f"{where}: its tokenizer has {self.vocab_size} ids but the model's vocabulary has only "
                f"{vocab_size}; put the tokenizer the model was trained with in the folder"
            )

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids.insert(0, _require(self.bos_id, "bos"))
        if add_eos:
            ids.append(_require(self.eos_id, "eos"))
        return ids

    # ---- properties -----------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def mask_id(self) -> int | None:
        return self._ids["mask"]

    @property
    def sep_id(self) -> int | None:
        return self._ids["sep"]

    @property
    def special_ids(self) -> set[int]:
        """Ids of every special token: the five roles that exist plus any other added special token."""
        added = {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        return added | {i for i in self._ids.values() if i is not None}

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON (sorted keys, no padding/truncation state)."""
        data = json.loads(self._tok.to_str())
        data.pop("padding", None)
        data.pop("truncation", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:8]})"


def add_bos_post_processor(backend: tokenizers.Tokenizer) -> bool:
    """Give ``backend`` a post-processor that puts its bos token (``<bos>`` or ``<s>``) before every text
    (and before the second text of a pair), the framing FlashLM trains with; return whether it did.

    Kept when ``backend`` already has a post-processor, and not added when it has no bos token. This is
    the template `transformers` itself builds for ``add_bos_token: true``.
    """
    bos_id = _first_id(backend, _ROLE_NAMES["bos"])
    if bos_id is None or backend.post_processor is not None:
        return False
    bos = backend.id_to_token(bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return True


# ---- the shape of a tokenizer.json, read by the fast encoder and the GGUF exporter ---------------
def is_gpt2_byte_level(spec: dict) -> bool:
    """Whether the tokenizer.json ``spec`` pre-tokenizes as `Tokenizer.train` does: ByteLevel with GPT-2's
    split regex, no prefix space and no normalizer (the shape tiktoken and llama.cpp's gpt-2 can run)."""
    pre = spec.get("pre_tokenizer") or {}
    plain = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    return bool(plain) and not spec.get("normalizer")


def bpe_merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """The BPE merges of the tokenizer.json ``spec`` as pairs, in rank order (the file stores each as an
    ``[a, b]`` list or an ``"a b"`` string)."""
    pairs = []
    for merge in (spec.get("model") or {}).get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        pairs.append((left, right))
    return pairs


def _first_id(backend: tokenizers.Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _require(token_id: int | None, role: str) -> int:
    if token_id is None:
        raise DataError(f"this tokenizer has no {role} token")
    return token_id


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "MASK_ID",
    "MIN_VOCAB_SIZE",
    "PAD_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "Tokenizer",
    "add_bos_post_processor",
    "bpe_merge_pairs",
    "is_gpt2_byte_level",
]
