"""How well a model's own causal LM tells a true NSP continuation from a random one.

For held-out ``<bos> A <sep> B`` pairs, two causal passes give, per token of B, how much A raises its
log-probability (log p(B_k | A, B_<k) − log p(B_k | B_<k)). A logistic regression fitted on training
pairs reads these features (B's first token, the first four, the mean, the sum, the lengths) and is
scored on held-out pairs, so it tells whether a model's causal LM already separates true pairs from
random ones, whatever its NSP head does. It reads a checkpoint and the shards it trained on (no
public corpus); the figures that motivated `flashlm.model.heads.junction_evidence` are in docs/notes/nsp.md.

    .venv/bin/python bench/nsp_evidence.py RUN/checkpoints SHARDS_DIR
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from flashlm.data.batches import nsp_pairs
from flashlm.evaluate.masked import open_split
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import BOS_ID, EOS_ID, PAD_ID
from flashlm.training.checkpoint import latest_checkpoint

FEATURES = {"first": [0], "first4": [1], "mean": [2], "sum": [3], "all": [0, 1, 2, 3, 4, 5]}


def token_logprobs(model: FlashLM, seqs: list[list[int]]) -> list[np.ndarray]:
    """Causal log-probability of every token of each sequence after its first."""
    ids = torch.full((len(seqs), max(map(len, seqs))), PAD_ID)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        logp = model(ids, mode="causal").logits.float().log_softmax(-1)
    return [
        logp[i, : len(s) - 1].gather(1, torch.tensor(s[1:])[:, None]).squeeze(1).numpy() for i, s in enumerate(seqs)
    ]


def features(model: FlashLM, shards: str, split: str, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    stream = open_split(shards, None, split)
    rows, labels = [], []
    for first in range(0, pairs, 32):
        rngs = [np.random.default_rng([seed, 1, i]) for i in range(first, min(first + 32, pairs))]
        batch = nsp_pairs(stream, 128, rngs)
        with_a, alone, sizes = [], [], []
        for row, sep in zip(batch.extras["pair_ids"].tolist(), batch.extras["sep_pos"].tolist(), strict=True):
            end = next((k for k in range(sep + 1, len(row)) if row[k] in (EOS_ID, PAD_ID)), len(row))
            a, b = row[1:sep], row[sep + 1 : end]
            with_a.append([BOS_ID, *a, *b])
            alone.append([BOS_ID, *b])
            sizes.append((len(a), len(b)))
        for lw, la, (na, nb) in zip(token_logprobs(model, with_a), token_logprobs(model, alone), sizes, strict=True):
            gain = lw[na:] - la
            rows.append([gain[0], gain[:4].mean(), gain.mean(), gain.sum() / 10, np.log(na + 1), np.log(nb + 1)])
        labels += batch.extras["nsp_labels"].tolist()
    return np.array(rows), np.array(labels)


def logistic_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Train and held-out accuracy of a logistic regression (standardised features, gradient descent)."""
    (x, y), (xt, yt) = train, test
    mu, sd = x.mean(0), x.std(0) + 1e-6
    design = lambda m: np.c_[(m - mu) / sd, np.ones(len(m))]  # noqa: E731
    a, b, w = design(x), design(xt), np.zeros(x.shape[1] + 1)
    for _ in range(3000):
        w -= 0.1 * a.T @ (1 / (1 + np.exp(-a @ w)) - y) / len(y)
    return float(((a @ w > 0) == y).mean()), float(((b @ w > 0) == yt).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", help="a run's checkpoints directory (the latest is read)")
    parser.add_argument("shards", help="the token shards it trained on (train and val splits)")
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs; held out: half as many")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = FlashLM.from_pretrained(latest_checkpoint(args.checkpoints)).eval()
    train = features(model, args.shards, "train", args.pairs, 5)
    test = features(model, args.shards, "val", args.pairs // 2, 0)
    scores = {}
    for name, cols in FEATURES.items():
        fit, held_out = logistic_accuracy((train[0][:, cols], train[1]), (test[0][:, cols], test[1]))
        scores[name] = {"train": round(fit, 4), "held_out": round(held_out, 4)}
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
