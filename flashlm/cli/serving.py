"""`flashlm serve` (the OpenAI-compatible API and playground) and `flashlm chat` (the terminal)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import INFERENCE_PRECISION, SEED_MAX, check_precision, sampling_options

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def serve(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    host: Annotated[
        str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes the model to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
    draft: Annotated[
        Path | None,
        typer.Option(
            help="A smaller model with the same tokenizer (e.g. a student distilled from this one): every "
            "request then decodes speculatively (same text greedily, same distribution when sampling), one "
            "request at a time (--batching does not apply)."
        ),
    ] = None,
    lookahead: Annotated[int, typer.Option(min=1, help="Tokens the draft proposes per check (with --draft).")] = 4,
    batching: Annotated[
        str,
        typer.Option(
            help="continuous: concurrent requests share each decode step (joining and leaving at any step); "
            "serial: one request at a time."
        ),
    ] = "continuous",
    max_batch: Annotated[
        int, typer.Option(min=1, help="Most requests decoded together (--batching continuous); others wait.")
    ] = 16,
    max_request_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body accepted; bigger ones get 413.")
    ] = 1_048_576,
    max_queue: Annotated[
        int,
        typer.Option(min=1, help="Most generation requests running or waiting at once; more get 429 + Retry-After."),
    ] = 64,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="FLASHLM_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every endpoint but / and /health.",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback --host without --api-key (open to anyone).")
    ] = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions) and a web playground (/).
    Limits and options: docs/serving.md."""
    from flashlm.errors import ConfigError
    from flashlm.serve.app import serve as run_server

    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    run_server(  # refuses an open non-loopback host in one line before the model loads
        model_dir,
        host=host,
        port=port,
        device=device,
        log_level=log_level,
        precision=check_precision(precision),
        draft_dir=draft,
        lookahead=lookahead,
        batching=_batching(batching),
        max_batch=max_batch,
        max_request_bytes=max_request_bytes,
        max_queue=max_queue,
        api_key=api_key,
        insecure=insecure,
    )


def _batching(value: str) -> str:
    from flashlm.errors import ConfigError

    if value not in ("continuous", "serial"):
        raise ConfigError(f"--batching must be continuous or serial, got {value!r}")
    return value


def chat(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per reply.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    seed: Annotated[int | None, typer.Option(min=0, max=SEED_MAX, help="Seed for reproducible replies.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
) -> None:
    """Chat in the terminal: one message a line ("User: …\\nAssistant:" template); /reset, /exit or EOF."""
    from flashlm.serve.engine import Engine, chat_repl

    sampling = sampling_options(  # before the model loads
        "chat",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    engine = Engine.load(model_dir, device=device, precision=check_precision(precision), batching="serial")
    sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a tokenizer error
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {engine.name}; /reset clears the conversation, /exit or Ctrl-D ends it", err=True)
    chat_repl(
        engine, sampling, sys.stdin, lambda text: typer.echo(text, nl=False), system=system, interactive=interactive
    )
