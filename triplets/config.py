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

Bounds (:func:`read_yaml`): a config file (and a ``--set`` value) is at most
``MAX_CONFIG_BYTES``; anchors and aliases are accepted, but the document, each alias counted as
a copy of what it names, may hold at most ``MAX_CONFIG_VALUES`` values and nest at most
``MAX_CONFIG_DEPTH`` deep (an alias bomb is refused before anything is built). Numbers: an
integer must fit in 64 bits (``MAX_CONFIG_INT``), a number that is NaN is refused anywhere in a
config, and a number-typed key also refuses infinity. Every error names the key and quotes a
value in at most ``QUOTE_CHARS`` characters.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mas_core.errors import did_you_mean

from .errors import ConfigError

T = TypeVar("T")


EXTENDS_KEY = "extends"
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_INT = (1 << 63) - 1
QUOTE_CHARS = 60

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = QUOTE_CHARS
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 4
_QUOTE.maxlevel = 2


def quote(value: Any) -> str:
    """``repr(value)`` cut to about ``QUOTE_CHARS`` characters (for error lines)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= 2 * QUOTE_CHARS else text[:2 * QUOTE_CHARS] + "…"


def read_yaml(text: str, where: str) -> Any:
    """The YAML document ``text`` (safe types only) within the bounds of the module docs;
    :class:`ConfigError` (one line naming ``where``) for one that is not YAML or exceeds them."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters, more than a config may hold ({MAX_CONFIG_BYTES:,})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {quote(str(exc).splitlines()[0])[1:-1]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than a config may be ({MAX_CONFIG_DEPTH} levels)") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a node graph whose expansion (aliases counted as copies) exceeds the bounds."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        children = [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) \
            else list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if not done:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in size)
            if len(stack) > MAX_CONFIG_VALUES:
                break
            continue
        size[id(node)] = 1 + sum(size.get(id(child), 0) for child in children)
        depth[id(node)] = 1 + max((depth.get(id(child), 0) for child in children), default=0)
        if size[id(node)] > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_CONFIG_VALUES:,} values (counting what "
                              "each alias repeats); a config needs far fewer (an alias bomb?)")
        if depth[id(node)] > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested deeper than a config may be ({MAX_CONFIG_DEPTH} levels)")
    if len(stack) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{where}: the YAML expands to more than {MAX_CONFIG_VALUES:,} values; a config needs far "
                          "fewer")


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
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, more than a config may hold ({MAX_CONFIG_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML text file") from None
    raw = read_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    base = raw.pop(EXTENDS_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: extends must be the path of a YAML preset (relative to this file), "
                          f"got {quote(base)}")
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
        raise ConfigError(f"--set expects key=value, got {quote(item)}")
    key, value_text = item.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"--set expects key=value, got {quote(item)}")
    try:
        value = read_yaml(value_text, f"--set {quote(key)[1:-1]}")
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise
        value = value_text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {quote(key)[1:-1]}: {quote(part)} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from the mapping ``raw``, validating keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    _refuse_nan(raw, where)
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {quote(key)}{did_you_mean(str(key)[:200], fields)} "
                              f"(valid keys: {', '.join(fields)})")
        kwargs[key] = _coerce(hints[key], value, f"{where}: {key}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {quote(str(exc))[1:-1]}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ValueError, OverflowError) as exc:
            raise ConfigError(f"{where}: {_cut(str(exc))}") from None
    return obj


def _cut(text: str, limit: int = 400) -> str:
    """``text`` on one line, its middle cut when longer than ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit - 120]} … {text[-100:]}"


def _dotted(where: str) -> str:
    """``"file: optim: lr"`` as ``"file: optim.lr"`` (the key as ``--set`` names it)."""
    head, _, keys = where.partition(": ")
    return f"{head}: {keys.replace(': ', '.')}" if keys else where


def _refuse_nan(raw: Any, where: str) -> None:
    """Refuse a NaN anywhere in ``raw`` (a number that is no number is never a setting)."""
    stack: list[tuple[Any, str]] = [(raw, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{_dotted(at)}: NaN is not a setting; give a number")
        if isinstance(value, dict):
            stack.extend((item, f"{at}.{quote(key)[1:-1] if not isinstance(key, str) else key[:60]}")
                         for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{at}[{index}]") for index, item in enumerate(value))


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts and lists, ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if callable(getattr(obj, "to_plain", None)):  # a dataclass with a shorthand (triplets.runner.MethodSpec)
            return obj.to_plain()
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
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {quote(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {quote(value)} is not one of {list(args)}{did_you_mean(str(value)[:200], args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and callable(getattr(tp, "from_string", None)):  # a shorthand ("mas@test")
            try:
                shorthand = tp.from_string(value)
                shorthand.validate()
            except ValueError as exc:
                raise ConfigError(f"{where}: {_cut(str(exc))}") from None
            return shorthand
        return from_dict(tp, value if value is not None else {}, where)
    if origin in (list, tuple):
        if isinstance(value, str) and args and (args[0] is str or callable(getattr(args[0], "from_string", None))):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {quote(value)}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {quote(value)}")
        value_type = args[1] if len(args) == 2 else Any
        return {key: _coerce(value_type, item, f"{where}.{quote(key)[1:-1] if not isinstance(key, str) else key[:60]}")
                for key, item in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {quote(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_CONFIG_INT:
                raise ConfigError(f"{_dotted(where)}: {quote(value)} is out of range (an integer of at most "
                                  f"{MAX_CONFIG_INT:,} in size)")
            return value
        raise ConfigError(f"{where}: expected an integer, got {quote(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{_dotted(where)}: {quote(value)} is out of range for a number") from None
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {quote(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{_dotted(where)}: {quote(value)} is not a finite number; give a finite one")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {quote(value)}")
    return value
