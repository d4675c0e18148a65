"""Benchmark `flashlm data prepare`: tokenization throughput (MB/s) and peak RSS of the process tree.

A corpus of real text (TinyStories, Tiny Shakespeare, Multi30k en+de, read from --data, by default
../shared/data; one document a line, shuffled and repeated) is assembled in a temporary directory at
each size; each run tokenizes it in a fresh process while this script samples the RSS of that process
and all of its children. Results go to bench/results/data_prepare.json and a section of
docs/benchmarks.md.

    .venv/bin/python bench/data_prepare.py                      # 50 and 200 MB, workers 1 and 2, both encoders
    .venv/bin/python bench/data_prepare.py --sizes 20 --workers 2 --data DIR
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from docs_section import replace_section
from shared_data import SHARED_DATA, require

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "data_prepare.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- data_prepare:begin -->", "<!-- data_prepare:end -->"
GOAL_MBPS, GOAL_RSS_MB = 5.0, 1024
# the corpus files, relative to --data
STORIES = ("tinystories/tinystories_train_head.txt", "tinystories/tinystories_validation_head.txt")
SHAKESPEARE = "tinyshakespeare/input.txt"
MULTI30K = ("multi30k/train.en.gz", "multi30k/train.de.gz")
SOURCES = (*STORIES, SHAKESPEARE, *MULTI30K)


# ---- corpus ---------------------------------------------------------------------------------------
def source_documents(data: Path) -> list[str]:
    """Real documents, one line each: stories, Shakespeare speeches, Multi30k captions (en, de)."""
    stories = (data / STORIES[0]).read_text(encoding="utf-8")
    docs = [line.strip() for line in stories.splitlines() if line.strip()]
    for name in (STORIES[1], SHAKESPEARE):
        text = (data / name).read_text(encoding="utf-8")
        docs += [" ".join(p.split("\n")) for p in text.split("\n\n") if p.strip()]
    for name in MULTI30K:
        with gzip.open(data / name, "rt", encoding="utf-8") as fh:
            docs += [line.strip() for line in fh if line.strip()]
    return docs


def write_corpus(path: Path, docs: list[str], megabytes: float, seed: int = 0) -> int:
    """Write shuffled passes over `docs` until `megabytes` MB; return the bytes written."""
    rng, target, written = random.Random(seed), int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            order = docs[:]
            rng.shuffle(order)
            for doc in order:
                written += fh.write(doc + "\n") + len(doc.encode("utf-8")) - len(doc)
                if written >= target:
                    break
    return written


# ---- measuring ------------------------------------------------------------------------------------
def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (psutil if installed, else /proc)."""
    try:
        import psutil

        proc = psutil.Process(root)
        procs = [proc, *proc.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total
    except ImportError:
        return _proc_tree_rss(root)
    except Exception:
        return 0


def _proc_tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_once(corpus: Path, tokenizer: Path, out: Path, workers: int | None, encoder: str) -> dict:
    """Run `prepare_shards` in a fresh process, sampling its tree's RSS every 50 ms."""
    cmd = [sys.executable, __file__, "--child", str(corpus), str(tokenizer), str(out), str(workers or 0), encoder]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"benchmark run failed ({proc.returncode}): {' '.join(cmd)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    return result


def child(corpus: str, tokenizer: str, out: str, workers: int, encoder: str) -> None:
    """The measured process: tokenize, then print timing as JSON."""
    import resource

    from flashlm.data.shards import prepare_shards

    start = time.perf_counter()
    meta = prepare_shards(corpus, tokenizer, out, workers=workers or None, progress=False, encoder=encoder)
    elapsed = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    text = sum(s["text_bytes"] for s in meta["splits"].values())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    print(
        json.dumps(
            {
                "seconds": round(elapsed, 2),
                "text_mb": round(text / 1e6, 2),
                "tokens": tokens,
                "mb_per_s": round(text / 1e6 / elapsed, 2),
                "cpu_seconds": round(cpu, 1),
                "mb_per_cpu_s": round(text / 1e6 / cpu, 2),
                "encoder": meta["encoder"],
            }
        )
    )


# ---- reporting ------------------------------------------------------------------------------------
def machine() -> dict:
    import numpy
    import tokenizers

    from flashlm.hardware import machine_info

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        **machine_info(),
        "memory_gib": round(mem, 1),
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }


def checks(report: dict) -> dict:
    """Goal checks: throughput (measured, and CPU-bound estimate), peak RSS, stability across sizes."""
    runs, cpus = report["runs"], report["machine"]["cpus"]
    per_cpu = sorted(r["mb_per_cpu_s"] for r in runs)
    estimate = round(cpus * per_cpu[len(per_cpu) // 2], 2)
    ratios = {}
    for key in sorted({(r.get("encoder", "tokenizers"), r["workers"]) for r in runs}):
        mine = sorted(
            (r for r in runs if (r.get("encoder", "tokenizers"), r["workers"]) == key), key=lambda r: r["size_mb"]
        )
        if len(mine) > 1:
            small, large = mine[0], mine[-1]
            ratios[f"{key[0]}, workers {key[1]}"] = {
                "mb_per_cpu_s": round(large["mb_per_cpu_s"] / small["mb_per_cpu_s"], 2),
                "peak_rss": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
            }
    best = max(r["mb_per_s"] for r in runs)
    peak = max(r["peak_rss_mb"] for r in runs)
    stable = all(abs(v - 1) <= 0.2 for ratio in ratios.values() for v in ratio.values())
    return {
        "best_mb_per_s": best,
        "cpu_bound_estimate_mb_per_s": estimate,
        "max_peak_rss_mb": peak,
        "large_over_small": ratios,
        "throughput_goal_met": best >= GOAL_MBPS,
        "rss_goal_met": peak < GOAL_RSS_MB,
        "stable_across_sizes": stable,
        "same_tokens_every_encoder": all(
            len({r["tokens"] for r in runs if r["size_mb"] == size}) == 1 for size in {r["size_mb"] for r in runs}
        ),
    }


def write_markdown(report: dict) -> None:
    from flashlm.hardware import describe

    m, rows, c = report["machine"], report["runs"], report["checks"]
    met = lambda flag: "met" if flag else "NOT met"
    lines = [
        BEGIN,
        "## Data preparation (`flashlm data prepare`)",
        "",
        "Tokenization throughput and peak memory (RSS of the process and its children) of `flashlm data "
        "prepare` on real text (TinyStories, Tiny Shakespeare, Multi30k en+de; one document a line) repeated "
        f"to each size, byte-level BPE with {report['settings']['vocab_size']} tokens.",
        "",
        f"Machine: {describe(m)}; workers 1 tokenizes in the process with the encoder's own "
        "threads (the default on <= 2 CPUs), 2 uses two worker processes; the encoder is `tokenizers` or "
        "`tiktoken` over the same BPE (`--encoder`; `auto`, the default, takes tiktoken when its ids equal "
        "`tokenizers`' on the first chunk); token counts equal for every encoder at each size: "
        f"{'yes' if c.get('same_tokens_every_encoder', True) else 'NO'}; "
        f"tokenizers {m['tokenizers']}, Python {m['python']}; load average before/after "
        f"{report['loadavg_before']} / {report['loadavg_after']}.",
        "",
        f"Goals: >= {GOAL_MBPS} MB/s; peak RSS < {GOAL_RSS_MB} MB; MB per CPU-second and peak RSS within 20% "
        "from the smallest to the largest corpus.",
        "",
        "| corpus MB | encoder | workers | MB/s | MB per CPU-second | peak RSS (tree) MB | tokens | seconds |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = f"{r['workers']} (in-process)" if r["workers"] == 1 else f"{r['workers']} (processes)"
        lines.append(
            f"| {r['text_mb']:.0f} | {r.get('encoder', 'tokenizers')} | {mode} | {r['mb_per_s']:.2f} | "
            f"{r['mb_per_cpu_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['tokens']:,} | {r['seconds']:.1f} |"
        )
    ratios = "; ".join(
        f"{w}: MB per CPU-second x{r['mb_per_cpu_s']}, peak RSS x{r['peak_rss']}"
        for w, r in c["large_over_small"].items()
    )
    lines += [
        "",
        f"Result: throughput {met(c['throughput_goal_met'])} (best {c['best_mb_per_s']} MB/s; a CPU-bound "
        f"estimate for {m['cpus']} uncontended CPUs, {m['cpus']} x the median MB per CPU-second, is "
        f"{c['cpu_bound_estimate_mb_per_s']} MB/s); memory {met(c['rss_goal_met'])} (at most "
        f"{c['max_peak_rss_mb']:.0f} MB); stability {met(c['stable_across_sizes'])} (largest over smallest "
        f"corpus: {ratios}).",
        "",
        f"Rerun: `{report['command']}` (add `--data DIR` when the corpora are not in ../shared/data; writes "
        "`bench/results/data_prepare.json`; `--report-only` rewrites this section from it).",
        END,
    ]
    section = "\n".join(lines)
    replace_section(DOC, BEGIN, END, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 200], help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker settings to compare")
    parser.add_argument(
        "--encoders", nargs="+", default=["tokenizers", "tiktoken"], help="encoders to compare (--encoder of prepare)"
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA,
        metavar="DIR",
        help=f"folder holding {', '.join(SOURCES)} (default: ../shared/data)",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from the JSON")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child[:3], int(args.child[3]), args.child[4])
    if args.report_only:
        report = json.loads(RESULTS.read_text(encoding="utf-8"))
        report["checks"] = checks(report)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return write_markdown(report)

    require("data_prepare.py", [args.data / name for name in SOURCES], "corpus files", "--data DIR")
    from flashlm.tokenizer import Tokenizer

    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    docs = source_documents(args.data)
    runs = []
    with tempfile.TemporaryDirectory(prefix="flashlm-bench-") as tmp:
        tmp_dir = Path(tmp)
        start = time.perf_counter()
        tok_path = Tokenizer.train(iter(docs), args.vocab_size, show_progress=False).save(tmp_dir / "tok")
        train_s = time.perf_counter() - start
        for size in args.sizes:
            corpus = tmp_dir / f"corpus_{size:g}mb.txt"
            write_corpus(corpus, docs, size)
            for encoder in args.encoders:
                for workers in args.workers:
                    measured = run_once(corpus, tok_path, tmp_dir / "out", workers, encoder)
                    result = {"size_mb": size, "workers": workers, **measured}
                    print(json.dumps(result), flush=True)
                    runs.append(result)
            corpus.unlink()
    cmd = "python bench/data_prepare.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    report = {
        "benchmark": "data_prepare",
        "command": cmd,
        "machine": machine(),
        "settings": {
            "vocab_size": args.vocab_size,
            "source_documents": len(docs),
            "txt_mode": "line",
            "val_fraction": 0.01,
            "tokenizer_train_seconds": round(train_s, 1),
        },
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "goal": {"mb_per_s": GOAL_MBPS, "peak_rss_mb": GOAL_RSS_MB, "size_ratio_tolerance": 0.2},
        "runs": runs,
    }
    report["checks"] = checks(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report)
    print(f"wrote {RESULTS.relative_to(REPO)} and {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
