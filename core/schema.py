"""One declaration per setting: type, default, allowed values, help and older value.

Every settings dataclass (the sections in ``core.settings``, each head's in
its module) derives from ``Settings`` and declares each field once::

    lr: float = setting(2e-4, above=0, help="AdamW's learning rate")
    score_loss: str = setting("hinge", choices=("hinge", "bce"), added="hinge", help="...")

The annotation is the type, ``setting``'s first argument the default; the
rest is the field's metadata, read by:

* ``check_settings`` (run by ``Settings.__post_init__``, so on every
  construction: config.toml, ``--set``, profiles, checkpoints): one message
  format for every section and head, ``<table>.<name> = <value>: must be
  <allowed>; fix config.toml or --set``, where ``table`` is the section
  (``features``) or the head's table (``train.clad``);
* ``words`` (the choices of a word setting, e.g. for error messages elsewhere);
* ``added_values`` and ``keyed`` (settings added after runs existed, with
  the value that reproduces those runs: hashed only when set otherwise, and
  filled in when a recorded table or a checkpoint lacks them);
* ``record`` / ``from_record`` (a settings object as a checkpoint's plain
  values and back).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from core.errors import CladError

_KEY = "setting"  # the metadata key of a field declared with ``setting``


class _NotAdded:
    def __repr__(self) -> str:
        return "NOT_ADDED"


NOT_ADDED: Any = _NotAdded()  # a setting that existed from the start (no older value)


@dataclass(frozen=True)
class Rule:
    """What a field allows (see ``setting``); ``describe`` says it in words."""

    integer: bool = False  # an int setting (ranges read "a .. b" rather than "in [a, b]")
    low: float | None = None  # value >= low
    high: float | None = None  # value <= high
    above: float | None = None  # value > above
    below: float | None = None  # value < below
    odd: bool = False
    nonempty: bool = False  # a list setting must have an element (ranges apply to each)
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    check: Callable[[Any, Any], bool] | None = None  # (value, the whole settings) -> ok: rules between settings
    allowed: str = ""  # ``check`` in words, e.g. "0 (no crop) or 32 .. resize"
    help: str = ""
    added: Any = NOT_ADDED

    def words(self) -> tuple[str, ...]:
        choices = self.choices() if callable(self.choices) else self.choices
        return tuple(choices or ())

    def _in_range(self, v: Any) -> bool:
        return ((self.low is None or v >= self.low) and (self.high is None or v <= self.high)
                and (self.above is None or v > self.above) and (self.below is None or v < self.below)
                and (not self.odd or v % 2 == 1))

    def own_ok(self, value: Any) -> bool:
        """The field's own rules (choices, range, odd, non-empty), without ``check``."""
        try:
            if self.choices is not None and value not in self.words():
                return False
            if isinstance(value, (tuple, list)):
                return (not self.nonempty or len(value) > 0) and all(self._in_range(v) for v in value)
            return self._in_range(value)
        except TypeError:  # a value of the wrong type (pipeline.config checks types first)
            return False

    def _range(self) -> str:
        def n(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)

        lo = ("[", self.low) if self.low is not None else ("(", self.above) if self.above is not None else None
        hi = ("]", self.high) if self.high is not None else (")", self.below) if self.below is not None else None
        if lo and hi:
            if self.integer and lo[0] == "[" and hi[0] == "]":
                return f"{n(lo[1])} .. {n(hi[1])}"
            return f"in {lo[0]}{n(lo[1])}, {n(hi[1])}{hi[0]}"
        if lo:
            return f"{'>=' if lo[0] == '[' else '>'} {n(lo[1])}"
        if hi:
            return f"{'<=' if hi[0] == ']' else '<'} {n(hi[1])}"
        return ""

    def describe(self, is_list: bool = False) -> str:
        """The allowed values in words: "one of hinge, bce", "in [0, 1)", "an odd number >= 1", ..."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(self.words()))
        r = self._range()
        if self.odd:
            r = f"an odd number {r}".strip()
        if is_list:
            parts.append(", each ".join(p for p in ("a non-empty list" if self.nonempty else "", r) if p))
        elif r:
            parts.append(r)
        if self.allowed:
            parts.append(self.allowed)
        return " and ".join(p for p in parts if p) or "valid"


def setting(default: Any, *, low: float | None = None, high: float | None = None, above: float | None = None,
            below: float | None = None, odd: bool = False, nonempty: bool = False,
            choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
            check: Callable[[Any, Any], bool] | None = None, allowed: str = "", help: str = "",
            added: Any = NOT_ADDED, **field_kw: Any) -> Any:
    """A settings field: ``default`` and what it allows, in one place.

    ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive ones
    (of each element for a list); ``odd`` an odd number; ``nonempty`` a list
    with an element; ``choices`` the words a word setting takes (or a function
    returning them, for lists known only later: the registered heads);
    ``check(value, settings)`` a rule between settings, ``allowed`` its words;
    ``help`` one line for people; ``added`` the value that reproduces runs made
    before the setting existed (those runs keep their keys: it is hashed only
    when set otherwise).
    """
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    integer = isinstance(default, int) and not isinstance(default, bool) or (
        isinstance(default, tuple) and all(isinstance(v, int) for v in default) and bool(default))
    rule = Rule(integer, low, high, above, below, odd, nonempty, choices, check, allowed, help, added)
    return dataclasses.field(default=default, metadata={_KEY: rule}, **field_kw)


def rule_of(f: dataclasses.Field) -> Rule | None:
    """The declaration of a field made with ``setting`` (None for other fields)."""
    return f.metadata.get(_KEY)


def rules(cls_or_obj: Any) -> dict[str, Rule]:
    """Every declared setting of a settings class, in field order."""
    return {f.name: r for f in fields(cls_or_obj) if (r := rule_of(f)) is not None}


def setting_lines(settings: Any, table: str) -> list[str]:
    """One line per declared setting of ``settings`` (an instance: its values are shown
    as the defaults): ``table.name = value  (allowed)  help``, as config.toml spells it."""
    out = []
    for f in fields(settings):
        r = rule_of(f)
        if r is None:
            continue
        value = getattr(settings, f.name)
        allowed = r.describe(isinstance(value, (tuple, list)))
        line = f"{table}.{f.name} = {toml_value(value)}"
        if allowed != "valid":
            line += f"  ({allowed})"
        out.append(line + (f"  {r.help}" if r.help else ""))
    return out


def toml_value(v: Any) -> str:
    """A value as config.toml writes it (the one writer: ``pipeline.config.dump_toml`` uses it)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # JSON string escaping is valid TOML basic-string escaping


def words(cls: type, name: str) -> tuple[str, ...]:
    """The words setting ``name`` of ``cls`` takes."""
    return rules(cls)[name].words()


def added_values(cls: type) -> dict[str, Any]:
    """Settings added after runs existed -> the value those runs had (field order)."""
    return {n: r.added for n, r in rules(cls).items() if r.added is not NOT_ADDED}


def keyed(settings: Any) -> dict[str, Any]:
    """``settings``' values as a key hashes them: a setting at its ``added``
    value is left out, so the runs and caches made before it existed keep their keys."""
    added = added_values(type(settings))
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in added or added[k] != v}


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_settings(obj: Any) -> None:
    """Refuse the first setting of ``obj`` that its declaration does not allow.

    Each field's own rules first (in field order), then the rules between
    settings (``check``), which may then rely on the others being valid. One
    line, naming the table, the setting and the bad value: never a traceback
    later, a cache keyed on the value, or a remembered ``--set``.
    """
    table = getattr(type(obj), "table", "") or type(obj).__name__
    declared = rules(obj)
    bad = next((n for n, r in declared.items() if not r.own_ok(getattr(obj, n))), None)
    if bad is None:
        bad = next((n for n, r in declared.items() if r.check is not None and not r.check(getattr(obj, n), obj)),
                   None)
    if bad is not None:
        value = getattr(obj, bad)
        allowed = declared[bad].describe(isinstance(value, (tuple, list)))
        raise CladError(f"{table}.{bad} = {_shown(value)!r}: must be {allowed}; fix config.toml or --set")


class Settings:
    """Base of every settings dataclass: every construction checks every field.

    ``table`` names where the settings live in config.toml (``features``,
    ``train.clad``); ``core.settings`` sets it for the sections, and
    ``stages.heads.register_head`` for each head's settings.
    """

    table: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_settings(self)


def record(settings: Any) -> dict[str, Any]:
    """``settings`` as plain values (lists for tuples): what a checkpoint stores."""
    return {k: _shown(v) for k, v in dataclasses.asdict(settings).items()}


def from_record(cls: type, values: dict[str, Any], where: str = "checkpoint") -> Any:
    """``record``'s values back as ``cls``: settings the record lacks take their
    ``added`` value (the record was written before they existed), then the default."""
    own = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - own)
    if unknown:
        raise CladError(f"{where}: setting(s) {', '.join(unknown)} unknown to this version of {cls.__name__}; "
                        "update clad, or re-train the run")
    return cls(**{**added_values(cls), **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}})
