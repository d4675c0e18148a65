"""Efficiency: parameters, FLOPs per token, prefill/decode throughput, latency, peak memory, KV-cache size.

FLOPs per token come from `flashlm.model.flops` (its docstring gives the formula).

Timings come from `generate_tokens` (greedy, KV cache, no early stop): time to first token = prefill
plus the first pick; decode latency = the time between consecutive tokens.

KV-cache size by layer pattern (`kv_cache_comparison`): keys and values of every layer, local layers
holding at most their window, per context length for the model's own pattern and for all-global.
"""

from __future__ import annotations

import platform
import resource
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flashlm.config import ModelConfig, replace
from flashlm.errors import ConfigError
from flashlm.generation import Sampling, generate_tokens
from flashlm.hardware import machine_info
from flashlm.model.cache import KVCache
from flashlm.model.flops import flops_per_token


# ---- memory -------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: peak RSS so far (kilobytes on Linux, bytes on macOS)
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory while the block runs: CUDA `max_memory_allocated`, or on CPU the process RSS sampled
    every `interval_s` by a thread (coarse; the allocator may reuse memory freed by earlier runs).

    `peak` is the absolute peak, `increase` the peak minus the level when the block began.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.01) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak = self.increase = self._base = 0
        self._stop = threading.Event()

    @property
    def measure(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "process RSS (sampled)"

    def _level(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _rss_bytes()

    def __enter__(self) -> PeakMemory:
        self._base = self.peak = self._level()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.increase = self.peak - self._base


# ---- KV-cache size by layer pattern --------------------------------------------------------------
def kv_cache_bytes(cfg: ModelConfig, context: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of keys and values for `context` tokens: local layers hold min(window, context) entries."""
    entries = sum(min(cfg.sliding_window, context) if kind == "local" else context for kind in cfg.layer_types)
    element = torch.empty((), dtype=dtype).element_size()
    return batch_size * entries * 2 * cfg.n_kv_heads * cfg.head_dim * element


def kv_cache_bytes_per_token(cfg: ModelConfig, context: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """KV-cache bytes per token of context (one sequence)."""
    return kv_cache_bytes(cfg, context, 1, dtype) / context


def kv_cache_comparison(
    cfg: ModelConfig,
    contexts: Sequence[int] = (2048, 8192, 32768),
    patterns: Sequence[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict[str, Any]]:
    """Bytes (total and per token) at each context for each layer pattern, the other dimensions kept.

    Default patterns: the model's own and all-global ("G"); Gemma's "LLLLLG" if the model has no local layer.
    """
    if patterns is None:
        patterns = (cfg.layer_pattern if "L" in cfg.layer_pattern else "LLLLLG", "G")
    rows = []
    for pattern in dict.fromkeys(patterns):
        variant = replace(cfg, layer_pattern=pattern, max_seq_len=max(cfg.max_seq_len, cfg.sliding_window))
        for context in contexts:
            total = kv_cache_bytes(variant, context, 1, dtype)
            rows.append({"pattern": pattern, "context": context, "bytes": total, "bytes_per_token": total / context})
    return rows


# ---- timing -------------------------------------------------------------------------------------
def _prompts(vocab_size: int, batch_size: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch_size, length), generator=gen)
    ids[:, 0] = 1  # <bos>
    return ids.tolist()


def _token_times(model: Any, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds from the start to each generated step (tokens reach the host, so CUDA is synchronised)."""
    sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    start, stamps = time.perf_counter(), []
    for _ in generate_tokens(model, prompts, sampling, eos_id=None):
        stamps.append(time.perf_counter() - start)
    return stamps


def measure_batch(model: Any, batch_size: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Throughput, latency and memory of greedy generation for one batch size."""
    device = next(model.parameters()).device
    prompts = _prompts(model.cfg.vocab_size, batch_size, prompt_len, seed)
    with PeakMemory(device) as memory:
        stamps = _token_times(model, prompts, new_tokens)
    gaps = np.diff(stamps)
    cache = KVCache(model.cfg, batch_size, prompt_len + new_tokens, "meta", next(model.parameters()).dtype)
    return {
        "batch_size": batch_size,
        "prefill_tokens_per_s": batch_size * prompt_len / stamps[0],
        "decode_tokens_per_s": batch_size * len(gaps) / float(gaps.sum()),
        "ttft_s": stamps[0],
        "latency_p50_s": float(np.percentile(gaps, 50)),
        "latency_p95_s": float(np.percentile(gaps, 95)),
        "peak_memory_bytes": memory.peak,
        "peak_memory_increase_bytes": memory.increase,
        "memory_measure": memory.measure,
        "kv_cache_bytes": cache.nbytes(),
    }


# ---- report -------------------------------------------------------------------------------------
def efficiency(
    model: Any,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 32,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Parameters, FLOPs per token, and generation speed/memory at each batch size (after a warm-up run).

    The model is moved to `device` when one is given; prompts are random ids, shortened if needed so
    prompt + new tokens fit the context.
    """
    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")
    cfg = model.cfg
    if new_tokens >= cfg.max_seq_len:
        raise ConfigError(f"new_tokens {new_tokens} leaves no room for a prompt in the context {cfg.max_seq_len}")
    prompt_len = max(1, min(prompt_len, cfg.max_seq_len - new_tokens))
    model = model.to(device).eval() if device is not None else model.eval()
    first = next(model.parameters())
    _token_times(model, _prompts(cfg.vocab_size, 1, prompt_len, seed), 2)  # warm-up
    total = model.num_parameters()
    return {
        "device": str(first.device),
        "dtype": str(first.dtype).replace("torch.", ""),
        "precision": "bf16" if first.dtype == torch.bfloat16 else "fp32",
        "machine": machine_info(),
        "parameters": {
            "total": total,
            "non_embedding": model.num_parameters(include_embedding=False),
            "embedding": total - model.num_parameters(include_embedding=False),
        },
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "flops_per_token": flops_per_token(cfg, prompt_len + new_tokens),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "runs": [measure_batch(model, b, prompt_len, new_tokens, seed) for b in batch_sizes],
        "kv_cache_comparison": kv_cache_comparison(cfg, dtype=first.dtype),
    }


__all__ = [
    "PeakMemory",
    "efficiency",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "kv_cache_comparison",
    "measure_batch",
]
