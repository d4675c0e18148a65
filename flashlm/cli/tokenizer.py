"""`flashlm tokenizer`: train byte-level BPE tokenizers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import tokenizer_out
from flashlm.cli.data import CONFIG_HELP, DATA_FILES_HELP, DATASET_HELP, INPUTS_HELP, SPLIT_HELP

tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")


@tokenizer_app.command("train")
def tokenizer_train(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Directory for tokenizer.json (new, empty or holding only one).", callback=tokenizer_out
        ),
    ],
    files: Annotated[list[Path] | None, typer.Argument(help=INPUTS_HELP)] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, the 5 special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(min=0, help="Merge only pairs seen this often.")] = 2,
    txt_mode: Annotated[str, typer.Option(help="Text files: 'line' or 'blank'(-line separated).")] = "line",
    field: Annotated[str, typer.Option(help="JSONL / Parquet / Arrow / datasets field holding the text.")] = "text",
    dataset: Annotated[str | None, typer.Option("--dataset", help=DATASET_HELP)] = None,
    dataset_config: Annotated[str | None, typer.Option("--config", "--dataset-config", help=CONFIG_HELP)] = None,
    data_files: Annotated[list[str] | None, typer.Option("--data-files", help=DATA_FILES_HELP)] = None,
    split: Annotated[str, typer.Option(help=SPLIT_HELP)] = "train",
) -> None:
    """Train a byte-level BPE tokenizer (<pad> <bos> <eos> <mask> <sep> get ids 0-4)."""
    from flashlm.data.corpus import corpus_source
    from flashlm.tokenizer import Tokenizer

    source = corpus_source(files or [], dataset, dataset_config, data_files or [], split, txt_mode, field)
    # tokenizers' progress bar only on a terminal: elsewhere (a pipe, CI) it prints stray blank lines
    show = sys.stderr.isatty()
    tok = Tokenizer.train(source, vocab_size, min_frequency, show, txt_mode=txt_mode, field=field)
    path = tok.save(out)
    typer.echo(f"tokenizer with {tok.vocab_size} tokens (fingerprint {tok.fingerprint[:8]}) saved to {path}")
