"""How much next-sentence signal do TinyStories pairs carry for simple statistics?

Builds the pairs `flashlm.data.batches.nsp_pairs` makes for training (the data of the hybrid NSP
test: the first 1,500 stories of the --stories file, byte-level BPE of 512 tokens, 5% held out), and
fits logistic regressions on two kinds of features:

- lexical overlap: for several token-frequency cut-offs, the share of B's tokens rarer than the
  cut-off that also occur in A, plus both segment lengths (shared names and objects);
- the junction: how well A's last token predicts B's first under the training split's bigram counts
  (log-probability and pointwise mutual information; a pair is cut at a random token, so a true B
  often finishes A's word or sentence).

Their held-out accuracies are what each cue is worth, to set against the model's NSP accuracy.
No neural network is trained; it runs on one core. Results go to bench/results/nsp_ceiling.json.

    .venv/bin/python bench/nsp_ceiling.py [--stories FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
from shared_data import SHARED_DATA, require

REPO = Path(__file__).resolve().parents[1]
STORIES = SHARED_DATA / "tinystories" / "tinystories_train_head.txt"
RESULTS = REPO / "bench" / "results" / "nsp_ceiling.json"
CUTOFFS = (1e-3, 3e-3, 1e-2, 1.0)  # token frequency in the training split
SEQ_LEN, DOCS, VOCAB = 128, 1500, 512


def build(directory: Path, stories: Path):
    from flashlm.data.shards import prepare_shards
    from flashlm.evaluate.masked import open_split
    from flashlm.tokenizer import Tokenizer

    with open(stories, encoding="utf-8") as f:
        docs = [line.strip() for line in itertools.islice(f, DOCS) if line.strip()]
    tok = Tokenizer.train(iter(docs), vocab_size=VOCAB, show_progress=False)
    tok.save(directory)
    prepare_shards(iter(docs), tok, directory, val_fraction=0.05, workers=1, progress=False)
    return tok, open_split(directory, tok, "train"), open_split(directory, tok, "val")


def pairs(stream, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from flashlm.data.batches import nsp_pairs

    batch = nsp_pairs(stream, SEQ_LEN, [np.random.default_rng([seed, i]) for i in range(n)])
    return batch.input_ids.numpy(), batch.extras["nsp_labels"].numpy()


def sep_index(row: np.ndarray, sep: int) -> int:
    """Position of the pair's `<sep>`."""
    return int(np.flatnonzero(row == sep)[0])


def features(rows: np.ndarray, freq: np.ndarray, sep: int, first_ordinary: int) -> np.ndarray:
    """Per pair: for each cut-off, the share of B's rarer tokens found in A (0.5 if B has none); lengths."""
    out = []
    for row in rows:
        cut = sep_index(row, sep)
        a = set(row[1:cut].tolist())
        b = [t for t in row[cut + 1 :].tolist() if t >= first_ordinary]
        shares = []
        for limit in CUTOFFS:
            rare = [t in a for t in b if freq[t] < limit]
            shares.append(float(np.mean(rare)) if rare else 0.5)
        out.append(shares + [len(a), len(b)])
    return np.asarray(out, dtype=np.float64)


def junction(rows: np.ndarray, bigrams: np.ndarray, freq: np.ndarray, sep: int) -> np.ndarray:
    """Per pair: log P(B's first token | A's last) (add-0.1 bigram counts) and its PMI."""
    out = []
    for row in rows:
        cut = sep_index(row, sep)
        last, first = row[cut - 1], row[cut + 1]
        logp = np.log((bigrams[last, first] + 0.1) / (bigrams[last].sum() + 0.1 * len(freq)))
        out.append([logp, logp - np.log(freq[first] + 1e-9)])
    return np.asarray(out, dtype=np.float64)


def fit_and_score(f: np.ndarray, y: np.ndarray, fv: np.ndarray, yv: np.ndarray) -> dict[str, float]:
    """Train and held-out accuracy of a logistic regression on standardised features."""
    mean, std = f.mean(0), f.std(0) + 1e-9
    design = lambda m: np.c_[(m - mean) / std, np.ones(len(m))]
    w = logistic_regression(design(f), y)
    accuracy = lambda m, labels: float(((design(m) @ w > 0) == labels).mean())
    return {"train_accuracy": accuracy(f, y), "heldout_accuracy": accuracy(fv, yv)}


def logistic_regression(x: np.ndarray, y: np.ndarray, steps: int = 3000, lr: float = 0.1) -> np.ndarray:
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        w -= lr * x.T @ (p - y) / len(y)
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stories",
        type=Path,
        default=STORIES,
        metavar="FILE",
        help="TinyStories text, one story a line (default: ../shared/data/tinystories/tinystories_train_head.txt)",
    )
    args = parser.parse_args()
    require("nsp_ceiling.py", [args.stories], "TinyStories", "--stories FILE")
    with tempfile.TemporaryDirectory(prefix="flashlm-nsp-ceiling-") as tmp:
        tok, train, val = build(Path(tmp), args.stories)
        x, y = pairs(train, 4000, 0)
        xv, yv = pairs(val, 2000, 1)
        ids = np.asarray(train.tokens, dtype=np.int64)
    counts = np.bincount(ids, minlength=tok.vocab_size)
    freq = counts / counts.sum()
    bigrams = np.zeros((tok.vocab_size, tok.vocab_size))
    np.add.at(bigrams, (ids[:-1], ids[1:]), 1)
    sep, first_ordinary = tok.sep_id, max(tok.special_ids) + 1
    f, fv = features(x, freq, sep, first_ordinary), features(xv, freq, sep, first_ordinary)
    j, jv = junction(x, bigrams, freq, sep), junction(xv, bigrams, freq, sep)
    overlap = fit_and_score(f, y, fv, yv)
    report = {
        "benchmark": "nsp_ceiling",
        "command": "python bench/nsp_ceiling.py",
        "data": {
            "stories": DOCS,
            "vocab_size": VOCAB,
            "seq_len": SEQ_LEN,
            "train_pairs": len(y),
            "val_pairs": len(yv),
            "val_positive_share": float(yv.mean()),
        },
        "features": [f"share of B tokens with frequency < {c:g} found in A" for c in CUTOFFS]
        + ["tokens in A (distinct)", "tokens in B"],
        **overlap,
        "junction_features": [
            "log P(first token of B | last token of A), bigram counts of the training split",
            "its pointwise mutual information",
        ],
        "junction": fit_and_score(j, y, jv, yv),
        "overlap_and_junction": fit_and_score(np.c_[f, j], y, np.c_[fv, jv], yv),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("heldout_accuracy", "junction", "overlap_and_junction")}))


if __name__ == "__main__":
    main()
