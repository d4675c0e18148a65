"""Mixing objectives step by step: a hybrid's cycle of terms, and the term each step trains.

The settings are typed in `flashlm.config` (`ObjectiveTerm`, `MaskingConfig`, validated there); the
YAML schema (both keys optional)::

    train:
      objectives:                  # mix objectives step by step; empty: train.objective alone
        clm: {ratio: 1}            # ratio: steps per cycle (integer >= 1); weight: loss multiplier
        mlm: {ratio: 3, nsp_weight: 0.5}   # nsp_weight > 0: masked batches are NSP pairs
        # nsp: {ratio: 1, nsp_weight: 1}   # MLM + NSP on pairs (nsp_weight default 1)
        # prefix_lm: {ratio: 1}
      masking:
        rate: 0.15                 # share of tokens predicted; rate_end: linear schedule to it
        rate_end: null
        mask_prob: 0.8             # of chosen tokens -> <mask>; random_prob -> random token; rest kept
        random_prob: 0.1
        max_span: 1                # > 1: spans of 1..max_span tokens
        next_token: true           # masked next-token prediction (GPT-BERT); false: in place (BERT)
        per_document: true         # masked windows attend only inside their documents

A step's term follows from the step index alone (`term_for_step`), so resumed runs stay exact.
"""

from __future__ import annotations

from typing import Any

from flashlm.config import OBJECTIVE_TERMS as TERMS
from flashlm.config import MaskingConfig, ObjectiveTerm, objective_terms

Term = ObjectiveTerm  # one entry of train.objectives
MaskingSettings = MaskingConfig  # train.masking

__all__ = ["TERMS", "MaskingSettings", "Term", "cycle", "masking_settings", "mix_terms", "term_for_step"]


def masking_settings(raw: Any) -> MaskingConfig:
    """`train.masking` (typed, or a mapping as YAML gives it) as settings; ConfigError naming the key."""
    return MaskingConfig.from_value(raw)


def mix_terms(raw: Any) -> list[ObjectiveTerm]:
    """`train.objectives` (typed, or a mapping) as its terms in order (empty when not mixing)."""
    return list(objective_terms(raw).values())


def cycle(terms: list[Term]) -> list[str]:
    """One cycle of term names, each `ratio` times, spread evenly (smooth weighted round robin)."""
    total = sum(t.ratio for t in terms)
    credit = [0] * len(terms)
    order = []
    for _ in range(total):
        for i, term in enumerate(terms):
            credit[i] += term.ratio
        best = max(range(len(terms)), key=lambda i: credit[i])
        credit[best] -= total
        order.append(terms[best].name)
    return order


def term_for_step(step: int, order: list[str]) -> str:
    """The term (1-based) `step` trains: a pure function of the step, so resume stays exact."""
    return order[(step - 1) % len(order)]
