"""What several command groups share: the stderr console, the --precision check, device and model loading,
the one-line result echo and the masked-prediction convention option."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
INFERENCE_PRECISION = (
    "auto (bf16 weights on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16 "
    "(much slower on CPUs without native bf16)."
)


def check_precision(value: str) -> str:
    """`value` if it is a known precision, else a ConfigError naming the choices."""
    from flashlm.errors import ConfigError
    from flashlm.hardware import PRECISIONS

    if value not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def eval_device(device: str) -> str:
    """--device: "auto" is cuda when available, else cpu."""
    from flashlm.hardware import default_device

    return str(default_device(device)) if device == "auto" else device


def eval_load(model_dir: Path, device: str, tokenizer: bool = True):
    """(model, tokenizer) of a model directory, on `device`."""
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir, device=eval_device(device))
    return model, Tokenizer.load(model_dir) if tokenizer else None


def eval_echo(task: str, results: dict, path: Path, keys: tuple[str, ...]) -> None:
    """One line: the task, the `keys` of its results and where they were written."""
    shown = ", ".join(f"{k} {results[k]:.4g}" if isinstance(results[k], float) else f"{k} {results[k]}" for k in keys)
    typer.echo(f"{task}: {shown}; written to {path}")


def next_token_convention(model_dir: Path, flag: bool | None) -> bool:
    """The masked-prediction convention: the flag, else the checkpoint's training config, else next-token."""
    from flashlm.evaluate.masked import trained_next_token

    return trained_next_token(model_dir) if flag is None else flag


CONVENTION = typer.Option(
    "--next-token/--in-place",
    help="Masked next-token (GPT-BERT) or in-place (BERT) prediction; default: "
    "what the checkpoint was trained with, else next-token.",
)
