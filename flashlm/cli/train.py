"""Training commands: `train` (pre-training), `distill` (+ `distill cache`) and `demo` (the whole pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import SEED_MAX, check_minutes, console, eval_device, writable_dir, writable_out

TIMED_STEP_CAP = 10**9  # --minutes without train.steps: the clock alone ends the run

distill_app = typer.Typer(
    help="Distil a teacher into a smaller student (`flashlm distill --config RECIPE`); "
    "`distill cache` stores a teacher's top-k logits once."
)


def _echo_summary(summary: dict, resume: list[str]) -> None:
    """The end of a run (rank 0 only): last step and loss, where the checkpoint and metrics are. A run stopped
    by SIGINT / SIGTERM (checkpoint saved) also says, on stderr, the command that resumes it (`resume`: this
    command's arguments), and exits with 128 + the signal's number, as the shell reports a killed process."""
    import os
    import shlex
    import sys

    main = int(os.environ.get("RANK", 0)) == 0
    if main:
        loss = f"{summary['loss']:.4f}" if summary["loss"] is not None else "-"
        typer.echo(
            f"step {summary['step']}: loss {loss}; checkpoint {summary['checkpoint']} "
            f"(also {summary['out']}/latest); metrics in {summary['out']}/metrics.jsonl"
        )
    if summary.get("signal"):
        if main:
            command = shlex.join(["flashlm", *resume, *([] if "--resume" in resume else ["--resume"])])
            console.print(
                f"stopped by {summary['stopped_by']} after step {summary['step']}, checkpoint saved; "
                f"resume with: {command}",
                highlight=False,
                soft_wrap=True,
                markup=False,
            )
        sys.exit(128 + summary["signal"])


def _command_line(command: list[str], config: Path, overrides: list[str] | None, *extra: str) -> list[str]:
    """The arguments of a training command as typed, for the resume hint."""
    sets = [arg for setting in overrides or () for arg in ("--set", setting)]
    return [*command, "--config", str(config), *sets, *extra]


def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="A YAML recipe, e.g. configs/causal.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key (repeatable): --set train.data=data/shards.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in train.out.")] = False,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Train for this many minutes (evaluation and saves not counted): the lr schedule follows "
            "the clock (warmup ends by a tenth of the budget at the latest) and the run ends with a checkpoint "
            "(train.steps, when set with --set, stays a cap)."
        ),
    ] = None,
) -> None:
    """Pre-train a model (also under torchrun: DDP, or FSDP2 with --set train.distributed=fsdp)."""
    from flashlm.config import load_run_config
    from flashlm.training import train

    check_minutes(minutes, "; leave it out to train for train.steps")  # 0 would be train.minutes' "no budget"
    settings = list(overrides or [])
    extra = (["--minutes", f"{minutes:g}"] if minutes is not None else []) + (["--resume"] if resume else [])
    if resume:
        settings.append("train.resume=true")
    if minutes is not None:
        settings.append(f"train.minutes={minutes}")
        if not any(s.startswith("train.steps=") for s in settings):
            settings.append(f"train.steps={TIMED_STEP_CAP}")
    cfg = load_run_config(config, settings)
    writable_dir(cfg.train.out, "train.out", keep=True)  # before any work; kept, as torchrun ranks share it
    _echo_summary(train(cfg, stop_on_signals=True), _command_line(["train"], config, overrides, *extra))


@distill_app.callback(invoke_without_command=True)
def distill_command(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="A YAML recipe with a distill: section, e.g. configs/distill-tiny.yaml."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key (repeatable): --set distill.alpha=0.3.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in train.out.")] = False,
) -> None:
    """Train a student with a teacher (online, or from a `distill cache`) in the training loop."""
    from flashlm.config import load_run_config
    from flashlm.errors import ConfigError
    from flashlm.training import train

    if ctx.invoked_subcommand is not None:
        if config is not None:
            raise ConfigError(f"--config belongs to `flashlm distill`, not `flashlm distill {ctx.invoked_subcommand}`")
        return
    if config is None:
        typer.echo(ctx.get_help())
        return
    cfg = load_run_config(config, [*(overrides or []), *(["train.resume=true"] if resume else [])])
    if cfg.distill is None:
        raise ConfigError(
            f"distill: {config} has no distill: section; add one with distill.teacher "
            "(see configs/distill-tiny.yaml) or use `flashlm train`"
        )
    writable_dir(cfg.train.out, "train.out", keep=True)
    _echo_summary(
        train(cfg, stop_on_signals=True),
        _command_line(["distill"], config, overrides, *(["--resume"] if resume else [])),
    )


@distill_app.command("cache")
def distill_cache(
    teacher: Annotated[Path, typer.Argument(help="The teacher: a FlashLM checkpoint or local transformers dir.")],
    data: Annotated[Path, typer.Argument(help="Token shards from `flashlm data prepare`.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the cache (rerun to resume).", callback=writable_out)
    ],
    top_k: Annotated[int, typer.Option(help="Token ids kept per position.")] = 64,
    seq_len: Annotated[
        int | None,
        typer.Option(
            help="Teacher window; default its context (at most 2048). Use train.seq_len to match the student."
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(help="Window step; default seq-len / 2 (every position keeps >= seq-len / 2 tokens of context)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per teacher forward pass.")] = 8,
    split: Annotated[str, typer.Option(help="Shard split to cache.")] = "train",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Run the teacher once over the shards and store each position's top-k ids and log-probabilities."""
    from flashlm.training.distill import cache_teacher

    cache = cache_teacher(teacher, data, out, top_k, seq_len, batch_size, split, eval_device(device), stride=stride)
    size = cache.n_positions * cache.bytes_per_token
    typer.echo(
        f"cached {cache.n_positions:,} positions (top-{cache.top_k}, window {cache.seq_len}, stride "
        f"{cache.stride}) in {out}: {cache.bytes_per_token} bytes per token, {size / 1e6:.1f} MB"
    )


def demo(
    data: Annotated[list[str] | None, typer.Option(help="Your own text/JSONL/Parquet files (repeatable).")] = None,
    minutes: Annotated[float, typer.Option(help="Approximate total budget.")] = 5.0,
    out: Annotated[Path, typer.Option(help="Run folder.", callback=writable_out)] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for the corpus, sampling and training.")] = 0,
) -> None:
    """The whole pipeline in minutes: tokenizer, shards, pre-training, distillation, evaluation, samples."""
    from flashlm.demo import run_demo

    run_demo(out, minutes=minutes, data=data, seed=seed)
