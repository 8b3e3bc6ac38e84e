"""The journal's one (de)serialisation: a dataclass to JSON-able data and back, by its type hints.

Every step's result, the saved options and the VM's description go through `to_record` and
`from_record`, so a shape is decided here once: a Path is its text, a tuple a list, an Endpoint
`{"host", "port"}`. Reading is lenient the ways older journals need, strict otherwise:

* a key the dataclass no longer has is ignored (older versions wrote more, e.g. `agent_files`);
* a key it does not have yet takes the field's default (and a field left at a default of None
  is not written at all);
* a dataclass written as text (`"127.0.0.1:3737"`, as the restart step once wrote an Endpoint)
  is read with the class's `parse`.

Anything else that does not fit is a JournalError naming the field, not a KeyError deep inside.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import JournalError

T = TypeVar("T")


def to_record(value: object) -> Any:
    """JSON-able data for `value`: dataclasses as dicts of their fields, Paths as text, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_record(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (getattr(value, f.name) is None and f.default is None)  # absent reads as that default
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_record(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_record(v) for k, v in value.items()}
    return value


def from_record(cls: type[T], data: object, where: str = "") -> T:
    """The `cls` that `to_record` wrote as `data` (or an older version did)."""
    value: T = _read(cls, data, where or cls.__name__)
    return value


def _read(kind: Any, data: object, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any or kind is object:
        return data
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _read(option, data, where)
            except JournalError as exc:
                errors.append(str(exc))
        raise JournalError("; ".join(errors))
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return _read_dataclass(kind, data, where)
    if origin in (list, tuple):
        if not isinstance(data, list | tuple):
            raise _wrong(data, "a list", where)
        item = (typing.get_args(kind) or (Any,))[0]
        items = [_read(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(data, dict):
            raise _wrong(data, "an object", where)
        item = typing.get_args(kind)[1]
        return {str(k): _read(item, v, f"{where}.{k}") for k, v in data.items()}
    if kind is Path:
        if not isinstance(data, str):
            raise _wrong(data, "a path", where)
        return Path(data)
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise _wrong(data, "a number", where)
        return float(data)
    if kind in (int, str, bool):
        if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
            raise _wrong(data, kind.__name__, where)
        return data
    raise JournalError(f"{where}: the journal cannot hold a {kind!r}")


def _read_dataclass(cls: type, data: object, where: str) -> Any:
    if isinstance(data, str) and hasattr(cls, "parse"):
        return cls.parse(data)
    if not isinstance(data, dict):
        raise _wrong(data, "an object", where)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _read(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise JournalError(f"{where} has no {f.name!r}")
    return cls(**values)


def _wrong(data: object, what: str, where: str) -> JournalError:
    return JournalError(f"{where} is {data!r}, not {what}")
