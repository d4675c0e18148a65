"""The report card: `report.md` with plots.

Every task writes `results/<task>.json` and its Markdown section (`flashlm.evaluate.results`:
provenance, `write_result`, `load_results`, `SECTIONS`; re-exported here). `write_report` assembles the
sections into `report.md` with plots (Agg backend): accuracy by task, the passkey heat-map (length ×
depth) and loss curves from a training `metrics.jsonl`. `eval all`, which runs every task that applies
to a model and then writes the report, is `flashlm.tasks.run_all.evaluate_all`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import DataError
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
from flashlm.training.runlog import plot_losses


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


__all__ = [
    "SECTIONS",
    "TASK_ORDER",
    "TITLES",
    "data_hashes",
    "load_results",
    "plot_histories",
    "plot_passkey",
    "plot_scores",
    "section",
    "sha256_file",
    "table",
    "versions",
    "write_report",
    "write_result",
]
