"""The fine-tuned tasks end to end: options → task config → model → run → `<task>.json`.

`evaluate_babi`, `evaluate_squad` and `evaluate_translate` take the settings of `flashlm eval babi`,
`eval squad` and `eval translate` (the same names and defaults), start from a model directory or a
fresh model of a preset, fine-tune and score, and write the result files with `write_result`. The
commands and `eval all` (`flashlm.tasks.run_all`) both call them. Each returns (path of the
`<task>.json`, results).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import ConfigError
from flashlm.evaluate.results import write_result
from flashlm.tasks.babi_config import ALL_TASKS as ALL_BABI_TASKS
from flashlm.tasks.babi_config import TASK_GROUPS, BabiConfig, format_groups
from flashlm.tasks.squad_config import SquadConfig
from flashlm.tasks.translate_config import TranslateConfig
from flashlm.training.finetune_config import FinetuneConfig


def resolve_device(device: str) -> str:
    """The device of `device`: "auto" is cuda when available, else cpu; anything else as given."""
    from flashlm.hardware import default_device

    return str(default_device(device))


def finetune_setup(
    model_dir: str | os.PathLike | None, preset: str | None, device: str, threads: int | None, cfg: Any
) -> tuple[tuple[Any, Any], Any]:
    """Threads, device and starting point: ((model, tokenizer), cfg) with the model of `model_dir`, or
    ((None, None), cfg) with a fresh model of `preset` (else the task's default) written into `cfg.model`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if model_dir is not None:
        from flashlm.model.transformer import FlashLM
        from flashlm.tokenizer import Tokenizer

        model = FlashLM.from_pretrained(model_dir, device=resolve_device(device))
        return (model, Tokenizer.load(model_dir)), cfg
    cfg = dataclasses.replace(cfg, model=preset or cfg.model, device=resolve_device(device))
    return (None, None), cfg


def finetune_config(
    base: Any,
    minutes: float | None,
    epochs: float | None,
    max_steps: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    precision: str = FinetuneConfig.precision,
    clock: str = FinetuneConfig.clock,
) -> Any:
    """The task's FinetuneConfig `base` with the settings given (None: the task's own)."""
    given = {
        "precision": precision,
        "clock": clock,
        "max_minutes": minutes,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
    }
    if minutes is not None and epochs is None:
        given["epochs"] = 10_000.0  # the clock decides
    return dataclasses.replace(base, seed=seed, **{k: v for k, v in given.items() if v is not None})


def _label(model_dir: str | os.PathLike | None, preset: str | None) -> str:
    return str(model_dir or preset or "default")


# ---- bAbI ---------------------------------------------------------------------------------------
def babi_task_numbers(tasks: str | Sequence[int]) -> tuple[int, ...]:
    """bAbI task numbers: "1-20" is every task, "1,2,3" those three; a sequence of numbers as given."""
    if not isinstance(tasks, str):
        return tuple(tasks)
    if tasks == ALL_BABI_TASKS:
        return tuple(range(1, 21))
    parts = [t.strip() for t in tasks.split(",") if t.strip()]
    if not parts or not all(t.isdigit() and 1 <= int(t) <= 20 for t in parts):
        raise ConfigError(f"--tasks {tasks!r}: expected bAbI task numbers from 1 to 20, e.g. 1,2,3 (or 1-20)")
    return tuple(int(t) for t in parts)


def evaluate_babi(
    out: str | os.PathLike = "results",
    *,
    model: str | os.PathLike | None = None,
    preset: str | None = None,
    data: str | os.PathLike | None = None,
    tasks: str | Sequence[int] = ALL_BABI_TASKS,
    per_task: bool = BabiConfig.per_task,
    jobs: int = BabiConfig.jobs,
    groups: str | Sequence[Sequence[int]] = format_groups(TASK_GROUPS),
    max_sentences: int = BabiConfig.max_sentences,
    augment: bool = BabiConfig.augment,
    supporting_facts: bool = BabiConfig.supporting_facts,
    beam: int = BabiConfig.beam,
    copy_statements: bool = BabiConfig.copy_statements,
    minutes: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    precision: str = FinetuneConfig.precision,
    clock: str = FinetuneConfig.clock,
    seed: int = FinetuneConfig.seed,
    threads: int | None = None,
    device: str = "auto",
    save: str | os.PathLike | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune on the bAbI 1k training sets (`run_babi`) and write `out/babi.json`; `data` defaults to
    $FLASHLM_BABI (`find_data`), `tasks` to all 20, `groups` ("2,3;7,8" or "none") applies with `per_task`."""
    from flashlm.tasks.babi import find_data, parse_groups, run_babi, task_file

    if jobs > 1 and not per_task:
        raise ConfigError(f"--jobs {jobs}: one joint model trains in one process; add --per-task or drop --jobs")
    numbers = babi_task_numbers(tasks)
    shared = parse_groups(groups) if isinstance(groups, str) else tuple(tuple(g) for g in groups)
    cfg = BabiConfig(
        tasks=numbers,
        per_task=per_task,
        groups=shared,
        max_sentences=max_sentences,
        augment=augment,
        supporting_facts=supporting_facts,
        beam=beam,
        copy_statements=copy_statements,
        train_limit=train_limit,
        test_limit=test_limit,
        jobs=jobs,
        threads=threads,
    )
    (net, tok), cfg = finetune_setup(model, preset, device, threads, cfg)
    ft = finetune_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed, precision, clock)
    cfg = dataclasses.replace(cfg, finetune=ft)
    directory = find_data(data)
    results = run_babi(directory, cfg, net, tok, save)
    settings = {
        "tasks": list(numbers),
        "per_task": per_task,
        "groups": [list(g) for g in shared],
        "jobs": jobs,
        "max_sentences": max_sentences,
        "augment": augment,
        "supporting_facts": supporting_facts,
        "beam": beam,
        "copy_statements": copy_statements,
        "minutes": minutes,
        "clock": clock,
        "precision": precision,
        "epochs": ft.epochs,
        "batch_size": ft.batch_size,
        "lr": ft.lr,
        "preset": preset,
        "threads": threads,
    }
    scores = {f"babi qa{t}": a for t, a in results["accuracy"].items()}
    path = write_result(
        out,
        "babi",
        results,
        model=_label(model, preset),
        data=[task_file(directory, t, s) for t in numbers for s in ("train", "test")],
        seed=seed,
        settings=settings,
        scores=scores,
    )
    return path, results


# ---- SQuAD --------------------------------------------------------------------------------------
def evaluate_squad(
    train: str | os.PathLike,
    eval_file: str | os.PathLike,
    out: str | os.PathLike = "results",
    *,
    model: str | os.PathLike | None = None,
    preset: str | None = None,
    max_len: int = SquadConfig.max_len,
    doc_stride: int = SquadConfig.doc_stride,
    max_answer_len: int = SquadConfig.max_answer_len,
    minutes: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    precision: str = FinetuneConfig.precision,
    clock: str = FinetuneConfig.clock,
    seed: int = FinetuneConfig.seed,
    threads: int | None = None,
    device: str = "auto",
    save: str | os.PathLike | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune a span head on a SQuAD-format file (`run_squad`), score EM/F1 on `eval_file` and
    write `out/squad.json`."""
    from flashlm.tasks.squad import run_squad

    cfg = SquadConfig(max_len=max_len, doc_stride=doc_stride, max_answer_len=max_answer_len)
    (net, tok), cfg = finetune_setup(model, preset, device, threads, cfg)
    ft = finetune_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed, precision, clock)
    cfg = dataclasses.replace(cfg, finetune=ft)
    results = run_squad(train, eval_file, cfg, net, tok, save)
    settings = {
        "max_len": max_len,
        "doc_stride": doc_stride,
        "max_answer_len": max_answer_len,
        "minutes": minutes,
        "clock": clock,
        "precision": precision,
        "epochs": ft.epochs,
        "lr": ft.lr,
        "preset": preset,
    }
    path = write_result(
        out,
        "squad",
        results,
        model=_label(model, preset),
        data=[train, eval_file],
        seed=seed,
        settings=settings,
        scores={"squad f1": results["f1"] / 100},
    )
    return path, results


# ---- translation --------------------------------------------------------------------------------
def evaluate_translate(
    train_src: str | os.PathLike,
    train_tgt: str | os.PathLike,
    eval_src: str | os.PathLike,
    eval_tgt: str | os.PathLike,
    out: str | os.PathLike = "results",
    *,
    model: str | os.PathLike | None = None,
    preset: str | None = None,
    beam: int = TranslateConfig.beam,
    length_penalty: float = TranslateConfig.length_penalty,
    vocab_size: int = TranslateConfig.vocab_size,
    minutes: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    precision: str = FinetuneConfig.precision,
    clock: str = FinetuneConfig.clock,
    seed: int = FinetuneConfig.seed,
    threads: int | None = None,
    device: str = "auto",
    save: str | os.PathLike | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune a prefix-LM translator on line-aligned files (`run_translation`), score BLEU and chrF
    on the evaluation pair and write `out/translate.json`."""
    from flashlm.tasks.translate import run_translation

    cfg = TranslateConfig(
        vocab_size=vocab_size, beam=beam, length_penalty=length_penalty, train_limit=train_limit, eval_limit=eval_limit
    )
    (net, tok), cfg = finetune_setup(model, preset, device, threads, cfg)
    ft = finetune_config(cfg.finetune, minutes, epochs, max_steps, batch_size, lr, seed, precision, clock)
    cfg = dataclasses.replace(cfg, finetune=ft)
    results = run_translation(train_src, train_tgt, eval_src, eval_tgt, cfg, net, tok, save)
    settings = {
        "beam": beam,
        "length_penalty": length_penalty,
        "minutes": minutes,
        "clock": clock,
        "precision": precision,
        "epochs": ft.epochs,
        "batch_size": ft.batch_size,
        "lr": ft.lr,
        "preset": preset,
        "threads": threads,
    }
    path = write_result(
        out,
        "translate",
        results,
        model=_label(model, preset),
        data=[train_src, train_tgt, eval_src, eval_tgt],
        seed=seed,
        settings=settings,
    )
    return path, results


__all__ = [
    "babi_task_numbers",
    "evaluate_babi",
    "evaluate_squad",
    "evaluate_translate",
    "finetune_config",
    "finetune_setup",
    "resolve_device",
]
