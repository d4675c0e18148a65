"""`flashlm data`: token shards from documents, and a generated story corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Prepare token shards.")


@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Text / JSONL / Parquet files or directories.")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.json or its directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the shards.")],
    val_fraction: Annotated[float, typer.Option(help="Share of documents for the val split.")] = 0.01,
    workers: Annotated[int | None, typer.Option(help="Tokenizing processes; default by CPU count.")] = None,
    txt_mode: Annotated[str, typer.Option(help="Text files: 'line' or 'blank'(-line separated).")] = "line",
    field: Annotated[str, typer.Option(help="JSONL / Parquet field holding the text.")] = "text",
    encoder: Annotated[
        str, typer.Option(help="auto | tokenizers | tiktoken (the same ids, faster; auto checks them first).")
    ] = "auto",
) -> None:
    """Tokenize documents into train/val token shards (+ document index and meta.json)."""
    from flashlm.data.shards import prepare_shards

    meta = prepare_shards(
        [str(p) for p in inputs],
        tokenizer,
        out,
        val_fraction=val_fraction,
        workers=workers,
        txt_mode=txt_mode,
        field=field,
        progress=True,
        encoder=encoder,
    )
    for split, stats in meta["splits"].items():
        typer.echo(
            f"{split}: {stats['docs']:,} documents, {stats['tokens']:,} tokens, "
            f"{stats['text_bytes'] / 1e6:.1f} MB of text"
        )
    typer.echo(f"shards ({meta['dtype']}) written to {out}")


@data_app.command("stories")
def data_stories(
    out: Annotated[Path, typer.Option("--out", "-o", help="Text file to write, one story a line.")],
    docs: Annotated[int, typer.Option(min=1, help="Number of stories.")] = 20_000,
    seed: Annotated[int, typer.Option(help="The same seed writes the same stories.")] = 0,
) -> None:
    """Write generated stories (FlashLM's own story world): a corpus to try the toolkit on."""
    from flashlm.data.synthetic import write_story_corpus

    path = write_story_corpus(out, docs, seed=seed)
    typer.echo(f"{docs:,} stories ({path.stat().st_size / 1e6:.1f} MB) written to {path}")
