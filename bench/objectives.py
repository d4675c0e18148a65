"""Benchmark the pre-training objectives at an equal token budget: causal-only, MLM+NSP-only, hybrids
of causal and masked steps (masked steps on NSP pairs or on plain windows) and MLM-only (the NSP ablation).

Every variant trains the `tiny` preset (~5M parameters) from the same seed for the same steps ×
batch × seq_len tokens on TinyStories (the file given by --stories, by default the train head in
../shared/data; one *story* a document, byte-level BPE of 4096 tokens, 5% of the stories held out),
then is evaluated on the held-out stories: causal loss over every window, masked-token accuracy (15%
masks, fixed), NSP accuracy (512 fixed pairs) and training tokens/s. Variants run in `--jobs`
processes of `--threads` torch threads each. Results go to bench/results/objectives.json and a section
of docs/benchmarks.md.

    nice .venv/bin/python bench/objectives.py                 # every variant, --steps 250
    nice .venv/bin/python bench/objectives.py --steps 100 --variants causal hybrid   # quicker look
    nice .venv/bin/python bench/objectives.py --add --jobs 3 --variants causal hybrid_4to1_mlm   # into the JSON

With ``--add``, the variants train with the settings of the existing JSON and join its runs. A variant
already there is a check: it must reproduce its stored figures bit for bit (causal is a cheap one), or
the merge stops, since the runs of one table must come from the same code and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import replace_section
from shared_data import SHARED_DATA, require

REPO = Path(__file__).resolve().parents[1]
STORIES = SHARED_DATA / "tinystories" / "tinystories_train_head.txt"
RESULTS = REPO / "bench" / "results" / "objectives.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- objectives:begin -->", "<!-- objectives:end -->"
GOAL_CAUSAL_REL, GOAL_MLM_POINTS = 0.05, 2.0
MLM_SEEDS = 4  # held-out masked accuracy: each window masked with this many seeds

MASKING = {"rate": 0.3, "rate_end": 0.15, "max_span": 3, "next_token": True, "per_document": True}
VARIANTS = {
    "causal": {"objective": "clm"},
    "mlm_nsp": {"objectives": {"nsp": {"ratio": 1, "nsp_weight": 1.0}}},
    "hybrid": {"objectives": {"clm": {"ratio": 1}, "mlm": {"ratio": 3, "nsp_weight": 0.5}}},
    "hybrid_1to1": {"objectives": {"clm": {"ratio": 1}, "mlm": {"ratio": 1, "nsp_weight": 0.5}}},
    "hybrid_3to1": {"objectives": {"clm": {"ratio": 3}, "mlm": {"ratio": 1, "nsp_weight": 0.5}}},
    "hybrid_3to1_mlm": {"objectives": {"clm": {"ratio": 3}, "mlm": {"ratio": 1}}},
    "hybrid_4to1_mlm": {"objectives": {"clm": {"ratio": 4}, "mlm": {"ratio": 1}}},
    "hybrid_5to1_mlm": {"objectives": {"clm": {"ratio": 5}, "mlm": {"ratio": 1}}},
    "hybrid_6to1_mlm": {"objectives": {"clm": {"ratio": 6}, "mlm": {"ratio": 1}}},
    "mlm_only": {"objectives": {"mlm": {"ratio": 1}}},
}
TITLES = {
    "causal": "causal only",
    "mlm_nsp": "MLM + NSP only",
    "hybrid": "hybrid 1 causal : 3 MLM+NSP",
    "hybrid_1to1": "hybrid 1 causal : 1 MLM+NSP",
    "hybrid_3to1": "hybrid 3 causal : 1 MLM+NSP",
    "hybrid_3to1_mlm": "hybrid 3 causal : 1 MLM (no NSP)",
    "hybrid_4to1_mlm": "hybrid 4 causal : 1 MLM (no NSP)",
    "hybrid_5to1_mlm": "hybrid 5 causal : 1 MLM (no NSP)",
    "hybrid_6to1_mlm": "hybrid 6 causal : 1 MLM (no NSP)",
    "mlm_only": "MLM only (no NSP)",
}


# ---- data -----------------------------------------------------------------------------------------
def stories(path: Path) -> list[str]:
    """TinyStories stories: stories end at a single newline, paragraphs inside them at a blank line."""
    text = path.read_text(encoding="utf-8")
    return [s.replace("\0", "\n\n").strip() for s in text.replace("\n\n", "\0").split("\n") if s.strip()]


def prepare(directory: Path, vocab_size: int, source: Path) -> dict:
    from flashlm.data.shards import prepare_shards
    from flashlm.tokenizer import Tokenizer

    docs = stories(source)
    tok = Tokenizer.train(iter(docs), vocab_size=vocab_size, show_progress=False)
    tok.save(directory)
    return prepare_shards(iter(docs), tok, directory, val_fraction=0.05, workers=1, progress=False)


# ---- one variant (in its own process) --------------------------------------------------------------
def run_variant(name: str, data: str, out: str, settings: dict) -> dict:
    import torch

    torch.set_num_threads(settings["threads"])
    from flashlm.config import RunConfig
    from flashlm.data.batches import IGNORE_INDEX, eval_batches
    from flashlm.evaluate.masked import mlm_accuracy, nsp_accuracy, open_split
    from flashlm.model.heads import FlashLMForPretraining
    from flashlm.model.transformer import FlashLM
    from flashlm.training import train
    from flashlm.training.checkpoint import latest_checkpoint
    from flashlm.training.objectives import lm_cross_entropy

    seq = settings["seq_len"]
    cfg = RunConfig.from_dict(
        {
            "model": {"preset": "tiny", "max_seq_len": seq, "sliding_window": min(128, seq)},
            "train": {
                "data": data,
                "out": out,
                "steps": settings["steps"],
                "batch_size": settings["batch_size"],
                "seq_len": seq,
                "lr": settings["lr"],
                "warmup_steps": max(1, settings["steps"] // 10),
                "log_every": 10,
                "eval_every": 10**9,
                "save_every": 10**9,
                "eval_batches": 1,
                "device": "cpu",
                "seed": 1337,
                "masking": MASKING,
                **VARIANTS[name],
            },
        }
    )
    began = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - began
    rows = [r for r in summary["history"] if "tokens_per_s" in r]
    if settings.get("speed_only"):  # skip the first row (warm-up) when there are others
        speeds = sorted(r["tokens_per_s"] for r in rows[1:] or rows)
        return {"variant": name, "isolated_tokens_per_s": speeds[len(speeds) // 2]}
    checkpoint = latest_checkpoint(Path(out) / "checkpoints")
    model = FlashLM.from_pretrained(checkpoint)
    stream = open_split(data)
    nats = tokens = 0.0
    with torch.no_grad():
        for batch in eval_batches(stream, seq, 16, 10**9):
            logits = model(batch.input_ids).logits
            nats += float(lm_cross_entropy(logits, batch.targets, reduction="sum"))
            tokens += int((batch.targets != IGNORE_INDEX).sum())
    # every held-out window, masked with MLM_SEEDS different seeds: more masked tokens, less noise
    seeded = [
        mlm_accuracy(model, stream, seq, windows=10**9, rate=0.15, next_token=True, seed=s) for s in range(MLM_SEEDS)
    ]
    masked_tokens = sum(m["masked_tokens"] for m in seeded)
    mlm = {
        "masked_tokens": masked_tokens,
        **{k: sum(m[k] * m["masked_tokens"] for m in seeded) / masked_tokens for k in ("mlm_acc", "unigram_acc")},
    }
    nsp = nsp_accuracy(FlashLMForPretraining.with_head_from(model, checkpoint), stream, seq, pairs=512)
    trained = settings["steps"] * settings["batch_size"] * seq
    last = {k: v for k, v in rows[-1].items() if k.endswith(("_loss", "_acc"))} if rows else {}
    return {
        "variant": name,
        "title": TITLES[name],
        "objective": VARIANTS[name],
        "causal_loss": nats / tokens,
        "causal_tokens": int(tokens),
        "mlm_acc": mlm["mlm_acc"],
        "unigram_acc": mlm["unigram_acc"],
        "masked_tokens": mlm["masked_tokens"],
        "nsp_acc": nsp["nsp_acc"],
        "train_tokens": trained,
        "train_seconds": round(wall, 1),
        "tokens_per_s": trained / wall,
        "median_logged_tokens_per_s": sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2] if rows else None,
        "last_train_metrics": last,
        "parameters": model.num_parameters(),
    }


# ---- reporting ------------------------------------------------------------------------------------
def machine() -> dict:
    from flashlm.hardware import machine_info

    return machine_info()


def checks(runs: dict) -> dict:
    """The goals, for each hybrid: causal loss within 5% of causal-only; MLM accuracy within 2 points of
    the best masked-only variant. Also NSP's effect on MLM accuracy (MLM+NSP minus MLM-only)."""
    out: dict = {}
    masked = [k for k in ("mlm_nsp", "mlm_only") if k in runs]
    best = max(masked, key=lambda k: runs[k]["mlm_acc"]) if masked else None
    for hybrid in (k for k in runs if k.startswith("hybrid")):
        goals: dict = {}
        if "causal" in runs:
            rel = runs[hybrid]["causal_loss"] / runs["causal"]["causal_loss"] - 1
            goals.update(causal_loss_vs_causal=round(rel, 4), causal_goal_met=rel <= GOAL_CAUSAL_REL)
        if best is not None:
            gap = 100 * (runs[best]["mlm_acc"] - runs[hybrid]["mlm_acc"])
            goals.update(
                mlm_points_below_best_masked=round(gap, 2), mlm_reference=best, mlm_goal_met=gap <= GOAL_MLM_POINTS
            )
        out[hybrid] = goals
    if "mlm_nsp" in runs and "mlm_only" in runs:
        out["nsp_effect_on_mlm_points"] = round(100 * (runs["mlm_nsp"]["mlm_acc"] - runs["mlm_only"]["mlm_acc"]), 2)
    return out


def write_markdown(report: dict) -> None:
    from flashlm.hardware import describe

    s, m, c, runs = report["settings"], report["machine"], report["checks"], report["runs"]
    budget = s["steps"] * s["batch_size"] * s["seq_len"]
    met = lambda flag: "met" if flag else "NOT met"
    lines = [
        BEGIN,
        "## Objectives: causal vs MLM+NSP vs hybrid (`bench/objectives.py`)",
        "",
        f"The `tiny` preset ({runs[next(iter(runs))]['parameters']:,} parameters) trained from one seed on "
        f"TinyStories stories (train head, byte-level BPE of {s['vocab_size']} tokens, 5% of the stories "
        f"held out) for an equal budget of {budget:,} tokens each ({s['steps']} steps × {s['batch_size']} × "
        f"{s['seq_len']}, lr {s['lr']}, warmup + cosine). Masking 30% → 15%, spans of 1-3, masked next-token "
        f"prediction. Held-out: causal loss over every window, masked-token accuracy at 15% (unigram baseline "
        f"in brackets), NSP accuracy on 512 fixed pairs (chance 50%). Tokens/s: *alone* is the median logged "
        "rate of a short run of each variant, one after the other (the fair comparison); *in the run* is tokens "
        "over wall time of the benchmark run, with variants side by side.",
        "",
        f"Machine: {describe(m)}, torch {m['torch']}; {s['jobs']} variant(s) at a time with "
        f"{s['threads']} torch thread(s) each; load average before/after {report['loadavg_before']} / "
        f"{report['loadavg_after']}.",
        "",
        f"Goals, for each hybrid: held-out causal loss at most {GOAL_CAUSAL_REL:.0%} above causal-only, and "
        f"masked-token accuracy within {GOAL_MLM_POINTS:g} points of the best masked-only variant.",
        "",
        "| variant | held-out causal loss | MLM accuracy (unigram) | NSP accuracy | train tokens/s alone | "
        "tokens/s in the run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs.values():
        alone = f"{r['isolated_tokens_per_s']:,.0f}" if r.get("isolated_tokens_per_s") else "-"
        lines.append(
            f"| {r['title']} | {r['causal_loss']:.3f} | {100 * r['mlm_acc']:.1f}% "
            f"({100 * r['unigram_acc']:.1f}%) | {100 * r['nsp_acc']:.1f}% | {alone} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    notes = []
    for hybrid, goals in ((k, v) for k, v in c.items() if k.startswith("hybrid")):
        parts = []
        if "causal_loss_vs_causal" in goals:
            parts.append(
                f"causal loss {100 * goals['causal_loss_vs_causal']:+.1f}% vs causal-only "
                f"({met(goals['causal_goal_met'])})"
            )
        if "mlm_points_below_best_masked" in goals:
            parts.append(
                f"MLM accuracy {-goals['mlm_points_below_best_masked']:+.1f} points vs "
                f"{TITLES[goals['mlm_reference']]} ({met(goals['mlm_goal_met'])})"
            )
        title = TITLES[hybrid]
        notes.append(f"{title[0].upper()}{title[1:]}: {'; '.join(parts)}.")
    if "nsp_effect_on_mlm_points" in c:
        notes.append(
            f"NSP's effect on MLM accuracy (MLM+NSP minus MLM-only): {c['nsp_effect_on_mlm_points']:+.1f} points."
        )
    for added in report.get("added", []):
        check = (
            f"{', '.join(TITLES[n] for n in added['checked'])}, trained alongside as a check, reproduced its "
            "stored figures bit for bit"
            if added["checked"]
            else "no stored variant was retrained as a check"
        )
        notes.append(
            f"Added later with `--add` ({added['jobs']} at a time, so their *in the run* tokens/s are "
            f"lower): {', '.join(TITLES[n] for n in added['variants'])}; {check}."
        )
    lines += ["", *(f"- {note}" for note in notes), ""] if notes else [""]
    for paragraph in report.get("commentary", []):
        lines += [paragraph, ""]
    also = "".join(f", then `{added['command']}`" for added in report.get("added", []))
    lines += [
        f"Rerun: `{report['command']}`{also} (add `--stories FILE` when TinyStories is not in "
        "../shared/data/tinystories; writes `bench/results/objectives.json`; `--report-only` rewrites this "
        "section from it).",
        END,
    ]
    section = "\n".join(lines)
    replace_section(DOC, BEGIN, END, section)


# ---- main -----------------------------------------------------------------------------------------
def run_children(names: list[str], data: Path, tmp: Path, settings: dict, jobs: int) -> dict:
    """Run `run_variant` for each name in child processes, `jobs` at a time; their results by name."""
    pending, active, results = list(names), [], {}
    while pending or active:
        while pending and len(active) < jobs:
            name = pending.pop(0)
            out = tmp / f"{name}-{'speed' if settings.get('speed_only') else 'run'}"
            cmd = [sys.executable, __file__, "--child", name, str(data), str(out), json.dumps(settings)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            active.append((name, proc))
        name, proc = active.pop(0)
        output, _ = proc.communicate()
        result = next((line[7:] for line in output.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode != 0 or result is None:
            raise SystemExit(f"variant {name} failed (exit {proc.returncode}): {output[-2000:]}")
        results[name] = json.loads(result)
        print(json.dumps(results[name]), flush=True)
    return results


def measure_speed(names: list[str], data: Path, tmp: Path, settings: dict) -> dict:
    """Training tokens/s of each variant alone, one after the other (`--speed-steps` steps, median row)."""
    quick = {**settings, "steps": settings["speed_steps"], "speed_only": True}
    return {k: v["isolated_tokens_per_s"] for k, v in run_children(names, data, tmp, quick, jobs=1).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant process")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at the same time")
    parser.add_argument("--speed-steps", type=int, default=40, help="steps of the sequential speed pass")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from the JSON")
    parser.add_argument("--speed-only", action="store_true", help="redo the speed pass into the existing JSON")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where a full run writes its JSON (another "
        "path than the default leaves docs/benchmarks.md alone: for side studies)",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="train --variants with the JSON's settings and merge "
        "them into it (a rerun variant must reproduce its stored figures)",
    )
    parser.add_argument(
        "--stories",
        type=Path,
        default=STORIES,
        metavar="FILE",
        help="TinyStories text, one story a line (default: ../shared/data/tinystories/tinystories_train_head.txt)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, data, out, settings = args.child
        print("RESULT " + json.dumps(run_variant(name, data, out, json.loads(settings))), flush=True)
        return
    if not args.report_only:
        require("objectives.py", [args.stories], "TinyStories", "--stories FILE")
    if args.speed_only:
        report = json.loads(RESULTS.read_text(encoding="utf-8"))
        settings = {**report["settings"], "speed_steps": args.speed_steps}
        with tempfile.TemporaryDirectory(prefix="flashlm-bench-objectives-") as tmp:
            prepare(Path(tmp) / "shards", settings["vocab_size"], args.stories)
            speeds = measure_speed(list(report["runs"]), Path(tmp) / "shards", Path(tmp), settings)
        for name, speed in speeds.items():
            report["runs"][name]["isolated_tokens_per_s"] = speed
        report["settings"]["speed_steps"] = args.speed_steps
        report["speed_loadavg"] = [round(x, 2) for x in os.getloadavg()]
        return save_report(report)
    if args.report_only:
        return save_report(json.loads(RESULTS.read_text(encoding="utf-8")))
    if args.add:
        return add_variants(list(args.variants), args.jobs, args.stories)
    settings = {
        "steps": args.steps,
        "speed_steps": args.speed_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "vocab_size": args.vocab_size,
        "threads": args.threads,
        "jobs": args.jobs,
    }
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    began = time.perf_counter()
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="flashlm-bench-objectives-") as tmp:
        data = Path(tmp) / "shards"
        meta = prepare(data, args.vocab_size, args.stories)
        runs = run_children(list(args.variants), data, Path(tmp), settings, args.jobs)
        for name, speed in measure_speed(list(args.variants), data, Path(tmp), settings).items():
            runs[name]["isolated_tokens_per_s"] = speed
    runs = {k: runs[k] for k in args.variants}
    cmd = "nice python bench/objectives.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    report = {
        "benchmark": "objectives",
        "command": cmd,
        "machine": machine(),
        "settings": {
            **settings,
            "masking": MASKING,
            "train_tokens_per_variant": args.steps * args.batch_size * args.seq_len,
            "data_splits": meta["splits"],
        },
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - began, 1),
        "runs": runs,
        "checks": checks(runs),
    }
    if args.results.exists():  # keep hand-written commentary across reruns
        report["commentary"] = json.loads(args.results.read_text(encoding="utf-8")).get("commentary", [])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.results.resolve() == RESULTS.resolve():
        write_markdown(report)
    print(json.dumps(report["checks"], indent=2))


def add_variants(names: list[str], jobs: int, source: Path) -> None:
    """Train `names` with the stored settings and merge them into the JSON (see the module docstring)."""
    report = json.loads(RESULTS.read_text(encoding="utf-8"))
    settings = {
        k: v for k, v in report["settings"].items() if k not in ("masking", "train_tokens_per_variant", "data_splits")
    }
    if report["settings"]["masking"] != MASKING:
        raise SystemExit(
            f"{RESULTS}: stored masking {report['settings']['masking']} differs from {MASKING}; "
            "rerun every variant instead of --add"
        )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flashlm-bench-objectives-") as tmp:
        data = Path(tmp) / "shards"
        prepare(data, settings["vocab_size"], source)
        runs = run_children(names, data, Path(tmp), settings, jobs)
        for name, speed in measure_speed(names, data, Path(tmp), settings).items():
            runs[name]["isolated_tokens_per_s"] = speed
    checked = [name for name in runs if name in report["runs"]]
    for name, run in runs.items():
        old = report["runs"].get(name)
        if old is None:
            report["runs"][name] = run
        elif (old["causal_loss"], old["mlm_acc"]) != (run["causal_loss"], run["mlm_acc"]):
            raise SystemExit(
                f"variant {name} no longer reproduces its stored figures ({old['causal_loss']} vs "
                f"{run['causal_loss']}): rerun every variant instead of --add"
            )
        # a variant that reproduces keeps its stored entry (and the speeds of the run it came from)
    report["runs"] = {k: report["runs"][k] for k in VARIANTS if k in report["runs"]}
    added = {
        "variants": [n for n in names if n not in checked],
        "checked": checked,
        "jobs": jobs,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "command": "nice python bench/objectives.py " + " ".join(sys.argv[1:]),
    }
    report["added"] = report.get("added", []) + [added]
    save_report(report)
    print(json.dumps(report["checks"], indent=2))


def save_report(report: dict) -> None:
    """Recompute the goal checks, write bench/results/objectives.json and the docs section."""
    report["checks"] = checks(report["runs"])
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(report)


if __name__ == "__main__":
    main()
