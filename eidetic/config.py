"""Typed configs: one dataclass schema per tool is the single source of its keys, defaults,
types and allowed ranges (the schemas live in :mod:`eidetic.schema`).

``load(Schema, files, overrides)`` merges the schema's defaults <- an optional base (a run's
saved config) <- YAML files (left to right) <- ``key=value`` overrides. Before anything
merges, every layer is checked against the schema:

* a key the schema does not have is an error naming the closest valid key
  (``unknown config key 'train.lrr': did you mean 'train.lr'?``);
* a value of the wrong type is an error naming the expected type;
* after merging, every section's ``problems()`` (ranges, choices, combinations) is asked,
  and all problems of all sections are reported together.

The result is an OmegaConf ``DictConfig`` built from the schema (struct mode: assigning an
unknown key later is an error too), so code reads ``cfg.train.lr`` and ``OmegaConf.to_yaml``
writes the resolved config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from eidetic.errors import ConfigError

__all__ = ["ConfigError", "Section", "choice_problem", "load", "defaults", "build_section", "check_layer", "parse_overrides", "to_yaml", "key_paths"]


class Section:
    """Base of every schema dataclass: ``problems()`` lists what is wrong with its values.

    Messages name keys relative to the section (``"lr must be > 0, got -1"``); the loader
    prefixes the section's path. Sub-sections are asked by the loader, not by their parent.
    """

    def problems(self) -> list[str]:
        return []


def choice_problem(name: str, value: Any, options: Sequence[Any]) -> list[str]:
    """``[]`` when ``value`` is one of ``options``, else one message with the closest option."""
    if value in options:
        return []
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return [f"{name} must be one of {', '.join(map(str, options))}; got {value!r}{hint}"]


# ---- schema introspection ---------------------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        (arg,) = typing.get_args(inner)[:1] or (Any,)
        name = f"a list of {_type_name(arg)}" if arg is not Any else "a list"
    elif origin is dict or inner is dict:
        name = "a mapping"
    elif inner is Any:
        name = "anything"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _value_ok(tp, value) -> bool:
    if tp is Any:
        return True
    inner, optional = _unwrap_optional(tp)
    if value is None:
        return optional or inner is Any
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        args = typing.get_args(inner)
        return not args or all(_value_ok(args[0], v) for v in value)
    if origin is dict or inner is dict:
        return isinstance(value, (dict, DictConfig))
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    return True


def key_paths(cls, prefix: str = "") -> list[str]:
    """Every leaf key of a schema as a dotted path (for help texts and suggestions)."""
    out = []
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            out += key_paths(tp, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _closest_key(key: str, here: list[str], leaves: list[str]) -> list[str]:
    """Best guess for a mistyped key: a deeper key of that exact name ('border' for
    'data.border'), a close key at this level, a close key deeper down, a looser match here."""
    names = {p.rsplit(".", 1)[-1]: p for p in reversed(leaves)}
    if key in names:
        return [names[key]]
    for pool, cutoff in ((here, 0.75), (list(names), 0.75), (here, 0.5)):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=cutoff)
        if close:
            return [names.get(close[0], close[0]) if pool is not here else close[0]]
    return []


def check_layer(cls, layer: dict, prefix: str = "") -> list[str]:
    """Unknown keys and wrong types in one (plain-dict) layer against the schema ``cls``."""
    errors: list[str] = []
    hints = _hints(cls)
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if key not in hints:
            valid = list(hints)
            # a deeper key given at the wrong level ('border=4' for 'data.border') first
            close = _closest_key(str(key), valid, key_paths(cls))
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
            errors.append(f"unknown config key '{path}': {hint}")
            continue
        tp = hints[key]
        element = _section_list_element(tp)
        if element is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    errors += check_layer(element, item, f"{path}[{i}].")
                else:
                    errors.append(f"config key '{path}[{i}]' must be a mapping of {element.__name__} keys, got {item!r}")
        elif _is_section(tp):
            if isinstance(value, dict):
                errors += check_layer(tp, value, path + ".")
            elif value is not None:
                errors.append(f"config key '{path}' is a section; got the value {value!r} (set '{path}.<key>=...' instead)")
        elif (fraction := _fraction(tp, value)) is not None:
            layer[key] = fraction
        elif not _value_ok(tp, value):
            errors.append(f"config key '{path}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return errors


_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def _fraction(tp, value) -> float | None:
    """A float setting written as a fraction ('16/255', as budgets in 8-bit levels are written)."""
    if _unwrap_optional(tp)[0] is not float or not isinstance(value, str):
        return None
    match = _FRACTION.match(value)
    if not match or float(match.group(2)) == 0:
        return None
    return float(match.group(1)) / float(match.group(2))


def _section_list_element(tp):
    """The section type of a ``list[Section]`` field, else None."""
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) in (list, tuple):
        args = typing.get_args(inner)
        if args and _is_section(args[0]):
            return args[0]
    return None


def _problems(obj, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(obj, Section):
        out += [f"{prefix}{p}" for p in obj.problems()]
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out += _problems(value, f"{prefix}{f.name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if dataclasses.is_dataclass(item):
                        out += _problems(item, f"{prefix}{f.name}[{i}].")
    return out


# ---- loading ----------------------------------------------------------------------------------
def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {', '.join(bad)}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:
        raise ConfigError(f"cannot parse the overrides {list(overrides)}: {exc}") from exc


def _read_file(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return layer


def defaults(cls) -> DictConfig:
    """The schema's defaults as a typed ``DictConfig``."""
    return OmegaConf.structured(cls)


def load(
    cls,
    files: Iterable[str | Path] = (),
    overrides: Sequence[str] = (),
    base: DictConfig | dict | None = None,
    base_source: str = "base config",
    extra: Sequence[tuple[str, dict]] = (),
) -> DictConfig:
    """``cls`` defaults <- ``base`` <- ``files`` <- ``extra`` (named mappings) <- ``overrides``;
    raises :class:`ConfigError`."""
    layers: list[tuple[str, DictConfig]] = []
    if base is not None:
        layers.append((base_source, base if isinstance(base, DictConfig) else OmegaConf.create(base)))
    for f in files:
        layers.append((f"config file {f}", _read_file(Path(f))))
    layers += [(source, OmegaConf.create(layer)) for source, layer in extra]
    if overrides:
        layers.append(("command-line override", parse_overrides(overrides)))
    for i, (source, layer) in enumerate(layers):
        container = OmegaConf.to_container(layer, resolve=False)
        errors = check_layer(cls, container)  # also turns fractions such as '16/255' into floats
        if errors:
            raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(errors))
        layers[i] = (source, OmegaConf.create(container))
    cfg = defaults(cls)
    try:
        cfg = OmegaConf.merge(cfg, *[layer for _, layer in layers])
    except Exception as exc:  # type conversions check_layer lets through (rare): still one clear line
        raise ConfigError(f"invalid config: {str(exc).splitlines()[0]}") from exc
    problems = _problems(OmegaConf.to_object(cfg))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def build_section(cls, values=None, **overrides):
    """A checked instance of the schema dataclass ``cls`` from a mapping and/or keywords
    (for code that builds one section directly, e.g. a callback in a test)."""
    layer = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values or {})
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        layer = OmegaConf.to_container(OmegaConf.structured(values))
    layer.update(overrides)
    errors = check_layer(cls, layer)
    if errors:
        raise ConfigError(f"invalid {cls.__name__}:\n  " + "\n  ".join(errors))
    obj = OmegaConf.to_object(OmegaConf.merge(defaults(cls), layer))
    problems = _problems(obj)
    if problems:
        raise ConfigError(f"invalid {cls.__name__}:\n  " + "\n  ".join(problems))
    return obj
