"""Build a `Config` from defaults, a YAML file and dotted overrides; write it back out.

Every key is checked against the dataclass tree and every value against its field's type,
so a typo or a wrong type is a one-line `ConfigError` that lists the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ld3m.config.schema import Config
from ld3m.errors import ConfigError

T = TypeVar("T")


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file at `path` (a file or a preset name; its `base:` chain first),
    then `key.sub=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(str(path))
        tree = read_with_bases(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value, source=f"override '{item}'")
    source = f"config file {path}" if path is not None else "overrides"
    return build(Config, tree, prefix="", source=source)


def preset_names() -> list[str]:
    """The presets shipped inside the package (ld3m/presets/<name>.yaml)."""
    return sorted(p.name[: -len(".yaml")] for p in presets_dir().iterdir() if p.suffix == ".yaml")


def presets_dir() -> Path:
    return Path(str(resources.files("ld3m") / "presets"))


def resolve_config(name: str, relative_to: Path | None = None) -> Path:
    """A config file: an existing path (absolute, or relative to the cwd or to `relative_to`),
    else the preset of that name."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    preset = presets_dir() / f"{name}.yaml"
    if preset.is_file():
        return preset
    close = difflib.get_close_matches(name, preset_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"config '{name}' is neither a YAML file nor a preset; {hint}"
        f"presets: {', '.join(preset_names())}"
    )


def read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping at `path`, laid over the chain of files its `base:` key names (a preset
    name or a path relative to the file): the file's own keys win."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"config files name each other as base in a cycle ({chain}); break it")
    tree = read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a preset name or a file path")
    parent = read_with_bases(resolve_config(base, path.parent), (*seen, path.resolve()))
    return deep_merge(parent, tree)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top, section by section."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass an existing YAML file to --config"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        raise ConfigError(
            f"config file {path} is not valid YAML ({where}); fix its syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split `eval.epochs=300` into ('eval.epochs', 300), the value read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override '{item}' must look like section.key=value, e.g. eval.epochs=300"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Assign `value` at dotted `key` inside nested dicts."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type[T], data: Any, prefix: str, source: str) -> T:
    """Instantiate dataclass `cls` from a (possibly partial) mapping, checking keys and types."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix + str(key), list(fields), where, source))
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, prefix + name + ".", source)
        else:
            values[name] = coerce(value, hint, prefix + name, source)
    return cls(**values)


def unknown_key_message(key: str, valid: list[str], section: str, source: str) -> str:
    """One line naming the bad key, the closest valid key and the section's keys."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown config key '{key}' ({source}){hint} valid keys in {section}: {', '.join(valid)}"
    )


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against type `hint`, converting where lossless (int->float, list->tuple)."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".", source)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else type_message(key, value, hint, source))
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(
                f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}"
            )
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(type_message(key, value, hint, source))
        inner = args[0] if args else Any
        return tuple(
            coerce(v.strip() if isinstance(v, str) else v, inner, key, source) for v in items
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(type_message(key, value, hint, source))
        kt, vt = args or (Any, Any)
        return {coerce(k, kt, key, source): coerce(v, vt, f"{key}.{k}", source)
                for k, v in value.items()}  # fmt: skip
    return coerce_scalar(value, hint, key, source)


def coerce_scalar(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check a scalar against bool/int/float/str."""
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(type_message(key, value, hint, source))


def type_message(key: str, value: Any, hint: Any, source: str) -> str:
    """One line naming the key, the expected type and the value given."""
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return f"{source}: '{key}' must be of type {name}, got {value!r} ({type(value).__name__})"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists), for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        else:
            out[f.name] = value
    return out


def nondefault(cfg: Any) -> dict[str, Any]:
    """`dotted.key` -> value of every setting of a config (or config section) that differs from
    its dataclass default: what identifies a configuration, unchanged when ld3m adds a new
    setting with a default."""
    default, out = to_dict(type(cfg)()), {}

    def walk(tree: dict[str, Any], ref: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(ref.get(key), dict) and ref[key]:
                walk(value, ref[key], f"{prefix}{key}.")
            elif key not in ref or ref[key] != value:
                out[prefix + key] = value

    walk(to_dict(cfg), default, "")
    return out


def save_config(cfg: Config, path: Path) -> None:
    """Write the merged config as YAML (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys
