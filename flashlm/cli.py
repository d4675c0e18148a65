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


# ---- eval: fine-tuned tasks --------------------------------------------------------------------
ModelOpt = Annotated[Path | None, typer.Option("--model", help="Start from this FlashLM directory.")]
PresetOpt = Annotated[str | None, typer.Option(help="Else a fresh model of this preset (default: task's).")]
MinutesOpt = Annotated[float | None, typer.Option(help="Training budget in minutes (schedule follows it).")]
EpochsOpt = Annotated[float | None, typer.Option(help="Training epochs (default: the task's).")]
StepsOpt = Annotated[int | None, typer.Option(help="At most this many optimizer steps.")]
BatchOpt = Annotated[int | None, typer.Option(help="Examples per step (default: the task's).")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (default: the task's).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the model, tokenizer and shuffling.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch (1 is best on a busy machine).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, ...")]
OutOpt = Annotated[Path, typer.Option(help="Results directory.")]
SaveOpt = Annotated[Path | None, typer.Option(help="Keep the fine-tuned model (and tokenizer) here.")]


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


def _ft_config(base, minutes, epochs, max_steps, batch_size, lr, seed):
    """The task's FinetuneConfig with the options given on the command line."""
    import dataclasses

    given = {"max_minutes": minutes, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
             "lr": lr}
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
    max_sentences: Annotated[int, typer.Option(help="Story statements kept before each question.")] = 50,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    train_limit: Annotated[int | None, typer.Option(help="Training questions per task (subset).")] = None,
    test_limit: Annotated[int | None, typer.Option(help="Test questions per task (subset).")] = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune on the bAbI 1k training sets (prefix LM) and report exact-match accuracy per task."""
    import dataclasses

    from flashlm.evaluate.babi import BabiConfig, find_data, run_babi
    from flashlm.evaluate.report import write_result

    numbers = tuple(range(1, 21)) if tasks == "1-20" else tuple(int(t) for t in tasks.split(",") if t.strip())
    cfg = BabiConfig(tasks=numbers, per_task=per_task, max_sentences=max_sentences, train_limit=train_limit,
                     test_limit=test_limit)
    (net, tok), cfg = _ft_setup(model, preset, device, threads, cfg)
    ft = _ft_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed)
    cfg = dataclasses.replace(cfg, finetune=ft)
    directory = find_data(data)
    results = run_babi(directory, cfg, net, tok, save)
    settings = {"tasks": list(numbers), "per_task": per_task, "max_sentences": max_sentences,
                "minutes": minutes, "epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr,
                "preset": preset, "threads": threads}
    scores = {f"babi qa{t}": a for t, a in results["accuracy"].items()}
    path = write_result(out, "babi", results, model=str(model or preset or "default"),
                        data=sorted(directory.glob("qa*.txt")), seed=seed, settings=settings, scores=scores)
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
    ft = _ft_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed)
    cfg = dataclasses.replace(cfg, finetune=ft)
    results = run_squad(train, eval_file, cfg, net, tok, save)
    settings = {"max_len": max_len, "doc_stride": doc_stride, "max_answer_len": max_answer_len,
                "minutes": minutes, "epochs": ft.epochs, "lr": ft.lr, "preset": preset}
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
    ft = _ft_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed)
    cfg = dataclasses.replace(cfg, finetune=ft)
    results = run_translation(train_src, train_tgt, eval_src, eval_tgt, cfg, net, tok, save)
    settings = {"beam": beam, "length_penalty": length_penalty, "minutes": minutes, "epochs": ft.epochs,
                "batch_size": ft.batch_size, "lr": ft.lr, "preset": preset, "threads": threads}
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
