"""`flashlm demo`: the whole pipeline on a corpus the code generates (or the user's files), in minutes.

corpus → tokenizer → token shards → pre-training (hybrid causal + masked + NSP) → distillation into a
smaller student → held-out evaluation → samples → a run folder with report.md and the loss curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from flashlm.config import RunConfig, TrainConfig, get_preset, replace
from flashlm.errors import FlashLMError

console = Console(stderr=True)
PROMPTS = ("Once upon a time", "The little dog", "One day, Mia")


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)


def model_config(vocab_size: int, student: bool = False):
    """The demo's teacher (tiny, ~5M) and student (about a third of it)."""
    base = get_preset("tiny")
    if student:
        return replace(base, vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                       layer_pattern="LLLG", sliding_window=64, max_seq_len=256)
    return replace(base, vocab_size=vocab_size, max_seq_len=256, sliding_window=64)


HYBRID = {"clm": {"ratio": 1}, "mlm": {"ratio": 1, "nsp_weight": 0.5}}  # 1 causal : 1 masked(+NSP) step
MASKING = {"rate": 0.3, "rate_end": 0.15, "max_span": 3}


def train_config(shards: Path, out: Path, steps: int, seed: int, hybrid: bool) -> TrainConfig:
    tokenizer = shards.parent / "tokenizer" / "tokenizer.json"
    mix = dict(objective="hybrid", objectives=HYBRID, masking=MASKING) if hybrid else dict(objective="clm")
    return TrainConfig(data=str(shards), out=str(out), tokenizer=str(tokenizer), steps=steps, batch_size=16,
                       seq_len=128, lr=3e-3, warmup_steps=min(50, max(steps // 10, 1)),
                       eval_every=max(steps // 4, 1), eval_batches=16, save_every=steps, keep_last=1,
                       log_every=max(min(10, steps // 20), 1), seed=seed, **mix)


def seconds_per_step(cfg: RunConfig) -> float:
    """Time one optimisation step of `cfg` on random tokens (after a warm-up step)."""
    from flashlm.model.transformer import FlashLM

    torch.manual_seed(0)
    model = FlashLM(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(5, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
    times = []
    for _ in range(3):
        began = time.perf_counter()
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - began)
    return min(times[1:])


def budget_steps(cfg: RunConfig, seconds: float) -> int:
    """How many steps fit in `seconds` (evaluation and saving take about a tenth)."""
    return max(int(0.9 * seconds / seconds_per_step(cfg)), 20)


def time_guard(seconds: float):
    """A loop callback that stops training once `seconds` have passed (the budget is an estimate)."""
    began = time.perf_counter()
    return lambda step, row: time.perf_counter() - began > seconds


def prepare(out: Path, data: list[str] | None, seed: int, vocab_size: int) -> tuple[Any, Path, Stage]:
    """Corpus (generated unless `data`), tokenizer and shards."""
    from flashlm.data.shards import prepare_shards
    from flashlm.data.synthetic import write_story_corpus
    from flashlm.tokenizer import Tokenizer

    stage = Stage("data")
    began = time.perf_counter()
    inputs: Any = data or str(write_story_corpus(out / "corpus.txt", n_docs=8_000, seed=seed))
    tokenizer = Tokenizer.train(inputs, vocab_size=vocab_size, show_progress=False)
    tokenizer.save(out / "tokenizer")
    meta = prepare_shards(inputs, tokenizer, out / "shards", val_fraction=0.02, progress=False)
    splits = meta["splits"]
    stage.results = {"train_tokens": len_of(out / "shards", "train"), "val_tokens": len_of(out / "shards", "val"),
                     "documents": sum(s.get("docs", 0) for s in splits.values()), "vocab_size": tokenizer.vocab_size}
    stage.seconds = time.perf_counter() - began
    return tokenizer, out / "shards", stage


def len_of(shards: Path, split: str) -> int:
    from flashlm.data.shards import TokenShards

    return len(TokenShards(shards, split))


def pretrain(shards: Path, out: Path, vocab_size: int, seconds: float, seed: int) -> Stage:
    """The teacher: the Flash-Lite hybrid (causal + masked next-token + NSP) on the tiny preset."""
    from flashlm.train.loop import train

    stage = Stage("pre-train (hybrid)")
    began = time.perf_counter()
    cfg = RunConfig(model=model_config(vocab_size), train=train_config(shards, out, 100, seed, hybrid=True))
    cfg.train = train_config(shards, out, budget_steps(cfg, seconds), seed, hybrid=True)
    summary = train(cfg, callback=time_guard(seconds * 1.25))
    stage.results = summarise(summary, cfg)
    stage.results.update(masked_scores(stage.results["checkpoint"], shards))
    stage.seconds = time.perf_counter() - began
    return stage


def distill(shards: Path, out: Path, teacher_dir: str, vocab_size: int, seconds: float, seed: int) -> Stage:
    """A student about a third of the teacher's size, distilled from it (causal LM + forward KL)."""
    from flashlm.config import DistillConfig
    from flashlm.train.loop import train

    stage = Stage("distill student")
    began = time.perf_counter()
    cfg = RunConfig(model=model_config(vocab_size, student=True),
                    train=train_config(shards, out, 100, seed, hybrid=False),
                    distill=DistillConfig(teacher=teacher_dir, alpha=0.3, temperature=1.0))
    # a distillation step also runs the teacher's forward pass: about 2x a plain step on a CPU
    cfg.train = train_config(shards, out, max(budget_steps(cfg, seconds) // 2, 20), seed, hybrid=False)
    summary = train(cfg, callback=time_guard(seconds * 1.25))
    stage.results = summarise(summary, cfg)
    stage.seconds = time.perf_counter() - began
    return stage


def masked_scores(model_dir: str, shards: Path) -> dict[str, float]:
    """Held-out masked-token and next-sentence accuracy of a checkpoint."""
    from flashlm.evaluate.masked import masked_metrics
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    scores = masked_metrics(FlashLM.from_pretrained(model_dir), shards, tokenizer=Tokenizer.load(model_dir),
                            windows=128, pairs=256)
    return {"mlm_acc": scores["mlm_acc"], "nsp_acc": scores["nsp_acc"], "unigram_acc": scores["unigram_acc"]}


def summarise(summary: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    from flashlm.config import count_parameters

    ev = summary.get("eval") or {}
    return {"parameters": count_parameters(cfg.model), "steps": summary["step"],
            "train_tokens": summary["step"] * cfg.train.batch_size * cfg.train.seq_len,
            "val_loss": ev.get("val_loss"), "val_ppl": ev.get("val_ppl"), "val_bpb": ev.get("val_bpb"),
            "checkpoint": summary.get("checkpoint")}


def samples(model_dir: str, seed: int) -> list[str]:
    from flashlm.generate import Sampling, generate
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(model_dir)
    tokenizer = Tokenizer.load(model_dir)
    sampling = Sampling(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=seed)
    return [p + c for p, c in zip(PROMPTS, generate(model, tokenizer, list(PROMPTS), sampling), strict=True)]


def report_card(model_dir: str, out: Path, seed: int) -> Stage:
    """`flashlm eval all` on the cheap tasks: perplexity/bits-per-byte on fresh stories and efficiency."""
    from flashlm.data.synthetic import story_corpus
    from flashlm.evaluate.report import evaluate_all

    stage = Stage("report card")
    began = time.perf_counter()
    texts = list(story_corpus(200, seed=seed + 1))  # stories the model has not seen
    report = evaluate_all(model_dir, out, texts=texts, quick=True, tasks=("ppl", "efficiency"))
    stage.results = {"report": str(report)}
    stage.seconds = time.perf_counter() - began
    return stage


def summary_table(stages: list[Stage]) -> Table:
    table = Table(title="FlashLM demo")
    for column in ("stage", "seconds", "results"):
        table.add_column(column)
    for s in stages:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in s.results.items() if k not in ("checkpoint", "samples"))
        table.add_row(s.name, f"{s.seconds:.0f}", shown)
    return table


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out: Path, stages: list[Stage], sample_texts: list[str]) -> Path:
    lines = ["# FlashLM demo report", "", "| stage | seconds | results |", "|---|---|---|"]
    for s in stages:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in s.results.items() if k != "samples")
        lines.append(f"| {s.name} | {s.seconds:.0f} | {shown} |")
    lines += ["", "## Samples", ""] + [f"- {t}" for t in sample_texts]
    lines += ["", "## Loss curves", "", "![teacher](teacher/loss.png)", "", "![student](student/loss.png)", ""]
    lines += ["", "The teacher's report card (`flashlm eval all`): [eval/report.md](eval/report.md)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps([s.__dict__ for s in stages], indent=2, default=str))
    return path


def run_demo(out: str | Path = "runs/demo", minutes: float = 5.0, data: list[str] | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Run the whole pipeline in about `minutes`; return the stages' results."""
    if minutes <= 0:
        raise FlashLMError(f"--minutes must be positive, got {minutes}")
    out = Path(out)
    if (out / "teacher" / "checkpoints").exists():
        raise FlashLMError(f"{out} already holds a demo run; pass another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    budget = minutes * 60
    console.print(f"[bold]FlashLM demo[/] → {out}  (budget {minutes:g} min)")
    tokenizer, shards, data_stage = prepare(out, data, seed, vocab_size=4096)
    console.print(f"data ready in {data_stage.seconds:.0f}s: {data_stage.results}")
    remaining = budget - data_stage.seconds
    teacher = pretrain(shards, out / "teacher", tokenizer.vocab_size, remaining * 0.55, seed)
    student = distill(shards, out / "student", teacher.results["checkpoint"], tokenizer.vocab_size,
                      remaining * 0.3, seed)
    texts = samples(teacher.results["checkpoint"], seed)
    card = report_card(teacher.results["checkpoint"], out / "eval", seed)
    stages = [data_stage, teacher, student, card]
    console.print(summary_table(stages))
    for t in texts:
        console.print(f"  [italic]{t}[/]")
    report = write_report(out, stages, texts)
    console.print(f"report: {report}")
    return {s.name: s.results for s in stages}
