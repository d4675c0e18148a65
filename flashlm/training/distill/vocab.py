"""Vocabularies: token → id maps of tokenizers and model directories, and the check that a teacher and its
student share one (`check_vocab`; a logit cache keeps only a `vocab_fingerprint` when it has no tokenizer)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flashlm.errors import DataError, FlashLMError, first_line

TOKENIZER_FILE = "tokenizer.json"


def vocab_of(source: Any) -> dict[str, int]:
    """Token → id map of a FlashLM `Tokenizer`, `tokenizers.Tokenizer`, HF tokenizer, dict or path."""
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        vocab = vocab_from_dir(source) if Path(source).is_dir() else _vocab_from_file(Path(source))
        if vocab is None:
            raise DataError(f"no tokenizer in {source}; pass a tokenizer.json or a directory holding one")
        return vocab
    backend = getattr(source, "backend", source)
    try:
        return dict(backend.get_vocab(with_added_tokens=True))
    except TypeError:
        return dict(backend.get_vocab())


def _vocab_from_file(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"cannot read tokenizer {path}: {first_line(exc)}") from None


def vocab_from_dir(directory: str | os.PathLike) -> dict[str, int] | None:
    """The vocabulary of a model directory: its tokenizer.json, else an HF tokenizer there, else None."""
    vocab = _vocab_from_file(Path(directory) / TOKENIZER_FILE)
    if vocab is not None:
        return vocab
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(str(directory), local_files_only=True).get_vocab())
    except Exception:  # no tokenizer files there, or transformers missing
        return None


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """sha256 of the sorted token → id map."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_vocab(student: dict[str, int], teacher: dict[str, int], teacher_name: str = "the teacher") -> None:
    """Refuse (one-line FlashLMError naming the first differing ids) unless both maps are identical."""
    if student == teacher:
        return
    s_by_id, t_by_id = {i: t for t, i in student.items()}, {i: t for t, i in teacher.items()}
    differ = sorted(i for i in set(s_by_id) | set(t_by_id) if s_by_id.get(i) != t_by_id.get(i))
    shown = "; ".join(f"id {i}: student {s_by_id.get(i)!r}, teacher {t_by_id.get(i)!r}" for i in differ[:3])
    raise FlashLMError(
        f"{teacher_name} and the student use different tokenizers ({len(differ)} ids differ: "
        f"{shown}); distill only between models that share a tokenizer"
    )
