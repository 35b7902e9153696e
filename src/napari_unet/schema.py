"""The typed-dataclass machinery behind :mod:`napari_unet.config`: fields with bounds, checked
conversion from JSON, and back.

A config section is a ``@dataclass(kw_only=True)`` subclass of :class:`Section` whose fields
are declared with :func:`opt` (default, bounds, choices). :meth:`Section._from` converts a
parsed JSON object field by field and refuses unknown keys; every failure is a
:class:`ConfigError` naming the dotted field. :meth:`Section.peek` reads a few fields of a
config that may not pass, for display.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, field
from typing import Any, ClassVar, Union

__all__ = ["ConfigError", "MAX_NESTING", "Section", "join", "opt"]

#: Largest nesting of the free dicts (``model_card``); deeper JSON is refused.
MAX_NESTING = 32


class ConfigError(ValueError):
    """A field of a config or an option with a bad value; ``field`` is its dotted name."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"field '{field_name}': {message}")
        self.field = field_name
        self.reason = message


def opt(
    default: Any = MISSING,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with its default and bounds (see the module docstring)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- conversion


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "text"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether ``value`` (JSON-like) nests at most ``limit`` deep (iterative, no recursion)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if d >= limit:
                return False
            items = v.values() if isinstance(v, dict) else v
            stack.extend((x, d + 1) for x in items)
    return True


def _bounds(value: float, meta: dict, name: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(name, f"must be {'>' if meta.get('lo_open') else '>='} {lo}, not {value}")
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        raise ConfigError(name, f"must be {'<' if meta.get('hi_open') else '<='} {hi}, not {value}")


def _convert(value: Any, tp: Any, meta: dict, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and the bounds in ``meta``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        return _convert(value, functools.reduce(operator.or_, inner), meta, name)
    if value is None:
        raise ConfigError(name, "is required (got null)")
    if dataclasses.is_dataclass(tp):
        return tp._from(value, name)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be a whole number, not {_kind(value)} ({value!r})")
        _bounds(value, meta, name)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, not {_kind(value)} ({value!r})")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, not {value}")
        _bounds(value, meta, name)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be text, not {_kind(value)} ({value!r})")
    elif origin in (list, tuple):
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
            raise ConfigError(name, f"must be a list, not {_kind(value)} ({value!r})")
        item_tp = args[0] if args else Any
        out = [_convert(v, item_tp, meta, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a JSON object, not {_kind(value)}")
        if not _depth_ok(value, MAX_NESTING):
            raise ConfigError(name, f"is nested more than {MAX_NESTING} levels deep")
        return copy.deepcopy(value)
    else:  # pragma: no cover - a field annotated with a type this module does not handle
        raise TypeError(f"config field {name} has an unsupported annotation {tp!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = " | ".join(repr(c) for c in choices)
        raise ConfigError(name, f"must be one of {shown}, not {value!r}")
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


class Section:
    """Shared ``from_dict`` / ``to_dict`` of the config dataclasses."""

    #: Keep keys this version does not know (history entries) instead of refusing them.
    _lenient: ClassVar[bool] = False

    @classmethod
    def _from(cls, raw: Any, prefix: str = ""):
        where = prefix or "config"
        if not isinstance(raw, dict):
            raise ConfigError(where, f"must be a JSON object, not {_kind(raw)} ({raw!r:.60})")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        unknown = [k for k in raw if k not in fields]
        if unknown and not cls._lenient:
            known = ", ".join(fields)
            key = unknown[0]
            raise ConfigError(
                f"{prefix}.{key}" if prefix else str(key),
                f"is not a known field (a typo?); known fields here: {known}",
            )
        values = {}
        for name, f in fields.items():
            full = f"{prefix}.{name}" if prefix else name
            if name not in raw:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ConfigError(full, "is missing")
                continue
            values[name] = _convert(raw[name], hints[name], dict(f.metadata), full)
        obj = cls(**values)
        if cls._lenient:
            obj.extra = {k: copy.deepcopy(raw[k]) for k in unknown}
        obj._check(prefix)
        return obj

    @classmethod
    def peek(cls, raw: Any, *names: str) -> dict[str, Any]:
        """The named fields of ``raw`` converted as this class types them; never raises.

        For showing a config that may not pass :meth:`_from` (saved with the low-level
        :func:`~napari_unet.save.save_model`, old or edited by hand): a value that is missing
        or of the wrong type gives the field's default (None where it has none). Choices are
        not enforced, so an unknown task still shows.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        raw = raw if isinstance(raw, dict) else {}
        out = {}
        for name in names:
            f = fields[name]
            meta = {k: v for k, v in f.metadata.items() if k != "choices"}
            try:
                out[name] = _convert(raw[name], hints[name], meta, name)
            except (KeyError, ConfigError):
                out[name] = _default(f)
        return out

    def _check(self, prefix: str) -> None:
        """Cross-field rules (overridden where there are some)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (defaults filled in), in declaration order."""
        out = {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }
        out.update(copy.deepcopy(getattr(self, "extra", None) or {}))
        return out


def join(prefix: str, name: str) -> str:
    """A field's dotted name inside ``prefix`` (the section's own dotted name, or "")."""
    return f"{prefix}.{name}" if prefix else name


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), None where it has none."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None
