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
@app.command("train")
def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="A YAML recipe, e.g. configs/causal.yaml.")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key (repeatable): --set train.data=data/shards.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the latest checkpoint in train.out.")] = False,
) -> None:
    """Pre-train a model (also under torchrun: DDP, or FSDP2 with --set train.distributed=fsdp)."""
    import os

    from flashlm.config import load_run_config
    from flashlm.train.loop import train

    summary = train(load_run_config(config, [*(overrides or []), *(["train.resume=true"] if resume else [])]))
    if int(os.environ.get("RANK", 0)) == 0:
        loss = f"{summary['loss']:.4f}" if summary["loss"] is not None else "-"
        typer.echo(f"step {summary['step']}: loss {loss}; checkpoint {summary['checkpoint']}; "
                   f"metrics in {summary['out']}/metrics.jsonl")


# ---- eval --------------------------------------------------------------------------------------
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models: perplexity, cloze, efficiency, reports.")
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
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("results"),
) -> None:
    """Parameters, FLOPs per token, prefill/decode speed, latency, peak memory and KV-cache size."""
    from flashlm.config import PRESETS, get_preset
    from flashlm.evaluate.efficiency import efficiency
    from flashlm.evaluate.report import write_result
    from flashlm.model.transformer import FlashLM

    if model in PRESETS and not Path(model).is_dir():
        net = FlashLM(get_preset(model)).eval()
    else:
        net, _ = _eval_load(Path(model), device, tokenizer=False)
    sizes = tuple(batch_size or (1, 8))
    results = efficiency(net, sizes, prompt_len, new_tokens, _eval_device(device))
    settings = {"batch_sizes": list(sizes), "prompt_len": results["prompt_len"], "new_tokens": new_tokens}
    path = write_result(out, "efficiency", results, model=model, seed=0, settings=settings)
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
