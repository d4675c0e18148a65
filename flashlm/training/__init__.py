"""Training: objectives, checkpoints and the loop.

`train(cfg)` (``from flashlm.training import train``) is the entry point: it picks the run's objective
(the distillation objective for a run with a ``distill:`` section, built by `flashlm.training.distill`)
and runs `flashlm.training.loop.train`, which takes an objective and never builds one around a teacher.
Imports are lazy: torch loads only when training.
"""

from __future__ import annotations

from typing import Any


def train(cfg: Any, callback: Any = None, objective: Any = None, stop_on_signals: bool = False) -> dict[str, Any]:
    """Train `cfg` (a `flashlm.config.RunConfig`) and return the loop's summary.

    `objective` replaces ``train.objective``: an `Objective`, or a factory ``objective(data, env)`` that the
    loop calls once the data is open. With a ``distill:`` section an `Objective` other than the distillation
    one is the base that the distillation objective wraps (the run's own objective when None).
    `stop_on_signals`: SIGINT / SIGTERM save a checkpoint after the current step and end the run (see
    `flashlm.training.loop.train`)."""
    from flashlm.training.loop import train as run

    if cfg.distill is not None and (objective is None or getattr(objective, "name", "distill") != "distill"):
        from flashlm.training.distill import distill_objective_for

        objective = distill_objective_for(cfg, objective)
    return run(cfg, callback, objective, stop_on_signals)


__all__ = ["train"]
