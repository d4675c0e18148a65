"""The `flashlm` command: one verb per capability, thin wrappers over the library.

One module per command group: `tokenizer`, `data`, `model` (generate, plan, explain, fill-mask, info),
`train` (train, distill, demo), `evaluate` (the `eval` group), `interop` (import / export) and
`serving` (serve, chat); `common` holds what they share. Each command parses its options, calls the
library and prints; the library is imported inside the commands, so `flashlm --help` stays fast.

User mistakes raise `FlashLMError`; `main` prints its message on one line and exits with code 2; Ctrl-C
exits with 130 and one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from flashlm.cli.common import INFERENCE_PRECISION, console
from flashlm.cli.data import data_app, data_prepare, data_stories
from flashlm.cli.evaluate import (
    eval_all,
    eval_app,
    eval_babi,
    eval_cloze,
    eval_efficiency,
    eval_longrange,
    eval_mlm,
    eval_nsp,
    eval_ppl,
    eval_report,
    eval_squad,
    eval_translate,
)
from flashlm.cli.interop import export_app, export_hf_cmd, import_app, import_hf_cmd, import_llama2c_cmd
from flashlm.cli.model import explain_command, fill_mask_command, generate, info, plan_command
from flashlm.cli.serving import chat, serve
from flashlm.cli.tokenizer import tokenizer_app, tokenizer_train
from flashlm.cli.train import TIMED_STEP_CAP, demo, distill_app, distill_cache, distill_command, train_command
from flashlm.errors import FlashLMError, first_line

INTERRUPTED = 130  # the shell's exit status for a process ended by SIGINT

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="FlashLM: build, pre-train, distill, evaluate and serve compact language models.",
)

# Commands, in the order `flashlm --help` lists them; then the command groups.
app.command()(generate)
app.command("train")(train_command)
app.command("plan")(plan_command)
app.command()(demo)
app.command()(serve)
app.command()(chat)
app.command("explain")(explain_command)
app.command("fill-mask")(fill_mask_command)
app.command()(info)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")
app.add_typer(eval_app, name="eval")
app.add_typer(distill_app, name="distill")


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line and exit code 2, and Ctrl-C into
    one line and exit code 130 (typer answers a KeyboardInterrupt with 130 as the return value). A training
    run stopped by a signal saves a checkpoint, prints how to resume and exits with 128 + the signal itself."""
    try:
        code = app(standalone_mode=False)
    except FlashLMError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except Exception as exc:
        if _out_of_memory(exc):
            console.print(
                f"[bold red]error:[/] out of memory ({first_line(exc)}); lower the batch size, the sequence length "
                "or the model size",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(2)
        if not isinstance(exc, _click_errors()):
            raise
        sys.exit(_usage_error(exc))
    if code == INTERRUPTED:
        console.print("interrupted (Ctrl-C)", highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation the machine could not make: numpy's and Python's MemoryError, torch's CPU allocator
    (a RuntimeError) and CUDA's OutOfMemoryError. Sizes the user chose, so one line rather than a traceback."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(exc)
    )


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's exception base class, as typer raises it: recent typer releases carry their own copy of
    click, whose classes are not `click`'s (found from typer's public `BadParameter`, not by module path)."""
    import click

    vendored = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return (vendored, click.ClickException)


def _usage_error(exc: Exception) -> int:
    """Show a click error (an unknown option, a missing argument, a value out of an option's range) as one
    line naming the command's help; the command line with no arguments shows the help. Returns the exit code."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        return 0
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    message = " ".join(exc.format_message().split())  # click may wrap a long message over lines
    console.print(f"[bold red]error:[/] {message}{where}", highlight=False, soft_wrap=True)
    return 2


__all__ = [
    "INFERENCE_PRECISION",
    "TIMED_STEP_CAP",
    "Path",
    "app",
    "chat",
    "console",
    "data_app",
    "data_prepare",
    "data_stories",
    "demo",
    "distill_app",
    "distill_cache",
    "distill_command",
    "eval_all",
    "eval_app",
    "eval_babi",
    "eval_cloze",
    "eval_efficiency",
    "eval_longrange",
    "eval_mlm",
    "eval_nsp",
    "eval_ppl",
    "eval_report",
    "eval_squad",
    "eval_translate",
    "explain_command",
    "export_app",
    "export_hf_cmd",
    "fill_mask_command",
    "generate",
    "import_app",
    "import_hf_cmd",
    "import_llama2c_cmd",
    "info",
    "main",
    "plan_command",
    "serve",
    "tokenizer_app",
    "tokenizer_train",
    "train_command",
]
