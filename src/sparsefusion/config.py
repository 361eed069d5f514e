"""Strict configuration: dataclass defaults <- YAML file <- dotted command-line overrides.

Every component owns a ``@dataclass(kw_only=True) XConfig``; the root composes them. Unknown keys,
values of the wrong type, non-finite numbers (``.inf``, ``.nan``) and keys repeated in a YAML
mapping are errors that name the key (with the closest valid key as a suggestion), so a typo
such as ``train.stpes=10`` never falls back silently to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "") -> C:
    """Build dataclass ``cls`` from a nested mapping, strictly.

    Args:
        cls: a dataclass type.
        data: mapping of field names to values (nested mappings for nested configs).
        where: dotted prefix used in error messages.

    Returns:
        An instance of ``cls``; fields absent from ``data`` keep their defaults.
    """
    return merge(cls(), data, where=where) if _all_defaults(cls) else _construct(cls, data, where)


def merge(cfg: C, data: dict[str, Any], *, where: str = "") -> C:
    """Return a copy of ``cfg`` with the values of ``data`` applied (recursively, strictly)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg) if f.init]
    updates: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(_unknown_key(path, key, names))
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = merge(current, value, where=path)
        else:
            updates[key] = coerce(value, hints[key], path)
    try:
        return dataclasses.replace(cfg, **updates)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _construct(cls: type[C], data: dict[str, Any], where: str) -> C:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(_unknown_key(path, key, names))
        kwargs[key] = coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def _all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
        if f.init
    )


def _unknown_key(path: str, key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return f"unknown config key '{path}'{hint}"


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type annotation ``tp`` (converting where lossless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, get_args(tp), path)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{path}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {coerce(k, kt, path): coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, options: tuple, path: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for opt in options:
        if opt is type(None):
            continue
        try:
            return coerce(value, opt, path)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(
        errors[0] if len(errors) == 1 else f"{path}: {value!r} matches no allowed type"
    )


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is not None:
            if not INT_MIN <= number <= INT_MAX:  # torch, numpy and the checkpoints hold int64
                raise ConfigError(f"{path}: {value!r} is outside the 64-bit integer range")
            return number
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf / .nan are never a setting that can be right
                raise ConfigError(f"{path}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{path}: expected {name}, got {value!r} ({type(value).__name__})")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["model.dim=64", "train.lr=3e-4"]`` into a nested mapping (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
        except DuplicateKeyError as e:
            raise ConfigError(f"override '{item}': {e}") from e
        except RecursionError as e:
            raise ConfigError(f"override '{key}=...': value nested too deeply") from e
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier '{part}=...'")
            node = nxt
        node[parts[-1]] = value
    return out


INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no code execution) that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        merge = None
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # "<<: *anchor" may be overridden by the mapping's own keys, but two "<<" keys
                # are a repeated key (PyYAML would merge both silently; use "<<: [*a, *b]")
                if merge is not None:
                    where = f"lines {merge.line + 1} and {key_node.start_mark.line + 1}"
                    raise DuplicateKeyError(f"merge key '<<' repeated in one mapping ({where})")
                merge = key_node.start_mark
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                where = f"lines {seen[key].line + 1} and {key_node.start_mark.line + 1}"
                raise DuplicateKeyError(f"key {key!r} repeated in one mapping ({where})")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no code execution), with errors naming the file.

    A key repeated in one mapping is an error (plain YAML loaders keep the last one silently).
    """
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=StrictLoader)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    except RecursionError as e:  # PyYAML composes nodes recursively
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def to_dict(cfg: Any) -> Any:
    """A plain nested dict (for YAML/JSON) of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
