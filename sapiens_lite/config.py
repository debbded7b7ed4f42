"""Typed configs: dataclass defaults < YAML files < `a.b=value` command-line overrides.

Every default lives in a dataclass (one per component, joined with `default_factory`). A YAML file
holds only what differs from the defaults. Unknown keys and values of the wrong type are errors that
name the key and list the valid choices, so a misspelt key can never silently become a new setting.

    cfg = load_config(PretrainConfig, ["configs/pretrain/tiny_cpu.yaml"], ["optim.blr=1e-3"])
    save_config(cfg, run_dir / "config.yaml")

Supported field types: bool, int, float, str, `Literal[...]`, `X | None`, `tuple[...]`, `list[X]`,
`dict[str, X]` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from sapiens_lite.errors import ConfigError

T = TypeVar("T")


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (YAML list -> tuple, int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not a valid choice; choose one of: {', '.join(map(repr, choices))}"
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}"
        )
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept any spelling Python's float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML turns `1e-3`-like or `on` strings into other types only when unquoted; be strict.
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from its defaults updated with the (nested, possibly partial) dict `data`.

    Unknown keys and wrong types are errors naming the dotted key. Every dataclass is constructed once,
    from its final values, so `__post_init__` checks see the merged config, never a half-applied layer.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}")
        tp = hints[k]
        if _is_dataclass_type(tp) and isinstance(v, dict):
            # Nested sections start from the parent's default for them (a default_factory may differ
            # from the section class's own defaults), then take the given keys.
            default = _field_default(fields[k])
            base = config_to_dict(default) if default is not None else {}
            kwargs[k] = _build(tp, _merge(base, v), key)
        else:
            kwargs[k] = _coerce(v, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # __post_init__ checks
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _merge(base: dict, update: dict) -> dict:
    """`base` with `update` applied recursively (sections merge, values replace); neither is modified."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_keys(cls: type, data: dict, prefix: str = "") -> None:
    """Unknown keys and wrong types in one layer (a YAML file or the overrides), so the error can name it."""
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}")
        tp = hints[k]
        if _is_dataclass_type(tp) and isinstance(v, dict):
            _check_keys(tp, v, key)
        else:
            _coerce(v, tp, key)


def _dotted_keys(data: dict, prefix: str = "") -> set[str]:
    """The leaf keys of a nested dict, dotted (`{"a": {"b": 1}}` -> {"a.b"})."""
    out: set[str] = set()
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out |= _dotted_keys(v, key)
        else:
            out.add(key)
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """`["a.b=1", "c=[2, 3]"]` -> `{"a": {"b": 1}, "c": [2, 3]}` (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        k = k.strip().removeprefix("--")
        if not k:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        _set_dotted(tree, k, value)
    return tree


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); is it a config file?"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T], files: typing.Sequence[str | os.PathLike] = (), overrides: typing.Sequence[str] = ()
) -> T:
    """Defaults of `cls`, updated by each YAML file in order, then by `a.b=value` overrides.

    The layers are merged first and the config is built once from the result, so checks that involve
    several fields run on the final values. A top-level class may define `finalize(self, explicit)`:
    cross-section derivations and checks, given the dotted keys the files and overrides set (a value the
    user set is checked against what another section implies; a value left unset is derived). It runs
    once, after the merge.
    """
    merged: dict = {}
    for f in files:
        layer = read_yaml(f)
        try:
            _check_keys(cls, layer)
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from None
        merged = _merge(merged, layer)
    if overrides:
        layer = parse_overrides(overrides)
        _check_keys(cls, layer)
        merged = _merge(merged, layer)
    cfg = _build(cls, merged)
    finalize = getattr(cfg, "finalize", None)
    if callable(finalize):
        try:
            cfg = finalize(frozenset(_dotted_keys(merged)))
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


def config_from_dict(cls: type[T], data: dict) -> T:
    """Build `cls` from a (possibly partial) nested dict, e.g. a saved config.json."""
    return _build(cls, data)


def config_to_dict(cfg) -> dict:
    """A plain nested dict (tuples become lists) that YAML/JSON can hold."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
