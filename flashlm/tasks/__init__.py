"""Benchmark tasks that fine-tune or train models, then score them: the fine-tune-then-score layer.

`babi` (bAbI question answering), `squad` (SQuAD-format extractive QA with a span head), `translate`
(prefix-LM translation, BLEU / chrF), `longrange` (passkey and MQAR on small trained models),
`finetuned` (the `flashlm eval babi|squad|translate` runners: options → config → run → `<task>.json`)
and `run_all` (`flashlm eval all`: every task, then the report card).

Each task's config dataclass lives in a module without torch (`babi_config`, `squad_config`,
`translate_config`, `longrange_config`; `FinetuneConfig` in `flashlm.training.finetune_config`), re-exported
by the task's module: the CLI imports them at startup and takes its options' defaults from their fields.

Layering: these modules import the library (`flashlm.model`, `flashlm.training`, `flashlm.generation`,
`flashlm.evaluate`, ...), which never imports them; `flashlm.cli` imports both.
"""
