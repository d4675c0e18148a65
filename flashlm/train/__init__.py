"""Training: objectives, checkpoints and the loop.

`flashlm.train(cfg)` calls `flashlm.train.loop.train`: this package is callable, so the name works
whether ``flashlm.train`` resolves to the package (once any submodule is imported) or not.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def train(cfg: Any, callback: Any = None, objective: Any = None) -> dict[str, Any]:
    """Run `flashlm.train.loop.train` (imported lazily: torch loads only when training)."""
    from flashlm.train.loop import train as run

    return run(cfg, callback, objective)


class _CallableModule(types.ModuleType):
    def __call__(self, cfg: Any, callback: Any = None, objective: Any = None) -> dict[str, Any]:
        return train(cfg, callback, objective)


sys.modules[__name__].__class__ = _CallableModule
