"""`TranslateConfig` and its `DEFAULT_MODEL`: the settings of `flashlm.tasks.translate.run_translation`,
in a module without torch so the CLI can read its defaults cheaply (`flashlm.tasks.translate` re-exports
them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flashlm.config import ModelConfig
from flashlm.training.finetune_config import FinetuneConfig

DEFAULT_MODEL = ModelConfig(
    vocab_size=8192,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    d_ff=768,
    layer_pattern="G",
    max_seq_len=160,
)


@dataclass
class TranslateConfig:
    """Model, training and decoding settings of `run_translation`."""

    vocab_size: int = 8000
    model: ModelConfig | str = field(default_factory=lambda: DEFAULT_MODEL)
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(
            epochs=10, batch_size=64, lr=2e-3, warmup_steps=200, bucket=32, label_smoothing=0.1
        )
    )
    beam: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 80
    eval_batch_size: int = 64
    train_limit: int | None = None
    eval_limit: int | None = None
    device: str = "cpu"  # where a fresh model is built


__all__ = ["DEFAULT_MODEL", "TranslateConfig"]
