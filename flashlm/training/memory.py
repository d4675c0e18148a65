"""A memory plan per GPU for training a config: what the loop keeps resident, estimated from the config.

The loop trains fp32 master weights with AdamW (two fp32 moments) under bf16 autocast on CUDA. Per GPU:

- **weights, gradients, AdamW moments**: 4 + 4 + 8 bytes a parameter; FSDP2 shards all three over the
  GPUs, DDP keeps them whole on every GPU;
- **FSDP working set**: one block's full weights gathered for its forward, the next one prefetched,
  and one block's full gradients before their reduce-scatter (fp32);
- **activations**: what backward needs of every block, per token: bf16 copies of the block's
  normalised inputs, q/k/v, attention output and the MLP's gate, up and product, and the fp32
  residual stream (flash attention keeps no T×T scores). With activation checkpointing a block keeps
  only its fp32 input, and one block at a time is recomputed;
- **logits**: bf16 logits, their fp32 copy for the loss and its gradient (vocabulary × tokens).

These are estimates (allocator fragmentation, CUDA context, communication buffers and temporaries
come on top; keep ~10-15% headroom). `flashlm plan` prints them.
"""

from __future__ import annotations

import math
from typing import Any

from flashlm.config import ModelConfig, count_parameters, layer_parameters
from flashlm.errors import ConfigError

GIB = 1024**3
BYTES_PER_PARAM = {"weights": 4, "gradients": 4, "optimizer": 8}  # fp32 master, fp32 grads, AdamW m and v


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes one block saves for backward per token without checkpointing (bf16 autocast)."""
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    bf16 = 2 * (d + q + 2 * kv + q + d + 3 * f + f)  # norm out, q, k, v, attn out, mlp in, gate/up/act, product
    fp32 = 4 * 4 * d  # residual stream and the RMSNorm inputs (norms run in fp32)
    return bf16 + fp32


def memory_plan(
    cfg: ModelConfig,
    gpus: int = 1,
    batch_size: int = 1,
    seq_len: int | None = None,
    strategy: str = "fsdp",
    activation_checkpointing: bool = False,
) -> dict[str, Any]:
    """Estimated bytes per GPU of training `cfg` with `batch_size` sequences of `seq_len` per GPU."""
    if strategy not in ("fsdp", "ddp"):
        raise ConfigError(f"strategy: must be fsdp or ddp, got {strategy!r}")
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    for key, value in (("gpus", gpus), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    n = count_parameters(cfg)
    share = gpus if strategy == "fsdp" else 1
    parts = {name: math.ceil(n * size / share) for name, size in BYTES_PER_PARAM.items()}
    parts["fsdp_working_set"] = (2 * 4 + 4) * layer_parameters(cfg) if strategy == "fsdp" and gpus > 1 else 0
    tokens = batch_size * seq_len
    per_layer = activation_bytes_per_token(cfg)
    if activation_checkpointing:
        parts["activations"] = tokens * (4 * cfg.d_model * cfg.n_layers + per_layer)
    else:
        parts["activations"] = tokens * per_layer * cfg.n_layers
    parts["logits"] = tokens * cfg.vocab_size * (2 + 4 + 4)
    total = sum(parts.values())
    return {
        "parameters": n,
        "gpus": gpus,
        "strategy": strategy,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "activation_checkpointing": activation_checkpointing,
        "bytes": parts,
        "total_bytes": total,
        "total_gib": total / GIB,
    }


def format_plan(plan: dict[str, Any], gpu_memory_gib: float | None = None) -> str:
    """The plan as a few aligned lines (GiB), with whether it fits in `gpu_memory_gib`."""
    head = (
        f"{plan['parameters']:,} parameters, {plan['strategy']} on {plan['gpus']} GPU(s), "
        f"{plan['batch_size']} x {plan['seq_len']} tokens per GPU"
        f"{', activation checkpointing' if plan['activation_checkpointing'] else ''}"
    )
    lines = [head] + [f"  {name:<18} {value / GIB:9.2f} GiB" for name, value in plan["bytes"].items()]
    lines.append(f"  {'total per GPU':<18} {plan['total_gib']:9.2f} GiB")
    if gpu_memory_gib is not None:
        fits = plan["total_gib"] <= 0.9 * gpu_memory_gib
        lines.append(
            f"  {'fits in ' + format(gpu_memory_gib, 'g') + ' GiB':<18} {'yes' if fits else 'no'} (with 10% headroom)"
        )
    return "\n".join(lines)
