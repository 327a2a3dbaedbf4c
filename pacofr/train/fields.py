"""Typed conversion between nested dataclass configs and plain dicts / ``key=value`` overrides.

A config is a tree of dataclasses. :func:`from_dict` builds one from a (YAML) mapping,
:func:`set_by_path` applies a ``"section.field"`` override, and both check every value against
the field's type hint (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``,
``tuple[...]``, ``list[...]``, nested dataclasses). Errors name the offending key. A ``float``
field (also inside a tuple or list) takes finite numbers only: ``inf`` and ``nan`` are refused
here, for every config section at once; an ``int`` field takes what fits in int64 (every count
ends in torch int64 arithmetic). An unknown key is named with the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

_INT64_MAX = 2**63 - 1


class ConfigError(ValueError):
    """A config key that does not exist or a value of the wrong type."""


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of the fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def unknown_key_error(key: str, valid: Any) -> ConfigError:
    """The error for config key ``key`` (dotted) that is not one of the names ``valid`` at its
    level: the nearest valid name first (difflib), then all of them."""
    names = sorted(str(name) for name in valid)
    near = difflib.get_close_matches(key.rpartition(".")[2], names, n=1)
    hint = f"did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{near[0]}? " if near else ""
    return ConfigError(f"unknown config key {key!r}; {hint}valid keys here: {names}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type hint ``tp``; raise :class:`ConfigError` naming ``key``.

    Strings are accepted for numbers and booleans (they come from the command line); an int is
    accepted for a float; nothing else is converted silently (``1.5`` for an ``int`` is an error).
    Floats must be finite.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/yes/no as booleans: map them back
            spellings = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((c for c in args if isinstance(c, str) and c.lower() in spellings), value)
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"{key}: expected a list such as [0.9, 0.95], got {value!r} "
                                  f"({getattr(err, 'problem', None) or type(err).__name__})") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            items = [coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else Any
            items = [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if abs(number) > _INT64_MAX:
            raise ConfigError(f"{key}: expected an integer of at most {_INT64_MAX} in size (int64), got {value!r}")
        return number
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot convert {value!r} to {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing fields keep their defaults.

    Raises :class:`ConfigError` for an unknown key (listing the valid ones) or a bad value.
    """
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types_:
            raise unknown_key_error(key, types_)
        kwargs[name] = coerce(value, types_[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def merge_into(obj: T, data: Mapping[str, Any], prefix: str = "") -> T:
    """A copy of dataclass instance ``obj`` with the (nested) values of ``data`` applied."""
    types_ = _field_types(type(obj))
    changes = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types_:
            raise unknown_key_error(key, types_)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = merge_into(current, value, key)
        else:
            changes[name] = coerce(value, types_[name], key)
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or type(obj).__name__}: {err}") from err


def _leaf_type(obj: Any, parts: list[str]) -> Any:
    """Type hint of the field at ``parts`` below dataclass instance ``obj`` (checks every name)."""
    target, prefix = obj, ""
    for part in parts[:-1]:
        prefix = f"{prefix}.{part}" if prefix else part
        if part not in _field_types(type(target)):
            raise unknown_key_error(prefix, _field_types(type(target)))
        target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"config key {prefix!r} is a value, not a section")
    field_types = _field_types(type(target))
    if parts[-1] not in field_types:
        raise unknown_key_error(f"{prefix}.{parts[-1]}" if prefix else parts[-1], field_types)
    return field_types[parts[-1]]


def set_by_path(obj: T, path: str, raw_value: str) -> T:
    """A copy of ``obj`` with the field at dotted ``path`` (``"train.base_lr"``) set from a string.

    For a plain ``str`` field the string is taken as is; otherwise it is parsed as YAML (so
    ``[0.9, 0.95]``, ``true``, ``null`` work) and then checked against the field's type.
    """
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"bad override key {path!r}: expected dotted names like 'train.base_lr'")
    value: Any = raw_value
    if _leaf_type(obj, parts) is not str:
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else raw_value
        except yaml.YAMLError:
            value = raw_value
    for part in reversed(parts):
        value = {part: value}
    return merge_into(obj, value)


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-friendly) data of a dataclass tree: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj
