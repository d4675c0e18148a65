"""Benchmark speculative decoding: the demo's teacher alone against the teacher checked by its distilled
student as draft (`flashlm generate TEACHER --draft STUDENT`), greedy, batch 1, on the CPU.

Both runs decode the same story-world prompts (`flashlm.demo.PROMPTS`) to the same length (256 new
tokens or what the context leaves; generation does not stop at <eos>, so every run decodes the same
number of tokens), and the speculative tokens are checked to be the teacher's own. The runs are timed
round-robin (each round, prompt by prompt: the teacher alone, then each lookahead), so load changes on a
shared machine hit all of them alike; figures are medians of the per-round tokens/s. The lookahead with
the best median is the one reported; every lookahead tried is kept in the JSON with its acceptance rate.

The models come from `make demo` (runs/demo/teacher and runs/demo/distilled_student); other paths with
--teacher / --draft.

    .venv/bin/python bench/decode_speculative.py                              # ~2 min on 2 idle CPUs
    .venv/bin/python bench/decode_speculative.py --rounds 1 --new-tokens 32 --dry-run   # smoke run

`bench/decode.py` runs this as its "speculative" section (`run_section`, `markdown_lines`: the JSON key
"speculative" of bench/results/decode.json and a part of its docs section). Run alone, this script
writes bench/results/decode_speculative.json (not with --dry-run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "decode_speculative.json"
DEMO = REPO / "runs" / "demo"
TEACHER = DEMO / "teacher" / "latest"
DRAFT = DEMO / "distilled_student" / "latest"
GOAL_SPEEDUP = 1.8
LOOKAHEADS = (2, 3, 4, 5, 6)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model_dir(path: Path, option: str) -> Path:
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"{option} {path}: no model there; run `make demo` first (it trains the teacher and its distilled "
            f"student into runs/demo), or pass {option} DIR"
        )
    return path


def speculative_section(
    teacher_dir: Path = TEACHER,
    draft_dir: Path = DRAFT,
    lookaheads: tuple[int, ...] = LOOKAHEADS,
    new_tokens: int = 256,
    rounds: int = 3,
    decoder: str = "fast",
) -> dict[str, Any]:
    """Teacher-alone vs speculative tokens/s (greedy, batch 1) and acceptance rates; the "speculative" key."""
    import torch

    from flashlm.demo import PROMPTS
    from flashlm.generation import Sampling, generate_tokens
    from flashlm.model.transformer import FlashLM
    from flashlm.speculative import SpeculativeStats, load_draft, speculative_tokens
    from flashlm.tokenizer import Tokenizer

    teacher_dir = _model_dir(Path(teacher_dir), "--teacher")
    draft_dir = _model_dir(Path(draft_dir), "--draft")
    teacher, tokenizer = FlashLM.from_pretrained(teacher_dir), Tokenizer.load(teacher_dir)
    draft = load_draft(draft_dir, teacher, tokenizer)
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    budget = min(new_tokens, teacher.cfg.max_seq_len - max(len(p) for p in prompts))
    sampling = Sampling(max_new_tokens=budget, temperature=0.0, stop_at_eos=False)

    def alone(prompt: list[int]) -> list[int]:
        return [s[0] for s in generate_tokens(teacher, [prompt], sampling, decoder=decoder)]

    def speculative(prompt: list[int], lookahead: int, stats: SpeculativeStats) -> list[int]:
        steps = speculative_tokens(teacher, draft, prompt, sampling, lookahead=lookahead, stats=stats, decoder=decoder)
        return [s[0] for s in steps]

    configs = ["teacher", *(f"lookahead_{k}" for k in lookaheads)]
    expected = {i: alone(p) for i, p in enumerate(prompts)}  # also the warm-up (and compile, if asked)
    for k in lookaheads:
        speculative(prompts[0][:2], k, SpeculativeStats())
    speeds: dict[str, list[float]] = {c: [] for c in configs}
    stats = {k: SpeculativeStats() for k in lookaheads}
    mismatched = 0
    for r in range(rounds):
        tokens = dict.fromkeys(configs, 0)
        seconds = dict.fromkeys(configs, 0.0)
        for i, prompt in enumerate(prompts):  # every config on one prompt, then the next: load hits all alike
            for config in configs:
                began = time.perf_counter()
                if config == "teacher":
                    out = alone(prompt)
                else:
                    k = int(config.rsplit("_", 1)[1])
                    out = speculative(prompt, k, stats[k])
                seconds[config] += time.perf_counter() - began
                tokens[config] += len(out)
                mismatched += config != "teacher" and out != expected[i]
        for config in configs:
            speeds[config].append(tokens[config] / seconds[config])
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{c} {speeds[c][-1]:.0f} tok/s" for c in configs))
    median = {c: statistics.median(v) for c, v in speeds.items()}
    best = max(lookaheads, key=lambda k: median[f"lookahead_{k}"])
    costs = step_costs(teacher, draft, prompts[0], best)
    return {
        "teacher": str(teacher_dir),
        "draft": str(draft_dir),
        "teacher_parameters": teacher.num_parameters(),
        "draft_parameters": draft.num_parameters(),
        "prompts": list(PROMPTS),
        "new_tokens": budget,
        "decoder": decoder,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "teacher_tok_s": median["teacher"],
        "speculative_tok_s": median[f"lookahead_{best}"],
        "speedup": median[f"lookahead_{best}"] / median["teacher"],
        "acceptance_rate": stats[best].acceptance_rate,
        "tokens_per_round": stats[best].tokens_per_round,
        "lookahead": best,
        "identical_to_teacher": mismatched == 0,
        "by_lookahead": {
            str(k): {
                "tok_s": median[f"lookahead_{k}"],
                "speedup": median[f"lookahead_{k}"] / median["teacher"],
                "acceptance_rate": stats[k].acceptance_rate,
                "tokens_per_round": stats[k].tokens_per_round,
            }
            for k in lookaheads
        },
        "costs": costs,
        "goal_speedup": GOAL_SPEEDUP,
        "samples": {c: v for c, v in speeds.items()},
    }


def step_costs(teacher: Any, draft: Any, prompt: list[int], lookahead: int, reps: int = 40) -> dict[str, float]:
    """What a round is made of, in teacher decode steps: one draft step (`draft_step`) and one checking pass
    of lookahead + 1 tokens (`check_pass`); medians of timed repeats after the prompt. A round that gives
    out t tokens then costs lookahead x draft_step + check_pass teacher steps, so the speedup is about
    t / (lookahead x draft_step + check_pass): `ceiling` is that with every proposal kept."""
    import torch

    from flashlm.model.cache import KVCache
    from flashlm.model.chunk_step import ChunkStep
    from flashlm.model.decoding import DecodeStep

    def timed(fn: Any) -> float:
        fn()
        samples = []
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - began) / reps)
        return statistics.median(samples)

    ids = torch.tensor([prompt])
    seconds = {}
    with torch.no_grad():
        for name, model, chunk in (("teacher", teacher, 1), ("draft", draft, 1), ("check", teacher, lookahead + 1)):
            cache = KVCache(model.cfg, 1, model.cfg.max_seq_len, lookahead=lookahead)
            model(ids, cache=cache)
            step = DecodeStep(model, cache) if chunk == 1 else ChunkStep(model, cache)
            tokens = ids[0, -1:] if chunk == 1 else ids[0, -1:].repeat(chunk)

            def once(step: Any = step, tokens: Any = tokens, cache: Any = cache) -> None:
                step(tokens)
                cache.truncate(len(prompt))

            seconds[name] = timed(once)
    draft_step, check_pass = seconds["draft"] / seconds["teacher"], seconds["check"] / seconds["teacher"]
    return {
        "teacher_step_ms": 1000 * seconds["teacher"],
        "draft_step": draft_step,
        "check_pass": check_pass,
        "ceiling": (lookahead + 1) / (lookahead * draft_step + check_pass),
    }


# ---- the section of bench/decode.py ---------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """bench/decode.py's options for this section."""
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="speculative: the target (make demo's teacher)")
    parser.add_argument("--draft", type=Path, default=DRAFT, help="speculative: the draft (make demo's student)")
    parser.add_argument(
        "--lookahead", type=int, nargs="+", default=list(LOOKAHEADS), help="speculative: the lookaheads to try"
    )


def check_models(args: argparse.Namespace) -> bool:
    """Before a run: True when both models are there; otherwise stop with one line (a --quick run skips
    the section instead)."""
    try:
        _model_dir(Path(args.teacher), "--teacher")
        _model_dir(Path(args.draft), "--draft")
    except SystemExit as missing:
        if getattr(args, "quick", False):
            log(f"speculative section skipped: {missing}")
            return False
        raise
    return True


def run_section(args: argparse.Namespace) -> dict[str, Any]:
    """bench/decode.py's "speculative" key (the fast decoder, as plain generation's default)."""
    if not check_models(args):
        return {}
    return {
        "speculative": speculative_section(
            args.teacher, args.draft, tuple(args.lookahead), args.new_tokens, args.rounds, decoder="fast"
        )
    }


def markdown_lines(report: dict[str, Any]) -> list[str]:
    """The speculative part of the decode section of docs/benchmarks.md."""
    s = report.get("speculative")
    if not s:
        return []
    c = s["costs"]
    met = "met" if s["speedup"] >= GOAL_SPEEDUP else "missed"
    rows = [
        f"| {k} | {v['tok_s']:.0f} | {v['speedup']:.2f}x | {v['acceptance_rate']:.0%} | {v['tokens_per_round']:.2f} |"
        for k, v in s["by_lookahead"].items()
    ]
    return [
        "### Speculative decoding: the demo's teacher drafted by its distilled student",
        "",
        f"`flashlm generate TEACHER --draft STUDENT`: greedy, batch 1, {s['new_tokens']} new tokens on the demo's "
        f"{len(s['prompts'])} prompts, {s['threads']} threads, medians of {s['rounds']} rounds. Teacher "
        f"{s['teacher_parameters']:,} parameters, draft {s['draft_parameters']:,}. Teacher alone "
        f"{s['teacher_tok_s']:.0f} tok/s; speculative {s['speculative_tok_s']:.0f} tok/s at lookahead "
        f"{s['lookahead']}: **{s['speedup']:.2f}x** (goal >= {GOAL_SPEEDUP}x: {met}); acceptance "
        f"{s['acceptance_rate']:.0%}. Tokens identical to the teacher's alone: "
        f"{'yes' if s['identical_to_teacher'] else 'NO'}.",
        "",
        "| lookahead | tok/s | vs teacher | proposals kept | tokens per teacher pass |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Where the time goes (lookahead {s['lookahead']}, in teacher decode steps of {c['teacher_step_ms']:.1f} ms): "
        f"a draft step costs {c['draft_step']:.2f}, the teacher's pass over the {s['lookahead'] + 1} proposed "
        f"positions {c['check_pass']:.2f}. A round giving out t tokens costs {s['lookahead']} x "
        f"{c['draft_step']:.2f} + {c['check_pass']:.2f} steps, so the speedup is about t / "
        f"{s['lookahead'] * c['draft_step'] + c['check_pass']:.2f}: {s['tokens_per_round']:.2f} tokens a round "
        f"here, and {c['ceiling']:.2f}x if every proposal were kept. {_why_missed(s)}",
    ]


def _why_missed(s: dict[str, Any]) -> str:
    """What keeps the best lookahead from the goal: how few proposals are kept, and what a round costs."""
    c, k = s["costs"], s["lookahead"]
    if s["speedup"] >= GOAL_SPEEDUP:
        return ""
    needed_tokens = GOAL_SPEEDUP * (k * c["draft_step"] + c["check_pass"])
    agreement = (
        f"it needs {needed_tokens:.2f} tokens a round of the {k + 1} possible and the draft gives "
        f"{s['tokens_per_round']:.2f} ({s['acceptance_rate']:.0%} of proposals kept)"
        if needed_tokens <= k + 1
        else f"no agreement reaches it at this lookahead (it would need {needed_tokens:.2f} tokens of {k + 1})"
    )
    cheap_enough = _draft_step_for_goal(k, c["check_pass"], s["tokens_per_round"])
    cost = (
        f"a draft step must cost at most {cheap_enough:.2f} teacher steps, against {c['draft_step']:.2f}"
        if cheap_enough > 0
        else f"no draft is cheap enough, as the checking pass alone costs {c['check_pass']:.2f} teacher steps"
    )
    return (
        f"For {GOAL_SPEEDUP}x, {agreement}; or, at the agreement it has, {cost}. At this size a decode step's cost is "
        "mostly per-layer work and per-step overhead, which shrink with the draft's depth and not with its "
        "parameter count, so a student at the teacher's width costs more than its share of parameters suggests."
    )


def _draft_step_for_goal(lookahead: int, check_pass: float, tokens_per_round: float) -> float:
    """The dearest draft step (in teacher steps) with which rounds of `tokens_per_round` tokens reach the
    goal: tokens / (lookahead x draft + check) = GOAL_SPEEDUP, solved for draft."""
    return max(0.0, (tokens_per_round / GOAL_SPEEDUP - check_pass) / lookahead)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decoder", default="fast", help="fast, compiled or reference (both runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the results, write nothing")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    check_models(args)
    section = speculative_section(
        args.teacher, args.draft, tuple(args.lookahead), args.new_tokens, args.rounds, args.decoder
    )
    report = {"benchmark": "decode_speculative", "speculative": section}
    text = json.dumps(report, indent=2)
    if args.dry_run:
        print(text)
        return
    RESULTS.write_text(text + "\n", encoding="utf-8")
    s = section
    log(
        f"speculative {s['speculative_tok_s']:.0f} tok/s vs teacher {s['teacher_tok_s']:.0f}: {s['speedup']:.2f}x "
        f"(lookahead {s['lookahead']}, acceptance {s['acceptance_rate']:.0%}) -> {RESULTS}"
    )


if __name__ == "__main__":
    main()
