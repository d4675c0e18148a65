"""Benchmark knowledge distillation on TinyStories: does a student taught by a larger teacher beat the same
student trained alone, at the same number of tokens, and what does the teacher cost per step?

1. A byte-level BPE tokenizer (4096 tokens) and token shards of tinystories_train_head.txt from the
   --stories folder (default ../shared/data/tinystories); held-out text: the first tokens of
   tinystories_validation_head.txt (another split of TinyStories, never trained on). Everything is built
   under bench/work/distill/ (not committed).
2. A teacher (the `tiny` preset, ~5.2M parameters) pre-trained with `flashlm.training` for a fixed time budget
   (its step count is chosen from a measured step time so that the cosine schedule completes).
3. Its top-k logit cache over the training shards (`flashlm.training.distill.cache_teacher`).
4. Three students of one architecture (~1.7M parameters, ~32% of the teacher), the same initial weights, the
   same batches and the same number of tokens: (a) plain cross-entropy from scratch, (b) distilled online
   (the teacher runs every step), (c) distilled from the top-k cache.
5. Held-out perplexity of all four; the cost of a training step (plain CE, cached, online: interleaved,
   medians, after warm-up); greedy decode speed of student vs teacher (interleaved, medians).

Results go to bench/results/distill.json and a section of docs/benchmarks.md.

    nice .venv/bin/python bench/distill.py                 # the recorded run
    nice .venv/bin/python bench/distill.py --quick         # a smoke run (nothing written)
    .venv/bin/python bench/distill.py --report-only        # rewrite the docs section from the JSON

The models are small enough that extra torch threads gain little and suffer most when other jobs
compete for the cores, so this script uses 1 thread by default (--threads to change it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from docs_section import replace_section
from shared_data import SHARED_DATA, require

REPO = Path(__file__).resolve().parents[1]
STORIES = SHARED_DATA / "tinystories"
TRAIN_FILE, HELDOUT_FILE = "tinystories_train_head.txt", "tinystories_validation_head.txt"
WORK = REPO / "bench" / "work" / "distill"
RESULTS = REPO / "bench" / "results" / "distill.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- distill:begin -->", "<!-- distill:end -->"
GOAL_PPL_GAIN, GOAL_CACHED_COST, GOAL_DECODE = 0.10, 1.15, 2.0

VOCAB = 4096
TEACHER = dict(
    vocab_size=VOCAB,
    d_model=256,
    n_layers=6,
    n_heads=4,
    n_kv_heads=2,
    d_ff=640,
    layer_pattern="LLLLLG",
    sliding_window=128,
    max_seq_len=128,
)  # the `tiny` preset, context 128
STUDENT = dict(
    vocab_size=VOCAB,
    d_model=192,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=576,
    layer_pattern="LG",
    sliding_window=64,
    max_seq_len=128,
)  # wide and shallow: decoding is per layer
DISTILL = dict(alpha=0.3, temperature=1.0, divergence="forward_kl", top_k=64)

FULL = dict(
    teacher_steps=400,
    teacher_batch=16,
    teacher_budget_s=540,
    student_steps=160,
    student_batch=8,
    seq_len=128,
    heldout_tokens=65_536,
    cost_rounds=12,
    decode_rounds=5,
)
QUICK = dict(
    teacher_steps=30,
    teacher_batch=8,
    teacher_budget_s=120,
    student_steps=12,
    student_batch=4,
    seq_len=64,
    heldout_tokens=4096,
    cost_rounds=3,
    decode_rounds=2,
)


# Why the run is set up as it is, and how to read it; filled in from the report (`notes`).
NOTES = [
    "The teacher is the `tiny` preset, not the ~20M-parameter `small` one: `small` costs about 4x the compute "
    "per token, so in the same CPU budget it would see about a quarter of the tokens.",
    "The students are wide and shallow ({student_layers} layers): decoding one sequence at a time on a CPU "
    "costs per layer more than per parameter.",
    "The cached student trails the online one. The cache keeps the teacher's top {top_k} of {vocab} ids, "
    "renormalised over them; this teacher is uncertain (held-out perplexity {teacher_ppl:.0f}) and its top "
    "{top_k} ids hold on average {mean:.0%} of its probability (median {median:.0%}, 10th percentile "
    "{p10:.0%}), so the cached target is sharper than the teacher's own distribution. The cached predictions "
    "also come from the teacher's windows (stride {stride}: at least {context} tokens of context), not the "
    "student's. A larger k, or a bucket for the rest of the vocabulary, would address the first of these.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- data -------------------------------------------------------------------------------------------
def prepare(work: Path, stories: Path) -> dict[str, Any]:
    """Tokenizer + training shards (train head) + held-out shards (validation head, all in one split)."""
    from flashlm.data.shards import TokenShards, prepare_shards
    from flashlm.tokenizer import Tokenizer

    train_dir, heldout_dir = work / "shards", work / "heldout"
    if not ((train_dir / "meta.json").is_file() and (heldout_dir / "meta.json").is_file()):
        text = (stories / TRAIN_FILE).read_text(encoding="utf-8")
        docs = [line.strip() for line in text.splitlines() if line.strip()]
        tok = Tokenizer.train(iter(docs), vocab_size=VOCAB, show_progress=False)
        train_dir.mkdir(parents=True, exist_ok=True)
        tok.save(train_dir)
        prepare_shards(iter(docs), tok, train_dir, val_fraction=0.01, workers=1, progress=False)
        held = (stories / HELDOUT_FILE).read_text(encoding="utf-8")
        paragraphs = [" ".join(p.split()) for p in held.split("\n\n") if p.strip()]
        prepare_shards(iter(paragraphs), tok, heldout_dir, val_fraction=0.0, workers=1, progress=False)
    train, held = TokenShards(train_dir, "train"), TokenShards(heldout_dir, "train")
    return {
        "train_dir": train_dir,
        "heldout_dir": heldout_dir,
        "train_tokens": len(train.tokens),
        "heldout_available": len(held.tokens),
        "heldout_bytes_per_token": held.text_bytes / len(held.tokens),
    }


# ---- training ---------------------------------------------------------------------------------------
def run_config(
    model: dict, out: Path, data: Path, steps: int, batch: int, seq_len: int, distill: dict | None = None, **train: Any
) -> Any:
    from flashlm.config import RunConfig

    settings = {
        "data": str(data),
        "out": str(out),
        "steps": steps,
        "batch_size": batch,
        "seq_len": seq_len,
        "lr": 3e-3,
        "warmup_steps": max(1, steps // 10),
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "eval_every": steps,
        "eval_batches": 4,
        "save_every": steps,
        "keep_last": 1,
        "log_every": max(1, steps // 20),
        "device": "cpu",
        "precision": "auto",
        "seed": 1234,
        **train,
    }
    data_dict = {"model": model, "train": settings}
    if distill is not None:
        data_dict["distill"] = distill
    return RunConfig.from_dict(data_dict)


def timed_train(cfg: Any, budget_s: float | None = None) -> dict[str, Any]:
    from flashlm.training import train

    shutil.rmtree(cfg.train.out, ignore_errors=True)
    began = time.perf_counter()
    stop = (lambda step, row: time.perf_counter() - began > budget_s) if budget_s else None
    summary = train(cfg, callback=stop)
    seconds = time.perf_counter() - began
    rows = [r for r in summary["history"] if "loss" in r]
    tokens = summary["step"] * cfg.train.batch_size * cfg.train.seq_len
    return {
        "steps": summary["step"],
        "planned_steps": cfg.train.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s_logged": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
        "final_train_loss": rows[-1]["loss"],
        "checkpoint": summary["checkpoint"],
        "kd_first_last": [rows[0].get("distill_kd"), rows[-1].get("distill_kd")],
    }


# ---- measurements -----------------------------------------------------------------------------------
def topk_mass(cache: Any) -> dict[str, float]:
    """How much of the teacher's probability its cached top-k ids hold (every 7th position)."""
    import numpy as np

    mass = np.exp(np.asarray(cache.logprobs[::7]).astype(np.float64)).sum(1)
    return {"mean": float(mass.mean()), "median": float(np.median(mass)), "p10": float(np.percentile(mass, 10))}


def heldout_eval(
    checkpoint: str, heldout_dir: Path, seq_len: int, n_tokens: int, bytes_per_token: float
) -> dict[str, float]:
    """Cross-entropy on non-overlapping windows over the first `n_tokens` held-out tokens."""
    import numpy as np
    import torch

    from flashlm.data.batches import IGNORE_INDEX, TokenStream, eval_batches
    from flashlm.data.shards import TokenShards
    from flashlm.model.transformer import FlashLM
    from flashlm.training.objectives import lm_cross_entropy

    model = FlashLM.from_pretrained(checkpoint).eval()
    tokens = np.asarray(TokenShards(heldout_dir, "train").tokens[: n_tokens + 1])
    nats, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(TokenStream(tokens), seq_len, 16, len(tokens)):
            logits = model(batch.input_ids).logits
            nats += float(lm_cross_entropy(logits, batch.targets, reduction="sum"))
            count += int((batch.targets != IGNORE_INDEX).sum())
    loss = nats / count
    return {"loss": loss, "ppl": math.exp(loss), "bpb": loss / (math.log(2) * bytes_per_token), "tokens": count}


def time_steps(cfgs: dict[str, Any], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each optimizer step of each run config (the loop's own step function), timed round-robin
    so that load changes on a shared machine hit every config alike; warm-up rounds are dropped."""
    import torch

    from flashlm.training.distill import distill_objective
    from flashlm.training.distributed import DistEnv
    from flashlm.training.loop import build_model, train_step
    from flashlm.training.objectives import get_objective
    from flashlm.training.optim import autocast_for, build_optimizer, build_scheduler
    from flashlm.training.rundata import open_data

    env = DistEnv(torch.device("cpu"))
    amp = autocast_for("fp32", env.device)
    setups = {}
    for name, cfg in cfgs.items():
        data = open_data(cfg.train, cfg.model.vocab_size)
        objective = get_objective("clm")
        if cfg.distill is not None:
            objective = distill_objective(cfg, objective, data, env.device)
        parts = build_model(cfg, env, objective)
        optimizer = build_optimizer(parts.model, cfg.train, env.device)
        setups[name] = (parts, optimizer, build_scheduler(optimizer, cfg.train), objective, data, cfg.train)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for step in range(1, rounds + warmup + 1):
        for name, (parts, optimizer, scheduler, objective, data, tcfg) in setups.items():
            began = time.perf_counter()
            train_step(parts, optimizer, scheduler, objective, data, tcfg, env, step, amp)
            if step > warmup:
                times[name].append(time.perf_counter() - began)
    return times


def step_costs(student_cfgs: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Median seconds per step of plain CE, cached and online distillation, and their ratios."""
    times = time_steps(student_cfgs, rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    plain = medians["scratch"]
    return {
        "seconds_per_step": medians,
        "relative_to_plain_ce": {k: v / plain for k, v in medians.items()},
        "rounds": rounds,
        "samples": times,
    }


def decode_speed(checkpoints: dict[str, str], rounds: int) -> dict[str, Any]:
    """Greedy decode tokens/s at batch 1 (prompt 32, 64 new tokens), interleaved, medians."""
    from flashlm.evaluate.efficiency import measure_batch
    from flashlm.model.transformer import FlashLM

    models = {name: FlashLM.from_pretrained(path).eval() for name, path in checkpoints.items()}
    for model in models.values():
        measure_batch(model, 1, 32, 8)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            speeds[name].append(measure_batch(model, 1, 32, 64)["decode_tokens_per_s"])
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    return {
        "decode_tokens_per_s": medians,
        "samples": speeds,
        "student_speedup": medians["student"] / medians["teacher"],
    }


# ---- the run ----------------------------------------------------------------------------------------
def run(sizes: dict[str, Any], threads: int, keep_teacher: bool, stories: Path, work: Path = WORK) -> dict[str, Any]:
    import torch

    from flashlm.config import ModelConfig, count_parameters
    from flashlm.hardware import machine_info
    from flashlm.training.distill import cache_teacher

    torch.set_num_threads(threads)
    load_before = list(os.getloadavg())
    began = time.perf_counter()
    data = prepare(work, stories)
    seq = sizes["seq_len"]
    log(f"data: {data['train_tokens']:,} training tokens, {data['heldout_available']:,} held-out tokens")

    teacher_cfg = run_config(
        TEACHER, work / "teacher", data["train_dir"], sizes["teacher_steps"], sizes["teacher_batch"], seq
    )
    ckpt = work / "teacher" / "checkpoints"
    if keep_teacher and (work / "teacher.json").is_file():
        teacher = json.loads((work / "teacher.json").read_text())
        log(f"teacher: reusing {teacher['checkpoint']}")
    else:
        per_step = statistics.median(time_steps({"teacher": teacher_cfg}, 3, warmup=1)["teacher"])
        steps = max(10, min(sizes["teacher_steps"], int(sizes["teacher_budget_s"] / (1.15 * per_step))))
        teacher_cfg = run_config(TEACHER, work / "teacher", data["train_dir"], steps, sizes["teacher_batch"], seq)
        log(f"teacher: {per_step:.2f} s/step measured: {steps} steps (budget {sizes['teacher_budget_s']} s)")
        teacher = timed_train(teacher_cfg, sizes["teacher_budget_s"] * 1.25)
        (work / "teacher.json").write_text(json.dumps(teacher))
    assert ckpt.is_dir()
    log(f"teacher: {teacher['steps']} steps, {teacher['tokens']:,} tokens in {teacher['seconds']:.0f} s")

    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cache = cache_teacher(
        teacher["checkpoint"],
        data["train_dir"],
        cache_dir,
        top_k=DISTILL["top_k"],
        seq_len=seq,
        batch_size=16,
        device="cpu",
        progress=False,
    )
    cache_info = {
        "seconds": time.perf_counter() - t0,
        "positions": cache.n_positions,
        "top_k": cache.top_k,
        "bytes_per_token": cache.bytes_per_token,
        "megabytes": cache.n_positions * cache.bytes_per_token / 1e6,
        "teacher_window": cache.seq_len,
        "stride": cache.stride,
        "topk_mass": topk_mass(cache),
    }
    log(f"cache: {cache.n_positions:,} positions, {cache.bytes_per_token} B/token in {cache_info['seconds']:.0f} s")

    kd = {k: v for k, v in DISTILL.items() if k != "top_k"}
    students = {
        "scratch": None,
        "distilled_online": {"teacher": teacher["checkpoint"], **kd},
        "distilled_cached": {"teacher": str(cache_dir), **kd},
    }
    student_cfgs = {
        name: run_config(
            STUDENT, work / name, data["train_dir"], sizes["student_steps"], sizes["student_batch"], seq, distill
        )
        for name, distill in students.items()
    }
    results: dict[str, Any] = {}
    for name, cfg in student_cfgs.items():
        log(f"student {name}: {cfg.train.steps} steps")
        results[name] = timed_train(cfg)
        done = results[name]
        log(f"student {name}: {done['seconds']:.0f} s, final train loss {done['final_train_loss']:.3f}")

    n_held = min(sizes["heldout_tokens"], data["heldout_available"] - 1)
    bpt = data["heldout_bytes_per_token"]
    heldout = {"teacher": heldout_eval(teacher["checkpoint"], data["heldout_dir"], seq, n_held, bpt)}
    for name in students:
        heldout[name] = heldout_eval(results[name]["checkpoint"], data["heldout_dir"], seq, n_held, bpt)
    log("held-out ppl: " + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in heldout.items()))

    log("step costs (interleaved)")
    costs = step_costs(
        {
            "scratch": student_cfgs["scratch"],
            "cached": student_cfgs["distilled_cached"],
            "online": student_cfgs["distilled_online"],
        },
        sizes["cost_rounds"],
    )
    log("decode speed (interleaved)")
    decode = decode_speed(
        {"teacher": teacher["checkpoint"], "student": results["scratch"]["checkpoint"]}, sizes["decode_rounds"]
    )

    t_params, s_params = (count_parameters(ModelConfig(**c)) for c in (TEACHER, STUDENT))
    return {
        "benchmark": "distill",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine_info(), "threads": threads},
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - began,
        "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()} | {"heldout_tokens": n_held},
        "sizes": sizes,
        "distill": DISTILL,
        "models": {
            "teacher": {**TEACHER, "parameters": t_params},
            "student": {**STUDENT, "parameters": s_params},
            "student_share": s_params / t_params,
        },
        "teacher": teacher,
        "cache": cache_info,
        "students": results,
        "heldout": heldout,
        "step_cost": costs,
        "decode": decode,
    }


# ---- report -----------------------------------------------------------------------------------------
def checks(report: dict[str, Any]) -> dict[str, Any]:
    held, cost, dec = report["heldout"], report["step_cost"]["relative_to_plain_ce"], report["decode"]
    scratch = held["scratch"]["ppl"]
    gains = {k: 1 - held[k]["ppl"] / scratch for k in ("distilled_online", "distilled_cached")}
    return {
        "ppl_gain_online": gains["distilled_online"],
        "ppl_gain_cached": gains["distilled_cached"],
        "ppl_goal_met": max(gains.values()) >= GOAL_PPL_GAIN,
        "cached_cost": cost["cached"],
        "cached_cost_goal_met": cost["cached"] <= GOAL_CACHED_COST,
        "online_cost": cost["online"],
        "decode_speedup": dec["student_speedup"],
        "decode_goal_met": dec["student_speedup"] >= GOAL_DECODE,
        "student_share_ok": report["models"]["student_share"] <= 0.40,
    }


def notes(report: dict[str, Any]) -> list[str]:
    """`NOTES` with this report's figures."""
    cache, sizes = report["cache"], report["sizes"]
    stride = cache.get("stride", sizes["seq_len"])
    figures = {
        "mean": math.nan,
        "median": math.nan,
        "p10": math.nan,
        **cache.get("topk_mass", {}),
        "top_k": report["distill"]["top_k"],
        "vocab": VOCAB,
        "teacher_ppl": report["heldout"]["teacher"]["ppl"],
        "stride": stride,
        "context": cache.get("teacher_window", sizes["seq_len"]) - stride,
        "student_layers": report["models"]["student"]["n_layers"],
    }
    return [note.format(**figures) for note in NOTES]


def markdown(report: dict[str, Any]) -> str:
    from flashlm.hardware import describe

    c, m, held = report["checks"], report["machine"], report["heldout"]
    t, s, sizes = report["models"]["teacher"], report["models"]["student"], report["sizes"]
    cost, dec, st = report["step_cost"], report["decode"], report["students"]
    ok = lambda flag: "met" if flag else "**NOT met**"
    short = GOAL_PPL_GAIN - c["ppl_gain_cached"]
    cached_gap = f"; the cached student alone misses it by {100 * short:.1f} points" if short > 0 else ""
    lines = [
        BEGIN,
        "## Distillation (`bench/distill.py`)",
        "",
        "Does a student taught by a larger teacher beat the same student trained alone on the same tokens, and "
        "what does the teacher cost per training step? "
        f"TinyStories: {report['data']['train_tokens']:,} training tokens (train head), held-out perplexity on the "
        f"first {report['data']['heldout_tokens']:,} tokens of the validation head (another split), windows of "
        f"{sizes['seq_len']}; byte-level BPE, {VOCAB} tokens. Teacher: the `tiny` preset, "
        f"{t['parameters'] / 1e6:.2f}M parameters (d {t['d_model']}, {t['n_layers']} layers), "
        f"{report['teacher']['steps']} steps = {report['teacher']['tokens']:,} tokens "
        f"({report['teacher']['seconds'] / 60:.1f} min). Students: {s['parameters'] / 1e6:.2f}M parameters "
        f"({report['models']['student_share']:.0%} of the teacher; d {s['d_model']}, {s['n_layers']} layers), "
        f"each {st['scratch']['steps']} steps = {st['scratch']['tokens']:,} tokens, same initial weights and "
        f"batches. Distillation: alpha {report['distill']['alpha']}, T {report['distill']['temperature']}, "
        f"{report['distill']['divergence']}, cache top-{report['distill']['top_k']} "
        f"(stride {report['cache'].get('stride', sizes['seq_len'])}, {report['cache']['bytes_per_token']} "
        f"bytes/token, {report['cache']['megabytes']:.0f} MB, built in {report['cache']['seconds']:.0f} s).",
        "",
        f"Machine: {describe(m)}; torch {m['torch']} on {m['threads']} thread(s) per model; load average "
        f"before/after {report['loadavg_before'][0]:.1f} / {report['loadavg_after'][0]:.1f}; whole run "
        f"{report['wall_seconds'] / 60:.1f} min.",
        "",
        "| model | parameters | training tokens | held-out loss | held-out ppl | bits/byte | vs scratch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("teacher", t["parameters"], report["teacher"]["tokens"])] + [
        (name, s["parameters"], st[name]["tokens"]) for name in ("scratch", "distilled_online", "distilled_cached")
    ]
    scratch = held["scratch"]["ppl"]
    for name, params, tokens in rows:
        h = held[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {params / 1e6:.2f}M | {tokens:,} | {h['loss']:.3f} | "
            f"{h['ppl']:.2f} | {h['bpb']:.3f} | {h['ppl'] / scratch - 1:+.1%} |"
        )
    sec = cost["seconds_per_step"]
    lines += [
        "",
        "| training step (student) | ms / step | relative to plain CE |",
        "|---|---:|---:|",
        *(
            f"| {label} | {1000 * sec[k]:.0f} | {cost['relative_to_plain_ce'][k]:.2f}x |"
            for k, label in (
                ("scratch", "plain cross-entropy"),
                ("cached", "distilled, top-k cache"),
                ("online", "distilled, online teacher"),
            )
        ),
        "",
        f"Greedy decoding at batch 1 (prompt 32, 64 new tokens, medians of {sizes['decode_rounds']} interleaved "
        f"runs): teacher {dec['decode_tokens_per_s']['teacher']:.0f} tok/s, student "
        f"{dec['decode_tokens_per_s']['student']:.0f} tok/s ({dec['student_speedup']:.2f}x).",
        "",
        "Goals:",
        f"- a distilled student beats scratch perplexity by >= {GOAL_PPL_GAIN:.0%}: {ok(c['ppl_goal_met'])} "
        f"(perplexity {c['ppl_gain_online']:.1%} lower online, {c['ppl_gain_cached']:.1%} lower from the cache"
        f"{cached_gap}).",
        f"- a cached distillation step costs <= {GOAL_CACHED_COST}x a plain CE step: "
        f"{ok(c['cached_cost_goal_met'])} ({c['cached_cost']:.2f}x; online {c['online_cost']:.2f}x).",
        f"- the student decodes >= {GOAL_DECODE:.0f}x faster than the teacher: {ok(c['decode_goal_met'])} "
        f"({c['decode_speedup']:.2f}x).",
        "",
        "Notes:",
        *(f"- {note}" for note in notes(report)),
        "",
        "Rerun: `nice .venv/bin/python bench/distill.py` (add `--stories DIR` when TinyStories is not in "
        "../shared/data/tinystories; writes `bench/results/distill.json`; `--report-only` rewrites this section).",
        END,
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    replace_section(DOC, BEGIN, END, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny budgets; writes nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    parser.add_argument("--keep-teacher", action="store_true", help="reuse the teacher of a previous run")
    parser.add_argument(
        "--stories",
        type=Path,
        default=STORIES,
        metavar="DIR",
        help=f"folder holding {TRAIN_FILE} and {HELDOUT_FILE} (default: ../shared/data/tinystories)",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from the JSON")
    args = parser.parse_args()
    if args.report_only:
        report = json.loads(RESULTS.read_text(encoding="utf-8"))
    else:
        require("distill.py", [args.stories / TRAIN_FILE, args.stories / HELDOUT_FILE], "TinyStories", "--stories DIR")
        work = WORK.with_name("distill-quick") if args.quick else WORK
        report = run(QUICK if args.quick else FULL, args.threads, args.keep_teacher, args.stories, work)
    report["checks"] = checks(report)
    print(json.dumps(report["checks"], indent=2))
    if args.quick:
        print(markdown(report))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_doc(markdown(report))
    log(f"written {RESULTS} and {DOC}")


if __name__ == "__main__":
    main()
