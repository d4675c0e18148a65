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
INFERENCE_PRECISION = ("auto (bf16 weights on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16 "
                       "(much slower on CPUs without native bf16).")


def _precision(value: str) -> str:
    from flashlm.errors import ConfigError
    from flashlm.hardware import PRECISIONS

    if value not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


# ---- tokenizer ---------------------------------------------------------------------------------
@tokenizer_app.command("train")
def tokenizer_train(
    files: Annotated[list[Path], typer.Argument(help="Text / JSONL / Parquet files or directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, the 5 special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(help="Merge only pairs seen this often.")] = 2,
    txt_mode: Annotated[str, typer.Option(help="Text files: 'line' or 'blank'(-line separated).")] = "line",
    field: Annotated[str, typer.Option(help="JSONL / Parquet field holding the text.")] = "text",
) -> None:
    """Train a byte-level BPE tokenizer (<pad> <bos> <eos> <mask> <sep> get ids 0-4)."""
    from flashlm.tokenizer import Tokenizer

    paths = [str(f) for f in files]
    tok = Tokenizer.train(paths, vocab_size, min_frequency, txt_mode=txt_mode, field=field)
    path = tok.save(out)
    typer.echo(f"tokenizer with {tok.vocab_size} tokens (fingerprint {tok.fingerprint[:8]}) saved to {path}")


# ---- data --------------------------------------------------------------------------------------
@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Text / JSONL / Parquet files or directories.")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.json or its directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the shards.")],
    val_fraction: Annotated[float, typer.Option(help="Share of documents for the val split.")] = 0.01,
    workers: Annotated[int | None, typer.Option(help="Tokenizing processes; default by CPU count.")] = None,
    txt_mode: Annotated[str, typer.Option(help="Text files: 'line' or 'blank'(-line separated).")] = "line",
    field: Annotated[str, typer.Option(help="JSONL / Parquet field holding the text.")] = "text",
) -> None:
    """Tokenize documents into train/val token shards (+ document index and meta.json)."""
    from flashlm.data.shards import prepare_shards

    meta = prepare_shards([str(p) for p in inputs], tokenizer, out, val_fraction=val_fraction,
                          workers=workers, txt_mode=txt_mode, field=field, progress=True)
    for split, stats in meta["splits"].items():
        typer.echo(f"{split}: {stats['docs']:,} documents, {stats['tokens']:,} tokens, "
                   f"{stats['text_bytes'] / 1e6:.1f} MB of text")
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
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
) -> None:
    """Generate text from a model, streaming tokens to the terminal."""
    from flashlm.generate import Sampling, stream
    from flashlm.generate import generate as generate_batch
    from flashlm.hardware import dtype_of, resolve_precision
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir, dtype=dtype_of(resolve_precision(_precision(precision), "cpu")))
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


# ---- interop -----------------------------------------------------------------------------------
@export_app.command("hf")
def export_hf_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the transformers checkpoint.")],
) -> None:
    """Export to a transformers checkpoint (Gemma3ForCausalLM or LlamaForCausalLM)."""
    from flashlm.interop.hf import export_hf
    from flashlm.model.transformer import FlashLM

    model = FlashLM.from_pretrained(model_dir)
    tokenizer = model_dir if (model_dir / "tokenizer.json").is_file() else None
    export_hf(model, out, tokenizer=tokenizer)
    typer.echo(f"exported {model_dir} to {out}" + ("" if tokenizer else " (no tokenizer.json to copy)"))


@import_app.command("hf")
def import_hf_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="A local transformers checkpoint (gemma3_text or llama).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the FlashLM model.")],
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
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the FlashLM model.")],
) -> None:
    """Import a llama2.c checkpoint and its SentencePiece tokenizer."""
    from flashlm.interop.llama2c import import_llama2c

    import_llama2c(model, tokenizer, out)
    typer.echo(f"imported {model} to {out}")


# ---- train -------------------------------------------------------------------------------------
TIMED_STEP_CAP = 10**9  # --minutes without train.steps: the clock alone ends the run

@app.command("train")
def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="A YAML recipe, e.g. configs/causal.yaml.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key (repeatable): --set train.data=data/shards.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the latest checkpoint in train.out.")] = False,
    minutes: Annotated[float | None, typer.Option(
        help="Train for this many minutes: the lr schedule follows the clock and the run ends with a "
             "checkpoint (train.steps, when set with --set, stays a cap).")] = None,
) -> None:
    """Pre-train a model (also under torchrun: DDP, or FSDP2 with --set train.distributed=fsdp)."""
    import os

    from flashlm.config import load_run_config
    from flashlm.train.loop import train

    settings = list(overrides or [])
    if resume:
        settings.append("train.resume=true")
    if minutes is not None:
        settings.append(f"train.minutes={minutes}")
        if not any(s.startswith("train.steps=") for s in settings):
            settings.append(f"train.steps={TIMED_STEP_CAP}")
    summary = train(load_run_config(config, settings))
    if int(os.environ.get("RANK", 0)) == 0:
        loss = f"{summary['loss']:.4f}" if summary["loss"] is not None else "-"
        typer.echo(f"step {summary['step']}: loss {loss}; checkpoint {summary['checkpoint']} "
                   f"(also {summary['out']}/latest); metrics in {summary['out']}/metrics.jsonl")


@app.command("plan")
def plan_command(
    preset: Annotated[str | None, typer.Option(help="A model preset, e.g. 7.5b.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Or the model of a YAML recipe.")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs the run is spread over.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Sequences per GPU per micro-step.")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: the model's context).")] = None,
    strategy: Annotated[str, typer.Option(help="fsdp (shard weights, grads, optimizer) or ddp.")] = "fsdp",
    checkpointing: Annotated[bool, typer.Option(help="Activation checkpointing.")] = False,
    gpu_memory: Annotated[float | None, typer.Option(help="GiB per GPU, to say whether it fits.")] = None,
) -> None:
    """Memory per GPU of training a model: weights, gradients, AdamW, activations, logits (estimates)."""
    from flashlm.config import get_preset, load_run_config
    from flashlm.errors import ConfigError
    from flashlm.train.memory import format_plan, memory_plan

    if (preset is None) == (config is None):
        raise ConfigError("plan: give exactly one of --preset NAME or --config RECIPE.yaml")
    model = get_preset(preset) if preset else load_run_config(config).model
    plan = memory_plan(model, gpus, batch_size, seq_len, strategy, checkpointing)
    typer.echo(format_plan(plan, gpu_memory))


# ---- eval --------------------------------------------------------------------------------------
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models: perplexity, cloze, long-range tasks, "
                       "efficiency, fine-tuned tasks, reports (`eval all`: the whole report card).")
app.add_typer(eval_app, name="eval")


def _eval_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _eval_load(model_dir: Path, device: str, tokenizer: bool = True):
    """(model, tokenizer) of a model directory, on `device`."""
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir, device=_eval_device(device))
    return model, Tokenizer.load(model_dir) if tokenizer else None


def _eval_echo(task: str, results: dict, path: Path, keys: tuple[str, ...]) -> None:
    shown = ", ".join(f"{k} {results[k]:.4g}" if isinstance(results[k], float) else f"{k} {results[k]}"
                      for k in keys)
    typer.echo(f"{task}: {shown}; written to {path}")


@eval_app.command("ppl")
def eval_ppl(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    files: Annotated[list[Path], typer.Argument(help="Text / JSONL / Parquet files or directories.")],
    seq_len: Annotated[int | None, typer.Option(help="Window length; default the model's context.")] = None,
    stride: Annotated[int | None, typer.Option(help="Window step (≤ seq-len); default seq-len / 2.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass (no effect on results).")] = 8,
    txt_mode: Annotated[str, typer.Option(help="Text documents: 'blank' or 'line' separated.")] = "blank",
    field: Annotated[str, typer.Option(help="JSONL / Parquet field holding the text.")] = "text",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Loss, perplexity and bits per byte with a sliding window."""
    from flashlm.data.corpus import resolve_files
    from flashlm.evaluate.lm import perplexity, read_texts
    from flashlm.evaluate.report import write_result

    paths = resolve_files([str(f) for f in files])
    model, tokenizer = _eval_load(model_dir, device)
    results = perplexity(model, tokenizer, read_texts(paths, txt_mode, field), seq_len, stride, batch_size)
    settings = {"seq_len": results["seq_len"], "stride": results["stride"], "txt_mode": txt_mode}
    path = write_result(out, "ppl", results, model=str(model_dir), data=paths, settings=settings)
    _eval_echo("ppl", results, path, ("loss", "ppl", "bpb", "tokens"))


@eval_app.command("cloze")
def eval_cloze(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    file: Annotated[Path, typer.Argument(help="One passage a line; the target is the last word.")],
    batch_size: Annotated[int, typer.Option(help="Passages per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Accuracy of greedily predicting each passage's last word, and the word's perplexity."""
    from flashlm.errors import DataError
    from flashlm.evaluate.lm import cloze
    from flashlm.evaluate.report import write_result

    if not file.is_file():
        raise DataError(f"no such file: {file}")
    model, tokenizer = _eval_load(model_dir, device)
    results = cloze(model, tokenizer, file.read_text(encoding="utf-8").splitlines(), batch_size)
    path = write_result(out, "cloze", results, model=str(model_dir), data=[file],
                        scores={"cloze": results["accuracy"]})
    _eval_echo("cloze", results, path, ("accuracy", "target_ppl", "passages"))


@eval_app.command("efficiency")
def eval_efficiency(
    model: Annotated[str, typer.Argument(help="A model directory, or a preset name (random weights).")],
    batch_size: Annotated[list[int] | None, typer.Option(
        "--batch-size", "-b", help="Batch sizes to time (repeatable); default 1 and 8.")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Generated tokens.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Parameters, FLOPs per token, prefill/decode speed, latency, peak memory and KV-cache size."""
    from flashlm.config import PRESETS, get_preset
    from flashlm.evaluate.efficiency import efficiency
    from flashlm.evaluate.report import write_result
    from flashlm.hardware import describe, dtype_of, resolve_precision
    from flashlm.model.transformer import FlashLM

    if model in PRESETS and not Path(model).is_dir():
        net = FlashLM(get_preset(model)).eval()
    else:
        net, _ = _eval_load(Path(model), device, tokenizer=False)
    run_on = _eval_device(device)
    net = net.to(dtype_of(resolve_precision(_precision(precision), run_on)))
    sizes = tuple(batch_size or (1, 8))
    results = efficiency(net, sizes, prompt_len, new_tokens, run_on)
    settings = {"batch_sizes": list(sizes), "prompt_len": results["prompt_len"], "new_tokens": new_tokens,
                "precision": results["precision"]}
    path = write_result(out, "efficiency", results, model=model, seed=0, settings=settings)
    typer.echo(f"{results['precision']} on {describe(results['machine'])}")
    for run in results["runs"]:
        typer.echo(f"batch {run['batch_size']}: prefill {run['prefill_tokens_per_s']:.0f} tok/s, decode "
                   f"{run['decode_tokens_per_s']:.0f} tok/s, first token {1000 * run['ttft_s']:.1f} ms, "
                   f"p50/p95 {1000 * run['latency_p50_s']:.1f}/{1000 * run['latency_p95_s']:.1f} ms")
    typer.echo(f"written to {path}")


@eval_app.command("report")
def eval_report(
    results_dir: Annotated[Path, typer.Argument(help="Directory of <task>.json results.")] = Path("results"),
    metrics: Annotated[Path | None, typer.Option(help="A training metrics.jsonl for loss curves.")] = None,
) -> None:
    """Assemble every result into report.md with plots."""
    from flashlm.evaluate.report import write_report

    typer.echo(f"report written to {write_report(results_dir, metrics)}")


@eval_app.command("longrange")
def eval_longrange(
    minutes: Annotated[float | None, typer.Option(
        help="Training budget in minutes for all the small models together (also capped by --steps).")] = 12.0,
    patterns: Annotated[str, typer.Option(
        help="Comma-separated layer patterns: 'default' (local/global), 'global' (all-global) or L/G strings."
    )] = "default,global",
    layers: Annotated[int, typer.Option(help="Layers of each small model ('default' is LG at 2).")] = 2,
    d_model: Annotated[int, typer.Option(help="Width of each small model.")] = 64,
    window: Annotated[int | None, typer.Option(help="Sliding window of the local layers (default 4).")] = None,
    rope_base_global: Annotated[float | None, typer.Option(
        help="RoPE base of the global layers (default 1e30, i.e. almost NoPE; models default to 1e6).")] = None,
    train_len: Annotated[int, typer.Option(help="Longest passkey training row; scored up to 4x this.")] = 256,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per model (default: the task's).")] = None,
    samples: Annotated[int, typer.Option(help="Passkey items per (length, depth) cell.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for data and models.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (1: best for these tiny models).")] = 1,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Passkey retrieval and MQAR on small models trained here, local/global vs all-global; KV bytes."""
    from flashlm.evaluate.longrange import LongRangeConfig, write_longrange

    changes = {"threads": threads, "n_layers": layers, "d_model": d_model, "train_len": train_len,
               "passkey_samples": samples, "seed": seed, "minutes": minutes}
    if window is not None:
        changes["sliding_window"] = window
    if rope_base_global is not None:
        changes["rope_base_global"] = rope_base_global
    if steps is not None:
        changes.update(passkey_steps=steps, mqar_steps=steps)
    cfg = LongRangeConfig.from_names(patterns.split(","), **changes)
    path, results = write_longrange(out, cfg, log=lambda m: typer.echo(m, err=True))
    for row in results["summary"]:
        typer.echo("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    typer.echo(f"longrange written to {path}")


@eval_app.command("all")
def eval_all(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    data: Annotated[list[Path] | None, typer.Option(help="Text files for perplexity (repeatable).")] = None,
    cloze_file: Annotated[Path | None, typer.Option("--cloze", help="A LAMBADA-format file.")] = None,
    out: Annotated[Path, typer.Option(help="Results directory (report.md goes here).")] = Path("results"),
    quick: Annotated[bool, typer.Option(help="Small data and budgets: a report in a few minutes.")] = False,
    minutes: Annotated[float | None, typer.Option(
        help="Training minutes shared by the trained tasks (default: 2.5 with --quick, else each task's).")] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated subset of ppl,cloze,efficiency,longrange,babi,squad,translate.")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: 1 with --quick: its small models gain nothing from more).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Every task that applies to MODEL (fine-tuned tasks on copies of it), then report.md with plots."""
    from flashlm.evaluate.report import evaluate_all

    report = evaluate_all(model_dir, out, quick=quick, data=data or (), cloze_file=cloze_file, minutes=minutes,
                          tasks=tasks.split(",") if tasks else None, threads=threads, device=device,
                          log=lambda m: typer.echo(m, err=True))
    typer.echo(f"report written to {report}")


# ---- eval: fine-tuned tasks --------------------------------------------------------------------
ModelOpt = Annotated[Path | None, typer.Option("--model", help="Start from this FlashLM directory.")]
PresetOpt = Annotated[str | None, typer.Option(help="Else a fresh model of this preset (default: task's).")]
MinutesOpt = Annotated[float | None, typer.Option(help="Training budget in minutes (schedule follows it).")]
EpochsOpt = Annotated[float | None, typer.Option(help="Training epochs (default: the task's).")]
StepsOpt = Annotated[int | None, typer.Option(help="At most this many optimizer steps.")]
BatchOpt = Annotated[int | None, typer.Option(help="Examples per step (default: the task's).")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (default: the task's).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the model, tokenizer and shuffling.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch (1 suits small models and shared CPUs).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, ...")]
OutOpt = Annotated[Path, typer.Option(help="Results directory.")]
SaveOpt = Annotated[Path | None, typer.Option(help="Keep the fine-tuned model (and tokenizer) here.")]
PrecisionOpt = Annotated[str, typer.Option(
    help="Training precision: auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16.")]
ClockOpt = Annotated[str, typer.Option(help="What --minutes counts: wall time, or this process's cpu time.")]


def _ft_setup(model_dir: Path | None, preset: str | None, device: str, threads: int | None, cfg):
    """Threads, device and starting point: (model, tokenizer) from --model, or None (a fresh model
    of --preset or the task's default, written into `cfg.model`)."""
    import dataclasses

    import torch

    if threads:
        torch.set_num_threads(threads)
    if model_dir is not None:
        return _eval_load(model_dir, device), cfg
    cfg = dataclasses.replace(cfg, model=preset or cfg.model, device=_eval_device(device))
    return (None, None), cfg


def _ft_config(base, minutes, epochs, max_steps, batch_size, lr, seed, precision="auto", clock="wall"):
    """The task's FinetuneConfig with the options given on the command line."""
    import dataclasses

    given = {"precision": precision, "clock": clock, "max_minutes": minutes, "epochs": epochs, "max_steps": max_steps,
             "batch_size": batch_size, "lr": lr}
    if minutes is not None and epochs is None:
        given["epochs"] = 10_000.0  # the clock decides
    return dataclasses.replace(base, seed=seed, **{k: v for k, v in given.items() if v is not None})


@eval_app.command("babi")
def eval_babi(
    model: ModelOpt = None,
    preset: PresetOpt = None,
    data: Annotated[Path | None, typer.Option(help="bAbI directory (default: $FLASHLM_BABI).")] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated task numbers.")] = "1-20",
    per_task: Annotated[bool, typer.Option(help="One model per task instead of one joint model.")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="With --per-task: tasks trained side by side, one process each "
                                      "(threads shared out; 2 on 2 cores), quick tasks first (babi.SCHEDULE).")] = 1,
    groups: Annotated[str, typer.Option(
        "--groups", help="With --per-task: tasks that share one model, e.g. '2,3' (the default) or '2,3;7,8'; "
                         "'none' for a model per task.")] = "2,3",
    max_sentences: Annotated[int, typer.Option(help="Story statements kept before each question.")] = 50,
    augment: Annotated[bool, typer.Option(
        help="Rename entities, reword verbs (and turn qa19's compass) at random at every step.")] = True,
    supporting_facts: Annotated[bool, typer.Option(
        "--supporting-facts/--answer-only",
        help="Train the model to write the supporting statements bAbI marks, then '= answer' (strong "
             "supervision; only the answer is scored), or the answer alone.")] = True,
    beam: Annotated[int, typer.Option(min=1, help="Beam search rows when answering (1: greedy).")] = 4,
    copy_statements: Annotated[bool, typer.Option(
        "--copy-statements/--free-chains",
        help="With --supporting-facts: the written chain may only cite statements of the story, whole "
             "(constrained beam search), or any text.")] = True,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    train_limit: Annotated[int | None, typer.Option(help="Training questions per task (subset).")] = None,
    test_limit: Annotated[int | None, typer.Option(help="Test questions per task (subset).")] = None,
    precision: PrecisionOpt = "auto",
    clock: ClockOpt = "wall",
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune on the bAbI 1k training sets (prefix LM) and report exact-match accuracy per task."""
    import dataclasses

    from flashlm.evaluate.babi import BabiConfig, find_data, parse_groups, run_babi, task_file
    from flashlm.evaluate.report import write_result

    if jobs > 1 and not per_task:
        from flashlm.errors import ConfigError

        raise ConfigError(f"--jobs {jobs}: one joint model trains in one process; add --per-task or drop --jobs")
    numbers = tuple(range(1, 21)) if tasks == "1-20" else tuple(int(t) for t in tasks.split(",") if t.strip())
    shared = parse_groups(groups)
    cfg = BabiConfig(tasks=numbers, per_task=per_task, groups=shared, max_sentences=max_sentences, augment=augment,
                     supporting_facts=supporting_facts, beam=beam, copy_statements=copy_statements,
                     train_limit=train_limit, test_limit=test_limit, jobs=jobs, threads=threads)
    (net, tok), cfg = _ft_setup(model, preset, device, threads, cfg)
    ft = _ft_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed, precision, clock)
    cfg = dataclasses.replace(cfg, finetune=ft)
    directory = find_data(data)
    results = run_babi(directory, cfg, net, tok, save)
    settings = {"tasks": list(numbers), "per_task": per_task, "groups": [list(g) for g in shared], "jobs": jobs,
                "max_sentences": max_sentences,
                "augment": augment, "supporting_facts": supporting_facts, "beam": beam,
                "copy_statements": copy_statements,
                "minutes": minutes, "clock": clock, "precision": precision,
                "epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr,
                "preset": preset, "threads": threads}
    scores = {f"babi qa{t}": a for t, a in results["accuracy"].items()}
    path = write_result(out, "babi", results, model=str(model or preset or "default"),
                        data=[task_file(directory, t, s) for t in numbers for s in ("train", "test")], seed=seed,
                        settings=settings, scores=scores)
    _eval_echo("babi", results, path, ("mean_accuracy", "failed_tasks", "train_seconds"))


@eval_app.command("squad")
def eval_squad(
    train: Annotated[Path, typer.Option(help="SQuAD v1.1 JSON training file.")],
    eval_file: Annotated[Path, typer.Option("--eval", help="SQuAD v1.1 JSON evaluation file.")],
    model: ModelOpt = None,
    preset: PresetOpt = None,
    max_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 256,
    doc_stride: Annotated[int, typer.Option(help="Context tokens shared by neighbouring windows.")] = 64,
    max_answer_len: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 30,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    precision: PrecisionOpt = "auto",
    clock: ClockOpt = "wall",
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune a span head on a SQuAD-format file and report EM/F1 (official v1.1 normalisation)."""
    import dataclasses

    from flashlm.evaluate.report import write_result
    from flashlm.evaluate.squad import SquadConfig, run_squad

    cfg = SquadConfig(max_len=max_len, doc_stride=doc_stride, max_answer_len=max_answer_len)
    (net, tok), cfg = _ft_setup(model, preset, device, threads, cfg)
    ft = _ft_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed, precision, clock)
    cfg = dataclasses.replace(cfg, finetune=ft)
    results = run_squad(train, eval_file, cfg, net, tok, save)
    settings = {"max_len": max_len, "doc_stride": doc_stride, "max_answer_len": max_answer_len,
                "minutes": minutes, "clock": clock, "precision": precision,
                "epochs": ft.epochs, "lr": ft.lr, "preset": preset}
    path = write_result(out, "squad", results, model=str(model or preset or "default"),
                        data=[train, eval_file], seed=seed, settings=settings,
                        scores={"squad f1": results["f1"] / 100})
    _eval_echo("squad", results, path, ("exact_match", "f1", "count"))


@eval_app.command("translate")
def eval_translate(
    train_src: Annotated[Path, typer.Option(help="Training sources, one a line (.gz ok).")],
    train_tgt: Annotated[Path, typer.Option(help="Training targets, line-aligned.")],
    eval_src: Annotated[Path, typer.Option(help="Evaluation sources.")],
    eval_tgt: Annotated[Path, typer.Option(help="Evaluation references.")],
    model: ModelOpt = None,
    preset: PresetOpt = None,
    beam: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam ranking: log p / length ** this.")] = 1.0,
    vocab_size: Annotated[int, typer.Option(help="Shared BPE vocabulary of a fresh model.")] = 8000,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    train_limit: Annotated[int | None, typer.Option(help="Use only the first N training pairs.")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Use only the first N evaluation pairs.")] = None,
    precision: PrecisionOpt = "auto",
    clock: ClockOpt = "wall",
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune a prefix-LM translator and report BLEU and chrF (sacrebleu, detokenised)."""
    import dataclasses

    from flashlm.evaluate.report import write_result
    from flashlm.evaluate.translate import TranslateConfig, run_translation

    cfg = TranslateConfig(vocab_size=vocab_size, beam=beam, length_penalty=length_penalty,
                          train_limit=train_limit, eval_limit=eval_limit)
    (net, tok), cfg = _ft_setup(model, preset, device, threads, cfg)
    ft = _ft_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed, precision, clock)
    cfg = dataclasses.replace(cfg, finetune=ft)
    results = run_translation(train_src, train_tgt, eval_src, eval_tgt, cfg, net, tok, save)
    settings = {"beam": beam, "length_penalty": length_penalty, "minutes": minutes, "clock": clock,
                "precision": precision, "epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr,
                "preset": preset, "threads": threads}
    path = write_result(out, "translate", results, model=str(model or preset or "default"),
                        data=[train_src, train_tgt, eval_src, eval_tgt], seed=seed, settings=settings)
    _eval_echo("translate", results, path, ("bleu", "chrf", "train_seconds"))


# ---- demo --------------------------------------------------------------------------------------
@app.command()
def demo(
    data: Annotated[list[str] | None, typer.Option(help="Your own text/JSONL/Parquet files (repeatable).")] = None,
    minutes: Annotated[float, typer.Option(help="Approximate total budget.")] = 5.0,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed for the corpus, sampling and training.")] = 0,
) -> None:
    """The whole pipeline in minutes: tokenizer, shards, pre-training, distillation, evaluation, samples."""
    from flashlm.demo import run_demo

    run_demo(out, minutes=minutes, data=data, seed=seed)


# ---- distill -----------------------------------------------------------------------------------
distill_app = typer.Typer(help="Distil a teacher into a smaller student (`flashlm distill --config RECIPE`); "
                               "`distill cache` stores a teacher's top-k logits once.")
app.add_typer(distill_app, name="distill")


@distill_app.callback(invoke_without_command=True)
def distill_command(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="A YAML recipe with a distill: section, e.g. configs/distill-tiny.yaml.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key (repeatable): --set distill.alpha=0.3.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the latest checkpoint in train.out.")] = False,
) -> None:
    """Train a student with a teacher (online, or from a `distill cache`) in the training loop."""
    import os

    from flashlm.config import load_run_config
    from flashlm.errors import ConfigError
    from flashlm.train.loop import train

    if ctx.invoked_subcommand is not None:
        if config is not None:
            raise ConfigError(f"--config belongs to `flashlm distill`, not `flashlm distill {ctx.invoked_subcommand}`")
        return
    if config is None:
        typer.echo(ctx.get_help())
        return
    cfg = load_run_config(config, [*(overrides or []), *(["train.resume=true"] if resume else [])])
    if cfg.distill is None:
        raise ConfigError(f"distill: {config} has no distill: section; add one with distill.teacher "
                          "(see configs/distill-tiny.yaml) or use `flashlm train`")
    summary = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        loss = f"{summary['loss']:.4f}" if summary["loss"] is not None else "-"
        typer.echo(f"step {summary['step']}: loss {loss}; checkpoint {summary['checkpoint']} "
                   f"(also {summary['out']}/latest); metrics in {summary['out']}/metrics.jsonl")


@distill_app.command("cache")
def distill_cache(
    teacher: Annotated[Path, typer.Argument(help="The teacher: a FlashLM checkpoint or local transformers dir.")],
    data: Annotated[Path, typer.Argument(help="Token shards from `flashlm data prepare`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the cache (rerun to resume).")],
    top_k: Annotated[int, typer.Option(help="Token ids kept per position.")] = 64,
    seq_len: Annotated[int | None, typer.Option(
        help="Teacher window; default its context (at most 2048). Use train.seq_len to match the student.")] = None,
    stride: Annotated[int | None, typer.Option(
        help="Window step; default seq-len / 2 (every position keeps >= seq-len / 2 tokens of context).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per teacher forward pass.")] = 8,
    split: Annotated[str, typer.Option(help="Shard split to cache.")] = "train",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Run the teacher once over the shards and store each position's top-k ids and log-probabilities."""
    from flashlm.train.distill import cache_teacher

    cache = cache_teacher(teacher, data, out, top_k, seq_len, batch_size, split, _eval_device(device),
                          stride=stride)
    size = cache.n_positions * cache.bytes_per_token
    typer.echo(f"cached {cache.n_positions:,} positions (top-{cache.top_k}, window {cache.seq_len}, stride "
               f"{cache.stride}) in {out}: {cache.bytes_per_token} bytes per token, {size / 1e6:.1f} MB")


# ---- serve -------------------------------------------------------------------------------------
@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    host: Annotated[str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes the model to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions) and a web playground (/)."""
    from flashlm.serve.app import serve as run_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach it can use the model")
    run_server(model_dir, host=host, port=port, device=device, log_level=log_level,
               precision=_precision(precision))


@app.command()
def chat(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per reply.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible replies.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
) -> None:
    """Chat in the terminal: one message a line ("User: …\\nAssistant:" template); /reset, /exit or EOF."""
    from flashlm.generate import Sampling
    from flashlm.serve.engine import Engine, chat_repl

    engine = Engine.load(model_dir, device=device, precision=_precision(precision))
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with {engine.name}; /reset clears the conversation, /exit or Ctrl-D ends it", err=True)
    chat_repl(engine, sampling, sys.stdin, lambda text: typer.echo(text, nl=False), system=system,
              interactive=interactive)


@app.command("explain")
def explain_command(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    text: Annotated[str, typer.Argument(help="The text to look at.")],
    layer: Annotated[int | None, typer.Option(help="Layer of the attention map; default the mean of layers.")] = None,
    head: Annotated[int | None, typer.Option(help="Head of the attention map; default the mean of heads.")] = None,
    target: Annotated[str | None, typer.Option(help="Next token to explain (e.g. ' cat'); default the likeliest.")]
    = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs and explain.json.")] = Path("explain"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Attention maps and token saliency for a text: attention.png, attention_grid.png, saliency.png, JSON."""
    from flashlm.explain import save_explanation
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir, device=device)
    paths = save_explanation(model, Tokenizer.load(model_dir), text, out, layer=layer, head=head, target=target)
    for path in paths.values():
        typer.echo(str(path))


# ---- masked LM ---------------------------------------------------------------------------------
def _next_token(model_dir: Path, flag: bool | None) -> bool:
    """The masked-prediction convention: the flag, else the checkpoint's training config, else next-token."""
    from flashlm.evaluate.masked import trained_next_token

    return trained_next_token(model_dir) if flag is None else flag


def _masked_seq_len(model_dir: Path, model, seq_len: int | None) -> int:
    """--seq-len, else the checkpoint's train.seq_len, else 128 (never past the model's context)."""
    from flashlm.evaluate.masked import training_config

    trained = training_config(model_dir).get("seq_len")
    return min(seq_len or (trained if isinstance(trained, int) else 128), model.cfg.max_seq_len)


_CONVENTION = typer.Option("--next-token/--in-place",
                           help="Masked next-token (GPT-BERT) or in-place (BERT) prediction; default: "
                                "what the checkpoint was trained with, else next-token.")


@eval_app.command("mlm")
def eval_mlm(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    data: Annotated[Path, typer.Argument(help="A token-shard directory (from `flashlm data prepare`).")],
    split: Annotated[str, typer.Option(help="Held-out shard split.")] = "val",
    seq_len: Annotated[int | None, typer.Option(help="Window length; default the training seq_len.")] = None,
    windows: Annotated[int, typer.Option(help="Fixed windows to mask (evenly spaced).")] = 256,
    rate: Annotated[float, typer.Option(help="Share of tokens masked.")] = 0.15,
    next_token: Annotated[bool | None, _CONVENTION] = None,
    seed: Annotated[int, typer.Option(help="Seed of the masks.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Masked-token accuracy on fixed held-out windows (and a unigram baseline)."""
    from flashlm.evaluate.masked import mlm_accuracy, open_split
    from flashlm.evaluate.report import write_result

    model, tokenizer = _eval_load(model_dir, device)
    stream = open_split(data, tokenizer, split)
    length = _masked_seq_len(model_dir, model, seq_len)
    convention = _next_token(model_dir, next_token)
    results = mlm_accuracy(model, stream, length, windows, rate=rate, next_token=convention, seed=seed)
    settings = {"split": split, "seq_len": length, "windows": windows, "rate": rate, "seed": seed}
    path = write_result(out, "mlm", results, model=str(model_dir), data=[data / f"{split}.bin"], seed=seed,
                        settings=settings, scores={"mlm": results["mlm_acc"]})
    _eval_echo("mlm", results, path, ("mlm_acc", "unigram_acc", "mlm_loss", "masked_tokens", "next_token"))


@eval_app.command("nsp")
def eval_nsp(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    data: Annotated[Path, typer.Argument(help="A token-shard directory (from `flashlm data prepare`).")],
    split: Annotated[str, typer.Option(help="Held-out shard split.")] = "val",
    seq_len: Annotated[int | None, typer.Option(help="Pair length; default the training seq_len.")] = None,
    pairs: Annotated[int, typer.Option(help="Fixed <bos> A <sep> B <eos> pairs.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the pairs.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Next-sentence-prediction accuracy on fixed held-out pairs (half true continuations)."""
    from flashlm.evaluate.masked import nsp_accuracy, open_split
    from flashlm.evaluate.report import write_result

    model, tokenizer = _eval_load(model_dir, device)
    stream = open_split(data, tokenizer, split)
    length = _masked_seq_len(model_dir, model, seq_len)
    results = nsp_accuracy(model, stream, length, pairs, seed=seed)
    settings = {"split": split, "seq_len": length, "pairs": pairs, "seed": seed}
    path = write_result(out, "nsp", results, model=str(model_dir), data=[data / f"{split}.bin"], seed=seed,
                        settings=settings, scores={"nsp": results["nsp_acc"]})
    _eval_echo("nsp", results, path, ("nsp_acc", "positive_share", "pairs"))


@app.command("fill-mask")
def fill_mask_command(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    text: Annotated[str, typer.Argument(help="Text with one or more <mask>: \"The cat sat on the <mask>.\"")],
    top_k: Annotated[int, typer.Option(min=1, help="Candidates per mask.")] = 5,
    next_token: Annotated[bool | None, _CONVENTION] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Print the most likely tokens for each <mask> (bidirectional attention)."""
    from flashlm.evaluate.masked import fill_mask

    model, tokenizer = _eval_load(model_dir, device)
    convention = _next_token(model_dir, next_token)
    found = fill_mask(model, tokenizer, text, top_k, convention)
    typer.echo(f"{'next-token' if convention else 'in-place'} masked prediction")
    for i, candidates in enumerate(found, 1):
        if len(found) > 1:
            typer.echo(f"<mask> {i}:")
        for text_, prob in candidates:
            typer.echo(f"  {100 * prob:5.1f}%  {text_!r}")


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
