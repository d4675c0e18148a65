"""FlashLM: compact, efficient transformer language models."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """Lazy top-level API: ``flashlm.train(cfg)`` imports the training code only when used."""
    if name == "train":
        import importlib

        return importlib.import_module("flashlm.train")  # a callable package: flashlm.train(cfg)
    raise AttributeError(f"module 'flashlm' has no attribute {name!r}")
