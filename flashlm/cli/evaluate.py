"""`flashlm eval`: perplexity, cloze, efficiency, long-range tasks, fine-tuned tasks, masked LM, reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashlm.cli.common import (
    CONVENTION,
    INFERENCE_PRECISION,
    SEED_MAX,
    check_minutes,
    check_precision,
    eval_device,
    eval_echo,
    eval_load,
    next_token_convention,
    writable_out,
)
from flashlm.tasks.babi_config import ALL_TASKS as ALL_BABI_TASKS
from flashlm.tasks.babi_config import TASK_GROUPS, BabiConfig, format_groups
from flashlm.tasks.longrange_config import LongRangeConfig
from flashlm.tasks.squad_config import SquadConfig
from flashlm.tasks.translate_config import TranslateConfig
from flashlm.training.finetune_config import FinetuneConfig

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Evaluate models: perplexity, cloze, long-range tasks, "
    "efficiency, fine-tuned tasks, reports (`eval all`: the whole report card).",
)


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _number(value: float) -> str:
    """A default for help text: 1e+30 as 1e30."""
    return f"{value:g}".replace("e+", "e")


@eval_app.command("ppl")
def eval_ppl(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    files: Annotated[list[Path], typer.Argument(help="Text / JSONL / Parquet files or directories.")],
    seq_len: Annotated[int | None, typer.Option(min=2, help="Window length; default the model's context.")] = None,
    stride: Annotated[int | None, typer.Option(min=1, help="Window step (≤ seq-len); default seq-len / 2.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass (no effect on results).")] = 8,
    txt_mode: Annotated[str, typer.Option(help="Text documents: 'blank' or 'line' separated.")] = "blank",
    field: Annotated[str, typer.Option(help="JSONL / Parquet field holding the text.")] = "text",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)] = Path("results"),
) -> None:
    """Loss, perplexity and bits per byte with a sliding window."""
    from flashlm.data.corpus import resolve_files
    from flashlm.evaluate.lm import perplexity, read_texts
    from flashlm.evaluate.results import write_result

    paths = resolve_files([str(f) for f in files])
    model, tokenizer = eval_load(model_dir, device)
    _check_window(seq_len, model.cfg.max_seq_len)
    results = perplexity(model, tokenizer, read_texts(paths, txt_mode, field), seq_len, stride, batch_size)
    settings = {"seq_len": results["seq_len"], "stride": results["stride"], "txt_mode": txt_mode}
    path = write_result(out, "ppl", results, model=str(model_dir), data=paths, settings=settings)
    eval_echo("ppl", results, path, ("loss", "ppl", "bpb", "tokens"))


def _check_window(seq_len: int | None, context: int) -> None:
    """--seq-len must fit the model: a longer window would only allocate memory for positions it never had."""
    from flashlm.errors import ConfigError

    if seq_len is not None and not 2 <= seq_len <= context:
        raise ConfigError(f"--seq-len: {seq_len} is outside 2..{context} (the model's context); use at most {context}")


@eval_app.command("cloze")
def eval_cloze(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    file: Annotated[Path, typer.Argument(help="One passage a line; the target is the last word.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Passages per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)] = Path("results"),
) -> None:
    """Accuracy of greedily predicting each passage's last word, and the word's perplexity."""
    from flashlm.errors import DataError
    from flashlm.evaluate.lm import cloze
    from flashlm.evaluate.results import write_result

    if not file.is_file():
        raise DataError(f"no such file: {file}")
    model, tokenizer = eval_load(model_dir, device)
    results = cloze(model, tokenizer, file.read_text(encoding="utf-8").splitlines(), batch_size)
    path = write_result(out, "cloze", results, model=str(model_dir), data=[file], scores={"cloze": results["accuracy"]})
    eval_echo("cloze", results, path, ("accuracy", "target_ppl", "passages"))


@eval_app.command("efficiency")
def eval_efficiency(
    model: Annotated[str, typer.Argument(help="A model directory, or a preset name (random weights).")],
    batch_size: Annotated[
        list[int] | None,
        typer.Option("--batch-size", "-b", min=1, help="Batch sizes to time (repeatable); default 1 and 8."),
    ] = None,
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens.")] = 128,
    new_tokens: Annotated[int, typer.Option(min=1, help="Generated tokens.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    precision: Annotated[str, typer.Option(help=INFERENCE_PRECISION)] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)] = Path("results"),
) -> None:
    """Parameters, FLOPs per token, prefill/decode speed, latency, peak memory and KV-cache size."""
    from flashlm.config import PRESETS, get_preset
    from flashlm.evaluate.efficiency import efficiency
    from flashlm.evaluate.results import write_result
    from flashlm.hardware import describe, dtype_of, resolve_precision
    from flashlm.model.transformer import FlashLM

    if model in PRESETS and not Path(model).is_dir():
        net = FlashLM(get_preset(model)).eval()
    else:
        net, _ = eval_load(Path(model), device, tokenizer=False)
    run_on = eval_device(device)
    net = net.to(dtype_of(resolve_precision(check_precision(precision), run_on)))
    sizes = tuple(batch_size or (1, 8))
    results = efficiency(net, sizes, prompt_len, new_tokens, run_on)
    settings = {
        "batch_sizes": list(sizes),
        "prompt_len": results["prompt_len"],
        "new_tokens": new_tokens,
        "precision": results["precision"],
    }
    path = write_result(out, "efficiency", results, model=model, seed=0, settings=settings)
    typer.echo(f"{results['precision']} on {describe(results['machine'])}")
    for run in results["runs"]:
        typer.echo(
            f"batch {run['batch_size']}: prefill {run['prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{run['decode_tokens_per_s']:.0f} tok/s, first token {1000 * run['ttft_s']:.1f} ms, "
            f"p50/p95 {1000 * run['latency_p50_s']:.1f}/{1000 * run['latency_p95_s']:.1f} ms"
        )
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
    minutes: Annotated[
        float | None,
        typer.Option(help="Training budget in minutes for all the small models together (also capped by --steps)."),
    ] = LongRangeConfig.minutes,
    patterns: Annotated[
        str,
        typer.Option(
            help="Comma-separated layer patterns: 'default' (local/global), 'global' (all-global) or L/G strings."
        ),
    ] = "default,global",
    layers: Annotated[
        int, typer.Option(min=1, help="Layers of each small model ('default' is LG at 2).")
    ] = LongRangeConfig.n_layers,
    d_model: Annotated[int, typer.Option(min=8, help="Width of each small model.")] = LongRangeConfig.d_model,
    window: Annotated[
        int | None,
        typer.Option(min=1, help=f"Sliding window of the local layers (default {LongRangeConfig.sliding_window})."),
    ] = None,
    rope_base_global: Annotated[
        float | None,
        typer.Option(
            help=f"RoPE base of the global layers (default {_number(LongRangeConfig.rope_base_global)}, "
            "i.e. almost NoPE; models default to 1e6)."
        ),
    ] = None,
    train_len: Annotated[
        int, typer.Option(min=8, help="Longest passkey training row; scored up to 4x this.")
    ] = LongRangeConfig.train_len,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps per model (default: the task's).")] = None,
    samples: Annotated[
        int, typer.Option(min=1, help="Passkey items per (length, depth) cell.")
    ] = LongRangeConfig.passkey_samples,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for data and models.")] = LongRangeConfig.seed,
    threads: Annotated[
        int, typer.Option(min=1, help="CPU threads for torch (1: best for these tiny models).")
    ] = LongRangeConfig.threads,
    out: Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)] = Path("results"),
) -> None:
    """Passkey retrieval and MQAR on small models trained here, local/global vs all-global; KV bytes."""
    from flashlm.tasks.longrange import write_longrange

    check_minutes(minutes)
    cfg = LongRangeConfig.from_options(
        patterns,
        steps=steps,
        threads=threads,
        n_layers=layers,
        d_model=d_model,
        train_len=train_len,
        passkey_samples=samples,
        seed=seed,
        minutes=minutes,
        sliding_window=window,
        rope_base_global=rope_base_global,
    )
    path, results = write_longrange(out, cfg, log=_log)
    for row in results["summary"]:
        typer.echo("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    typer.echo(f"longrange written to {path}")


@eval_app.command("all")
def eval_all(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    data: Annotated[list[Path] | None, typer.Option(help="Text files for perplexity (repeatable).")] = None,
    cloze_file: Annotated[Path | None, typer.Option("--cloze", help="A LAMBADA-format file.")] = None,
    out: Annotated[Path, typer.Option(help="Results directory (report.md goes here).", callback=writable_out)] = Path(
        "results"
    ),
    quick: Annotated[bool, typer.Option(help="Small data and budgets: a report in a few minutes.")] = False,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Training minutes shared by the trained tasks (default: 2.5 with --quick, else each task's)."
        ),
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated subset of ppl,cloze,efficiency,longrange,babi,squad,translate.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, help="CPU threads for torch (default: 1 with --quick: its small models gain nothing from more)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Every task that applies to MODEL (fine-tuned tasks on copies of it), then report.md with plots."""
    from flashlm.tasks.run_all import evaluate_all

    report = evaluate_all(
        model_dir,
        out,
        quick=quick,
        data=data or (),
        cloze_file=cloze_file,
        minutes=minutes,
        tasks=tasks.split(",") if tasks else None,
        threads=threads,
        device=device,
        log=_log,
    )
    typer.echo(f"report written to {report}")


# ---- fine-tuned tasks: the options shared by babi, squad and translate ----------------------------
ModelOpt = Annotated[Path | None, typer.Option("--model", help="Start from this FlashLM directory.")]
PresetOpt = Annotated[str | None, typer.Option(help="Else a fresh model of this preset (default: task's).")]
MinutesOpt = Annotated[float | None, typer.Option(help="Training budget in minutes (schedule follows it).")]
EpochsOpt = Annotated[float | None, typer.Option(help="Training epochs (default: the task's).")]
StepsOpt = Annotated[int | None, typer.Option(min=1, help="At most this many optimizer steps.")]
BatchOpt = Annotated[int | None, typer.Option(help="Examples per step (default: the task's).")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (default: the task's).")]
SeedOpt = Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for the model, tokenizer and shuffling.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="CPU threads for torch (1 suits small models and shared CPUs).")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, ...")]
OutOpt = Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)]
SaveOpt = Annotated[Path | None, typer.Option(help="Keep the fine-tuned model (and tokenizer) here.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="Training precision: auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16."
    ),
]
ClockOpt = Annotated[str, typer.Option(help="What --minutes counts: wall time, or this process's cpu time.")]


@eval_app.command("babi")
def eval_babi(
    model: ModelOpt = None,
    preset: PresetOpt = None,
    data: Annotated[Path | None, typer.Option(help="bAbI directory (default: $FLASHLM_BABI).")] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated task numbers.")] = ALL_BABI_TASKS,
    per_task: Annotated[
        bool, typer.Option(help="One model per task instead of one joint model.")
    ] = BabiConfig.per_task,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --per-task: tasks trained side by side, one process each "
            "(threads shared out; 2 on 2 cores), quick tasks first (babi.SCHEDULE).",
        ),
    ] = BabiConfig.jobs,
    groups: Annotated[
        str,
        typer.Option(
            "--groups",
            help="With --per-task: tasks that share one model, e.g. '2,3' (the default) or '2,3;7,8'; "
            "'none' for a model per task.",
        ),
    ] = format_groups(TASK_GROUPS),
    max_sentences: Annotated[
        int, typer.Option(help="Story statements kept before each question.")
    ] = BabiConfig.max_sentences,
    augment: Annotated[
        bool, typer.Option(help="Rename entities, reword verbs (and turn qa19's compass) at random at every step.")
    ] = BabiConfig.augment,
    supporting_facts: Annotated[
        bool,
        typer.Option(
            "--supporting-facts/--answer-only",
            help="Train the model to write the supporting statements bAbI marks, then '= answer' (strong "
            "supervision; only the answer is scored), or the answer alone.",
        ),
    ] = BabiConfig.supporting_facts,
    beam: Annotated[int, typer.Option(min=1, help="Beam search rows when answering (1: greedy).")] = BabiConfig.beam,
    copy_statements: Annotated[
        bool,
        typer.Option(
            "--copy-statements/--free-chains",
            help="With --supporting-facts: the written chain may only cite statements of the story, whole "
            "(constrained beam search), or any text.",
        ),
    ] = BabiConfig.copy_statements,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    train_limit: Annotated[int | None, typer.Option(help="Training questions per task (subset).")] = None,
    test_limit: Annotated[int | None, typer.Option(help="Test questions per task (subset).")] = None,
    precision: PrecisionOpt = FinetuneConfig.precision,
    clock: ClockOpt = FinetuneConfig.clock,
    seed: SeedOpt = FinetuneConfig.seed,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune on the bAbI 1k training sets (prefix LM) and report exact-match accuracy per task."""
    from flashlm.tasks.finetuned import evaluate_babi

    path, results = evaluate_babi(
        out,
        model=model,
        preset=preset,
        data=data,
        tasks=tasks,
        per_task=per_task,
        jobs=jobs,
        groups=groups,
        max_sentences=max_sentences,
        augment=augment,
        supporting_facts=supporting_facts,
        beam=beam,
        copy_statements=copy_statements,
        minutes=minutes,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        train_limit=train_limit,
        test_limit=test_limit,
        precision=precision,
        clock=clock,
        seed=seed,
        threads=threads,
        device=device,
        save=save,
    )
    eval_echo("babi", results, path, ("mean_accuracy", "failed_tasks", "train_seconds"))


@eval_app.command("squad")
def eval_squad(
    train: Annotated[Path, typer.Option(help="SQuAD v1.1 JSON training file.")],
    eval_file: Annotated[Path, typer.Option("--eval", help="SQuAD v1.1 JSON evaluation file.")],
    model: ModelOpt = None,
    preset: PresetOpt = None,
    max_len: Annotated[int, typer.Option(help="Window length in tokens.")] = SquadConfig.max_len,
    doc_stride: Annotated[
        int, typer.Option(help="Context tokens shared by neighbouring windows.")
    ] = SquadConfig.doc_stride,
    max_answer_len: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = SquadConfig.max_answer_len,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    precision: PrecisionOpt = FinetuneConfig.precision,
    clock: ClockOpt = FinetuneConfig.clock,
    seed: SeedOpt = FinetuneConfig.seed,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune a span head on a SQuAD-format file and report EM/F1 (official v1.1 normalisation)."""
    from flashlm.tasks.finetuned import evaluate_squad

    path, results = evaluate_squad(
        train,
        eval_file,
        out,
        model=model,
        preset=preset,
        max_len=max_len,
        doc_stride=doc_stride,
        max_answer_len=max_answer_len,
        minutes=minutes,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        precision=precision,
        clock=clock,
        seed=seed,
        threads=threads,
        device=device,
        save=save,
    )
    eval_echo("squad", results, path, ("exact_match", "f1", "count"))


@eval_app.command("translate")
def eval_translate(
    train_src: Annotated[Path, typer.Option(help="Training sources, one a line (.gz ok).")],
    train_tgt: Annotated[Path, typer.Option(help="Training targets, line-aligned.")],
    eval_src: Annotated[Path, typer.Option(help="Evaluation sources.")],
    eval_tgt: Annotated[Path, typer.Option(help="Evaluation references.")],
    model: ModelOpt = None,
    preset: PresetOpt = None,
    beam: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = TranslateConfig.beam,
    length_penalty: Annotated[
        float, typer.Option(help="Beam ranking: log p / length ** this.")
    ] = TranslateConfig.length_penalty,
    vocab_size: Annotated[
        int, typer.Option(help="Shared BPE vocabulary of a fresh model.")
    ] = TranslateConfig.vocab_size,
    minutes: MinutesOpt = None,
    epochs: EpochsOpt = None,
    max_steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    train_limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N training pairs.")] = None,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N evaluation pairs.")] = None,
    precision: PrecisionOpt = FinetuneConfig.precision,
    clock: ClockOpt = FinetuneConfig.clock,
    seed: SeedOpt = FinetuneConfig.seed,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("results"),
    save: SaveOpt = None,
) -> None:
    """Fine-tune a prefix-LM translator and report BLEU and chrF (sacrebleu, detokenised)."""
    from flashlm.tasks.finetuned import evaluate_translate

    path, results = evaluate_translate(
        train_src,
        train_tgt,
        eval_src,
        eval_tgt,
        out,
        model=model,
        preset=preset,
        beam=beam,
        length_penalty=length_penalty,
        vocab_size=vocab_size,
        minutes=minutes,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        train_limit=train_limit,
        eval_limit=eval_limit,
        precision=precision,
        clock=clock,
        seed=seed,
        threads=threads,
        device=device,
        save=save,
    )
    eval_echo("translate", results, path, ("bleu", "chrf", "train_seconds"))


# ---- masked LM ------------------------------------------------------------------------------------
def _masked_seq_len(model_dir: Path, model, seq_len: int | None) -> int:
    """--seq-len (within the model's context), else the checkpoint's train.seq_len, else 128 (never past the
    model's context)."""
    from flashlm.evaluate.masked import training_config

    _check_window(seq_len, model.cfg.max_seq_len)
    trained = training_config(model_dir).get("seq_len")
    return min(seq_len or (trained if isinstance(trained, int) else 128), model.cfg.max_seq_len)


@eval_app.command("mlm")
def eval_mlm(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    data: Annotated[Path, typer.Argument(help="A token-shard directory (from `flashlm data prepare`).")],
    split: Annotated[str, typer.Option(help="Held-out shard split.")] = "val",
    seq_len: Annotated[int | None, typer.Option(min=2, help="Window length; default the training seq_len.")] = None,
    windows: Annotated[int, typer.Option(min=1, help="Fixed windows to mask (evenly spaced).")] = 256,
    rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of tokens masked (above 0).")] = 0.15,
    next_token: Annotated[bool | None, CONVENTION] = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the masks.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)] = Path("results"),
) -> None:
    """Masked-token accuracy on fixed held-out windows (and a unigram baseline)."""
    from flashlm.errors import ConfigError
    from flashlm.evaluate.masked import mlm_accuracy, open_split
    from flashlm.evaluate.results import write_result

    if rate <= 0:
        raise ConfigError(f"--rate must be above 0 (a share of the tokens to mask), got {rate:g}")
    model, tokenizer = eval_load(model_dir, device)
    stream = open_split(data, tokenizer, split)
    length = _masked_seq_len(model_dir, model, seq_len)
    convention = next_token_convention(model_dir, next_token)
    results = mlm_accuracy(model, stream, length, windows, rate=rate, next_token=convention, seed=seed)
    settings = {"split": split, "seq_len": length, "windows": windows, "rate": rate, "seed": seed}
    path = write_result(
        out,
        "mlm",
        results,
        model=str(model_dir),
        data=[data / f"{split}.bin"],
        seed=seed,
        settings=settings,
        scores={"mlm": results["mlm_acc"]},
    )
    eval_echo("mlm", results, path, ("mlm_acc", "unigram_acc", "mlm_loss", "masked_tokens", "next_token"))


@eval_app.command("nsp")
def eval_nsp(
    model_dir: Annotated[Path, typer.Argument(help="A FlashLM model directory (with tokenizer.json).")],
    data: Annotated[Path, typer.Argument(help="A token-shard directory (from `flashlm data prepare`).")],
    split: Annotated[str, typer.Option(help="Held-out shard split.")] = "val",
    seq_len: Annotated[int | None, typer.Option(min=4, help="Pair length; default the training seq_len.")] = None,
    pairs: Annotated[int, typer.Option(min=1, help="Fixed <bos> A <sep> B <eos> pairs.")] = 512,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the pairs.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Results directory.", callback=writable_out)] = Path("results"),
) -> None:
    """Next-sentence-prediction accuracy on fixed held-out pairs (half true continuations)."""
    from flashlm.evaluate.masked import nsp_accuracy, open_split
    from flashlm.evaluate.results import write_result

    model, tokenizer = eval_load(model_dir, device)
    stream = open_split(data, tokenizer, split)
    length = _masked_seq_len(model_dir, model, seq_len)
    from flashlm.model.heads import FlashLMForPretraining

    results = nsp_accuracy(FlashLMForPretraining.with_head_from(model, model_dir), stream, length, pairs, seed=seed)
    settings = {"split": split, "seq_len": length, "pairs": pairs, "seed": seed}
    path = write_result(
        out,
        "nsp",
        results,
        model=str(model_dir),
        data=[data / f"{split}.bin"],
        seed=seed,
        settings=settings,
        scores={"nsp": results["nsp_acc"]},
    )
    eval_echo("nsp", results, path, ("nsp_acc", "positive_share", "pairs"))
