"""`flashlm demo`: the Flash-Lite story end to end on a generated corpus (or the user's files), in minutes.

corpus -> tokenizer -> token shards -> a teacher pre-trained with the Flash-Lite hybrid (causal LM mixed
with masked next-token prediction and NSP) -> a student 40% of its size, distilled from it -> the
same student trained from scratch on the same batches -> the three models side by side on held-out
text: size, loss / perplexity / bits per byte, MLM and NSP accuracy, decoding speed -> samples and a
run folder with report.md, summary.json and the loss curves.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from flashlm.config import DistillConfig, ModelConfig, RunConfig, TrainConfig, get_preset, replace
from flashlm.errors import FlashLMError

console = Console(stderr=True)
PROMPTS = ("Once upon a time", "One rainy Saturday, Ben", "The little dog")
# Distillation pays most where a student is short of data and its teacher is far ahead of it: the teacher
# gets most of the training time (the budget less data preparation and evaluation), and each student a
# quarter of the teacher's steps. The two students run the same steps on the same batches; a distillation
# step also runs the teacher's forward pass.
TEACHER_SHARE = 0.8
STUDENT_STEPS_PER_TEACHER_STEP = 0.25
EVAL_SECONDS = 40.0  # held-out scoring, decoding speed and samples of three models
HYBRID = {"clm": {"ratio": 5}, "mlm": {"ratio": 1, "nsp_weight": 0.5}}  # configs/flashlite-tiny.yaml's mix
MASKING = {"rate": 0.3, "rate_end": 0.15, "max_span": 3}


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)


def model_config(vocab_size: int, student: bool = False) -> ModelConfig:
    """The teacher (the tiny preset: 6 layers, one global to five local) and the student: the same width
    with 2 layers (a local and a global one), about 40% of the parameters. Wide and shallow suits a CPU,
    where batch-1 decoding costs per layer."""
    base = replace(get_preset("tiny"), vocab_size=vocab_size, max_seq_len=256, sliding_window=64)
    return replace(base, n_layers=2, layer_pattern="LG") if student else base


def train_config(
    shards: Path, out: Path, seed: int, minutes: float = 0.0, steps: int = 10**9, hybrid: bool = False
) -> TrainConfig:
    """A run of `minutes` (the lr schedule follows the clock), or of exactly `steps`."""
    mix = dict(objective="hybrid", objectives=HYBRID, masking=MASKING) if hybrid else dict(objective="clm")
    timed = minutes > 0
    return TrainConfig(
        data=str(shards),
        out=str(out),
        minutes=minutes,
        steps=steps,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup_steps=30,
        eval_every=10**9 if timed else steps,
        eval_batches=16,
        save_every=10**9 if timed else steps,
        keep_last=1,
        log_every=10,
        seed=seed,
        device="cpu",
        **mix,
    )


def prepare(out: Path, data: list[str] | None, seed: int) -> tuple[Any, Path, list[str], Stage]:
    """Corpus (generated unless `data`), tokenizer, shards, and held-out texts the models never see."""
    from flashlm.data.shards import prepare_shards
    from flashlm.data.synthetic import story_corpus, write_story_corpus
    from flashlm.tokenizer import Tokenizer

    stage = Stage("data")
    began = time.perf_counter()
    if data:
        inputs: Any = data
        vocab_size = 4096
    else:
        inputs = str(write_story_corpus(out / "corpus.txt", n_docs=12_000, seed=seed))
        vocab_size = 2048  # the story world has a few hundred word types
    tokenizer = Tokenizer.train(inputs, vocab_size=vocab_size, show_progress=False)
    tokenizer.save(out / "tokenizer")
    meta = prepare_shards(inputs, tokenizer, out / "shards", val_fraction=0.02, progress=False)
    if data:  # the user's text: hold out the shards' validation documents
        held_out = [tokenizer.decode(d) for d in _val_documents(out / "shards", 200)]
    else:  # new stories from another seed
        held_out = list(story_corpus(200, seed=seed + 10_000))
    splits = meta["splits"]
    stage.results = {
        "documents": sum(s.get("docs", 0) for s in splits.values()),
        "train_tokens": splits["train"]["tokens"],
        "vocab_size": tokenizer.vocab_size,
        "held_out_documents": len(held_out),
    }
    stage.seconds = time.perf_counter() - began
    return tokenizer, out / "shards", held_out, stage


def _val_documents(shards: Path, limit: int) -> list[Any]:
    from flashlm.data.shards import TokenShards

    val = TokenShards(shards, "val")
    return [val.document(i)[:-1] for i in range(min(limit, val.n_docs))]  # without the closing <eos>


def train_stage(name: str, cfg: RunConfig) -> Stage:
    from flashlm.config import count_parameters
    from flashlm.training import train

    stage = Stage(name)
    began = time.perf_counter()
    summary = train(cfg)
    stage.seconds = time.perf_counter() - began
    stage.results = {
        "parameters": count_parameters(cfg.model),
        "steps": summary["step"],
        "train_tokens": summary["step"] * cfg.train.batch_size * cfg.train.seq_len,
        "checkpoint": summary["checkpoint"],
    }
    return stage


def score(model_dir: str, shards: Path, held_out: list[str]) -> dict[str, float]:
    """Held-out loss / ppl / bpb, masked-token and next-sentence accuracy, and greedy decoding speed."""
    from flashlm.evaluate.efficiency import measure_batch
    from flashlm.evaluate.lm import perplexity
    from flashlm.evaluate.masked import masked_metrics
    from flashlm.model.heads import FlashLMForPretraining
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model, tokenizer = FlashLM.from_pretrained(model_dir), Tokenizer.load(model_dir)
    lm = perplexity(model, tokenizer, held_out, seq_len=128, stride=64, batch_size=16)
    pretraining = FlashLMForPretraining.with_head_from(model, model_dir)  # + the NSP head the teacher trained
    masked = masked_metrics(pretraining, shards, tokenizer=tokenizer, windows=128, pairs=256)
    measure_batch(model, 1, 32, 4)  # warm-up
    speeds = [measure_batch(model, 1, 32, 64, seed=i)["decode_tokens_per_s"] for i in range(3)]
    return {
        "val_loss": lm["loss"],
        "val_ppl": lm["ppl"],
        "val_bpb": lm["bpb"],
        "mlm_acc": masked["mlm_acc"],
        "nsp_acc": masked["nsp_acc"],
        "decode_tok_s": statistics.median(speeds),
    }


def samples(model_dir: str, seed: int) -> list[str]:
    from flashlm.generation import Sampling, generate
    from flashlm.model.transformer import FlashLM
    from flashlm.tokenizer import Tokenizer

    model, tokenizer = FlashLM.from_pretrained(model_dir), Tokenizer.load(model_dir)
    sampling = Sampling(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=seed)
    return [p + c for p, c in zip(PROMPTS, generate(model, tokenizer, list(PROMPTS), sampling), strict=True)]


COLUMNS = (
    ("parameters", "parameters", "{:,}"),
    ("steps", "steps", "{:,}"),
    ("train s", "seconds", "{:.0f}"),
    ("held-out loss", "val_loss", "{:.3f}"),
    ("ppl", "val_ppl", "{:.2f}"),
    ("bits/byte", "val_bpb", "{:.3f}"),
    ("MLM acc", "mlm_acc", "{:.1%}"),
    ("NSP acc", "nsp_acc", "{:.1%}"),
    ("decode tok/s", "decode_tok_s", "{:.0f}"),
)


def comparison_rows(models: list[Stage]) -> list[list[str]]:
    return [
        [m.name] + [fmt.format(m.seconds if key == "seconds" else m.results[key]) for _, key, fmt in COLUMNS]
        for m in models
    ]


def verdicts(teacher: Stage, distilled: Stage, scratch: Stage) -> list[str]:
    """What the comparison shows, in the terms the demo promises (held-out loss, decoding speed)."""
    t, d, s = (m.results for m in (teacher, distilled, scratch))
    gain = 1 - d["val_ppl"] / s["val_ppl"]
    return [
        f"teacher beats both students: {'yes' if t['val_loss'] < min(d['val_loss'], s['val_loss']) else 'NO'} "
        f"(held-out loss {t['val_loss']:.3f} vs {d['val_loss']:.3f} distilled, {s['val_loss']:.3f} scratch)",
        f"distilled student beats the scratch one on the same batches: "
        f"{'yes' if d['val_loss'] < s['val_loss'] else 'NO'} (perplexity {gain:.1%} lower)",
        f"students decode {d['decode_tok_s'] / t['decode_tok_s']:.1f}x as fast as the teacher "
        f"at {d['parameters'] / t['parameters']:.0%} of its parameters",
    ]


def write_report(out: Path, data: Stage, models: list[Stage], texts: list[str], notes: list[str]) -> Path:
    header = ["model", *(c[0] for c in COLUMNS)]
    lines = [
        "# FlashLM demo report",
        "",
        f"Corpus: {data.results['documents']:,} documents, {data.results['train_tokens']:,} training tokens, "
        f"byte-level BPE of {data.results['vocab_size']:,} tokens; scored on "
        f"{data.results['held_out_documents']} held-out documents with the same tokenizer.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(models)]
    lines += ["", *[f"- {n}" for n in notes], "", "## Teacher samples", "", *[f"- {t}" for t in texts]]
    lines += ["", "## Loss curves", ""] + [f"![{m.name}]({_run_dir(m.name)}/loss.png)" for m in models] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"data": data.__dict__, "models": [m.__dict__ for m in models], "verdicts": notes}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _run_dir(name: str) -> str:
    return name.replace(" ", "_")


def comparison_table(models: list[Stage]) -> Table:
    table = Table(title="FlashLM demo: teacher vs students (held-out)")
    for column in ("model", *(c[0] for c in COLUMNS)):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in comparison_rows(models):
        table.add_row(*row)
    return table


def run_demo(
    out: str | Path = "runs/demo", minutes: float = 5.0, data: list[str] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Run the whole pipeline in about `minutes`; return the stages' results."""
    if not 0 < minutes < math.inf:  # NaN too
        raise FlashLMError(f"--minutes must be a positive number, got {minutes}")
    out = Path(out)
    if (out / "teacher" / "checkpoints").exists():
        raise FlashLMError(f"{out} already holds a demo run; pass another --out or delete it")
    if data:  # a missing, empty or unreadable input: one line before anything is made or printed
        from flashlm.data.corpus import iter_documents

        next(iter_documents(data), None)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    console.print(f"[bold]FlashLM demo[/] -> {out}  (budget {minutes:g} min)")
    tokenizer, shards, held_out, data_stage = prepare(out, data, seed)
    console.print(f"data ready in {data_stage.seconds:.0f}s: {data_stage.results}")
    train_minutes = max(minutes * 60 - data_stage.seconds - EVAL_SECONDS, 30.0) / 60
    vocab = tokenizer.vocab_size

    console.print("[bold]1/3[/] teacher: Flash-Lite hybrid pre-training (causal + masked next-token + NSP)")
    teacher = train_stage(
        "teacher",
        RunConfig(
            model=model_config(vocab),
            train=train_config(
                shards, out / _run_dir("teacher"), seed, minutes=train_minutes * TEACHER_SHARE, hybrid=True
            ),
        ),
    )
    steps = max(int(teacher.results["steps"] * STUDENT_STEPS_PER_TEACHER_STEP), 20)
    console.print(f"[bold]2/3[/] student distilled from the teacher (causal LM + forward KL), {steps} steps")
    distilled = train_stage(
        "distilled student",
        RunConfig(
            model=model_config(vocab, student=True),
            train=train_config(shards, out / _run_dir("distilled student"), seed, steps=steps),
            distill=DistillConfig(teacher=teacher.results["checkpoint"], alpha=0.3, temperature=1.0),
        ),
    )
    console.print(f"[bold]3/3[/] the same student from scratch: the same {steps} steps and batches")
    scratch = train_stage(
        "scratch student",
        RunConfig(
            model=model_config(vocab, student=True),
            train=train_config(shards, out / _run_dir("scratch student"), seed, steps=steps),
        ),
    )
    models = [teacher, distilled, scratch]
    for m in models:
        m.results.update(score(m.results["checkpoint"], shards, held_out))
    notes = verdicts(teacher, distilled, scratch)
    texts = samples(teacher.results["checkpoint"], seed)
    console.print(comparison_table(models), width=max(console.width, 130))
    for line in notes:
        console.print(f"  {line}")
    for t in texts:
        console.print(f"  [italic]{t}[/]")
    report = write_report(out, data_stage, models, texts, notes)
    console.print(f"report: {report}")
    return {"data": data_stage.results, **{m.name: m.results for m in models}, "verdicts": notes}
