"""Type checks for settings read from YAML, with the key named in every message.

YAML reads ``1e9`` as a string and ``yes`` as a boolean; a wrong type used to surface deep inside a step as a
``TypeError`` naming no key. :func:`check_fields` compares each value with the type of the dataclass
field's default before the dataclass is built.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from typing import Any, Mapping

_NUMERIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """A setting has an unknown key or a value of the wrong type; the message names ``section.key``."""


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _fits(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected in (list, tuple):
        return isinstance(value, (list, tuple))
    if expected is dict:
        return isinstance(value, Mapping)
    if expected is str:
        return isinstance(value, str)
    return True


def type_error(where: str, value: Any, expected: type) -> ConfigError:
    names = {bool: "true or false", int: "an integer", float: "a number", list: "a list", tuple: "a list",
             dict: "a mapping", str: "a string"}
    hint = ""
    if isinstance(value, str) and expected in (int, float) and _NUMERIC.fullmatch(value.strip()):
        hint = " (YAML reads exponent notation such as 1e9 as text: write 1000000000 or 1.0e+9)"
    return ConfigError(f"{where} must be {names.get(expected, expected.__name__)}, got {value!r}{hint}")


def check_value(where: str, value: Any, expected: type) -> Any:
    if not _fits(value, expected):
        raise type_error(where, value, expected)
    return value


def check_fields(where: str, cls: type, values: Mapping[str, Any]) -> None:
    """Unknown keys and values whose type differs from the field default's type raise :class:`ConfigError`
    naming ``where.key``. Fields whose default is None accept anything (their own parser checks them)."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    for key, value in values.items():
        default = _default(known[key])
        if default is None or value is None:
            continue
        check_value(f"{where}.{key}", value, type(default))
