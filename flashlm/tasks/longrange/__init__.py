"""Long-range dependency tasks: passkey retrieval and MQAR, generated in code, on small trained models.

`flashlm.tasks.longrange.synthetic` builds and scores the items (passkey with any encoder or the
word-level `PasskeyVocab`, MQAR on token ids); `flashlm.tasks.longrange.run` trains one passkey and one
MQAR model per layer pattern (`LongRangeConfig`, `run_longrange`, `write_longrange`). The KV-cache
size by layer pattern, reported with them, is a general measurement: `flashlm.evaluate.efficiency`.
This package re-exports the public names of both modules.
"""

from __future__ import annotations

from flashlm.tasks.longrange.run import (
    GOALS,
    REFERENCE_PRESET,
    LongRangeConfig,
    MQARSpec,
    PasskeySpec,
    TaskBatch,
    answer_loss,
    collate_mqar,
    collate_passkey,
    longrange_scores,
    mqar_items,
    passkey_items,
    resolve_pattern,
    run_longrange,
    train_mqar,
    train_passkey,
    write_longrange,
)
from flashlm.tasks.longrange.synthetic import (
    FILLER,
    NEEDLE,
    QUESTION,
    PasskeyExample,
    PasskeyVocab,
    make_mqar_batch,
    make_passkey_batch,
    mqar_accuracy,
    mqar_example,
    passkey_accuracy,
    passkey_example,
    random_key,
)

__all__ = [
    "FILLER",
    "NEEDLE",
    "QUESTION",
    "PasskeyExample",
    "PasskeyVocab",
    "make_mqar_batch",
    "make_passkey_batch",
    "mqar_accuracy",
    "mqar_example",
    "passkey_accuracy",
    "passkey_example",
    "random_key",
    "GOALS",
    "REFERENCE_PRESET",
    "LongRangeConfig",
    "MQARSpec",
    "PasskeySpec",
    "TaskBatch",
    "answer_loss",
    "collate_mqar",
    "collate_passkey",
    "longrange_scores",
    "mqar_items",
    "passkey_items",
    "resolve_pattern",
    "run_longrange",
    "train_mqar",
    "train_passkey",
    "write_longrange",
]
