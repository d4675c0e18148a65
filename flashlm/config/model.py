"""`ModelConfig`, the named presets (up to 7.5B) and parameter counts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from flashlm.config.fields import as_mapping, check_keys, coerce_fields
from flashlm.errors import ConfigError

FLAVOURS = ("gemma", "llama")


@dataclass
class ModelConfig:
    """Shape and flavour of a FlashLM transformer.

    `layer_pattern` is tiled over the layers: "L" a local (sliding-window) layer, "G" a global one.
    "LLLLLG" is Gemma 3's 5 local : 1 global; "G" makes every layer global.
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int | None = None  # MLP hidden width; default 4 * d_model
    flavour: str = "gemma"
    layer_pattern: str = "LLLLLG"
    sliding_window: int = 128
    rope_base_local: float = 10_000.0
    rope_base_global: float = 1_000_000.0
    qk_norm: bool | None = None  # default: True for gemma, False for llama
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; default head_dim
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tie_embeddings: bool = True
    max_seq_len: int = 512
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dropout: float = 0.0  # on the embeddings and every residual branch, in training mode only

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.d_model, int) and isinstance(self.n_heads, int):
            self.head_dim = self.d_model // self.n_heads if self.n_heads > 0 else 0
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model
        if self.qk_norm is None:
            self.qk_norm = self.flavour == "gemma"
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = float(self.head_dim or 1)
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        """Per layer: "local" or "global"."""
        pat = self.layer_pattern
        return ["global" if pat[i % len(pat)] == "G" else "local" for i in range(self.n_layers)]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.flavour == "gemma" else 1.0

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for key in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "sliding_window",
            "max_seq_len",
        ):
            value = getattr(self, key)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                key,
                f"must be a positive integer, got {value!r}",
            )
        need(self.flavour in FLAVOURS, "flavour", f"must be one of {', '.join(FLAVOURS)}, got {self.flavour!r}")
        need(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"{self.d_model} is not divisible by n_heads={self.n_heads}; pick a multiple of n_heads",
        )
        need(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"{self.n_kv_heads} does not divide n_heads={self.n_heads}; use a divisor of n_heads",
        )
        need(
            isinstance(self.layer_pattern, str)
            and len(self.layer_pattern) > 0
            and set(self.layer_pattern) <= {"L", "G"},
            "layer_pattern",
            f"must be a non-empty string of 'L' (local) and 'G' (global), got {self.layer_pattern!r}",
        )
        if "local" in self.layer_types:
            need(
                self.sliding_window <= self.max_seq_len,
                "sliding_window",
                f"{self.sliding_window} is larger than the context max_seq_len={self.max_seq_len}; "
                "lower it or make every layer global (layer_pattern: G)",
            )
        need(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        for key in ("attn_softcap", "final_softcap"):
            value = getattr(self, key)
            need(value is None or value > 0, key, f"must be positive or null, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "model") -> ModelConfig:
        data = dict(as_mapping(data, prefix, "{preset: tiny, max_seq_len: 512}"))
        preset = data.pop("preset", None)
        if preset is not None:
            get_preset(preset)  # validates the name
        base = dict(PRESETS[preset]) if preset else {}
        check_keys(cls, data, prefix)
        base.update(coerce_fields(cls, data, prefix))
        return cls(**base)


# ---- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # tests: well under 1M parameters
    "nano": dict(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        layer_pattern="LG",
        sliding_window=16,
        max_seq_len=128,
    ),
    # CPU sizes
    "micro": dict(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=384,
        layer_pattern="LLLG",
        sliding_window=64,
        max_seq_len=256,
    ),
    "tiny": dict(
        vocab_size=4096,
        d_model=256,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        d_ff=640,
        layer_pattern="LLLLLG",
        sliding_window=128,
        max_seq_len=512,
    ),  # ~5M
    "small": dict(
        vocab_size=8192,
        d_model=384,
        n_layers=8,
        n_heads=6,
        n_kv_heads=2,
        d_ff=1536,
        layer_pattern="LLLLLG",
        sliding_window=256,
        max_seq_len=1024,
    ),  # ~20M
    # GPU sizes
    "base": dict(
        vocab_size=32768,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        d_ff=3072,
        layer_pattern="LLLLLG",
        sliding_window=512,
        max_seq_len=2048,
    ),
    "1b": dict(
        vocab_size=65536,
        d_model=2048,
        n_layers=20,
        n_heads=16,
        n_kv_heads=4,
        d_ff=8192,
        layer_pattern="LLLLLG",
        sliding_window=512,
        max_seq_len=8192,
    ),
    # Llama-3-8B widths with a tied 128k vocabulary: ≈7.5B parameters
    "7.5b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        layer_pattern="LLLLLG",
        sliding_window=1024,
        max_seq_len=8192,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block of `FlashLM(cfg)`."""
    d, h = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * h + 2 * d * cfg.n_kv_heads * h + cfg.n_heads * h * d
    mlp = 3 * d * cfg.d_ff
    norms = (4 if cfg.flavour == "gemma" else 2) * d + (2 * h if cfg.qk_norm else 0)
    return attn + mlp + norms


def count_parameters(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameters of `FlashLM(cfg)`, computed from the config alone (the LM head included; task heads
    such as NSP live outside the base model)."""
    d = cfg.d_model
    total = cfg.n_layers * layer_parameters(cfg) + d
    if include_embedding:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return total


def replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    """A copy of `cfg` with some fields changed (and validated)."""
    return dataclasses.replace(cfg, **changes)
