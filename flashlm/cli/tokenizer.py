"""`flashlm tokenizer`: train byte-level BPE tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")


@tokenizer_app.command("train")
def tokenizer_train(
    files: Annotated[list[Path], typer.Argument(help="Text / JSONL / Parquet files or directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, the 5 special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(help="Merge only pairs seen this often.")] = 2,
    txt_mode: Annotated[str, typer.Option(help="Text files: 'line' or 'blank'(-line separated).")] = "line",
    field: Annotated[str, typer.Option(help="JSONL / Parquet field holding the text.")] = "text",
) -> None:
    """Train a byte-level BPE tokenizer (<pad> <bos> <eos> <mask> <sep> get ids 0-4)."""
    from flashlm.tokenizer import Tokenizer

    paths = [str(f) for f in files]
    tok = Tokenizer.train(paths, vocab_size, min_frequency, txt_mode=txt_mode, field=field)
    path = tok.save(out)
    typer.echo(f"tokenizer with {tok.vocab_size} tokens (fingerprint {tok.fingerprint[:8]}) saved to {path}")
