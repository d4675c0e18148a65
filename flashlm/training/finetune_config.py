"""`FinetuneConfig`: the settings of a fine-tuning run (`flashlm.training.finetune`), in a module
without torch so the CLI can read its defaults without importing the library."""

from __future__ import annotations

from dataclasses import dataclass

from flashlm.errors import ConfigError


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run. The run stops at whichever budget ends first."""

    epochs: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    clock: str = "wall"  # what max_minutes counts: "wall" time or this process's "cpu" time (all threads)
    batch_size: int = 32
    lr: float = 1e-3  # AdamW's peak lr (with muon: of the parameters Muon does not step)
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    label_smoothing: float = 0.0  # prefix-LM loss only
    precision: str = "auto"  # auto (bf16 on CUDA and native-bf16 CPUs, else fp32; flashlm.hardware) | fp32 | bf16
    seed: int = 0
    bucket: int = 32  # sort by length inside groups of this many batches (0 or 1: plain shuffle)
    log_every: int = 20
    stop_loss: float | None = None  # stop early once `stop_windows` logged losses in a row are below it
    stop_windows: int = 5
    progress: bool = True

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad setting."""
        checks = [
            (self.batch_size > 0, "batch_size", "must be positive"),
            (self.lr > 0, "lr", "must be positive"),
            (self.optimizer in ("adamw", "muon"), "optimizer", "must be adamw or muon"),
            (self.muon_lr > 0, "muon_lr", "must be positive"),
            (0 <= self.muon_momentum < 1, "muon_momentum", "must be in [0, 1)"),
            (self.epochs > 0, "epochs", "must be positive"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be positive"),
            (self.max_steps is None or self.max_steps >= 0, "max_steps", "must be >= 0"),
            (self.clock in ("wall", "cpu"), "clock", "must be wall or cpu"),
            (self.stop_loss is None or self.stop_loss > 0, "stop_loss", "must be positive"),
            (self.stop_windows > 0, "stop_windows", "must be positive"),
            (self.precision in ("fp32", "bf16", "auto"), "precision", "must be fp32, bf16 or auto"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"finetune.{key}: {msg}, got {getattr(self, key)!r}")


__all__ = ["FinetuneConfig"]
