"""bAbI fine-tuning and scoring: `BabiConfig`, `run_babi` and its per-task scheduling, the report section.

`train_model` fine-tunes (with augmentation: `flashlm.tasks.babi.augment`), `predict` decodes greedily or
by a beam search constrained by `ChainGrammar`, `score` / `evaluate` give exact-match accuracy per task.
`run_babi` trains one joint model or one per task (groups of tasks sharing a model: `task_groups`),
per task optionally in worker processes that share a time budget (`next_budget`, in `SCHEDULE` order).
Importing this module registers the `babi` report section (`markdown`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import ConfigError
from flashlm.evaluate.results import SECTIONS, table
from flashlm.generation import beam_search, greedy_decode, length_batches
from flashlm.model.transformer import FlashLM
from flashlm.tasks.babi.augment import augmenting_collate
from flashlm.tasks.babi.data import (
    FAILED_BELOW,
    TASKS,
    Question,
    answer_of,
    build_examples,
    corpus,
    normalize,
    read_task,
    source_text,
)
from flashlm.tasks.babi.grammar import ChainGrammar, chain_grammar
from flashlm.tasks.babi_config import DEFAULT_MODEL, SCHEDULE, TASK_GROUPS, BabiConfig
from flashlm.training.finetune import finetune, new_model, prompt_ids


def predict(
    model: FlashLM,
    tokenizer: Any,
    sources: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    beam: int = 1,
    grammars: Sequence[ChainGrammar] | None = None,
) -> list[str]:
    """Prefix-LM answers to ``<bos> source <sep>`` prompts (a long story loses its start): greedy, or
    a beam search of ``beam`` rows whose chains follow ``grammars`` (one per source)."""
    limit = model.cfg.max_seq_len - max_new_tokens - 2
    prompts = [prompt_ids(tokenizer, s, limit, keep="end") for s in sources]
    pad = tokenizer.pad_id or 0
    if beam == 1 and grammars is None:
        outputs = greedy_decode(model, prompts, max_new_tokens, tokenizer.eos_id, pad, batch_size)
    else:
        outputs = [[] for _ in prompts]
        for rows in length_batches(prompts, max(batch_size // beam, 1)):
            rules = [grammars[i] for i in rows] if grammars is not None else None

            def allowed(source: int, history: list[int], rules: list | None = rules) -> list[int] | None:
                return rules[source].allowed(history) if rules is not None else None

            found = beam_search(
                model,
                [prompts[i] for i in rows],
                beam,
                max_new_tokens,
                tokenizer.eos_id,
                pad,
                length_penalty=0.0,
                allowed=allowed,
            )
            for i, tokens in zip(rows, found, strict=True):
                outputs[i] = tokens
    return [tokenizer.decode(out).strip() for out in outputs]


def score(predictions: Sequence[str], questions: Sequence[Question]) -> dict[int, float]:
    """Exact-match accuracy per task."""
    hits: dict[int, list[bool]] = {}
    for pred, q in zip(predictions, questions, strict=True):
        hits.setdefault(q.task, []).append(normalize(answer_of(pred)) == normalize(q.answer))
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def evaluate(
    model: FlashLM,
    tokenizer: Any,
    questions: Sequence[Question],
    max_sentences: int,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    beam: int = 1,
    copy_statements: bool = False,
) -> dict[int, float]:
    """Accuracy per task; with ``copy_statements`` the chains may only cite the story (`ChainGrammar`)."""
    sources = [source_text(q, max_sentences) for q in questions]
    grammars = [chain_grammar(tokenizer, q, max_sentences) for q in questions] if copy_statements else None
    return score(predict(model, tokenizer, sources, batch_size, max_new_tokens, beam, grammars), questions)


# ---- the task -----------------------------------------------------------------------------------
def train_model(
    train: Sequence[Question], cfg: BabiConfig, model: FlashLM | None = None, tokenizer: Any = None
) -> tuple[FlashLM, Any, dict[str, Any]]:
    """Fine-tune ``model`` (or a new one with a tokenizer trained on ``train``) on ``train``."""
    facts = cfg.supporting_facts
    if model is None:
        text = corpus(train, cfg.max_sentences, facts)
        model, tokenizer = new_model(text, cfg.model, cfg.vocab_size, cfg.finetune.seed, cfg.device)
    max_len = model.cfg.max_seq_len
    examples = build_examples(tokenizer, train, cfg.max_sentences, max_len, facts)
    if cfg.augment:
        collate = augmenting_collate(tokenizer, train, cfg.max_sentences, max_len, cfg.finetune.seed, facts)
        summary = finetune(model, list(train), cfg.finetune, collate, [len(e.ids) for e in examples])
    else:
        summary = finetune(model, examples, cfg.finetune)
    summary["examples"] = len(examples)
    summary["longest_target"] = max(len(e.ids) - e.prefix_len for e in examples)  # tokens, with <eos>
    return model, tokenizer, summary


def run_babi(
    data_dir: str | os.PathLike,
    cfg: BabiConfig,
    model: FlashLM | None = None,
    tokenizer: Any = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune (jointly or per task) and score every task in ``cfg.tasks`` on its test file.

    Per task with ``cfg.jobs`` > 1, that many worker processes train tasks side by side, each on
    ``cfg.threads // cfg.jobs`` threads, and the time budget is shared out as tasks finish (see
    `next_budget`). ``save_dir`` keeps the fine-tuned model and tokenizer (per task: ``qaN`` each).
    """
    began = time.perf_counter()
    groups = task_groups(cfg.tasks, cfg.groups) if cfg.per_task else [list(cfg.tasks)]
    work = [(data_dir, cfg, g, model, tokenizer, _save_path(save_dir, g, cfg.per_task)) for g in groups]
    if cfg.per_task and cfg.jobs > 1 and len(groups) > 1:
        order = sorted(range(len(groups)), key=lambda i: scheduled(groups[i]))
        finished = dict(zip(order, _run_parallel([work[i] for i in order], cfg), strict=True))
        outcomes = [finished[i] for i in range(len(groups))]
    else:
        minutes = cfg.finetune.max_minutes
        outcomes = [
            train_and_score(*w, minutes=minutes * len(g) / len(cfg.tasks) if minutes else None)
            for w, g in zip(work, groups, strict=True)
        ]
    accuracy = {t: a for o in outcomes for t, a in o["accuracy"].items()}
    runs = [o["run"] for o in outcomes]
    return _results(accuracy, runs, outcomes[-1], time.perf_counter() - began)


def train_and_score(
    data_dir: str | os.PathLike,
    cfg: BabiConfig,
    group: Sequence[int],
    model: FlashLM | None,
    tokenizer: Any,
    save_path: Path | None,
    minutes: float | None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train on the tasks of ``group`` for at most ``minutes`` and score them on their test files."""
    import copy
    from dataclasses import replace

    import torch

    if threads:
        torch.set_num_threads(threads)
    train = [q for t in group for q in read_task(data_dir, t, "train", cfg.train_limit)]
    test = [q for t in group for q in read_task(data_dir, t, "test", cfg.test_limit)]
    cfg = replace(cfg, finetune=replace(cfg.finetune, max_minutes=minutes))
    start = copy.deepcopy(model) if model is not None else None
    net, tok, summary = train_model(train, cfg, start, tokenizer)
    written = summary["longest_target"] + 2  # what decoding must allow, with some slack
    copy = cfg.copy_statements and cfg.supporting_facts
    accuracy = evaluate(net, tok, test, cfg.max_sentences, cfg.eval_batch_size, written, cfg.beam, copy)
    if save_path is not None:
        net.save_pretrained(save_path, tok)
    run = {k: v for k, v in summary.items() if k != "history"} | {"tasks": list(group), "budget_minutes": minutes}
    return {
        "accuracy": accuracy,
        "run": run,
        "history": summary["history"],
        "parameters": net.num_parameters(),
        "model_config": net.cfg.to_dict(),
    }


def task_groups(tasks: Sequence[int], groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """`tasks` split into the models that train them: each of `groups` (its members among `tasks`) at
    its first member's place, every other task alone."""
    out, placed = [], set()
    for task in tasks:
        if task in placed:
            continue
        group = next(([t for t in g if t in tasks] for g in groups if task in g), [task])
        placed.update(group)
        out.append(group)
    return out


def scheduled(group: Sequence[int]) -> tuple[int, int]:
    """Sort key of a model's tasks in `SCHEDULE` (its first member's place; unlisted tasks last)."""
    first = group[0]
    return (SCHEDULE.index(first), first) if first in SCHEDULE else (len(SCHEDULE), first)


def parse_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``"2,3;7,8"`` → ((2, 3), (7, 8)); ``"none"`` or "" → (). Tasks must be 1-20, each in one group."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        groups = tuple(tuple(int(t) for t in g.split(",") if t.strip()) for g in text.split(";") if g.strip())
    except ValueError:
        raise ConfigError(f"--groups {text!r}: expected task numbers like '2,3' or '2,3;7,8' (or 'none')") from None
    members = [t for g in groups for t in g]
    if any(t not in TASKS for t in members) or len(set(members)) != len(members):
        raise ConfigError(f"--groups {text!r}: tasks must be 1-20 and each in at most one group")
    return groups


def next_budget(
    seconds_left: float, jobs: int, running_left: Sequence[float], waiting: Sequence[int], overhead: float = 0.0
) -> float:
    """Training seconds for the next model to start: the workers' time still unclaimed, less each
    unfinished model's ``overhead`` (start-up, tokenizer, scoring), shared by the ``waiting`` models in
    proportion to their tasks (``waiting``: tasks per model, the next one first). ``running_left``
    holds what the running models may still train; one that ends early (its loss converged) thereby
    hands its rest to those after it. A model trains on one worker, so it never gets more than the
    time left to the deadline (less its own overhead)."""
    free = seconds_left * jobs - sum(max(r, 0.0) for r in running_left)
    free -= overhead * (len(waiting) + len(running_left))
    share = free * (waiting[0] if waiting else 1) / max(sum(waiting), 1)
    return max(min(share, seconds_left - overhead), 1.0)


def _run_parallel(work: list[tuple], cfg: BabiConfig) -> list[dict[str, Any]]:
    """`train_and_score` over ``work`` in ``cfg.jobs`` spawned processes, in order of submission."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    jobs = min(cfg.jobs, len(work))
    threads = max(1, (cfg.threads or os.cpu_count() or 1) // jobs)
    minutes = cfg.finetune.max_minutes
    deadline = time.perf_counter() + minutes * 60 if minutes else None
    running: dict[Any, tuple[int, float, float]] = {}  # future → (index, started, budget seconds)
    outcomes: dict[int, dict[str, Any]] = {}
    overheads: list[float] = []  # per finished task: wall seconds not spent training
    queue = list(range(len(work)))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while queue or running:
            while queue and len(running) < jobs:
                index, now = queue.pop(0), time.perf_counter()
                budget = None
                if deadline is not None:
                    left = [b - (now - s) for _, s, b in running.values()]
                    overhead = sum(overheads) / len(overheads) if overheads else 0.0
                    sizes = [len(work[i][2]) for i in (index, *queue)]
                    budget = next_budget(deadline - now, jobs, left, sizes, overhead)
                future = pool.submit(train_and_score, *work[index], budget / 60 if budget else None, threads)
                running[future] = (index, now, budget or 0.0)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index, started, _ = running.pop(future)
                outcomes[index] = future.result()
                overheads.append(time.perf_counter() - started - outcomes[index]["run"]["seconds"])
    return [outcomes[i] for i in range(len(work))]


def _save_path(save_dir: str | os.PathLike | None, group: Sequence[int], per_task: bool) -> Path | None:
    if save_dir is None:
        return None
    return Path(save_dir) / f"qa{group[0]}" if per_task else Path(save_dir)


def _results(
    accuracy: dict[int, float], runs: list[dict[str, Any]], last: dict[str, Any], seconds: float
) -> dict[str, Any]:
    mean = sum(accuracy.values()) / len(accuracy)
    return {
        "mean_accuracy": mean,
        "accuracy": {str(t): a for t, a in accuracy.items()},
        "failed_tasks": sum(a < FAILED_BELOW for a in accuracy.values()),
        "train_seconds": sum(r["seconds"] for r in runs),
        "total_seconds": seconds,
        "parameters": last["parameters"],
        "model_config": last["model_config"],
        "runs": runs,
        "loss_history": last["history"],
    }


def markdown(results: dict[str, Any]) -> str:
    """The report section: per-task accuracy, the mean and the time."""
    rows = [(f"qa{t}", a) for t, a in results["accuracy"].items()]
    rows.append(("mean", results["mean_accuracy"]))
    head = (
        f"Mean accuracy {100 * results['mean_accuracy']:.1f}% over {len(results['accuracy'])} tasks, "
        f"{results['failed_tasks']} under 95%; training {results['train_seconds'] / 60:.1f} min, "
        f"total {results['total_seconds'] / 60:.1f} min."
    )
    return head + "\n\n" + table(("task", "accuracy"), rows)


def _register() -> None:
    SECTIONS.setdefault("babi", markdown)


_register()


__all__ = [
    "DEFAULT_MODEL",
    "SCHEDULE",
    "TASK_GROUPS",
    "BabiConfig",
    "evaluate",
    "markdown",
    "next_budget",
    "parse_groups",
    "predict",
    "run_babi",
    "scheduled",
    "score",
    "task_groups",
    "train_and_score",
    "train_model",
]
