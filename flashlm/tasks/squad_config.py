"""`SquadConfig` and its `DEFAULT_MODEL`: the settings of `flashlm.tasks.squad.run_squad`, in a module
without torch so the CLI can read its defaults cheaply (`flashlm.tasks.squad` re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flashlm.config import ModelConfig
from flashlm.training.finetune_config import FinetuneConfig

DEFAULT_MODEL = ModelConfig(
    vocab_size=4096,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=384,
    layer_pattern="LLLG",
    sliding_window=64,
    max_seq_len=256,
)


@dataclass
class SquadConfig:
    """Windowing, decoding and training settings of `run_squad`."""

    max_len: int = 256
    doc_stride: int = 64
    max_question: int = 64
    max_answer_len: int = 30
    vocab_size: int = 4096
    model: ModelConfig | str = field(default_factory=lambda: DEFAULT_MODEL)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=2, batch_size=16, lr=1e-3))
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 32
    device: str = "cpu"  # where a fresh model is built


__all__ = ["DEFAULT_MODEL", "SquadConfig"]
