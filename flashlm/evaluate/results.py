"""Result records on disk: `<task>.json` and its Markdown section `<task>.md`.

Every task writes `results/<task>.json`: the results plus what is needed to reproduce and trust them
(model path, sha256 of every data file, seed, settings, versions of torch / flashlm / python) and a
Markdown section, also saved as `results/<task>.md`. Task modules add their own sections to `SECTIONS`
(`flashlm.tasks.babi`, `flashlm.tasks.translate`); `flashlm.evaluate.report` assembles the sections
into `report.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import DataError
from flashlm.hardware import describe, machine_info

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
        "machine": machine_info(),
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
    machine = f" Machine: {describe(record['machine'])}." if record.get("machine") else ""
    return (
        f"Model `{record.get('model')}`; data {data}; seed {record.get('seed')}; settings: {settings}; "
        f"torch {v.get('torch')}, flashlm {v.get('flashlm')}, python {v.get('python')}.{machine}"
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
    if r.get("summary"):
        parts.append(_longrange_summary(r))
    entries = r.get("patterns") or [{"pattern": None, "passkey": r.get("passkey"), "mqar": r.get("mqar")}]
    for entry in entries:
        name = f" — pattern `{entry['pattern']}`" if entry.get("pattern") else ""
        if entry.get("passkey"):
            p = entry["passkey"]
            rows = ([length, *accs] for length, accs in zip(p["lengths"], p["accuracy"], strict=True))
            parts.append(
                f"Passkey accuracy{name} (rows: length, columns: depth)\n\n"
                + table(["length", *(f"{d:g}" for d in p["depths"])], rows)
            )
        if entry.get("mqar"):
            rows = ((s["seq_len"], s["n_pairs"], s["accuracy"]) for s in entry["mqar"]["settings"])
            parts.append(f"MQAR{name}\n\n" + table(("seq_len", "pairs", "accuracy"), rows))
    if "kv_cache" in r:
        parts.append(_kv_table(r["kv_cache"]))
    if r.get("kv_cache_reference"):
        ref = r["kv_cache_reference"]
        parts.append(_kv_table(ref["rows"]).replace("pattern", f"pattern (preset `{ref['preset']}`)", 1))
    return "\n\n".join(parts)


def _longrange_summary(r: dict[str, Any]) -> str:
    """One row a pattern: passkey by length multiple, MQAR settings, KV bytes/token, training time."""
    rows = r["summary"]
    figures = [k for k in rows[0] if k.startswith(("passkey_", "mqar_"))]
    kv = {(k["pattern"], k["context"]): k["bytes_per_token"] for k in r.get("kv_cache", [])}
    contexts = sorted({c for _, c in kv})
    header = ["pattern", *figures, *(f"KV B/token @{c // 1024}k" for c in contexts), "train s"]
    body = (
        [
            row["pattern"],
            *(row.get(f) for f in figures),
            *(kv.get((row["pattern"], c)) for c in contexts),
            row.get("train_seconds"),
        ]
        for row in rows
    )
    goals = r.get("goals", {})
    note = (
        f"Training length {r.get('train_len')}; goals: passkey {goals.get('passkey_train_len', 1.0):.0%} at the "
        f"training length and ≥ {goals.get('passkey_4x', 0.9):.0%} at 4×, MQAR ≥ {goals.get('mqar', 0.99):.0%}."
    )
    return note + "\n\n" + table(header, body)


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


__all__ = [
    "SECTIONS",
    "TASK_ORDER",
    "TITLES",
    "data_hashes",
    "load_results",
    "section",
    "sha256_file",
    "table",
    "versions",
    "write_result",
]
