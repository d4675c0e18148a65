"""Results on disk and the report card.

Every task writes `results/<task>.json`: the results plus what is needed to reproduce and trust them
(model path, sha256 of every data file, seed, settings, versions of torch / flashlm / python) and a
Markdown section, also saved as `results/<task>.md`. `write_report` assembles the sections into
`report.md` with plots (Agg backend): accuracy by task, the passkey heat-map (length × depth) and loss
curves from a training `metrics.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import DataError

TASK_ORDER = ("ppl", "cloze", "babi", "squad", "translate", "longrange", "efficiency")
TITLES = {
    "ppl": "Language modelling",
    "cloze": "Cloze (LAMBADA format)",
    "babi": "bAbI",
    "squad": "SQuAD",
    "translate": "Translation",
    "longrange": "Long-range dependencies",
    "efficiency": "Efficiency",
}


# ---- provenance ---------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of python, torch and flashlm, and the platform."""
    import importlib.metadata

    import torch

    try:
        flashlm_version = importlib.metadata.version("flashlm")
    except importlib.metadata.PackageNotFoundError:
        flashlm_version = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flashlm": flashlm_version,
        "platform": platform.platform(),
        "cuda": str(torch.version.cuda),
    }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def data_hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """sha256 of every file, directories expanded recursively."""
    out: dict[str, str] = {}
    for item in paths:
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.is_file():
                raise DataError(f"no such file: {file}")
            out[str(file)] = sha256_file(file)
    return out


# ---- writing and reading results ----------------------------------------------------------------
def write_result(
    results_dir: str | os.PathLike,
    task: str,
    results: dict[str, Any],
    *,
    model: str | None = None,
    data: Sequence[str | os.PathLike] = (),
    seed: int | None = None,
    settings: dict[str, Any] | None = None,
    scores: dict[str, float] | None = None,
) -> Path:
    """Write `<task>.json` and `<task>.md` into `results_dir`; `scores` (accuracies, 0-1) feed the chart."""
    record = {
        "task": task,
        "model": model,
        "data": data_hashes(data),
        "seed": seed,
        "settings": settings or {},
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scores": scores or {},
        "results": results,
    }
    record["markdown"] = section(record)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / f"{task}.json", json.dumps(record, indent=2, default=str))
    _write_text(out / f"{task}.md", record["markdown"])
    return out / f"{task}.json"


def load_results(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result record in `results_dir`, in report order (known tasks first)."""
    directory = Path(results_dir)
    if not directory.is_dir():
        raise DataError(f"no results directory {directory}; run `flashlm eval TASK --out {directory}` first")
    records = []
    for file in sorted(directory.glob("*.json")):
        try:
            record = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: not valid JSON ({exc.msg})") from None
        if isinstance(record, dict) and "task" in record and "results" in record:
            records.append(record)
    rank = {task: i for i, task in enumerate(TASK_ORDER)}
    return sorted(records, key=lambda r: (rank.get(r["task"], len(rank)), r["task"]))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---- Markdown -----------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats shown with 4 significant digits."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def section(record: dict[str, Any]) -> str:
    """The Markdown section of one result record."""
    task = record["task"]
    head = [f"## {TITLES.get(task, task)}", "", _provenance(record), ""]
    body = SECTIONS.get(task, _generic)(record["results"])
    return "\n".join(head) + "\n" + body + "\n"


def _provenance(record: dict[str, Any]) -> str:
    data = ", ".join(f"`{Path(p).name}` ({h[:12]})" for p, h in record.get("data", {}).items()) or "generated"
    settings = ", ".join(f"{k}={v}" for k, v in record.get("settings", {}).items()) or "defaults"
    v = record.get("versions", {})
    return (
        f"Model `{record.get('model')}`; data {data}; seed {record.get('seed')}; settings: {settings}; "
        f"torch {v.get('torch')}, flashlm {v.get('flashlm')}, python {v.get('python')}."
    )


def _generic(results: dict[str, Any]) -> str:
    return table(("metric", "value"), ((k, v) for k, v in results.items() if not isinstance(v, (dict, list))))


def _ppl(r: dict[str, Any]) -> str:
    keys = ("loss", "ppl", "bpb", "tokens", "bytes", "documents", "seq_len", "stride")
    return table(keys, [[r.get(k) for k in keys]])


def _cloze(r: dict[str, Any]) -> str:
    keys = ("accuracy", "target_ppl", "passages", "target_tokens")
    return table(keys, [[r.get(k) for k in keys]])


def _longrange(r: dict[str, Any]) -> str:
    parts = []
    if "passkey" in r:
        p = r["passkey"]
        rows = ([length, *accs] for length, accs in zip(p["lengths"], p["accuracy"], strict=True))
        parts.append(
            "Passkey accuracy (rows: length, columns: depth)\n\n"
            + table(["length", *(f"{d:g}" for d in p["depths"])], rows)
        )
    if "mqar" in r:
        rows = ((s["seq_len"], s["n_pairs"], s["accuracy"]) for s in r["mqar"]["settings"])
        parts.append("MQAR\n\n" + table(("seq_len", "pairs", "accuracy"), rows))
    if "kv_cache" in r:
        parts.append(_kv_table(r["kv_cache"]))
    return "\n\n".join(parts)


def _kv_table(rows: list[dict[str, Any]]) -> str:
    body = ((k["pattern"], k["context"], k["bytes"], k["bytes_per_token"]) for k in rows)
    return "KV-cache size by layer pattern\n\n" + table(("pattern", "context", "bytes", "bytes/token"), body)


_RUN_COLUMNS = {
    "batch_size": "batch",
    "prefill_tokens_per_s": "prefill tok/s",
    "decode_tokens_per_s": "decode tok/s",
    "ttft_s": "first token (s)",
    "latency_p50_s": "p50 (s)",
    "latency_p95_s": "p95 (s)",
    "peak_memory_bytes": "peak memory (B)",
    "kv_cache_bytes": "KV cache (B)",
}


def _efficiency(r: dict[str, Any]) -> str:
    p, f = r["parameters"], r["flops_per_token"]
    head = table(
        ("parameters", "non-embedding", "FLOPs/token: decode", "prefill", "training", "device", "dtype"),
        [[p["total"], p["non_embedding"], f["decode"], f["prefill"], f["training"], r["device"], r["dtype"]]],
    )
    runs = table(tuple(_RUN_COLUMNS.values()), ([run[k] for k in _RUN_COLUMNS] for run in r["runs"]))
    measure = r["runs"][0].get("memory_measure", "") if r["runs"] else ""
    note = (
        f"Prompt {r['prompt_len']} tokens, {r['new_tokens']} new tokens (greedy, KV cache); decode and "
        f"prefill FLOPs at a {f['context']}-token context; memory: {measure}."
    )
    return "\n\n".join((head, note, runs, _kv_table(r["kv_cache_comparison"])))


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "ppl": _ppl,
    "cloze": _cloze,
    "longrange": _longrange,
    "efficiency": _efficiency,
}


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


def plot_passkey(passkey: dict[str, Any], path: Path) -> Path:
    """Heat-map of passkey accuracy, context length × needle depth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 * len(passkey["depths"]) + 2, 0.6 * len(passkey["lengths"]) + 1.5))
    im = ax.imshow(passkey["accuracy"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(passkey["depths"])), [f"{d:g}" for d in passkey["depths"]])
    ax.set_yticks(range(len(passkey["lengths"])), [str(n) for n in passkey["lengths"]])
    ax.set_xlabel("depth")
    ax.set_ylabel("context length")
    for i, row in enumerate(passkey["accuracy"]):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
    fig.colorbar(im, ax=ax)
    ax.set_title("Passkey accuracy")
    return _save(fig, path)


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


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the report ---------------------------------------------------------------------------------
def write_report(
    results_dir: str | os.PathLike,
    metrics: str | os.PathLike | None = None,
    title: str = "FlashLM evaluation report",
) -> Path:
    """Assemble every `<task>.json` in `results_dir` (+ plots) into `results_dir/report.md`."""
    directory = Path(results_dir)
    records = load_results(directory)
    if not records:
        raise DataError(f"no result files (<task>.json) in {directory}; run a `flashlm eval` task first")
    if metrics is not None and not Path(metrics).is_file():
        raise DataError(f"no metrics file {metrics}")
    plots = [plot_scores(records, directory / "accuracy.png")]
    passkey = next((r["results"]["passkey"] for r in records if "passkey" in r["results"]), None)
    plots.append(plot_passkey(passkey, directory / "passkey.png") if passkey else None)
    plots.append(plot_losses(metrics, directory / "loss.png") if metrics else None)
    lines = [
        f"# {title}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}; python {sys.version.split()[0]}.",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})\n" for p in plots if p is not None]
    lines += [r.get("markdown") or section(r) for r in records]
    out = directory / "report.md"
    _write_text(out, "\n".join(lines))
    return out


__all__ = [
    "SECTIONS",
    "TASK_ORDER",
    "data_hashes",
    "load_results",
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
