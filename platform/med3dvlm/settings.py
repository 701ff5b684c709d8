"""One settings system. Every group of settings the platform takes is a dataclass whose fields carry their one line
of help, their bounds and their choices beside them (`setting`): the training config (`config.Config`), an evaluation
(`eval.runner.EvalConfig`), the Serve app's arguments (`serve.app.AppSettings`) and a sweep (`sweep.SweepConfig`).
One loader fills any of them from mappings (a YAML file, `key=value` overrides, command-line flags: `load_settings`)
with one set of refusals, each naming the setting: an unknown key with the nearest known one, a value of the wrong
type, a number out of bounds, a choice not offered. The same fields make the command-line flags (`add_flags`) and the
configuration reference (`settings_reference`).

    ec = load_settings(EvalConfig, merge(read_settings_file("e.yaml"), parse_overrides(["limit=8"])), FLAGS)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import field
from typing import Any, get_args, get_origin, get_type_hints

import yaml


def setting(default, help: str, least=None, most=None, above: bool = False, choices=None):
    """A field with its one line of help, its bounds (`least`/`most`, None: unbounded; `above`: the value must exceed
    `least`; a tuple's every value is held to them) and its choices (None, meaning "not set", always allowed)."""
    meta = {"help": help, "bounds": (least, most, above) if least is not None or most is not None else None,
            "choices": tuple(choices) if choices else None}
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def required(help: str, choices=None):
    """A field with no default (the loader refuses a run without it, naming it)."""
    return field(metadata={"help": help, "bounds": None, "choices": tuple(choices) if choices else None})


POSITIVE = {"least": 0, "above": True}


@dataclasses.dataclass(frozen=True)
class Spelling:
    """How refusals name a setting: as a config key (`config key 'train.seed'`), an argument (`argument 'replicas'`)
    or a command-line flag (`--batch-size`)."""

    what: str
    flag: bool = False

    def name(self, key: str) -> str:
        return "--" + key.replace("_", "-") if self.flag else f"{self.what} {key!r}"


CONFIG, FLAGS, ARGS = Spelling("config key"), Spelling("setting", flag=True), Spelling("argument")


# ---------------------------------------------------------------- reading values


def yaml_error_line(e: Exception) -> str:
    """A YAML error's text on one line (PyYAML's spans several, with a caret under the column)."""
    return " ".join(str(e).replace("^", "").split())


def read_settings_file(path: str, read=None) -> dict:
    """A YAML (or JSON) file of settings as a mapping; ValueError naming the file and the reason. `read` reads its text
    (default: a local file; `storage.read_text` for URIs)."""
    from pathlib import Path

    try:
        text = (read or (lambda p: Path(p).read_text()))(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: cannot read: not valid YAML ({yaml_error_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return data


def parse_overrides(overrides: list[str], empty="") -> dict:
    """`a.b.c=value` strings as one nested mapping, each value parsed as YAML (`key=` gives `empty`); ValueError naming
    a bad one."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else empty
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({yaml_error_line(e)})") from None
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r} sets a key inside {p!r}, which another override sets to {child!r}")
            node = child
        node[parts[-1]] = value
    return nested


def merge(*layers: dict) -> dict:
    """Mappings merged in order (a later one wins, key by key, nested mappings merged)."""
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- the loader


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """`value` as type `tp`; ValueError with `name` (the setting as its refusals spell it). Text is accepted for numbers
    and booleans (flags and Serve's `key=value` arguments arrive as text) and comma-separated for tuples."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):  # a group of settings given a single value
        raise ValueError(f"{name} is a group of settings; it expects a mapping, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(kinds[0], value, name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} expects a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, name) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{name} expects {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, name) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"{name} expects true/false, got {value!r}")
        return value
    if tp is float:
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            return float(value)
        except ValueError:
            raise ValueError(f"{name} expects a number, got {value!r}") from None
    if tp is int:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        try:
            if isinstance(value, str) or (whole and not isinstance(value, bool)):
                return int(value)
        except ValueError:
            pass
        raise ValueError(f"{name} expects a whole number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off (and yes/no) as booleans; text settings spell them on/off
            return "on" if value else "off"
        return str(value)
    return value


def _suggest(root, cls, k: str, prefix: str) -> str:
    """'; did you mean ...' from the keys at this level and, for a misplaced key, anywhere in the settings."""
    import difflib

    here = [f"{prefix}.{f.name}" if prefix else f.name for f in dataclasses.fields(cls) if f.init]
    anywhere = [key for key, tp, f in fields_of(root) if f.init and not dataclasses.is_dataclass(tp)
                and key.rsplit(".", 1)[-1] == k]
    close = anywhere or difflib.get_close_matches(f"{prefix}.{k}" if prefix else k, here, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _from_dict(cls, data: dict, sp: Spelling, prefix: str = "", base=None, root=None):
    """`cls` from a (nested) mapping over `base` (None: the fields' defaults)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    values = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            raise ValueError(f"unknown {sp.what} {key!r}{_suggest(root or cls, cls, k, prefix)}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            under = getattr(base, k) if base is not None else _default(fields[k])
            values[k] = _from_dict(hints[k], v, sp, key, under, root or cls)
        else:
            values[k] = _coerce(hints[k], v, sp.name(key))
    if base is None:
        missing = [n for n, f in fields.items() if n not in values and _default(f) is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{sp.name(missing[0])} is required")
        return cls(**values)
    return dataclasses.replace(copy.deepcopy(base), **values)


def load_settings(cls, data: dict, sp: Spelling = CONFIG, base=None):
    """The one loader: `cls` (a settings dataclass) from a mapping over `base`, every value coerced to its field's type
    and held to its bounds and choices; ValueError naming the setting (as `sp` spells it)."""
    return check_settings(_from_dict(cls, data, sp, base=base), sp)


def check_settings(obj, sp: Spelling = CONFIG):
    """Every number within its field's bounds (each of a tuple's) and every choice among its field's; None passes
    (it means "not set"). Returns `obj`; ValueError naming the setting."""
    for key, tp, f in fields_of(type(obj)):
        if dataclasses.is_dataclass(tp) or not f.init:
            continue
        value = obj
        for part in key.split("."):
            value = getattr(value, part)
        values = [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if v is not None]
        if f.metadata.get("bounds") and not all(number_ok(v, *f.metadata["bounds"][:2], whole=isinstance(v, int),
                                                          above=f.metadata["bounds"][2]) for v in values):
            raise ValueError(f"{sp.name(key)} is {value!r}; it must be {bounds_text(*f.metadata['bounds'])}")
        if f.metadata.get("choices") and not all(v in f.metadata["choices"] for v in values):
            raise ValueError(f"{sp.name(key)} is {value!r}; it must be one of {', '.join(f.metadata['choices'])}")
    return obj


def number_ok(value, least=None, most=None, whole: bool = False, above: bool = False) -> bool:
    """A number setting's rule: a real int/float (never a bool; an int when `whole`), finite, at least `least` (above
    it when `above`) and at most `most` (None: no bound)."""
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not math.isfinite(value):
        return False
    low = least is not None and (value <= least if above else value < least)
    return not low and (most is None or value <= most)


def bounds_text(least=None, most=None, above: bool = False) -> str:
    """"at least 1 and at most 3", "above 0", ...: what `number_ok` asks, in words ("" when unbounded)."""
    parts = ([f"{'above' if above else 'at least'} {least:g}"] if least is not None else []) + \
        ([f"at most {most:g}"] if most is not None else [])
    return " and ".join(parts)


def fields_of(cls, prefix: str = ""):
    """(dotted key, type, field) of every setting, depth first; a nested group comes before its own fields."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        yield key, hints[f.name], f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from fields_of(hints[f.name], key)


# ---------------------------------------------------------------- flags and the reference


def add_flags(parser, cls, skip=()) -> None:
    """One flag per field of a flat settings dataclass (`--batch-size`; `--no-x` for a boolean that defaults to true),
    with its help and default. A flag not given is absent from the parsed namespace (the file and overrides then
    decide); every value goes through `load_settings`."""
    import argparse

    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), _default(f)
        where = {"dest": f.name, "default": argparse.SUPPRESS}
        if default is True or default is False:
            parser.add_argument(flag.replace("--", "--no-") if default else flag, action="store_const",
                                const=not default, help=f.metadata["help"], **where)
            continue
        shown = " (required)" if default is dataclasses.MISSING else "" if default is None else \
            f" (default: {','.join(map(str, default)) if isinstance(default, tuple) else default})"
        parser.add_argument(flag, choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                            f.name.upper(), help=f.metadata["help"] + shown, **where)


def type_name(tp) -> str:
    name = getattr(tp, "__name__", None) if get_origin(tp) is None else str(tp).replace("typing.", "")
    return name.replace(" | ", " or ")  # a table cell holds no |


def settings_reference(title: str, cls, how: str) -> str:
    """A flat settings dataclass as a reference table: name, type, default, bounds or choices, help."""
    lines = [f"## {title}", "", how, "", "| setting | type | default | allowed | what it sets |", "|---|---|---|---|---|"]
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _default(f)
        default = "required" if default is dataclasses.MISSING else f"`{json.dumps(default)}`"
        lines.append(f"| `{f.name}` | {type_name(hints[f.name])} | {default} | {allowed_text(f)} | "
                     f"{f.metadata.get('help', '')} |")
    return "\n".join(lines) + "\n"


def allowed_text(f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return ", ".join(f.metadata["choices"])
    return bounds_text(*f.metadata["bounds"]) if f.metadata.get("bounds") else ""
