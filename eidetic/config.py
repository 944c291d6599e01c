"""Config loading: ``configs/default.yaml`` is the schema; files and overrides merge on top.

A key that is not in the default config is an error naming the closest valid key; a value
whose type differs from the default's is an error naming the expected type. Keys whose
default is ``null`` take the type given in ``NULLABLE`` (or anything, if not listed).
Validation happens before any work, so a typo never costs a training run.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = ["ConfigError", "DEFAULT_CONFIG", "load_config", "validate", "parse_overrides", "to_yaml"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

# Types of keys whose default is null (the default can't tell us).
NULLABLE: dict[str, tuple[type, ...]] = {
    "run.dir": (str,),
    "data.folder": (str,),
    "model.pretrained": (str,),
    "model.vae.pretrained": (str,),
    "train.resume": (str,),
    "train.min_snr_gamma": (float, int),
    "train.max_epochs": (int,),
    "logging.wandb.group": (str,),
    "logging.wandb.id": (str,),
    "solidmark.train_sample": (int,),
    "solidmark.heldout_sample": (int,),
    "controls.stop.margin": (float, int),
    "controls.stop.p_value": (float, int),
}

# Sections that hold free-form mappings (no schema below them).
OPEN_SECTIONS: set[str] = {"logging.wandb.tags_extra"}


class ConfigError(ValueError):
    """A config that cannot run: says which key and how to fix it."""


def _type_name(types: Iterable[type]) -> str:
    return " or ".join(t.__name__ for t in types)


def _walk(default: dict, user: dict, prefix: str, errors: list[str]) -> None:
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in default:
            valid = [str(k) for k in default]
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
            errors.append(f"unknown config key '{path}': {hint}")
        elif path in OPEN_SECTIONS:
            continue
        elif isinstance(default[key], dict):
            if isinstance(value, dict):
                _walk(default[key], value, path + ".", errors)
            elif value is not None:
                errors.append(f"config key '{path}' is a section; got the value {value!r} (set '{path}.<key>=...' instead)")
        else:
            _check_value(path, default[key], value, errors)


def _check_value(path: str, d: Any, u: Any, errors: list[str]) -> None:
    if u is None:
        return  # null always means "off / use the default behaviour"
    if d is None:
        types = NULLABLE.get(path)
        if types and not isinstance(u, types) or (types and isinstance(u, bool) and bool not in types):
            errors.append(f"config key '{path}' expects {_type_name(types)}, got {type(u).__name__} {u!r}")
        return
    if isinstance(d, list):
        if not isinstance(u, list):
            errors.append(f"config key '{path}' expects a list, got {type(u).__name__} {u!r}")
        return
    if isinstance(d, bool):
        ok = isinstance(u, bool)
    elif isinstance(d, int):
        ok = isinstance(u, int) and not isinstance(u, bool)
    elif isinstance(d, float):
        ok = isinstance(u, (int, float)) and not isinstance(u, bool)
    elif isinstance(d, str):
        ok = isinstance(u, str)
    else:
        ok = True
    if not ok:
        errors.append(f"config key '{path}' expects {type(d).__name__} (default {d!r}), got {type(u).__name__} {u!r}")


def validate(user: DictConfig, default: DictConfig | None = None, source: str = "config") -> None:
    default = default if default is not None else OmegaConf.load(DEFAULT_CONFIG)
    errors: list[str] = []
    _walk(OmegaConf.to_container(default), OmegaConf.to_container(user), "", errors)
    if errors:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(errors))


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {', '.join(bad)}")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: DictConfig | None = None,
    schema: str | Path = DEFAULT_CONFIG,
) -> DictConfig:
    """``schema`` (default.yaml) <- files (left to right) <- ``key=value`` overrides, each validated.

    Other entry points (``protect``, ``imitate``) pass their own schema YAML.
    """
    default = OmegaConf.load(schema)
    layers = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # yaml errors carry line numbers
            raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        validate(layer, default, source=f"config file {path}")
        layers.append(layer)
    cli = parse_overrides(overrides)
    validate(cli, default, source="command-line override")
    cfg = OmegaConf.merge(default, base or {}, *layers, cli)
    # float defaults given as ints (lr=1) become floats so downstream code sees one type
    _coerce_floats(OmegaConf.to_container(default), cfg)
    return cfg


def _coerce_floats(default: dict, cfg: DictConfig, prefix: str = "") -> None:
    for key, d in default.items():
        if key not in cfg or f"{prefix}{key}" in OPEN_SECTIONS:
            continue
        if isinstance(d, dict) and isinstance(cfg[key], DictConfig):
            _coerce_floats(d, cfg[key], f"{prefix}{key}.")
        elif isinstance(d, float) and isinstance(cfg[key], int) and not isinstance(cfg[key], bool):
            cfg[key] = float(cfg[key])


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
