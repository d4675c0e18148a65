"""`eval all`: every task that applies to a model, then the report card.

`evaluate_all` runs perplexity, cloze and efficiency (library evaluations, `flashlm.evaluate`), the
long-range tasks (`flashlm.tasks.longrange`) and, where their data is present, the fine-tuned tasks
(`flashlm.tasks.finetuned`: bAbI, SQuAD built from bAbI stories, Multi30k translation), writing each
`<task>.json`, then assembles `report.md` (`flashlm.evaluate.report.write_report`). Quick mode shares
a small training budget among the trained tasks (`QUICK_SHARES`) and limits their data (`QUICK_LIMITS`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import DataError, FlashLMError
from flashlm.evaluate.report import write_report
from flashlm.evaluate.results import _write_text, write_result

# ---- the whole report card ----------------------------------------------------------------------
ALL_TASKS = ("ppl", "cloze", "efficiency", "longrange", "babi", "squad", "translate")
# Quick mode: shares of the training minutes, and data limits of the fine-tuned tasks.
QUICK_SHARES = {"longrange": 0.5, "babi": 0.2, "squad": 0.1, "translate": 0.2}
QUICK_LIMITS = {
    "ppl_documents": 200,
    "babi_train": 100,
    "babi_test": 20,
    "squad_train": 300,
    "squad_eval": 60,
    "translate_train": 5000,
    "translate_eval": 100,
}


def evaluate_all(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    texts: Sequence[str] | None = None,
    quick: bool = True,
    *,
    data: Sequence[str | os.PathLike] = (),
    cloze_file: str | os.PathLike | None = None,
    minutes: float | None = None,
    tasks: Sequence[str] | None = None,
    threads: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run every task that applies to the model in `model_dir` and write `out_dir/report.md`.

    Perplexity on `texts` (strings) and `data` (files), cloze on `cloze_file`, efficiency, long-range
    (its own small models), and, where their commands and data are present, bAbI, SQuAD (built from
    bAbI stories) and Multi30k translation fine-tuned on copies of the model. `quick` uses small data
    and a training budget of `minutes` (default 2.5) shared by the trained tasks; without it every
    task uses its own defaults (`minutes`, when given, is still shared). Tasks that cannot run (no
    data, no command) are listed in the report; the loss curves come from a `metrics.jsonl` in or
    above `model_dir` when there is one. `threads` sets torch's CPU threads for the whole run (quick
    default: 1, since the small models gain nothing from more and extra threads contend for a shared
    CPU); the previous setting is restored at the end.
    """
    import torch

    say = log or (lambda message: None)
    model_dir, out = Path(model_dir), Path(out_dir)
    wanted = list(tasks) if tasks else list(ALL_TASKS)
    unknown = set(wanted) - set(ALL_TASKS)
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_TASKS)}")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir} is not a FlashLM model directory (no config.json)")
    for option, path in [*(("--data", p) for p in data), ("--cloze", cloze_file)]:
        if path is not None and not Path(path).exists():  # a typo stops the run, not one task of it
            raise DataError(f"{option} {path}: no such file or directory")
    budget = minutes if minutes is not None else (2.5 if quick else None)
    trained = sum(f for t, f in QUICK_SHARES.items() if t in wanted)
    share = {t: budget * f / trained for t, f in QUICK_SHARES.items()} if budget and trained else {}
    notes: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    threads = threads if threads is not None else (1 if quick else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        _run_tasks(
            wanted,
            model_dir,
            out,
            quick,
            share,
            device,
            threads,
            notes,
            {"texts": texts, "data": data, "cloze": cloze_file, "log": say},
        )
    finally:
        torch.set_num_threads(previous)
    metrics = _find_metrics(model_dir)
    mode = ("quick" if quick else "full") + (f" (training budget {budget:g} min)" if budget else "")
    return write_report(out, metrics, notes=[f"`flashlm eval all {model_dir}`, {mode}.", *notes])


def _run_tasks(wanted, model_dir, out, quick, share, device, threads, notes, extra) -> None:
    say = extra["log"]
    for task in wanted:
        began = time.perf_counter()
        say(f"eval all: {task}")
        try:
            skipped = _RUNNERS[task](model_dir, out, quick, share.get(task), device, {**extra, "threads": threads})
        except FlashLMError as exc:  # a user-level problem of one task (data, settings): note it, go on
            skipped = f"failed: {exc}"
        if skipped:
            notes.append(f"`{task}` skipped: {skipped}")
            say(f"eval all: {task} skipped ({skipped})")
        else:
            say(f"eval all: {task} done in {time.perf_counter() - began:.0f} s")


def _find_metrics(model_dir: Path) -> Path | None:
    for directory in (model_dir, *list(model_dir.resolve().parents)[:2]):
        if (directory / "metrics.jsonl").is_file():
            return directory / "metrics.jsonl"
    return None


def _load(model_dir: Path, device: str) -> tuple[Any, Any]:
    from flashlm.hardware import default_device
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    return FlashLM.from_pretrained(model_dir, device=default_device(device)).eval(), Tokenizer.load(model_dir)


def _run_ppl(model_dir, out, quick, minutes, device, extra) -> str | None:
    from flashlm.data.corpus import resolve_files
    from flashlm.evaluate.lm import perplexity, read_texts

    paths = resolve_files([str(p) for p in extra["data"]]) if extra["data"] else []
    docs = list(extra["texts"] or []) + (list(read_texts(paths, "blank", "text")) if paths else [])
    if not docs:
        return "no --data files or texts given"
    if quick:
        docs = docs[: QUICK_LIMITS["ppl_documents"]]
    model, tokenizer = _load(model_dir, device)
    results = perplexity(model, tokenizer, docs)
    settings = {"seq_len": results["seq_len"], "stride": results["stride"], "documents": len(docs), "quick": quick}
    write_result(out, "ppl", results, model=str(model_dir), data=paths, settings=settings)
    return None


def _run_cloze(model_dir, out, quick, minutes, device, extra) -> str | None:
    from flashlm.evaluate.lm import cloze

    if not extra["cloze"]:
        return "no --cloze file given"
    path = Path(extra["cloze"])
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    model, tokenizer = _load(model_dir, device)
    results = cloze(model, tokenizer, path.read_text(encoding="utf-8").splitlines())
    write_result(out, "cloze", results, model=str(model_dir), data=[path], scores={"cloze": results["accuracy"]})
    return None


def _run_efficiency(model_dir, out, quick, minutes, device, extra) -> str | None:
    from flashlm.evaluate.efficiency import efficiency

    model, _ = _load(model_dir, device)
    sizes, prompt_len, new_tokens = ((1, 8), 64, 16) if quick else ((1, 8), 128, 32)
    dev = str(next(model.parameters()).device)
    results = efficiency(model, sizes, prompt_len, new_tokens, dev)
    settings = {"batch_sizes": list(sizes), "prompt_len": results["prompt_len"], "new_tokens": new_tokens}
    write_result(out, "efficiency", results, model=str(model_dir), seed=0, settings=settings)
    return None


def _run_longrange(model_dir, out, quick, minutes, device, extra) -> str | None:
    from dataclasses import replace

    from flashlm.tasks.longrange import LongRangeConfig, write_longrange

    threads = {"threads": extra["threads"]} if extra["threads"] else {}  # else the task's own (1)
    cfg = LongRangeConfig(minutes=minutes, **threads)
    if quick:  # shorter passkey rows (scored up to 4x = 512) and fewer scored items
        cfg = replace(cfg, train_len=128, passkey_samples=4, mqar_samples=8)
    write_longrange(out, cfg, extra["log"])
    return None


def _shared_data(name: str) -> Path | None:
    here = Path(__file__).resolve().parents[3]
    for base in (Path.cwd().parent, Path.cwd(), here):
        if (base / "shared" / "data" / name).is_dir():
            return base / "shared" / "data" / name
    return None


def _run_babi(model_dir, out, quick, minutes, device, extra) -> str | None:
    data = _babi_dir()
    if data is None:
        return "no bAbI data (set $FLASHLM_BABI)"
    from flashlm.tasks.finetuned import evaluate_babi

    evaluate_babi(
        out,
        model=model_dir,
        data=data,
        minutes=minutes,
        train_limit=QUICK_LIMITS["babi_train"] if quick else None,
        test_limit=QUICK_LIMITS["babi_test"] if quick else None,
        threads=extra["threads"],
        device=device,
    )
    return None


def _babi_dir() -> Path | None:
    try:
        from flashlm.tasks.babi import find_data
    except ImportError:
        return None
    try:
        return find_data(None)
    except DataError:
        return None


def _run_squad(model_dir, out, quick, minutes, device, extra) -> str | None:
    """SQuAD-format files built from bAbI task 1 stories (the answer is a word of the story)."""
    data = _babi_dir()
    if data is None:
        return "no bAbI data to build SQuAD files from"
    from flashlm.tasks.babi import read_task
    from flashlm.tasks.finetuned import evaluate_squad
    from flashlm.tasks.squad import squad_from_babi

    folder = out / "squad-from-babi"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, limit in (("train", QUICK_LIMITS["squad_train"]), ("test", QUICK_LIMITS["squad_eval"])):
        questions = read_task(data, 1, split, limit if quick else None)
        files[split] = folder / f"qa1_{split}.json"
        _write_text(files[split], json.dumps(squad_from_babi(questions, f"qa1-{split}")))
    evaluate_squad(
        files["train"], files["test"], out, model=model_dir, minutes=minutes, threads=extra["threads"], device=device
    )
    return None


def _run_translate(model_dir, out, quick, minutes, device, extra) -> str | None:
    data = _shared_data("multi30k")
    if data is None:
        return "no Multi30k data (shared/data/multi30k)"
    from flashlm.tasks.finetuned import evaluate_translate

    evaluate_translate(
        data / "train.en.gz",
        data / "train.de.gz",
        data / "val.en.gz",
        data / "val.de.gz",
        out,
        model=model_dir,
        minutes=minutes,
        train_limit=QUICK_LIMITS["translate_train"] if quick else None,
        eval_limit=QUICK_LIMITS["translate_eval"] if quick else None,
        threads=extra["threads"],
        device=device,
    )
    return None


_RUNNERS: dict[str, Callable[..., str | None]] = {
    "ppl": _run_ppl,
    "cloze": _run_cloze,
    "efficiency": _run_efficiency,
    "longrange": _run_longrange,
    "babi": _run_babi,
    "squad": _run_squad,
    "translate": _run_translate,
}


__all__ = ["ALL_TASKS", "QUICK_LIMITS", "QUICK_SHARES", "evaluate_all"]
