"""`flashlm data`: token shards from documents, and a generated story corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import SEED_MAX, shards_out, writable_parent

data_app = typer.Typer(no_args_is_help=True, help="Prepare token shards.")


INPUTS_HELP = "Text / JSONL / Parquet / Arrow files, directories, or Hugging Face datasets (save_to_disk) folders."
DATASET_HELP = (
    "Read datasets.load_dataset(NAME, streaming=True) instead of files: a Hub name (offline: from the local "
    "cache) or a builder over local files, e.g. --dataset json --data-files a.jsonl."
)
CONFIG_HELP = "The --dataset's configuration (subset) name."
DATA_FILES_HELP = "Files for a --dataset builder (json, text, parquet, csv, arrow); repeat for several."
SPLIT_HELP = "Split of a --dataset or of a DatasetDict folder."


@data_app.command("prepare")
def data_prepare(
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.json or its directory.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Shards directory (new, empty, or earlier shards: replaced).", callback=shards_out
        ),
    ],
    inputs: Annotated[list[Path] | None, typer.Argument(help=INPUTS_HELP)] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents for the val split.")] = 0.01,
    workers: Annotated[int | None, typer.Option(help="Tokenizing processes; default by CPU count.")] = None,
    txt_mode: Annotated[str, typer.Option(help="Text files: 'line' or 'blank'(-line separated).")] = "line",
    field: Annotated[str, typer.Option(help="JSONL / Parquet / Arrow / datasets field holding the text.")] = "text",
    encoder: Annotated[
        str, typer.Option(help="auto | tokenizers | tiktoken (the same ids, faster; auto checks them first).")
    ] = "auto",
    dataset: Annotated[str | None, typer.Option("--dataset", help=DATASET_HELP)] = None,
    dataset_config: Annotated[str | None, typer.Option("--config", "--dataset-config", help=CONFIG_HELP)] = None,
    data_files: Annotated[list[str] | None, typer.Option("--data-files", help=DATA_FILES_HELP)] = None,
    split: Annotated[str, typer.Option(help=SPLIT_HELP)] = "train",
) -> None:
    """Tokenize documents into train/val token shards (+ document index and meta.json)."""
    from flashlm.data.corpus import corpus_source
    from flashlm.data.shards import prepare_shards

    source = corpus_source(inputs or [], dataset, dataset_config, data_files or [], split, txt_mode, field)
    meta = prepare_shards(
        source,
        tokenizer,
        out,
        val_fraction=val_fraction,
        workers=workers,
        txt_mode=txt_mode,
        field=field,
        progress=True,
        encoder=encoder,
    )
    for name, stats in meta["splits"].items():
        typer.echo(
            f"{name}: {stats['docs']:,} documents, {stats['tokens']:,} tokens, "
            f"{stats['text_bytes'] / 1e6:.1f} MB of text"
        )
    typer.echo(f"shards ({meta['dtype']}) written to {out}")


@data_app.command("stories")
def data_stories(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Text file to write, one story a line.", callback=writable_parent)
    ],
    docs: Annotated[int, typer.Option(min=1, help="Number of stories.")] = 20_000,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="The same seed writes the same stories.")] = 0,
) -> None:
    """Write generated stories (FlashLM's own story world): a corpus to try the toolkit on."""
    from flashlm.data.synthetic import write_story_corpus

    path = write_story_corpus(out, docs, seed=seed)
    typer.echo(f"{docs:,} stories ({path.stat().st_size / 1e6:.1f} MB) written to {path}")
