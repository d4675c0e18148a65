"""Reading config values: coercion to each field's type (numbers finite), unknown keys, numbers and
mappings, each refusal one `ConfigError` line naming the key."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from flashlm.errors import ConfigError


def coerce_fields(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Convert values to each field's declared type (YAML reads `1e-3` as a string); refuse the rest."""
    types = {f.name: str(f.type) for f in fields(cls)}
    out = {}
    for key, value in data.items():
        kind = types.get(key, "")
        base = kind.replace(" | None", "")
        try:
            if value is None and "None" in kind:
                pass
            elif base == "float" and not isinstance(value, bool):
                value = float(value)
            elif base == "int" and isinstance(value, str):
                value = int(value)
            elif base == "bool" and not isinstance(value, bool):
                raise ValueError
            elif base.startswith("tuple"):
                value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}.{key}: expected {kind}, got {value!r}") from None
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            raise ConfigError(f"{prefix}.{key}: must be a finite number, got {value!r}")  # inf/NaN train to NaN
        out[key] = value
    return out


def check_keys(cls: type, data: dict[str, Any], prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{prefix}.{key}: unknown key{hint}; known keys: {', '.join(sorted(known))}")


def as_number(value: Any, key: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if integer and number != int(number):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return number


def as_mapping(value: Any, key: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, e.g. {example}; got {value!r:.80}")
    return value
