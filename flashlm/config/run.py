"""`RunConfig`, a whole recipe (model, train, distill), read from YAML with dotted `--set` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flashlm.config.fields import as_mapping, check_keys, coerce_fields
from flashlm.config.model import ModelConfig, get_preset
from flashlm.config.training import DistillConfig, TrainConfig
from flashlm.errors import ConfigError


# ---- a whole recipe -----------------------------------------------------------------------------
@dataclass
class RunConfig:
    """A whole recipe: what `configs/*.yaml` holds (`distill` only in distillation recipes)."""

    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len: {self.train.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; lower seq_len or raise max_seq_len"
            )
        if self.distill is not None:
            self.distill.validate()
            if not self.distill.teacher and not self.distill.cache:
                raise ConfigError(
                    "distill.teacher: not set; point it at a FlashLM checkpoint, a local "
                    "transformers model dir or a `flashlm distill cache` dir"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict(), "train": self.train.to_dict()}
        if self.distill is not None:
            out["distill"] = self.distill.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError("config: the top level must be a mapping with sections 'model' and 'train'")
        check_keys(cls, data, "config")
        model = ModelConfig.from_dict(data.get("model") or {})
        train_data = as_mapping(data.get("train"), "train", "{steps: 100, lr: 3e-3}")
        check_keys(TrainConfig, train_data, "train")
        train = TrainConfig(**coerce_fields(TrainConfig, train_data, "train"))
        distill = None if data.get("distill") is None else DistillConfig.from_dict(data["distill"])
        cfg = cls(model=model, train=train, distill=distill)
        cfg.validate()
        return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping with sections such as model: and train:, "
            f"not a {type(data).__name__} (see configs/)"
        )
    return data or {}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a config mapping.

    Keys may go deeper into nested settings: ``train.masking.rate=0.3`` changes one masking setting
    (the others keep their values), ``train.masking={rate: 0.3}`` replaces the whole mapping."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.n_layers=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must be section.name, e.g. train.lr=1e-3")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                what = "a section" if depth == 0 else "a mapping"
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not {what}")
            node[part] = child = dict(child)  # a copy: the caller's mapping stays as it was
            node = child
        node[parts[-1]] = value
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = load_yaml(path) if path else {}
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def save_yaml(cfg: RunConfig | ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
