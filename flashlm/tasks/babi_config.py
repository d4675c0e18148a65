"""`BabiConfig` and its defaults (`DEFAULT_MODEL`, `TASKS`, `TASK_GROUPS`, `SCHEDULE`): the settings of
`flashlm.tasks.babi.run_babi`, in a module without torch so the CLI can read its defaults cheaply.
`flashlm.tasks.babi` re-exports all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flashlm.config import ModelConfig
from flashlm.training.finetune_config import FinetuneConfig

TASKS = tuple(range(1, 21))
ALL_TASKS = "1-20"  # `--tasks`: every task (`flashlm.tasks.finetuned.babi_task_numbers`)

# From scratch over a word-level BPE vocabulary: the long-range recipe (flashlm.tasks.longrange),
# a local layer with a 6-token window (a sentence: it binds each place to its subject) under a global
# layer with an effectively infinite RoPE base (content lookup), init_std 0.1. All-global models, and
# deeper ones, sit on a plateau where they only ever answer with the last place named; this layout learns
# the binding instead (see docs/notes/babi.md).
DEFAULT_MODEL = ModelConfig(
    vocab_size=512,
    d_model=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=384,
    layer_pattern="LG",
    sliding_window=6,
    rope_base_global=1e30,
    init_std=0.1,
    max_seq_len=512,
)
# With per_task: tasks that share one model, trained on their union with their time pooled. qa2 and
# qa3 track the same people and objects, so one model learns both from their joint data and pooled time
# (see docs/notes/babi.md).
TASK_GROUPS = ((2, 3),)
# Per task on several workers, the order the models start in. Tasks that converge and stop early go
# first, so the time they leave unused flows to the models after them (`next_budget`); those that train
# to the end of their budget go last, so no worker idles long before the deadline, and the shared qa2/qa3
# model and the full-budget tasks train longer than in task order. The last one, qa16, gains little from
# more time, so it gets what is left before the deadline (see docs/notes/babi.md).
SCHEDULE = (20, 15, 4, 1, 6, 9, 12, 5, 18, 11, 10, 7, 8, 13, 19, 2, 3, 17, 14, 16)


@dataclass
class BabiConfig:
    """How `run_babi` builds, trains and scores the model."""

    tasks: Sequence[int] = TASKS
    per_task: bool = False  # one model per task instead of one joint model
    groups: Sequence[Sequence[int]] = TASK_GROUPS  # with per_task: tasks that share a model
    max_sentences: int = 50
    vocab_size: int = 1024
    model: ModelConfig | str = field(default_factory=lambda: DEFAULT_MODEL)
    finetune: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(
            epochs=200, batch_size=16, lr=3e-3, warmup_steps=100, bucket=32, stop_loss=0.01, stop_windows=10
        )
    )
    supporting_facts: bool = True  # the target lists the supporting statements before the answer
    beam: int = 4  # test-time beam search rows (1: greedy)
    copy_statements: bool = True  # with supporting_facts: chains may only cite the story (`ChainGrammar`)
    augment: bool = True  # rename people/places/objects at every training step (see the module docstring)
    train_limit: int | None = None  # questions per task (subsets for quick runs)
    test_limit: int | None = None
    eval_batch_size: int = 64
    device: str = "cpu"  # where a fresh model is built
    jobs: int = 1  # per task: worker processes training tasks side by side
    threads: int | None = None  # torch threads in all (per task with jobs: shared by the workers)


def format_groups(groups: Sequence[Sequence[int]]) -> str:
    """((2, 3), (7, 8)) → ``"2,3;7,8"``; () → ``"none"`` (the inverse of `flashlm.tasks.babi.parse_groups`)."""
    return ";".join(",".join(str(t) for t in g) for g in groups) or "none"


__all__ = ["ALL_TASKS", "DEFAULT_MODEL", "SCHEDULE", "TASKS", "TASK_GROUPS", "BabiConfig", "format_groups"]
