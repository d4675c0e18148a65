"""Commands on one model: `generate`, `plan`, `explain`, `fill-mask` and `info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import (
    CONVENTION,
    INFERENCE_PRECISION,
    SEED_MAX,
    check_precision,
    console,
    eval_load,
    load_model,
    next_token_convention,
    sampling_options,
    writable_out,
)


def generate(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string; repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=SEED_MAX, help="Seed for reproducible samples.")] = None,
    prefix_lm: Annotated[bool, typer.Option(help="Attend bidirectionally over the prompt.")] = False,
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
    draft: Annotated[
        Path | None,
        typer.Option(
            help="A smaller model with the same tokenizer (e.g. a student distilled from this one) that "
            "proposes tokens for speculative decoding: the same text greedily, the same distribution when "
            "sampling, sooner. Prompts then run one at a time."
        ),
    ] = None,
    lookahead: Annotated[int, typer.Option(min=1, help="Tokens the draft proposes per check (with --draft).")] = 4,
    compile: Annotated[
        bool,
        typer.Option(
            help="Run the decode step under torch.compile: faster per token after a one-time compile of "
            "seconds to a minute, so worth it for long outputs."
        ),
    ] = False,
) -> None:
    """Generate text from a model, streaming tokens to the terminal."""
    from flashlm.generation import generate as generate_batch
    from flashlm.generation import stream
    from flashlm.hardware import dtype_of, resolve_precision
    from flashlm.speculative import load_draft, speculative_generate, speculative_stream

    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    dtype = dtype_of(resolve_precision(check_precision(precision), "cpu"))
    model, tokenizer = load_model(model_dir, dtype=dtype)
    draft_model = None if draft is None else load_draft(draft, model, tokenizer, dtype=dtype)
    sampling = sampling_options(
        "generate",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop or ()),
        seed=seed,
        prefix_lm=prefix_lm,
    )
    prompt = [fit_prompt(tokenizer, text, model.cfg.max_seq_len, max_new_tokens) for text in prompt]
    decoder = "compiled" if compile else "fast"
    if compile and draft_model is None:  # the first token waits for the compile: say why
        console.print("compiling the decode step (once per process); the tokens then come faster")
    if len(prompt) == 1:
        typer.echo(prompt[0], nl=False)
        if draft_model is None:
            pieces = stream(model, tokenizer, prompt[0], sampling, decoder=decoder)
        else:
            pieces = speculative_stream(model, draft_model, tokenizer, prompt[0], sampling, lookahead)
        for piece in pieces:
            typer.echo(piece, nl=False)
        typer.echo()
        return
    if draft_model is None:
        completions = generate_batch(model, tokenizer, prompt, sampling, decoder=decoder)
    else:
        completions = speculative_generate(model, draft_model, tokenizer, prompt, sampling, lookahead)
    for text, completion in zip(prompt, completions, strict=True):
        typer.echo(f"{text}{completion}\n")


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float
) -> None:
    """The sampling options' ranges, each refused with one line naming the option."""
    import math

    from flashlm.errors import ConfigError

    checks = (
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
        ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0, "0 (greedy) or more"),
        ("--top-k", top_k, top_k is None or top_k >= 1, "at least 1"),
        ("--top-p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1]"),
        (
            "--repetition-penalty",
            repetition_penalty,
            math.isfinite(repetition_penalty) and repetition_penalty > 0,
            "> 0",
        ),
    )
    for option, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{option}: got {value}; it must be {allowed}")


def fit_prompt(tokenizer, text: str, context: int, max_new_tokens: int) -> str:
    """`text`, or its end when it fills the model's context: the last tokens that fit with room for up to
    `max_new_tokens` (at most half the context) new ones, said on stderr in one line."""
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) < context:  # room for at least one new token: generation itself caps the rest, said here
        if len(ids) + max_new_tokens > context:
            console.print(
                f"note: the model's context is {context} tokens, so after this prompt at most "
                f"{context - len(ids)} of the {max_new_tokens} new tokens asked for fit",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return text
    room = min(max_new_tokens, context // 2)
    keep = context - room - 1  # <bos> comes first
    kept = tokenizer.decode(ids[-keep:])
    while keep > 1 and len(tokenizer.encode(kept, add_bos=True)) > context - room:  # re-encoding may merge
        keep -= 1
        kept = tokenizer.decode(ids[-keep:])
    console.print(
        f"note: the prompt is {len(ids) - 1} tokens and the model's context {context}; "
        f"kept its last {keep} tokens to leave room for {room} new ones",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return kept


def plan_command(
    preset: Annotated[str | None, typer.Option(help="A model preset, e.g. 7.5b.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Or the model of a YAML recipe.")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs the run is spread over.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Sequences per GPU per micro-step.")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: the model's context).")] = None,
    strategy: Annotated[str, typer.Option(help="fsdp (shard weights, grads, optimizer) or ddp.")] = "fsdp",
    checkpointing: Annotated[bool, typer.Option(help="Activation checkpointing.")] = False,
    gpu_memory: Annotated[float | None, typer.Option(min=0.001, help="GiB per GPU, to say whether it fits.")] = None,
) -> None:
    """Memory per GPU of training a model: weights, gradients, AdamW, activations, logits (estimates)."""
    from flashlm.config import get_preset, load_run_config
    from flashlm.errors import ConfigError
    from flashlm.training.memory import format_plan, memory_plan

    if (preset is None) == (config is None):
        raise ConfigError("plan: give exactly one of --preset NAME or --config RECIPE.yaml")
    model = get_preset(preset) if preset else load_run_config(config).model
    plan = memory_plan(model, gpus, batch_size, seq_len, strategy, checkpointing)
    typer.echo(format_plan(plan, gpu_memory))


def explain_command(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    text: Annotated[str, typer.Argument(help="The text to look at.")],
    layer: Annotated[int | None, typer.Option(help="Layer of the attention map; default the mean of layers.")] = None,
    head: Annotated[int | None, typer.Option(help="Head of the attention map; default the mean of heads.")] = None,
    target: Annotated[
        str | None, typer.Option(help="Next token to explain (e.g. ' cat'); default the likeliest.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the PNGs and explain.json.", callback=writable_out)
    ] = Path("explain"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Attention maps and token saliency for a text: attention.png, attention_grid.png, saliency.png, JSON."""
    from flashlm.explain import save_explanation

    model, tokenizer = load_model(model_dir, device=device)
    paths = save_explanation(model, tokenizer, text, out, layer=layer, head=head, target=target)
    for path in paths.values():
        typer.echo(str(path))


def fill_mask_command(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    text: Annotated[str, typer.Argument(help='Text with one or more <mask>: "The cat sat on the <mask>."')],
    top_k: Annotated[int, typer.Option(min=1, help="Candidates per mask.")] = 5,
    next_token: Annotated[bool | None, CONVENTION] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Print the most likely tokens for each <mask> (bidirectional attention)."""
    from flashlm.evaluate.masked import fill_mask

    model, tokenizer = eval_load(model_dir, device)
    convention = next_token_convention(model_dir, next_token)
    found = fill_mask(model, tokenizer, text, top_k, convention)
    typer.echo(f"{'next-token' if convention else 'in-place'} masked prediction")
    for i, candidates in enumerate(found, 1):
        if len(found) > 1:
            typer.echo(f"<mask> {i}:")
        for text_, prob in candidates:
            typer.echo(f"  {100 * prob:5.1f}%  {text_!r}")


def info(preset_or_dir: Annotated[str, typer.Argument(help="A preset name or a model directory.")]) -> None:
    """Print a model's configuration and parameter count."""
    from flashlm.config import PRESETS, count_parameters, get_preset
    from flashlm.errors import ConfigError
    from flashlm.model.transformer import FlashLM

    if preset_or_dir not in PRESETS and not Path(preset_or_dir).exists():
        raise ConfigError(f"{preset_or_dir}: neither a preset ({', '.join(PRESETS)}) nor a model directory")
    cfg = get_preset(preset_or_dir) if preset_or_dir in PRESETS else FlashLM.load_config(preset_or_dir)
    total, non_embed = count_parameters(cfg), count_parameters(cfg, include_embedding=False)
    for key, value in cfg.to_dict().items():
        typer.echo(f"{key:24s} {value}")
    typer.echo(f"{'parameters':24s} {total:,} ({non_embed:,} without embeddings)")
