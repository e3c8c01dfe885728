"""One setting's value as read from TOML or ``--set``, checked against the type its
dataclass field declares: true is not 1, a list is not text, nan is not a number.
Ranges and allowed words are the dataclass's own checks (``core.schema``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

from core.errors import CladError


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` as the type ``cls.name`` declares (allowed values and words are
    checked by the dataclass itself, from each field's declaration: core.schema)."""
    kind = _kind(next(f for f in fields(cls) if f.name == name))
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise CladError(f"{where}: '{name}' must be true or false, got {value!r}")
        return value
    if kind.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise CladError(f"{where}: '{name}' must be a list, got {value!r}")
        elem = "int" if kind == "tuple[int, ...]" else "str"
        return tuple(_scalar(elem, name, v, where, f"an element of '{name}'") for v in value)
    return _scalar(kind, name, value, where, f"'{name}'")


_KIND_WORDS = {"int": "int (a whole number)", "float": "float (a finite number)", "str": "str (text)"}


def _kind(f: dataclasses.Field) -> str:
    """The declared type of a settings field as a word: bool, int, float, str or tuple[...]."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.startswith("tuple"):
        return "tuple[int, ...]" if "int" in t else "tuple[str, ...]"
    return t if t in ("bool", "int", "float", "str") else type(f.default).__name__


def _scalar(kind: str, name: str, value: Any, where: str, what: str) -> Any:
    """A number or text setting, checked against its declared type: true is not 1,
    and a list is not text (TOML and --set give real types; only they are converted)."""
    def refuse() -> CladError:
        fix = {"int": f"{name} = 3", "float": f"{name} = 0.5", "str": f'{name} = "text"'}[kind]
        return CladError(f"{where}: {what} must be {_KIND_WORDS[kind]}, got {value!r} "
                         f"({type(value).__name__}); write it like {fix}")

    if isinstance(value, (bool, list, tuple, dict)):
        raise refuse()
    if kind == "str":
        return str(value)  # a number is fine as text (a folder named 2024)
    try:
        if kind == "float":
            if not math.isfinite(float(value)):  # nan passes every range check, inf most
                raise ValueError(value)
            return float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    except (TypeError, ValueError):
        raise refuse() from None
