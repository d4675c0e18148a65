"""`LongRangeConfig` (and `resolve_pattern`): the settings of `flashlm.tasks.longrange.run_longrange`, in a
module without torch so the CLI can read its defaults cheaply (`flashlm.tasks.longrange` re-exports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashlm.config import ModelConfig
from flashlm.errors import ConfigError
from flashlm.training.finetune_config import FinetuneConfig


@dataclass
class LongRangeConfig:
    """Models, data and budgets of `run_longrange`: per layer pattern, one passkey and one MQAR model.

    The first pattern is the default local/global layout (Gemma's 5:1 "LLLLLG" needs 6 layers; these
    models have 2, so "LG": a local layer, then a global one), compared with all-global "G". What makes
    the local/global models learn fast and extrapolate (figures in docs/benchmarks.md, the attempts that
    led here in docs/notes/longrange.md):

    - a very small window (4): a local layer can then only look at the last few tokens, so the
      previous-token step of an induction head is nearly free to learn, and it behaves identically at
      any length; with a window of 32 (or all-global layers) MQAR stays on its plateau far longer;
    - global layers with an effectively infinite RoPE base (1e30: every rotary frequency but the first
      turns by < 0.2 rad over 1k tokens, i.e. almost NoPE, as Llama 4's iRoPE global layers): content
      lookup then does not depend on distance, so passkey and MQAR hold up well beyond the training
      length, where the model default base 1e6 loses needles outside the distances it was trained on;
    - init_std 0.1 instead of 0.02: the plateau before induction forms is much shorter;
    - training rows of varied lengths up to `train_len`, needle at a uniform depth.

    Training stops at `steps` or when the run's share of `minutes` is spent, whichever comes first.
    """

    patterns: tuple[str, ...] = ("LG", "G")
    n_layers: int = 2  # 3 ("LLG") learns passkey as well but stays on the MQAR plateau far longer
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    sliding_window: int = 4
    rope_base_global: float = 1e30
    init_std: float = 0.1
    # passkey: PasskeyVocab, trained on lengths uniform in [min_train_len, train_len]
    train_len: int = 256
    min_train_len: int = 48
    passkey_steps: int = 600
    digits: int = 5
    length_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 10
    # MQAR: trained on `mqar_train_lengths` with up to length/8 pairs
    mqar_vocab: int = 128  # keys 1-63, values 64-127 (Zoology uses 8192; larger ones learn too slowly here)
    mqar_train_lengths: tuple[int, ...] = (64, 128, 256)
    mqar_pairs_ratio: float = 1 / 8
    mqar_steps: int = 600
    mqar_settings: tuple[tuple[int, int], ...] = ((256, 16), (512, 32))
    mqar_samples: int = 32
    # optimisation
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    minutes: float | None = 12.0  # total training budget, shared evenly by the runs (None: steps only)
    kv_contexts: tuple[int, ...] = (2048, 8192, 32768)
    seed: int = 0
    progress: bool = False
    # torch CPU threads while training/scoring (restored after): these models are too small to gain
    # from more, and extra threads contend with other work on small machines; None keeps the setting
    threads: int | None = 1

    @classmethod
    def from_names(cls, names: Sequence[str], **changes: Any) -> LongRangeConfig:
        """A config whose patterns are given by name ("default", "global" or L/G strings)."""
        layers = changes.get("n_layers", cls.n_layers)
        return cls(patterns=tuple(resolve_pattern(n, layers) for n in names if n.strip()), **changes)

    @classmethod
    def from_options(cls, patterns: str, steps: int | None = None, **changes: Any) -> LongRangeConfig:
        """The config of `flashlm eval longrange`: comma-separated pattern names, `steps` for both the
        passkey and the MQAR models, and the settings in `changes` that are not None (None: the default)."""
        given = {k: v for k, v in changes.items() if v is not None}
        if steps is not None:
            given.update(passkey_steps=steps, mqar_steps=steps)
        return cls.from_names(patterns.split(","), **given)

    @property
    def passkey_lengths(self) -> list[int]:
        """Scored lengths: the multiples of the training length not shorter than `min_train_len`."""
        lengths = (int(round(m * self.train_len)) for m in self.length_multiples)
        return sorted({n for n in lengths if n >= self.min_train_len})

    def __post_init__(self) -> None:
        if not 0 < self.min_train_len <= self.train_len:
            raise ConfigError(
                f"longrange: min_train_len {self.min_train_len} must be in [1, train_len={self.train_len}]"
            )

    def model_config(self, pattern: str, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_ff=2 * self.d_model,
            layer_pattern=pattern,
            sliding_window=self.sliding_window,
            rope_base_global=self.rope_base_global,
            init_std=self.init_std,
            max_seq_len=max(self.passkey_lengths + [s for s, _ in self.mqar_settings] + [self.sliding_window]),
        )

    def finetune_config(self, steps: int, runs: int) -> Any:
        return FinetuneConfig(
            epochs=1.0,
            max_steps=steps,
            max_minutes=self.minutes / runs if self.minutes else None,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=0.0,
            bucket=8,
            seed=self.seed,
            log_every=25,
            progress=self.progress,
        )


def resolve_pattern(name: str, n_layers: int) -> str:
    """ "default": the local/global layout for `n_layers` (Gemma's "LLLLLG" when 6 divides the depth, else
    local layers then one global, e.g. "LLG"); "global": "G"; anything else is taken as a pattern."""
    name = name.strip()
    if name == "default":
        return "LLLLLG" if n_layers % 6 == 0 else "L" * (n_layers - 1) + "G"
    if name == "global":
        return "G"
    if not name or set(name) - {"L", "G"}:
        raise ConfigError(f"layer pattern {name!r}: use 'default', 'global' or a string of L and G")
    return name


__all__ = ["LongRangeConfig", "resolve_pattern"]
