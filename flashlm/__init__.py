"""FlashLM: compact, efficient transformer language models.

The public API, imported lazily so that ``import flashlm`` stays cheap (torch loads on first use)::

    from flashlm import FlashLM, ModelConfig, Tokenizer, generate, train

- ``ModelConfig`` / ``RunConfig``: the typed configuration (``flashlm.config``).
- ``FlashLM``: the model (``flashlm.model``); ``FlashLM.from_pretrained(folder)`` reads a checkpoint.
- ``Tokenizer``: byte-level BPE with FlashLM's special tokens; ``Tokenizer.load(path)``.
- ``generate(model, tokenizer, prompts, sampling)`` with ``Sampling`` (``flashlm.generation``).
- ``train(run_config)``: the training loop (``flashlm.training``).
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "FlashLM": "flashlm.model.transformer",
    "ModelConfig": "flashlm.config",
    "RunConfig": "flashlm.config",
    "Tokenizer": "flashlm.tokenizer",
    "Sampling": "flashlm.generation",
    "generate": "flashlm.generation",
    "train": "flashlm.training",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'flashlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
