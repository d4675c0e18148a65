"""Settings of the masked and hybrid objectives, parsed and validated (no torch, so config loads fast).

The YAML schema (both keys optional)::

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

from dataclasses import dataclass, fields
from typing import Any

from flashlm.errors import ConfigError

TERMS = ("clm", "mlm", "nsp", "prefix_lm")
_TERM_KEYS = {"clm": ("ratio", "weight"), "mlm": ("ratio", "weight", "nsp_weight"),
              "nsp": ("ratio", "weight", "nsp_weight"), "prefix_lm": ("ratio", "weight")}


@dataclass(frozen=True)
class MaskingSettings:
    """`train.masking`: how masked batches are corrupted and predicted."""

    rate: float = 0.15
    rate_end: float | None = None
    mask_prob: float = 0.8
    random_prob: float = 0.1
    max_span: int = 1
    next_token: bool = True
    per_document: bool = True

    def rate_at(self, step: int, total_steps: int) -> float:
        """The masking rate at (1-based) `step`: linear from rate to rate_end over the run."""
        if self.rate_end is None or total_steps <= 1:
            return self.rate
        frac = min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
        return self.rate + (self.rate_end - self.rate) * frac


@dataclass(frozen=True)
class Term:
    """One entry of `train.objectives`."""

    name: str
    ratio: int = 1
    weight: float = 1.0
    nsp_weight: float = 0.0

    @property
    def uses_nsp(self) -> bool:
        return self.name in ("mlm", "nsp") and self.nsp_weight > 0


def _number(value: Any, key: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if integer and number != int(number):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return number


def _mapping(value: Any, key: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, e.g. {example}; got {value!r}")
    return value


def masking_settings(raw: Any) -> MaskingSettings:
    """`train.masking` as settings; ConfigError naming the key for any bad value."""
    data = _mapping(raw, "train.masking", "{rate: 0.3, rate_end: 0.15, max_span: 3}")
    known = [f.name for f in fields(MaskingSettings)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = f"train.masking.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key; known keys: {', '.join(known)}")
        if key in ("next_token", "per_document"):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            values[key] = value
        elif key == "max_span":
            span = _number(value, where, integer=True)
            if span < 1:
                raise ConfigError(f"{where}: must be an integer >= 1, got {value!r}")
            values[key] = int(span)
        elif key == "rate_end" and value is None:
            values[key] = None
        else:
            number = _number(value, where)
            low_open = key in ("rate", "rate_end")
            if not (0 < number < 1 if low_open else 0 <= number <= 1):
                bounds = "(0, 1)" if low_open else "[0, 1]"
                raise ConfigError(f"{where}: must be in {bounds}, got {value!r}")
            values[key] = number
    settings = MaskingSettings(**values)
    if settings.mask_prob + settings.random_prob > 1 + 1e-9:
        raise ConfigError(f"train.masking.random_prob: mask_prob + random_prob must be <= 1, got "
                          f"{settings.mask_prob} + {settings.random_prob}")
    return settings


def mix_terms(raw: Any) -> list[Term]:
    """`train.objectives` as terms (empty when not mixing); ConfigError naming the key when invalid."""
    data = _mapping(raw, "train.objectives", "{clm: {ratio: 1}, mlm: {ratio: 3}}")
    terms = []
    for name, options in data.items():
        where = f"train.objectives.{name}"
        if name not in TERMS:
            raise ConfigError(f"{where}: unknown objective; choose among {', '.join(TERMS)}")
        options = _mapping(options, where, "{ratio: 1, weight: 1.0}")
        values: dict[str, Any] = {"nsp_weight": 1.0} if name == "nsp" else {}
        for key, value in options.items():
            if key not in _TERM_KEYS[name]:
                raise ConfigError(f"{where}.{key}: unknown key; {name} takes {', '.join(_TERM_KEYS[name])}")
            if key == "ratio":
                ratio = _number(value, f"{where}.ratio", integer=True)
                if ratio < 1:
                    raise ConfigError(f"{where}.ratio: must be an integer >= 1, got {value!r}")
                values[key] = int(ratio)
            else:
                number = _number(value, f"{where}.{key}")
                if number < 0 or (key == "weight" and number == 0):
                    sign = "positive" if key == "weight" else ">= 0"
                    raise ConfigError(f"{where}.{key}: must be {sign}, got {value!r}")
                values[key] = number
        terms.append(Term(name, **values))
    return terms


def check_objective_settings(tcfg: Any) -> None:
    """Validate train.masking and train.objectives (and that train.objective does not contradict them)."""
    masking_settings(tcfg.masking)
    terms = mix_terms(tcfg.objectives)
    if terms and tcfg.objective not in ("clm", "hybrid"):
        raise ConfigError(f"train.objective: {tcfg.objective!r} conflicts with train.objectives (a mix); "
                          "drop one of them")
    if not terms and tcfg.objective == "hybrid":
        raise ConfigError("train.objectives: train.objective hybrid needs terms, e.g. "
                          "{clm: {ratio: 1}, mlm: {ratio: 3}}")


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
