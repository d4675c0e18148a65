"""Translation with a prefix LM: ``<bos> source <sep> target <eos>``, scored by BLEU and chrF.

One byte-level BPE tokenizer is trained on both languages' training text (or the model's own is
used). Fine-tuning reuses `flashlm.training.finetune`; decoding is greedy (`greedy_decode`) or the batched
beam search of `flashlm.generation` (`beam_search`). Outputs are decoded back to plain text, so sacrebleu
sees detokenised hypotheses and the raw references. Importing this module registers the `translate`
report section (`markdown`).
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashlm.errors import DataError
from flashlm.evaluate.metrics import bleu, chrf
from flashlm.evaluate.results import SECTIONS, table
from flashlm.generation import beam_search, greedy_decode, length_batches
from flashlm.model.transformer import FlashLM
from flashlm.tasks.translate_config import DEFAULT_MODEL, TranslateConfig
from flashlm.training.finetune import (
    finetune,
    make_example,
    new_model,
    prompt_ids,
)


# ---- data ---------------------------------------------------------------------------------------
def read_lines(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Lines of a text file (gzip when the name ends in .gz), without their newlines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit is not None else lines


def read_pairs(src: str | os.PathLike, tgt: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """Line-aligned (source, target) pairs; the files must have as many lines."""
    sources, targets = read_lines(src, limit), read_lines(tgt, limit)
    if len(sources) != len(targets):
        raise DataError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; they must align")
    return list(zip(sources, targets, strict=True))


# ---- translation --------------------------------------------------------------------------------
def translate(
    model: FlashLM,
    tokenizer: Any,
    sources: Sequence[str],
    beam: int = 1,
    max_new_tokens: int = 80,
    batch_size: int = 64,
    length_penalty: float = 1.0,
) -> list[str]:
    """Translations of ``sources`` (greedy when ``beam`` is 1), batched shortest first."""
    model.eval()
    prompts = [prompt_ids(tokenizer, s, max(model.cfg.max_seq_len - max_new_tokens - 2, 1)) for s in sources]
    eos, pad = tokenizer.eos_id, tokenizer.pad_id or 0
    if beam == 1:
        outputs = greedy_decode(model, prompts, max_new_tokens, eos, pad, batch_size)
    else:
        outputs = [[] for _ in prompts]
        for rows in length_batches(prompts, max(batch_size // beam, 1)):
            found = beam_search(model, [prompts[i] for i in rows], beam, max_new_tokens, eos, pad, length_penalty)
            for i, out in zip(rows, found, strict=True):
                outputs[i] = out
    return [tokenizer.decode(out).strip() for out in outputs]


def run_translation(
    train_src: str | os.PathLike,
    train_tgt: str | os.PathLike,
    eval_src: str | os.PathLike,
    eval_tgt: str | os.PathLike,
    cfg: TranslateConfig,
    model: FlashLM | None = None,
    tokenizer: Any = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune on the training pairs, translate the evaluation sources, score BLEU and chrF
    (``save_dir`` keeps the fine-tuned model and tokenizer)."""
    began = time.perf_counter()
    train = read_pairs(train_src, train_tgt, cfg.train_limit)
    test = read_pairs(eval_src, eval_tgt, cfg.eval_limit)
    if model is None:
        texts = (text for pair in train for text in pair)
        model, tokenizer = new_model(texts, cfg.model, cfg.vocab_size, cfg.finetune.seed, cfg.device)
    max_len = model.cfg.max_seq_len
    examples = [make_example(tokenizer, s, t, max_len) for s, t in train]
    summary = finetune(model, examples, cfg.finetune)
    if save_dir is not None:
        model.save_pretrained(save_dir, tokenizer)
    decode_start = time.perf_counter()
    hyps = translate(
        model,
        tokenizer,
        [s for s, _ in test],
        cfg.beam,
        cfg.max_new_tokens,
        cfg.eval_batch_size,
        cfg.length_penalty,
    )
    refs = [t for _, t in test]
    return {
        "bleu": bleu(hyps, refs),
        "chrf": chrf(hyps, refs),
        "beam": cfg.beam,
        "train_pairs": len(train),
        "eval_pairs": len(test),
        "train_seconds": summary["seconds"],
        "decode_seconds": time.perf_counter() - decode_start,
        "total_seconds": time.perf_counter() - began,
        "parameters": model.num_parameters(),
        "model_config": model.cfg.to_dict(),
        "train": {k: v for k, v in summary.items() if k != "history"},
        "loss_history": summary["history"],
        "samples": [
            {"source": s, "reference": r, "hypothesis": h} for (s, r), h in zip(test[:5], hyps[:5], strict=False)
        ],
    }


def markdown(results: dict[str, Any]) -> str:
    """The report section: BLEU, chrF and time."""
    keys = ("bleu", "chrf", "beam", "train_pairs", "eval_pairs", "train_seconds", "total_seconds")
    return table(keys, [[results.get(k) for k in keys]])


def _register() -> None:
    SECTIONS.setdefault("translate", markdown)


_register()

__all__ = [
    "DEFAULT_MODEL",
    "TranslateConfig",
    "markdown",
    "read_lines",
    "read_pairs",
    "run_translation",
    "translate",
]
