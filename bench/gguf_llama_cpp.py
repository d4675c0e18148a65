"""Run `flashlm export gguf` files in llama.cpp itself: same tokens, same logits, same greedy text, and
batch-1 decoding speed beside FlashLM's, on the CPU.

llama.cpp runs through `llama-cpp-python`, its Python binding, which builds llama.cpp from source (about
ten minutes on 2 CPUs). It is not a FlashLM dependency and the test suite never needs it (the suite reads
the GGUF files back with `gguf` and `transformers` instead); install it anywhere and point `--site` at
its site-packages folder:

    python3 -m venv /tmp/lcpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_TESTS=OFF" /tmp/lcpp/bin/pip install llama-cpp-python markupsafe
    .venv/bin/python bench/gguf_llama_cpp.py --site /tmp/lcpp/lib/python3.11/site-packages

Models: the decode benchmark's shape (d_model 384, 6 layers, 6 heads, MLP hidden 1024, tied embeddings)
with a byte-level BPE of 512 tokens trained on generated stories, random-init as in `bench/decode.py`
(so the greedy text is not one repeated token): gemma with `LLLLLG` (window 128, which llama.cpp's gemma3
fixes) and llama all global. Each is exported to GGUF in f32 (the exact comparison) and f16 (the
exporter's default). Checks, per flavour:

- tokens: llama.cpp's tokenizer (from the GGUF alone) against `Tokenizer.encode` on held-out stories;
- logits: one teacher-forced pass over a 256-token story, every position, max |difference|;
- greedy text: 256 new tokens after a 32-token prompt, llama.cpp's against FlashLM's.

Speed: the same greedy generation (prefill included), rows interleaved, medians: FlashLM's fast step
(eager, the default) and compiled step, and llama.cpp with the f32 file and an f32 KV cache (the exact
comparison) and with the f16 file and its default f16 cache; llama.cpp takes each token with its greedy
sampler, one `Llama.eval` and one `Llama.sample` call from Python per token (its C++ command-line loop
would save that small per-token overhead).

Results go to bench/results/gguf_llama_cpp.json and a section of docs/benchmarks.md.
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
from pathlib import Path
from typing import Any

import decode
from docs_section import replace_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gguf_llama_cpp.json"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gguf_llama_cpp:begin -->", "<!-- gguf_llama_cpp:end -->"

SHAPE = {k: v for k, v in decode.SHAPE.items() if k != "vocab_size"}  # the decode benchmark's models
PATTERNS, RANDOM_INIT = decode.PATTERNS, decode.RANDOM_INIT
WINDOW = 128
VOCAB = 512
PROMPT_LEN, NEW_TOKENS, SCORED = 32, 256, 256
CONTEXT_TOKENS = 768  # llama.cpp rounds its context up to a multiple of 256: the models are made that long
STORIES = "stories260K"
STORIES_DIR = REPO.parent / "shared" / "data" / "llama2c-stories260K"
ROWS = ("flashlm_fast", "flashlm_compiled", "llama_cpp_f32", "llama_cpp_f16")
LABELS = {
    "flashlm_fast": decode.LABELS["flashlm_fast"],
    "flashlm_compiled": decode.LABELS["flashlm_compiled"],
    "llama_cpp_f32": "llama.cpp, f32 GGUF, f32 KV cache",
    "llama_cpp_f16": "llama.cpp, f16 GGUF, f16 KV cache (its default)",
}
log = decode.log


def import_llama_cpp(site: str | None) -> Any:
    if site:
        sys.path.append(site)  # after the project's own packages: its numpy stays the one in use
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(
            "error: llama_cpp is not importable: install llama-cpp-python (see this file's docstring) and pass "
            "--site with its site-packages folder"
        ) from None
    return llama_cpp


# ---- models ------------------------------------------------------------------------------------------
def build(flavour: str, tokenizer: Any) -> Any:
    import torch

    from flashlm import FlashLM
    from flashlm.config import ModelConfig

    init = RANDOM_INIT[flavour]
    cfg = ModelConfig(
        flavour=flavour,
        layer_pattern=PATTERNS[flavour],
        sliding_window=WINDOW,
        vocab_size=tokenizer.vocab_size,
        max_seq_len=CONTEXT_TOKENS,
        init_std=init["init_std"],
        **SHAPE,
    )
    torch.manual_seed(0)
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(init["embed_scale"])
    return model


def load_gguf(llama_cpp: Any, path: Path, threads: int, f32_cache: bool, all_logits: bool = False) -> Any:
    """llama.cpp on `path`; `f32_cache` keeps keys and values in f32 (llama.cpp's default is f16),
    `all_logits` keeps the logits of every position (the teacher-forced check reads them)."""
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=CONTEXT_TOKENS,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=all_logits,
        swa_full=False,  # local layers keep only their window, as FlashLM's ring cache does
        verbose=False,
        **cache,
    )


# ---- checks ------------------------------------------------------------------------------------------
def check_tokens(llm: Any, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    same = [
        llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) == tokenizer.encode(t, add_bos=True) for t in texts
    ]
    return {"texts": len(texts), "identical": sum(same)}


def check_logits(llm: Any, model: Any, ids: list[int]) -> dict[str, float]:
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    diff = np.abs(theirs - ours)
    return {
        "positions": len(ids),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": float(np.abs(ours).max()),
        "argmax_agree": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
    }


def flashlm_runner(model: Any, prompt: list[int], decoder: str, new_tokens: int) -> Callable[[], list[int]]:
    from flashlm.generation import Sampling, generate_tokens

    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    return lambda: [s[0] for s in generate_tokens(model, [prompt], sampling, eos_id=None, decoder=decoder)]


def llama_cpp_runner(llm: Any, prompt: list[int], new_tokens: int) -> Callable[[], list[int]]:
    def run() -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0))  # llama.cpp's greedy sampler
            out.append(token)
            if len(out) < new_tokens:
                llm.eval([token])
        return out

    return run


def check_stories260k(llama_cpp: Any, args: argparse.Namespace, tmp: Path, texts: list[str]) -> dict[str, Any]:
    """The trained stories260K (llama2.c, SentencePiece tokenizer: GGUF tokenizer kind `llama`), imported
    with `flashlm import llama2c`: tokens, logits and greedy text (f32 file, f32 cache) against FlashLM."""
    from flashlm import FlashLM
    from flashlm.interop.gguf import export_gguf
    from flashlm.interop.llama2c import import_llama2c
    from flashlm.tokenizer import Tokenizer

    folder = args.stories260k
    model_dir = import_llama2c(folder / "stories260K.bin", folder / "tok512.model", tmp / "stories260K")
    model, tokenizer = FlashLM.from_pretrained(model_dir).eval(), Tokenizer.load(model_dir)
    gguf = export_gguf(model, tmp / "stories260K-f32.gguf", tokenizer, dtype="f32")
    checks = check_model(llama_cpp, model, tokenizer, gguf, texts, args.threads)
    llm = load_gguf(llama_cpp, gguf, args.threads, f32_cache=True)
    prompt = tokenizer.encode(texts[0], add_bos=True)[:PROMPT_LEN]
    outputs = {
        "flashlm_fast": flashlm_runner(model, prompt, "fast", args.new_tokens)(),
        "llama_cpp_f32": llama_cpp_runner(llm, prompt, args.new_tokens)(),
    }
    return {**checks, **compare_greedy(outputs)}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


# ---- the run -----------------------------------------------------------------------------------------
def check_model(llama_cpp: Any, model: Any, tokenizer: Any, gguf: Path, texts: list[str], threads: int) -> dict:
    """Tokens, teacher-forced logits and greedy text of the f32 file in llama.cpp (f32 cache) against FlashLM."""
    scored = tokenizer.encode(" ".join(texts), add_bos=True)[:SCORED]
    exact = load_gguf(llama_cpp, gguf, threads, f32_cache=True, all_logits=True)
    checks = {"tokens": check_tokens(exact, tokenizer, texts), "logits_f32": check_logits(exact, model, scored)}
    del exact
    return checks


def compare_greedy(outputs: dict[str, list[int]]) -> dict[str, Any]:
    ours = outputs["flashlm_fast"]
    same = {
        name: {"identical": out == ours, "first_divergence": first_divergence(out, ours)}
        for name, out in outputs.items()
        if name != "flashlm_fast"
    }
    return {"greedy": same, "distinct_tokens": len(set(ours))}


def run(args: argparse.Namespace, llama_cpp: Any) -> dict[str, Any]:
    import torch

    from flashlm.data.synthetic import story_corpus
    from flashlm.hardware import machine_info
    from flashlm.interop.gguf import export_gguf
    from flashlm.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    tokenizer = Tokenizer.train(iter(story_corpus(3000, seed=0)), VOCAB, show_progress=False)
    held_out = list(story_corpus(200, seed=7))
    prompt = tokenizer.encode(held_out[0], add_bos=True)[:PROMPT_LEN]
    report: dict[str, Any] = {"benchmark": "gguf_llama_cpp", "checks": {}, "tokens_per_s": {}, "samples": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in ("gemma", "llama"):
            model = build(flavour, tokenizer)
            files = {
                dt: export_gguf(model, Path(tmp) / f"{flavour}-{dt}.gguf", tokenizer, dtype=dt) for dt in ("f32", "f16")
            }
            checks = check_model(llama_cpp, model, tokenizer, files["f32"], held_out, args.threads)
            llms = {dt: load_gguf(llama_cpp, f, args.threads, f32_cache=dt == "f32") for dt, f in files.items()}
            runs = {
                "flashlm_fast": flashlm_runner(model, prompt, "fast", args.new_tokens),
                "flashlm_compiled": flashlm_runner(model, prompt, "compiled", args.new_tokens),
                "llama_cpp_f32": llama_cpp_runner(llms["f32"], prompt, args.new_tokens),
                "llama_cpp_f16": llama_cpp_runner(llms["f16"], prompt, args.new_tokens),
            }
            checks.update(compare_greedy({name: run_() for name, run_ in runs.items()}))  # + warm-up, compiles
            log(f"{flavour}: {json.dumps(checks)}")
            got: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.rounds):
                for name, run_ in runs.items():
                    began = time.perf_counter()
                    run_()
                    got[name].append(args.new_tokens / (time.perf_counter() - began))
                log(f"{flavour} round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in got.items()))
            report["checks"][flavour] = checks
            report["samples"][flavour] = got
            report["tokens_per_s"][flavour] = {n: statistics.median(v) for n, v in got.items()}
            del llms
        if args.stories260k.is_dir():
            report["checks"][STORIES] = check_stories260k(llama_cpp, args, Path(tmp), held_out)
            log(f"{STORIES}: {json.dumps(report['checks'][STORIES])}")
        else:
            log(f"{args.stories260k} is absent: the imported stories260K model is not checked")
    tps = report["tokens_per_s"]
    report["speedup_vs_llama_cpp"] = {
        f: {row: t[row] / max(t["llama_cpp_f32"], t["llama_cpp_f16"]) for row in ("flashlm_fast", "flashlm_compiled")}
        for f, t in tps.items()
    }
    report["settings"] = {
        "shape": SHAPE,
        "layer_pattern": PATTERNS,
        "sliding_window": WINDOW,
        "vocab_size": tokenizer.vocab_size,
        "random_init": RANDOM_INIT,
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": args.new_tokens,
        "scored_tokens": SCORED,
        "held_out_texts": len(held_out),
        "threads": args.threads,
        "rounds": args.rounds,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
    }
    report["seconds"] = time.perf_counter() - started
    report["machine"] = {**machine_info(), "load_before": load_before, "load_after": list(os.getloadavg())}
    return report


def markdown(report: dict[str, Any]) -> str:
    from flashlm.hardware import describe

    m, s, checks, tps = report["machine"], report["settings"], report["checks"], report["tokens_per_s"]
    flavours, models = list(tps), list(checks)  # the models checked: the two timed, and stories260K
    table = [
        "| row | " + " | ".join(f"{f}, batch 1" for f in flavours) + " |",
        "|---|" + "---:|" * len(flavours),
    ]
    table += [f"| {LABELS[r]} | " + " | ".join(f"{tps[f][r]:,.0f}" for f in flavours) + " |" for r in ROWS]
    check_rows = [
        "| check | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
        "| llama.cpp's tokens equal `Tokenizer.encode` (held-out stories) | "
        + " | ".join(f"{checks[f]['tokens']['identical']} / {checks[f]['tokens']['texts']}" for f in models)
        + " |",
        f"| logits over {s['scored_tokens']} teacher-forced tokens, f32 file: max abs difference (largest logit) | "
        + " | ".join(
            f"{checks[f]['logits_f32']['max_abs_diff']:.1e} ({checks[f]['logits_f32']['logit_scale']:.1f})"
            for f in models
        )
        + " |",
        "| same argmax at every position, f32 file | "
        + " | ".join(f"{checks[f]['logits_f32']['argmax_agree']:.1%}" for f in models)
        + " |",
    ]
    for row in ("llama_cpp_f32", "llama_cpp_f16", "flashlm_compiled"):
        check_rows.append(
            f"| greedy text of {LABELS[row]} equals FlashLM's ({s['new_tokens']} tokens) | "
            + " | ".join(_greedy_cell(checks[f]["greedy"].get(row)) for f in models)
            + " |"
        )
    sp = report["speedup_vs_llama_cpp"]
    lines = [
        BEGIN,
        "## llama.cpp: the GGUF export run, and decoding beside it (`bench/gguf_llama_cpp.py`)",
        "",
        "`flashlm export gguf` files loaded by llama.cpp itself (through `llama-cpp-python` "
        f"{s['llama_cpp_python']}, built from source on this machine). Models: d_model {s['shape']['d_model']}, "
        f"{s['shape']['n_layers']} layers, {s['shape']['n_heads']} heads, MLP hidden {s['shape']['d_ff']}, tied "
        f"embeddings, byte-level BPE of {s['vocab_size']} tokens trained on generated stories; gemma `LLLLLG` "
        f"(window {s['sliding_window']}) and llama all global; random-init as in `bench/decode.py`. "
        + (
            f"Also checked: llama2.c's trained {STORIES} imported with `flashlm import llama2c` (llama flavour, "
            "SentencePiece tokenizer, which goes into GGUF as tokenizer kind `llama`)."
            if STORIES in checks
            else f"{STORIES} was not beside the clone, so the SentencePiece tokenizer kind was not checked."
        ),
        "",
        f"Machine: {describe(m)}; load average before/after {m['load_before'][0]:.2f} / {m['load_after'][0]:.2f}; "
        f"whole run {report['seconds'] / 60:.1f} min.",
        "",
        *check_rows,
        "",
        f"Greedy decoding at batch 1, {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, "
        f"tokens/s (medians of {s['rounds']} interleaved rounds, prefill included; llama.cpp takes each token "
        "with its greedy sampler, one `Llama.eval` and `Llama.sample` call from Python per token):",
        "",
        *table,
        "",
        "FlashLM over the faster llama.cpp row: "
        + "; ".join(
            f"{f}: fast step {sp[f]['flashlm_fast']:.2f}x, compiled {sp[f]['flashlm_compiled']:.2f}x" for f in flavours
        )
        + ". No goal is set for this comparison; it places FlashLM beside the CPU runtime a user would reach "
        "for to serve a small model. FlashLM decodes in fp32 here (auto precision on a CPU without native bf16); "
        "llama.cpp's f16 file holds 2 bytes a weight against fp32's 4, so each token reads half the weight "
        "bytes.",
        "",
        "Rerun: install `llama-cpp-python` apart from the project (this script's docstring says how), then "
        "`.venv/bin/python bench/gguf_llama_cpp.py --site DIR` (writes `bench/results/gguf_llama_cpp.json`; "
        "`--report-only` rewrites this section from it).",
        END,
    ]
    return "\n".join(lines)


def _greedy_cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    if result["identical"]:
        return "yes"
    return f"no, from token {result['first_divergence']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", help="the site-packages folder llama-cpp-python is installed in")
    parser.add_argument(
        "--stories260k", type=Path, default=STORIES_DIR, help="llama2.c's stories260K folder (checked when present)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each: one generation per row)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per row")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--dry-run", action="store_true", help="print the section, write nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from the JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.report_only:
        replace_section(DOC, BEGIN, END, markdown(json.loads(RESULTS.read_text(encoding="utf-8"))))
        log(f"rewrote the section in {DOC}")
        return
    report = run(args, import_llama_cpp(args.site))
    section = markdown(report)
    if args.dry_run:
        print(section)
        return
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    replace_section(DOC, BEGIN, END, section)
    log(f"wrote {RESULTS} and the section in {DOC}")


if __name__ == "__main__":
    main()
