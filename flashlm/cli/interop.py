"""`flashlm import` and `flashlm export`: models from and to other formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import new_out, writable_parent

import_app = typer.Typer(no_args_is_help=True, help="Import models from other formats.")
export_app = typer.Typer(no_args_is_help=True, help="Export models to other formats.")


@export_app.command("hf")
def export_hf_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="A new or empty checkpoint directory.", callback=new_out)],
) -> None:
    """Export to a transformers checkpoint (Gemma3ForCausalLM or LlamaForCausalLM)."""
    from flashlm.interop.hf import export_hf
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import TOKENIZER_FILE, Tokenizer

    model = FlashLM.from_pretrained(model_dir)
    tokenizer = model_dir if (model_dir / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None:  # a tokenizer with ids the model lacks would make a checkpoint that fails later
        Tokenizer.load(model_dir).check_fits(model.cfg.vocab_size, model_dir)
    export_hf(model, out, tokenizer=tokenizer)
    typer.echo(f"exported {model_dir} to {out}" + ("" if tokenizer else " (no tokenizer.json to copy)"))


@export_app.command("gguf")
def export_gguf_cmd(
    model_dir: Annotated[
        Path, typer.Argument(help="A FlashLM model directory (a checkpoint, runs/X/latest or runs/X).")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="The GGUF file to write (name ending in .gguf).", callback=writable_parent),
    ],
    dtype: Annotated[str, typer.Option("--dtype", help="Type of the weight matrices: f32, f16 or bf16.")] = "f16",
) -> None:
    """Export to one GGUF file for llama.cpp (architecture llama or gemma3, tokenizer included)."""
    from flashlm.errors import ConfigError
    from flashlm.interop.gguf import GGUF_DTYPES, export_gguf
    from flashlm.model.transformer import FlashLM

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if not (model_dir / "config.json").is_file() and (model_dir / "latest" / "config.json").is_file():
        model_dir = model_dir / "latest"  # a run folder: its newest checkpoint
    model = FlashLM.from_pretrained(model_dir)
    tokenizer = model_dir if (model_dir / "tokenizer.json").is_file() else None
    export_gguf(model, out, tokenizer=tokenizer, dtype=dtype, name=model_dir.resolve().name)
    typer.echo(f"exported {model_dir} to {out} ({model.cfg.flavour} flavour, {dtype})")


@import_app.command("hf")
def import_hf_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="A local transformers checkpoint (gemma3_text or llama).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="A new or empty model directory.", callback=new_out)],
) -> None:
    """Import a local transformers checkpoint; never downloads or runs remote code."""
    from flashlm.interop.hf import copy_tokenizer, import_hf

    model = import_hf(hf_dir)
    model.save_pretrained(out)
    copied = copy_tokenizer(hf_dir, out)
    typer.echo(f"imported {hf_dir} to {out}" + ("" if copied else " (no tokenizer.json to copy)"))


@import_app.command("llama2c")
def import_llama2c_cmd(
    model: Annotated[Path, typer.Argument(help="A llama2.c checkpoint (legacy .bin export).")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Its SentencePiece .model file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="A new or empty model directory.", callback=new_out)],
) -> None:
    """Import a llama2.c checkpoint and its SentencePiece tokenizer."""
    from flashlm.interop.llama2c import import_llama2c

    import_llama2c(model, tokenizer, out)
    typer.echo(f"imported {model} to {out}")
