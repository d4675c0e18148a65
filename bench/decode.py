"""Benchmark greedy decoding: FlashLM against Hugging Face `transformers` `generate` on the same weights,
on the CPU, in fp32.

Shape: d_model 384, 6 layers, 6 heads (MHA: n_kv_heads 6), MLP hidden 1024, vocabulary 65, tied
embeddings, a context of 288 tokens (the 32-token prompt plus the 256 new tokens). Two flavours: gemma
with its default layer pattern (5 local layers with a 128-token window : 1 global; the window is shorter
than the sequence, so the ring buffer wraps) and llama (every layer global, as HF Llama). Each random-init
model (set so its greedy text is not one repeated token: `RANDOM_INIT`) is exported with
`flashlm.interop.hf.export_hf` (what `flashlm export hf` runs) and loaded back with
`AutoModelForCausalLM.from_pretrained`.

Batch 1: one 32-token prompt. Batch 8: eight different prompts of 25 to 32 tokens, left-padded (HF gets
the matching attention mask). 256 new tokens, no early stop. Rows timed, round-robin (each round: one
whole generation of each row, prefill included), medians of the per-round tokens/s:

- FlashLM `generate_tokens` with decoder "compiled" (the decode step under `torch.compile`; compiling
  happens in the warm-up and is reported apart), "fast" (the same step, eager; the default) and
  "reference" (`FlashLM.forward` every step: the path before the fast step existed);
- HF `generate(do_sample=False)` with its default dynamic KV cache, and with its static cache.

The FlashLM tokens must equal HF's, row for row; the check is recorded. The speedup is FlashLM compiled
over the faster HF row. A section list (`SECTIONS`) holds what one run measures, so another comparison
can be added as one more entry.

    .venv/bin/python bench/decode.py                  # the recorded run (about 8 min on 2 idle CPUs, compiles included)
    .venv/bin/python bench/decode.py --quick          # smoke run: 8 new tokens, 1 round, no compile or profile
    .venv/bin/python bench/decode.py --report-only    # rewrite the docs section from the JSON

Results go to bench/results/decode.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import decode_speculative
from docs_section import replace_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "decode.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"
GOALS = {"batch1": 3.0, "batch8": 2.0}

SHAPE = dict(vocab_size=65, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1024, tie_embeddings=True)
PATTERNS = {"gemma": "LLLLLG", "llama": "G"}
PROMPT_LEN, NEW_TOKENS = 32, 256
CONTEXT = PROMPT_LEN + NEW_TOKENS  # the model's max_seq_len: what a 256-token generation needs
BATCHES = {"batch1": [PROMPT_LEN], "batch8": [PROMPT_LEN - i for i in range(8)]}  # prompt lengths
# Random models whose greedy text is not one repeated token from the first step: llama with init_std 0.1;
# gemma with its embeddings x0.1 (its sqrt(d_model) input scale otherwise lets the token's own tied
# embedding win every step, so it copies the last prompt token forever).
RANDOM_INIT = {"gemma": {"init_std": 0.02, "embed_scale": 0.1}, "llama": {"init_std": 0.1, "embed_scale": 1.0}}
ROWS = ("flashlm_compiled", "flashlm_fast", "flashlm_reference", "hf_dynamic", "hf_static")
LABELS = {
    "flashlm_compiled": "FlashLM, compiled decode step",
    "flashlm_fast": "FlashLM, fast decode step (eager, default)",
    "flashlm_reference": "FlashLM, `FlashLM.forward` each step",
    "hf_dynamic": "HF `generate`, dynamic cache",
    "hf_static": "HF `generate`, static cache",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- models and prompts ---------------------------------------------------------------------------------
def build_pair(flavour: str, new_tokens: int, workdir: Path) -> tuple[Any, Any, str]:
    """(FlashLM, the HF model loaded from its export, HF attention implementation)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from flashlm import FlashLM
    from flashlm.config import ModelConfig
    from flashlm.interop.hf import export_hf

    init = RANDOM_INIT[flavour]
    cfg = ModelConfig(
        flavour=flavour, layer_pattern=PATTERNS[flavour], max_seq_len=CONTEXT, init_std=init["init_std"], **SHAPE
    )
    torch.manual_seed(0)
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(init["embed_scale"])
    out = export_hf(model, workdir / flavour)
    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    hf.generation_config.eos_token_id = None  # always 256 new tokens, like FlashLM with eos_id None
    return model, hf, getattr(hf.config, "_attn_implementation", "?")


def prompts_for(lengths: list[int]) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1234)
    return [[1, *torch.randint(3, SHAPE["vocab_size"], (n - 1,), generator=gen).tolist()] for n in lengths]


def hf_inputs(prompts: list[list[int]]) -> tuple[Any, Any]:
    """Left-padded input ids and attention mask, as FlashLM pads its batches."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def runner(name: str, model: Any, hf: Any, prompts: list[list[int]], new_tokens: int) -> Callable[[], list]:
    """A function that generates greedily and returns the new tokens of every row."""
    import torch

    from flashlm.generation import Sampling, generate_tokens

    if name.startswith("flashlm_"):
        sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0)
        decoder = name.removeprefix("flashlm_")

        def run() -> list:
            rows: list[list[int]] = [[] for _ in prompts]
            for step in generate_tokens(model, prompts, sampling, eos_id=None, decoder=decoder):
                for row, token in zip(rows, step, strict=True):
                    row.append(token)
            return rows

        return run
    ids, mask = hf_inputs(prompts)
    cache = "static" if name == "hf_static" else None

    def run() -> list:
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                cache_implementation=cache,
            )
        return out[:, ids.shape[1] :].tolist()

    return run


# ---- the greedy comparison ------------------------------------------------------------------------------
def run_greedy(args: argparse.Namespace) -> dict[str, Any]:
    rows = [r for r in ROWS if args.compile or r != "flashlm_compiled"]
    tok_s: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    warmup_s: dict[str, dict[str, dict[str, float]]] = {}
    identical: dict[str, dict[str, bool]] = {}
    identical_rows: dict[str, dict[str, dict[str, bool]]] = {}
    distinct: dict[str, dict[str, list[int]]] = {}
    attn: dict[str, str] = {}
    profiles: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in ("gemma", "llama"):
            model, hf, attn[flavour] = build_pair(flavour, args.new_tokens, Path(tmp))
            for batch, lengths in BATCHES.items():
                prompts = prompts_for(lengths)
                runs = {name: runner(name, model, hf, prompts, args.new_tokens) for name in rows}
                outputs, warm = {}, {}
                for name, run in runs.items():  # warm-up (compiles the FlashLM step) and the token check
                    began = time.perf_counter()
                    outputs[name] = run()
                    warm[name] = time.perf_counter() - began
                peer = outputs["hf_dynamic"]
                same = {name: out == peer for name, out in outputs.items() if name != "hf_dynamic"}
                identical.setdefault(batch, {})[flavour] = all(same.values())
                identical_rows.setdefault(batch, {})[flavour] = same
                distinct.setdefault(batch, {})[flavour] = [len(set(r)) for r in peer]
                log(f"{flavour} {batch}: warm-up " + ", ".join(f"{n} {s:.1f} s" for n, s in warm.items()))
                log(f"{flavour} {batch}: tokens equal to HF dynamic: {same}")
                log(f"{flavour} {batch}: distinct tokens per row {distinct[batch][flavour]}")
                got: dict[str, list[float]] = {name: [] for name in rows}
                n_tokens = len(prompts) * args.new_tokens
                for r in range(args.rounds):
                    for name, run in runs.items():
                        began = time.perf_counter()
                        run()
                        got[name].append(n_tokens / (time.perf_counter() - began))
                    rates = ", ".join(f"{n} {v[-1]:,.0f}" for n, v in got.items())
                    log(f"{flavour} {batch} round {r + 1}/{args.rounds}: {rates} tok/s")
                samples.setdefault(batch, {})[flavour] = got
                if not args.quick:
                    profiles.setdefault(batch, {})[flavour] = profile_fast(model, prompts, args.new_tokens)
                tok_s.setdefault(batch, {})[flavour] = {n: statistics.median(v) for n, v in got.items()}
                warmup_s.setdefault(batch, {})[flavour] = warm
    best = "flashlm_compiled" if args.compile else "flashlm_fast"
    return {
        "speedup_vs_hf": speedups(tok_s, best),
        "speedup_vs_hf_fast_eager": speedups(tok_s, "flashlm_fast"),
        "speedup_vs_hf_reference": speedups(tok_s, "flashlm_reference"),
        "flashlm_row": best,
        "tokens_per_s": tok_s,
        "samples_tokens_per_s": samples,
        "warmup_seconds": warmup_s,
        "compile_seconds": {
            b: {f: w.get("flashlm_compiled", 0.0) - w.get("flashlm_fast", 0.0) for f, w in per.items()}
            for b, per in warmup_s.items()
        }
        if args.compile
        else None,
        "tokens_identical": identical,
        "tokens_identical_by_row": identical_rows,
        "distinct_tokens_per_row": distinct,
        "hf_attn_implementation": attn,
        "profile_fast_ms_per_token": profiles,
    }


def profile_fast(model: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """CPU self-time (ms per new token) of one eager fast-step generation, split into the projection
    matmuls (aten::mm/addmm), attention (the SDPA kernel) and everything else."""
    from torch.profiler import ProfilerActivity, profile

    from flashlm.generation import Sampling, generate_tokens

    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in generate_tokens(model, prompts, sampling, eos_id=None, decoder="fast"):
            pass
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            part = "matmul"
        elif "scaled_dot_product" in event.key:
            part = "attention"
        else:
            part = "other"
        parts[part] += event.self_cpu_time_total / 1000 / new_tokens
    return {**parts, "total": sum(parts.values())}


def speedups(tok_s: dict, row: str) -> dict[str, dict[str, float]]:
    """FlashLM `row` tokens/s over the faster HF row, per batch and flavour."""
    return {
        b: {f: t[row] / max(t["hf_dynamic"], t["hf_static"]) for f, t in per.items() if row in t}
        for b, per in tok_s.items()
    }


def greedy_markdown(report: dict[str, Any]) -> list[str]:
    s, tok = report["settings"], report["tokens_per_s"]
    lines = [
        f"Greedy decoding, {s['new_tokens']} new tokens, tokens/s (medians of {s['rounds']} interleaved rounds; "
        "one round = one whole generation per row, prefill included):",
        "",
        "| row | gemma, batch 1 | llama, batch 1 | gemma, batch 8 | llama, batch 8 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        cells = [tok[b][f].get(name) for b in ("batch1", "batch8") for f in ("gemma", "llama")]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {LABELS[name]} | " + " | ".join("-" if c is None else f"{c:,.0f}" for c in cells) + " |")
    sp, fast = report["speedup_vs_hf"], report["speedup_vs_hf_fast_eager"]
    row = LABELS[report["flashlm_row"]]
    cases = [(b, f) for b in ("batch1", "batch8") for f in ("gemma", "llama")]
    ratio = lambda d: ", ".join(f"{b.replace('batch', 'batch ')} {f} {d[b][f]:.2f}x" for b, f in cases)
    verdict = {b: "met" if all(v >= GOALS[b] for v in sp[b].values()) else "NOT met" for b in ("batch1", "batch8")}
    same = report["tokens_identical"]
    all_same = all(v for per in same.values() for v in per.values())
    lines += [
        "",
        f"Speedup of {row} over the faster HF row: batch 1: "
        + ", ".join(f"{f} {sp['batch1'][f]:.2f}x" for f in ("gemma", "llama"))
        + f" (goal {GOALS['batch1']:.0f}x: {verdict['batch1']}); batch 8: "
        + ", ".join(f"{f} {sp['batch8'][f]:.2f}x" for f in ("gemma", "llama"))
        + f" (goal {GOALS['batch8']:.0f}x: {verdict['batch8']}).",
        f"The eager fast step alone (the default, no compile): {ratio(fast)}."
        if report["flashlm_row"] != "flashlm_fast"
        else "The compiled row was not run (--no-compile).",
        "",
        f"Tokens identical to HF `generate` (dynamic cache) for every FlashLM and HF row, both batches and "
        f"flavours: {'yes' if all_same else 'NO, see tokens_identical_by_row in the JSON'}. Distinct tokens "
        f"per row of the greedy text: batch 1 gemma {report['distinct_tokens_per_row']['batch1']['gemma']}, "
        f"llama {report['distinct_tokens_per_row']['batch1']['llama']}.",
    ]
    prof = report.get("profile_fast_ms_per_token")
    if prof:
        split = "; ".join(
            f"{b.replace('batch', 'batch ')} {f}: {p['total']:.2f} ms, matmuls {p['matmul']:.2f}, attention "
            f"{p['attention']:.2f}, other {p['other']:.2f}"
            for b, per in prof.items()
            for f, p in per.items()
        )
        lines += [
            "",
            "Where a token's time goes in the eager fast step (torch.profiler CPU self-time per new token, one "
            f"generation): {split}. The projection matmuls (ATen's, which pack each weight matrix again at "
            "every call) read every weight once per step (42 MB in fp32); 'other' is the per-op overhead of "
            "the norms, RoPE, cache writes and masks, which the compiled step fuses into a few C++ kernels.",
        ]
        tps = report["tokens_per_s"]
        ceilings = "; ".join(
            f"{b.replace('batch', 'batch ')} {f}: {_matmul_ceiling(tps[b][f], len(BATCHES[b]), p['matmul']):.2f}x"
            for b, per in prof.items()
            for f, p in per.items()
        )
        lines += [
            "",
            "The ceiling these ATen matmuls set: if a step were nothing but them, it would run at most (the "
            f"faster HF row's step time / the matmul time) x HF: {ceilings}. Removing overhead cannot go past "
            "it; cheaper matmuls can, and the compiled step has them: its weights are packed once, when it "
            "compiles, for Inductor's C++ GEMM micro-kernels.",
        ]
    if report.get("compile_seconds"):
        cs = report["compile_seconds"]
        lines += [
            "",
            "Compilation (warm-up, not in the tokens/s): the first compiled generation took "
            + "; ".join(
                f"{b.replace('batch', 'batch ')} {f} {cs[b][f]:.0f} s longer than the eager one"
                for b in ("batch1", "batch8")
                for f in ("gemma", "llama")
            )
            + " (one graph per model, batch size and cache length, reused by every later generation in the "
            "process; a frozen graph is not cached on disk, so each process compiles it again).",
        ]
    return lines


def _matmul_ceiling(hf_rows: dict[str, float], batch: int, matmul_ms: float) -> float:
    """The best FlashLM/HF ratio a step with only `matmul_ms` of work could reach."""
    hf_step_ms = 1000.0 * batch / max(v for k, v in hf_rows.items() if k.startswith("hf_"))
    return hf_step_ms / matmul_ms


@dataclass
class Section:
    """One comparison of the run: `run` measures (its dict is merged into the report), `markdown` reports."""

    name: str
    run: Callable[[argparse.Namespace], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], list[str]]


SECTIONS = [
    Section("greedy", run_greedy, greedy_markdown),
    # the demo's teacher drafted by its distilled student (bench/decode_speculative.py)
    Section("speculative", decode_speculative.run_section, decode_speculative.markdown_lines),
]


# ---- the run and the report ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from flashlm.hardware import machine_info

    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "decode", "sections": [s.name for s in SECTIONS]}
    report["settings"] = {
        "shape": SHAPE,
        "layer_pattern": PATTERNS,
        "sliding_window": 128,
        "max_seq_len": CONTEXT,
        "prompt_lengths": BATCHES,
        "padding": "left (batch 8: prompts of 25..32 tokens)",
        "new_tokens": args.new_tokens,
        "random_init": RANDOM_INIT,
        "dtype": "fp32",
        "threads": args.threads,
        "rounds": args.rounds,
        "compile": args.compile,
        "transformers": transformers.__version__,
        "hf_export": "flashlm.interop.hf.export_hf, loaded with AutoModelForCausalLM.from_pretrained",
    }
    for section in SECTIONS:
        log(f"section {section.name}")
        report.update(section.run(args))
    report["threads"] = args.threads
    report["seconds"] = time.perf_counter() - started
    report["machine"] = {**machine_info(), "load_before": load_before, "load_after": list(os.getloadavg())}
    return report


def markdown(report: dict[str, Any]) -> str:
    from flashlm.hardware import describe

    m, s = report["machine"], report["settings"]
    shape = s["shape"]
    body: list[str] = []
    for section in SECTIONS:
        if section.name in report.get("sections", []):
            body += section.markdown(report) + [""]
    lines = [
        BEGIN,
        "## Decoding speed (`bench/decode.py`)",
        "",
        f"FlashLM against Hugging Face `transformers` {s['transformers']} `generate` on the same weights, fp32 "
        f"on the CPU. Shape: d_model {shape['d_model']}, {shape['n_layers']} layers, {shape['n_heads']} heads "
        f"(MHA), MLP hidden {shape['d_ff']}, vocabulary {shape['vocab_size']}, tied embeddings, context "
        f"{s['max_seq_len']}; gemma with its default pattern `LLLLLG` (window 128: the ring buffer wraps), "
        "llama all global. Random-init models (llama init_std 0.1; gemma embeddings x0.1, else its greedy text "
        "copies the last prompt token from the first step), exported with "
        "`flashlm.interop.hf.export_hf` (`flashlm export hf`) and loaded with `AutoModelForCausalLM` (HF "
        f"attention: {', '.join(f'{f} {a}' for f, a in report['hf_attn_implementation'].items())}). Batch 1: "
        "one 32-token prompt; batch 8: eight different prompts of 25 to 32 tokens, left-padded.",
        "",
        f"Machine: {describe(m)}; load average before/after {m['load_before'][0]:.2f} / {m['load_after'][0]:.2f}; "
        f"whole run {report['seconds'] / 60:.1f} min.",
        "",
        f"Goals: FlashLM decodes >= {GOALS['batch1']:.0f}x HF `generate`'s tokens/s at batch 1 and >= "
        f"{GOALS['batch8']:.0f}x at batch 8, both flavours.",
        "",
        *body,
        "How the fast step works: the prompt runs through `FlashLM.forward` once; each new token then goes "
        "through `flashlm.model.decoding.DecodeStep`, which builds per step only what the new token needs "
        "(its slot in the cache, one mask per cache kind from slots, RoPE rows looked up in tables made "
        "once) and multiplies by fused, transposed copies of the q/k/v and gate/up matrices made once per "
        "model; `FlashLM.forward` rebuilds position tensors, mask specs, masks and RoPE every step. "
        "Compiled, the step runs as one Inductor C++ graph over a cache of the whole context (the same "
        "shapes every step, so it compiles once), with the norms, RoPE, cache writes, masks and the one-query "
        "attention fused into loops between the matmuls. On the CPU the weights are frozen into that graph "
        "(Inductor `freezing`): each projection matrix is packed once into the layout of Inductor's C++ GEMM "
        "template (`max_autotune` with the CPP backend), which multiplies by it without repacking; Dynamo's "
        "guards on the frozen weights are dropped (the graph belongs to one model and weights version).",
        "",
        "Rerun: `.venv/bin/python bench/decode.py` (`--rounds`, `--threads`, `--no-compile`, `--quick`; writes "
        "`bench/results/decode.json`; `--report-only` rewrites this section from it).",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each: one generation per row)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled row")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, 1 round, no compile, no profile")
    parser.add_argument("--dry-run", action="store_true", help="print the section, write nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from the JSON")
    decode_speculative.add_arguments(parser)
    args = parser.parse_args()
    if args.report_only:
        replace_section(DOC, BEGIN, END, markdown(json.loads(RESULTS.read_text(encoding="utf-8"))))
        log(f"rewrote the section in {DOC}")
        return
    if args.quick:
        args.new_tokens, args.rounds, args.compile, args.dry_run = 8, 1, False, True
    sys.path.insert(0, str(REPO))
    decode_speculative.check_models(args)  # stop before the long sections if the demo's models are absent
    report = run(args)
    section = markdown(report)
    if args.dry_run:
        print(section)
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    replace_section(DOC, BEGIN, END, section)
    log(f"wrote {RESULTS} and the section in {DOC}")


if __name__ == "__main__":
    main()
