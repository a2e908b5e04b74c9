"""params.yaml access for DVC stages: one section per stage, read once into a typed config.

A stage declares its section as a frozen dataclass and reads it with ``load_config``: unknown
keys, missing keys and values of the wrong type are refused with one line naming the file, the
section and the key, before any work starts. ``load_params`` (the section as a plain dict) stays
for the few readers that take a whole section as data (the serving profiles, drift references).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar, Union

import yaml

PARAMS_FILE = Path("params.yaml")  # relative to the working directory (DVC runs stages at the root)

T = TypeVar("T")


class ParamsError(ValueError):
    """params.yaml is missing, or lacks a section or a key a stage needs, or a value has the wrong type."""


def params_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``BUDGETDIFF_PARAMS`` (read at each call), else params.yaml."""
    return Path(path or os.environ.get("BUDGETDIFF_PARAMS") or PARAMS_FILE)


def load_params(section: str, path: str | os.PathLike | None = None,
                required: Iterable[str] = ()) -> dict[str, Any]:
    """The ``section`` of ``params_path(path)`` as a dict. Raises ``ParamsError`` naming the
    missing file, section or ``required`` keys."""
    path = params_path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the repository root)")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict) or section not in params:
        raise ParamsError(f"params file {path} has no section {section!r}")
    cfg = params[section]
    missing = [k for k in required if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ParamsError(f"params file {path}: section {section!r} lacks {', '.join(missing)}")
    return cfg


def load_config(section: str, cls: type[T], path: str | os.PathLike | None = None,
                overrides: Iterable[str] = ()) -> T:
    """The ``section`` of the params file as an instance of the dataclass ``cls``.

    ``overrides``: further sections whose keys replace the first's, in order (a fine-tune is its
    base stage's section with its own overrides). Every key must be a field of ``cls`` and every
    field without a default must be given; values are checked against the field types
    (``ParamsError`` names the key otherwise)."""
    where = f"params file {params_path(path)}: section {section!r}"
    data = dict(_mapping(load_params(section, path), where))
    for extra in overrides:
        data.update(_mapping(load_params(extra, path), f"params file {params_path(path)}: section {extra!r}"))
        where += f" + {extra!r}"
    return config_from_dict(cls, data, where)


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build the dataclass ``cls`` from ``data`` (nested dataclass fields from nested mappings),
    refusing unknown keys, missing required keys and values of the wrong type."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = _mapping(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(known: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamsError(f"{where} lacks {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()})


def config_dict(config: Any, omit_defaults: bool = False) -> dict[str, Any]:
    """A config dataclass back to plain data (nested dataclasses as dicts), e.g. to hash or log it.
    ``omit_defaults``: leave out the fields that hold their default (nested dataclasses alike),
    i.e. the keys a params section states (a default is what the code used for an absent key), so
    a key hashed from it is the one hashed from the section as a dict."""
    if not omit_defaults:
        return dataclasses.asdict(config)
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = config_dict(value, True) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParamsError(f"{where}: expected a mapping of keys, got {type(value).__name__}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp``: int is accepted for float (YAML writes
    ``1`` for ``1.0``), a list for a tuple; bool is never an int."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ParamsError(f"{where}: must not be null")
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ParamsError(f"{where}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where)
    if value is None:
        raise ParamsError(f"{where}: must not be null (expected {_type_name(tp)})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ParamsError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        return {_coerce(k, args[0], f"{where} (key)"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
