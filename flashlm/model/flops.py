"""FLOPs per token of a FlashLM config (2 FLOPs per multiply-add; norms, softmax and RoPE ignored):

    forward   = 2·N + 4·H·h·Σ_layers c_l
    training  = 3 · forward                     (the backward pass costs about twice the forward)

N counts the weights of every matmul a token passes through: per layer d·H·h + 2·d·K·h + H·h·d (q, k, v,
o) + 3·d·f (gated MLP), plus the V·d LM head (counted even when tied to the embedding, whose lookup is
free). The attention term is QKᵀ and AV: 2·H·h FLOPs each per key, over c_l keys in layer l. Decoding
at context C: c_l = C on global layers, min(window, C) on local ones. Over a causal sequence of T
tokens (prefill, training) c_l is the mean over positions t = 1..T of min(window, t) (global: (T+1)/2).

The training loop reads model FLOPs utilisation from it (`flashlm.training.loop`), the efficiency
report its decode and prefill figures (`flashlm.evaluate.efficiency`).
"""

from __future__ import annotations

from flashlm.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights a token multiplies through: attention and MLP projections of every layer plus the LM head."""
    d, h = cfg.d_model, cfg.head_dim
    per_layer = d * cfg.n_heads * h + 2 * d * cfg.n_kv_heads * h + cfg.n_heads * h * d + 3 * d * cfg.d_ff
    return cfg.n_layers * per_layer + cfg.vocab_size * d


def mean_causal_keys(length: int, window: int | None) -> float:
    """Mean over positions t = 1..length of the keys a causal query sees: min(window, t)."""
    w = length if window is None else min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / length


def flops_per_token(cfg: ModelConfig, context: int, train_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one decoded token at `context`, of prefilling `context` tokens, and of training
    on sequences of `train_len` tokens (default: the model's max_seq_len)."""
    n = matmul_params(cfg)
    windows = [cfg.sliding_window if kind == "local" else None for kind in cfg.layer_types]
    per_key = 4 * cfg.n_heads * cfg.head_dim
    decode = sum(context if w is None else min(w, context) for w in windows)
    prefill = sum(mean_causal_keys(context, w) for w in windows)
    train = sum(mean_causal_keys(train_len or cfg.max_seq_len, w) for w in windows)
    return {
        "context": context,
        "matmul_params": n,
        "decode": 2 * n + per_key * decode,
        "prefill": 2 * n + per_key * prefill,
        "training": 3 * (2 * n + per_key * train),
    }


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs of one trained token (forward and backward) on sequences of `seq_len` tokens."""
    return flops_per_token(cfg, seq_len, seq_len)["training"]


__all__ = ["flops_per_token", "matmul_params", "mean_causal_keys", "training_flops_per_token"]
