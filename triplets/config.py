"""YAML configuration files validated against dataclasses.

:func:`load_config` reads a YAML mapping, applies ``--set key=value`` overrides
(dotted keys reach into nested sections) and builds the dataclass given. Every key
is checked: an unknown key raises :class:`~triplets.errors.ConfigError` naming the
nearest valid key; a value of the wrong type raises naming the key and the type
expected. Nested dataclass fields are built recursively.

Presets: a file may start from another with ``extends: base.yaml`` (a path relative to
the file itself). The base is read first (it may extend another in turn) and the file's
keys are merged into it: mappings are merged key by key, recursively; any other value
(a number, a string, a list such as ``methods``) of the file replaces the base's. A chain
that comes back to a file it already read is refused.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mas_core.errors import did_you_mean

from .errors import ConfigError

T = TypeVar("T")


EXTENDS_KEY = "extends"


def load_config(path: str | Path, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read the YAML file ``path`` (with its ``extends:`` chain), apply ``overrides``
    (``"a.b=value"`` strings) and build ``cls``."""
    raw = read_preset(path)
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(cls, raw, where=str(path))


def read_preset(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of the YAML file ``path`` merged over the preset it ``extends`` (see the
    module docs); :class:`ConfigError` for a missing file, invalid YAML or a cycle."""
    path = Path(path)
    if not path.is_file():
        where = f" (extended by {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(item) for item in (*_chain[_chain.index(resolved):], resolved))
        raise ConfigError(f"{path}: 'extends' goes round in a cycle ({cycle}); remove one of the extends keys")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    base = raw.pop(EXTENDS_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: extends must be the path of a YAML preset (relative to this file), got {base!r}")
    return merge_presets(read_preset(resolved.parent / base, (*_chain, resolved)), raw)


def merge_presets(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` merged over ``base``: mappings key by key (recursively), anything else replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_presets(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``key.sub=value`` override to the raw mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value_text = item.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from the mapping ``raw``, validating keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), fields)} "
                              f"(valid keys: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, f"{where}: {key}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts and lists, ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {field.name: to_dict(getattr(obj, field.name)) for field in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(item) for item in obj]
    if isinstance(obj, dict):
        return {key: to_dict(value) for key, value in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{did_you_mean(str(value), args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {key: _coerce(value_type, item, f"{where}.{key}") for key, item in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
