"""Benchmark tasks that fine-tune or train models, then score them: the fine-tune-then-score layer.

`babi` (bAbI question answering), `squad` (SQuAD-format extractive QA with a span head), `translate`
(prefix-LM translation, BLEU / chrF), `longrange` (passkey and MQAR on small trained models),
`finetuned` (the `flashlm eval babi|squad|translate` runners: options → config → run → `<task>.json`)
and `run_all` (`flashlm eval all`: every task, then the report card).

Layering: these modules import the library (`flashlm.model`, `flashlm.training`, `flashlm.generation`,
`flashlm.evaluate`, ...), which never imports them; `flashlm.cli` imports both.
"""
