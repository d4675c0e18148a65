"""The report card: `report.md` with plots, and `eval all`.

Every task writes `results/<task>.json` and its Markdown section (`flashlm.evaluate.results`:
provenance, `write_result`, `load_results`, `SECTIONS`; re-exported here). `write_report` assembles the
sections into `report.md` with plots (Agg backend): accuracy by task, the passkey heat-map (length ×
depth) and loss curves from a training `metrics.jsonl`. `evaluate_all` runs every task that applies to
a model, then writes the report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import DataError, FlashLMError
from flashlm.evaluate.results import (
    SECTIONS,
    TASK_ORDER,
    TITLES,
    _write_text,
    data_hashes,
    load_results,
    section,
    sha256_file,
    table,
    versions,
    write_result,
)


# ---- plots --------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Bar chart of every record's scores (accuracy in [0, 1])."""
    scores = {name: value for r in records for name, value in r.get("scores", {}).items()}
    if not scores:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(scores) + 2), 3.5))
    ax.bar(list(scores), list(scores.values()), color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by task")
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def plot_passkey(passkey: dict[str, Any] | Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Heat-map of passkey accuracy, context length × needle depth; one panel per (title, grid) pair."""
    panels = [("Passkey accuracy", passkey)] if isinstance(passkey, dict) else list(passkey)
    first = panels[0][1]
    plt = _pyplot()
    width = (1.0 * len(first["depths"]) + 1.5) * len(panels) + 1
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 0.6 * len(first["lengths"]) + 1.8), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels, strict=True):
        im = ax.imshow(grid["accuracy"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid["depths"])), [f"{d:g}" for d in grid["depths"]])
        ax.set_yticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
        ax.set_xlabel("depth")
        ax.set_ylabel("context length")
        for i, row in enumerate(grid["accuracy"]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
        ax.set_title(title)
    fig.colorbar(im, ax=list(axes[0]))
    return _save(fig, path, tight=False)


def plot_histories(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Fine-tuning loss curves stored in results: `loss_history` as [[step, loss], ...] or a dict of them
    (long-range: per pattern and task)."""
    series: dict[str, list] = {}
    for r in records:
        res = r.get("results", {})
        if _is_history(res.get("loss_history")):
            series[r["task"]] = res["loss_history"]
        for entry in res.get("patterns", []) if isinstance(res.get("patterns"), list) else []:
            for name, history in (entry.get("loss_history") or {}).items():
                if _is_history(history):
                    series[f"{name} {entry.get('pattern')}"] = history
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, history in series.items():
        ax.plot([h[0] for h in history], [h[1] for h in history], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.set_title("Task training curves")
    return _save(fig, path)


def _is_history(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(h, (list, tuple)) and len(h) == 2 for h in value)


def plot_losses(metrics_jsonl: str | os.PathLike, path: Path) -> Path | None:
    """Every numeric field whose name contains "loss" against `step`, from a metrics.jsonl."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{metrics_jsonl}: a line is not valid JSON ({exc.msg})") from None
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)) and "step" in row:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(row["step"])
                ys.append(value)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, (xs, ys) in series.items():
        ax.plot(xs, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.set_title("Training curves")
    return _save(fig, path)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the report ---------------------------------------------------------------------------------
def _passkey_panels(records: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(title, grid) of every pattern of the first record with passkey results."""
    for r in records:
        res = r["results"]
        if isinstance(res.get("patterns"), list) and res["patterns"]:
            return [(f"Passkey, pattern {e['pattern']}", e["passkey"]) for e in res["patterns"] if e.get("passkey")]
        if res.get("passkey"):
            return [("Passkey accuracy", res["passkey"])]
    return []


def write_report(
    results_dir: str | os.PathLike,
    metrics: str | os.PathLike | None = None,
    title: str = "FlashLM evaluation report",
    notes: Sequence[str] = (),
) -> Path:
    """Assemble every `<task>.json` in `results_dir` (+ plots) into `results_dir/report.md`."""
    directory = Path(results_dir)
    records = load_results(directory)
    if not records:
        raise DataError(f"no result files (<task>.json) in {directory}; run a `flashlm eval` task first")
    if metrics is not None and not Path(metrics).is_file():
        raise DataError(f"no metrics file {metrics}")
    plots = [plot_scores(records, directory / "accuracy.png")]
    passkey = _passkey_panels(records)
    plots.append(plot_passkey(passkey, directory / "passkey.png") if passkey else None)
    plots.append(plot_losses(metrics, directory / "loss.png") if metrics else None)
    plots.append(plot_histories(records, directory / "task_loss.png"))
    lines = [
        f"# {title}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}; python {sys.version.split()[0]}.",
        "",
    ]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += [f"![{p.stem}]({p.name})\n" for p in plots if p is not None]
    lines += [r.get("markdown") or section(r) for r in records]
    out = directory / "report.md"
    _write_text(out, "\n".join(lines))
    return out


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
    import torch

    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return FlashLM.from_pretrained(model_dir, device=device).eval(), Tokenizer.load(model_dir)


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

    from flashlm.evaluate.longrange import LongRangeConfig, write_longrange

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
    from flashlm.evaluate.finetuned import evaluate_babi

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
        from flashlm.evaluate.babi import find_data
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
    from flashlm.evaluate.babi import read_task
    from flashlm.evaluate.finetuned import evaluate_squad
    from flashlm.evaluate.squad import squad_from_babi

    folder = out / "squad-from-babi"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, limit in (("train", QUICK_LIMITS["squad_train"]), ("test", QUICK_LIMITS["squad_eval"])):
        questions = read_task(data, 1, split, limit if quick else None)
        files[split] = folder / f"qa1_{split}.json"
        _write_text(files[split], json.dumps(squad_from_babi(questions, f"qa1-{split}")))
    evaluate_squad(files["train"], files["test"], out, model=model_dir, minutes=minutes, threads=extra["threads"],
                   device=device)
    return None


def _run_translate(model_dir, out, quick, minutes, device, extra) -> str | None:
    data = _shared_data("multi30k")
    if data is None:
        return "no Multi30k data (shared/data/multi30k)"
    from flashlm.evaluate.finetuned import evaluate_translate

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


__all__ = [
    "SECTIONS",
    "TASK_ORDER",
    "TITLES",
    "ALL_TASKS",
    "data_hashes",
    "evaluate_all",
    "load_results",
    "plot_histories",
    "plot_losses",
    "plot_passkey",
    "plot_scores",
    "section",
    "sha256_file",
    "table",
    "versions",
    "write_report",
    "write_result",
]
