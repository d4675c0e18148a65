"""The `flashlm` command: one verb per capability, thin wrappers over the library.

User mistakes raise `FlashLMError`; `main` prints its message on one line and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flashlm.errors import FlashLMError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="FlashLM: build, pre-train, distill, evaluate and serve compact language models.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train byte-level BPE tokenizers.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare token shards.")
import_app = typer.Typer(no_args_is_help=True, help="Import models from other formats.")
export_app = typer.Typer(no_args_is_help=True, help="Export models to other formats.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")

console = Console(stderr=True)


# ---- tokenizer ---------------------------------------------------------------------------------


# ---- data --------------------------------------------------------------------------------------


# ---- generate ----------------------------------------------------------------------------------
@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string; repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible samples.")] = None,
    prefix_lm: Annotated[bool, typer.Option(help="Attend bidirectionally over the prompt.")] = False,
) -> None:
    """Generate text from a model, streaming tokens to the terminal."""
    from flashlm.generate import Sampling, stream
    from flashlm.generate import generate as generate_batch
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed,
                        prefix_lm=prefix_lm)
    if len(prompt) == 1:
        typer.echo(prompt[0], nl=False)
        for piece in stream(model, tokenizer, prompt[0], sampling):
            typer.echo(piece, nl=False)
        typer.echo()
        return
    for text, completion in zip(prompt, generate_batch(model, tokenizer, prompt, sampling), strict=True):
        typer.echo(f"{text}{completion}\n")


# ---- model info --------------------------------------------------------------------------------
@app.command()
def info(preset_or_dir: Annotated[str, typer.Argument(help="A preset name or a model directory.")]) -> None:
    """Print a model's configuration and parameter count."""
    from flashlm.config import PRESETS, count_parameters, get_preset
    from flashlm.model.transformer import FlashLM

    cfg = get_preset(preset_or_dir) if preset_or_dir in PRESETS else FlashLM.load_config(preset_or_dir)
    total, non_embed = count_parameters(cfg), count_parameters(cfg, include_embedding=False)
    for key, value in cfg.to_dict().items():
        typer.echo(f"{key:24s} {value}")
    typer.echo(f"{'parameters':24s} {total:,} ({non_embed:,} without embeddings)")


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line and exit code 2."""
    try:
        app(standalone_mode=False)
    except FlashLMError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


__all__ = ["app", "main", "Path"]
