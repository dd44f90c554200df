"""The machinery of mm's configs: nested dataclasses from dicts / YAML / JSON, dotted overrides, validation.

The configs themselves live with what they configure (``mm.layers.config``, ``mm.models.config``,
``mm.eval.config``, ``mm.train.config``); each is a plain dataclass whose ``check()`` yields ``(key, problem)``
pairs about its own values. Every config error names the dotted key it is about (``vision.patch_size``), and is
raised before any model is built or any data is read.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds a bad value. The message names the key."""


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/JSON scalar to the annotated type, or raise ConfigError naming ``key``."""
    if value is None:
        if _allows_none(tp) or tp is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        # try each alternative in order (``list[str] | str``: a list, else a file path)
        alts = [a for a in typing.get_args(tp) if a is not type(None)]
        for alt in alts:
            try:
                return _coerce(value, alt, key)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in alts)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        # PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string; accept plain decimal / exponent notation
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict | Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are errors naming the dotted key."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # keys an earlier version wrote (a class's ``legacy_keys``) are read and dropped
    data = {k: v for k, v in data.items() if k not in getattr(cls, "legacy_keys", ())}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _dataclass_type(hints[name])
        if sub is not None and value is not None:
            kwargs[name] = from_dict(sub, value, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for JSON/YAML."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def parse_value(text: str) -> Any:
    """A command-line override value: YAML scalar/list syntax (``1e-3``, ``true``, ``[a, b]``, ``null``). Text YAML
    cannot read is taken as written: a string, or for ``[a, b]`` a list of strings, so that unquoted globs work
    (``train.lora.targets=[*.attn, *.mlp]``: YAML reads ``*`` as an alias); a wrong type is then named by the
    config's own check."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        t = text.strip()
        if t.startswith("[") and t.endswith("]"):
            return [x.strip().strip("'\"") for x in t[1:-1].split(",") if x.strip()]
        return text


def parse_typed(text: str, tp: Any, key: str) -> Any:
    """A command-line value for a field of type ``tp``: YAML as :func:`parse_value` reads it, a bare comma list
    (``0.9,1.0``) for a list or tuple, ``none`` as well as ``null`` for an optional value; ConfigError naming ``key``
    if it is not of the type."""
    value = None if _allows_none(tp) and text.strip().lower() in ("none", "null") else parse_value(text)
    sequence = any(typing.get_origin(a) in (list, tuple) for a in (tp, *typing.get_args(tp)))
    if isinstance(value, str) and "," in value and sequence:
        value = [parse_value(v) for v in value.split(",")]
    return _coerce(value, tp, key)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys replaced: ``{"vision.patch_dropout": 0.5}``.

    String values are parsed as YAML (so CLI ``key=value`` pairs can be passed through). Setting a
    key inside an optional section that is null (``vision.transformer.moe.num_experts``) creates that
    section with defaults first.
    """
    data = to_dict(cfg)
    cls = type(cfg)
    for dotted, value in overrides.items():
        if isinstance(value, str):
            value = parse_value(value)
        parts = dotted.split(".")
        node, node_cls = data, cls
        for i, part in enumerate(parts):
            key = ".".join(parts[: i + 1])
            hints = typing.get_type_hints(node_cls)
            names = {f.name for f in dataclasses.fields(node_cls)}
            if part not in names:
                raise ConfigError(f"unknown config key {key!r} (valid keys here: {', '.join(sorted(names))})")
            if i == len(parts) - 1:
                node[part] = to_dict(value) if dataclasses.is_dataclass(value) else value
                break
            sub = _dataclass_type(hints[part])
            if sub is None:
                raise ConfigError(f"{key!r} is a value, not a section; cannot set {dotted!r}")
            if node.get(part) is None:
                node[part] = to_dict(sub())
            node, node_cls = node[part], sub
    return validate(from_dict(cls, data))


def parse_overrides(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Command-line ``section.key=value`` strings (or a dict, returned as it is) -> ``{dotted key: value}``;
    values stay strings, parsed as YAML by :func:`apply_overrides`."""
    if isinstance(overrides, dict):
        return overrides
    items = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form section.key=value")
        k, v = ov.split("=", 1)
        items[k.strip()] = v
    return items


def validate(cfg: Any, prefix: str = "") -> Any:
    """Run every nested ``check()``; raise ConfigError for the first problem, naming its dotted key."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, f"{prefix}{f.name}.")
    if hasattr(cfg, "check"):
        for key, msg in cfg.check():
            raise ConfigError(f"{prefix}{key}: {msg}")
    return cfg


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON file into a dict, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its description}, read from the dataclass's source (the configs describe their keys there, for
    the generated docs and for command-line flags made from a config): the comment lines directly above the field
    (no blank line between) followed by the comment(s) on the field's own lines."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        trailing = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        text = " ".join(above + trailing)
        out[node.target.id] = text.replace("noqa: E501", "").strip()
    return out
