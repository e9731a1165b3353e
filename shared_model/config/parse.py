"""Strict parsing of the typed configs: dictionaries, YAML files and overrides, errors that name
the dotted field (e.g. ``model.sam.lora_rank``) and, for Flower's run config, the kebab-case key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping, strictly.

    Args:
        cls: The dataclass type.
        data: Mapping of field name to value; nested dataclasses take nested mappings.
        path: Dotted prefix used in error messages.

    Raises:
        ConfigError: On an unknown key or a value of the wrong type, naming the field.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def merge(cfg: T, overrides: dict[str, Any], path: str = "") -> T:
    """Return a copy of dataclass ``cfg`` with (nested) ``overrides`` applied strictly."""
    return from_dict(type(cfg), _deep_update(to_dict(cfg), overrides, path, type(cfg)), path)


def _deep_update(base: dict, upd: dict, path: str, cls: type) -> dict:
    out = dict(base)
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in upd.items():
        if key not in names:
            where = path or cls.__name__
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys are {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _deep_update(base[key], value, f"{path}.{key}" if path else key, tp)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def blame_overrides(err: ConfigError, source: str, overrides: Mapping[str, Any],
                    reparse: Callable[[], Any], flag: str = "--set") -> ConfigError:
    """The error of a config parsed with ``overrides``, naming who gave the bad value.

    If the file alone (``reparse``) fails the same way, the file is to blame and ``err`` is kept.
    Otherwise an override is: the error names ``flag`` and the override key as the user wrote it
    (``--set federation.num_server_rounds=-1: federation.num_server_rounds: must be >= 1``).
    """
    try:
        reparse()
    except ConfigError as file_err:
        if str(file_err) == str(err):
            return err
    message = str(err).removeprefix(f"{source}: ")
    named = [k for k in overrides if message.startswith((f"{k}:", f"{k}[", f"{k}."))]
    items = " ".join(f"{flag} {k}={overrides[k]}" for k in (named or list(overrides)))
    return ConfigError(f"{items}: {message}")


def kebab(name: str) -> str:
    """``snake_case`` -> ``kebab-case`` (Flower's run-config keys)."""
    return name.replace("_", "-")


def _field(name: str, prefix: str) -> str:
    """Field name as the source spells it: kebab-case in the run config (``privacy-``), else snake."""
    return kebab(name) if prefix.endswith("-") else name


def _raise_first(checks: list[tuple[str, bool, str]], prefix: str) -> None:
    """Raise ConfigError ``"<prefix><field>: <why>"`` for the first failed ``(field, ok, why)``."""
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: {why}")
