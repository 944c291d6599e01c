"""Sweep specification: a YAML file describing a hyperparameter search.

::

    name: lr-vs-memorization            # also the W&B group of every trial
    base: [configs/tests/tiny.yaml]     # config files merged over configs/default.yaml
    overrides: [extraction.enabled=false]
    params:
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      train.max_steps: {type: int, low: 4, high: 8, step: 2}
      train.lr_schedule: {choices: [constant, cosine]}
    objectives:                          # one: best trial; several: Pareto front
      - {metric: summary.train.final_loss, direction: minimize}
      - {metric: summary.solidmark.eidetic.0.1, direction: minimize}
    n_trials: 20
    sampler: tpe                         # tpe | random | nsga2 (several objectives)
    seed: 0
    pruning: {enabled: true, metric: train/loss, pruner: median, n_startup_trials: 2, n_warmup_steps: 2, interval: 1}
    storage: null                        # default sqlite:///<dir>/study.db; any RDB URL or a journal file path
    study_name: null                     # default: name
    dir: null                            # default: sweeps/<name>

Metric paths: ``summary.<section>.<key>...`` reads the trial's ``summary.json`` (keys that
themselves contain dots, such as ``0.1``, are matched against the actual keys);
``metrics.<name>`` is the last logged value of ``<name>`` in ``metrics.csv``.
Everything here is engine-independent; :mod:`lightning_modules.sweep` runs it with Optuna and
:func:`to_wandb_sweep` exports the same search space for ``wandb agent``.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .config import DEFAULT_CONFIG, ConfigError, load_config

__all__ = [
    "Param", "Objective", "Pruning", "SweepSpec", "load_sweep", "resolve_metric", "metric_wandb_name",
    "to_wandb_sweep", "format_override", "journal_path",
]

REPO_ROOT = DEFAULT_CONFIG.parent.parent
_TOP_KEYS = {"name", "base", "overrides", "params", "objectives", "n_trials", "sampler", "seed", "pruning",
             "storage", "study_name", "dir", "group"}
_PRUNING_KEYS = {"enabled", "metric", "pruner", "n_startup_trials", "n_warmup_steps", "interval"}


@dataclass
class Param:
    name: str  # dotted config key
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def example(self) -> Any:
        return self.choices[0] if self.kind == "categorical" else self.low


@dataclass
class Objective:
    metric: str
    direction: str = "minimize"


@dataclass
class Pruning:
    enabled: bool = False
    metric: str = "train/loss"  # a logged metric (trainer.callback_metrics)
    pruner: str = "median"  # median | hyperband | percentile | none
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    interval: int = 1  # report every N optimizer steps


@dataclass
class SweepSpec:
    name: str
    path: Path | None
    base: list[Path]
    overrides: list[str]
    params: list[Param]
    objectives: list[Objective]
    n_trials: int = 10
    sampler: str = "tpe"
    seed: int | None = 0
    pruning: Pruning = field(default_factory=Pruning)
    storage: str | None = None
    study_name: str | None = None
    dir: Path | None = None
    group: str | None = None

    @property
    def sweep_dir(self) -> Path:
        return (self.dir or Path("sweeps") / self.name).resolve()

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.sweep_dir / 'study.db'}"

    @property
    def study(self) -> str:
        return self.study_name or self.name

    @property
    def wandb_group(self) -> str:
        return self.group or self.name

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def trial_overrides(self, values: dict[str, Any]) -> list[str]:
        return [*self.overrides, *(format_override(k, v) for k, v in values.items())]

    def trial_config(self, values: dict[str, Any], extra: list[str] = ()):
        return load_config(self.base, [*self.trial_overrides(values), *extra])


def format_override(key: str, value: Any) -> str:
    """``key=value`` that OmegaConf parses back to the same value and type."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp}"  # YAML 1.1 floats need a dot
    elif isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w./-]*", value) and value not in ("true", "false", "null"):
        text = value
    elif isinstance(value, str):
        text = "'" + value.replace("'", "\\'") + "'"
    else:
        text = str(value)
    return f"{key}={text}"


def _resolve_file(entry: str, sweep_path: Path | None) -> Path:
    p = Path(entry)
    if p.is_absolute():
        return p
    for root in (Path.cwd(), sweep_path.parent if sweep_path else None, REPO_ROOT):
        if root is not None and (root / p).is_file():
            return (root / p).resolve()
    raise ConfigError(f"sweep base config not found: {entry}")


def _param(name: str, spec: Any) -> Param:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep param '{name}': expected a mapping like {{type: float, low: .., high: ..}} or {{choices: [..]}}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(f"sweep param '{name}': unknown field(s) {sorted(unknown)}")
    if "choices" in spec:
        choices = list(spec["choices"])
        if not choices or any(not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
            raise ConfigError(f"sweep param '{name}': choices must be a non-empty list of scalars")
        return Param(name, "categorical", choices=choices)
    kind = spec.get("type", "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"sweep param '{name}': type must be float or int (or give choices), got {kind!r}")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"sweep param '{name}': needs low and high")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise ConfigError(f"sweep param '{name}': low ({low}) must be below high ({high})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"sweep param '{name}': log scale needs low > 0")
    if log and spec.get("step") not in (None, 1):
        raise ConfigError(f"sweep param '{name}': step cannot be combined with log")
    return Param(name, kind, low=low, high=high, log=log, step=spec.get("step"))


def load_sweep(path: str | Path | None = None, data: dict | None = None, **overrides: Any) -> SweepSpec:
    """Parse and validate a sweep YAML (or ``data``); ``overrides`` replace top-level fields (n_trials=...)."""
    sweep_path = Path(path).resolve() if path else None
    if data is None:
        if sweep_path is None or not sweep_path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        data = OmegaConf.to_container(OmegaConf.load(sweep_path), resolve=True)
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    name = data.get("name") or (sweep_path.stem if sweep_path else None)
    if not name:
        raise ConfigError("a sweep needs a name")
    base = data.get("base") or []
    base = [base] if isinstance(base, str) else list(base)
    objectives = data.get("objectives")
    if not objectives:
        raise ConfigError("a sweep needs at least one objective, e.g. objectives: [{metric: summary.train.final_loss, direction: minimize}]")
    if isinstance(objectives, (dict, str)):
        objectives = [objectives]
    objs = []
    for o in objectives:
        o = {"metric": o} if isinstance(o, str) else o
        direction = o.get("direction", "minimize")
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"objective {o.get('metric')}: direction must be minimize or maximize, got {direction!r}")
        if not str(o.get("metric", "")).startswith(("summary.", "metrics.")):
            raise ConfigError(f"objective metric must start with 'summary.' or 'metrics.', got {o.get('metric')!r}")
        objs.append(Objective(str(o["metric"]), direction))
    pruning = data.get("pruning") or {}
    if isinstance(pruning, bool):
        pruning = {"enabled": pruning}
    bad = set(pruning) - _PRUNING_KEYS
    if bad:
        raise ConfigError(f"unknown pruning key(s) {sorted(bad)}; valid: {sorted(_PRUNING_KEYS)}")
    pruning = Pruning(**pruning)
    if pruning.enabled and len(objs) > 1:
        raise ConfigError("pruning works with a single objective only (Optuna cannot prune multi-objective trials)")
    if pruning.pruner not in ("median", "hyperband", "percentile", "none"):
        raise ConfigError(f"pruning.pruner must be median, hyperband, percentile or none, got {pruning.pruner!r}")
    sampler = data.get("sampler", "tpe")
    if sampler not in ("tpe", "random", "nsga2"):
        raise ConfigError(f"sampler must be tpe, random or nsga2, got {sampler!r}")
    n_trials = int(data.get("n_trials", 10))
    if n_trials < 1:
        raise ConfigError("n_trials must be at least 1")
    spec = SweepSpec(
        name=str(name),
        path=sweep_path,
        base=[_resolve_file(str(b), sweep_path) for b in base],
        overrides=[str(o) for o in data.get("overrides") or []],
        params=[_param(k, v) for k, v in (data.get("params") or {}).items()],
        objectives=objs,
        n_trials=n_trials,
        sampler=sampler,
        seed=data.get("seed", 0),
        pruning=pruning,
        storage=data.get("storage"),
        study_name=data.get("study_name"),
        dir=Path(data["dir"]) if data.get("dir") else None,
        group=data.get("group"),
    )
    # every parameter must be a valid config key of the right type: fail before any trial runs
    spec.trial_config({p.name: p.example() for p in spec.params})
    return spec


# ---- metrics -------------------------------------------------------------------------------
def _lookup(tree: Any, parts: list[str]) -> Any:
    """Walk ``parts`` into nested dicts, joining parts when a key itself contains dots."""
    if not parts:
        return tree
    if not isinstance(tree, dict):
        raise KeyError(".".join(parts))
    for n in range(len(parts), 0, -1):  # longest key first: "0.1" before "0"
        key = ".".join(parts[:n])
        if key in tree:
            try:
                return _lookup(tree[key], parts[n:])
            except KeyError:
                continue
    raise KeyError(".".join(parts))


def resolve_metric(run_dir: str | Path, metric: str) -> float | None:
    """The value of ``summary.…`` or ``metrics.<name>`` for a finished run (None if absent)."""
    import json

    run_dir = Path(run_dir)
    kind, _, rest = metric.partition(".")
    if kind == "summary":
        path = run_dir / "summary.json"
        if not path.exists():
            return None
        try:
            value = _lookup(json.loads(path.read_text()), rest.split("."))
        except KeyError:
            return None
        return None if value is None else float(value)
    if kind == "metrics":
        path = run_dir / "metrics.csv"
        if not path.exists():
            return None
        last = None
        with path.open() as fh:
            for row in csv.DictReader(fh):
                if row.get(rest) not in (None, ""):
                    last = float(row[rest])
        return last
    raise ValueError(f"metric must start with summary. or metrics.: {metric}")


def metric_wandb_name(metric: str) -> str:
    """Name under which a metric appears in a W&B run summary.

    Logged metrics keep their name (``train/loss``); summary.json entries are flattened with
    ``/`` (``summary/solidmark/eidetic/0.1``): numeric keys such as ``0.1`` stay whole.
    """
    kind, _, rest = metric.partition(".")
    if kind == "metrics":
        return rest
    parts: list[str] = []
    for piece in rest.split("."):
        if parts and piece.isdigit() and re.fullmatch(r"\d+", parts[-1]) and "/" not in parts[-1]:
            parts[-1] = f"{parts[-1]}.{piece}"  # 0.1, 0.05 are keys, not paths
        else:
            parts.append(piece)
    return "/".join(["summary", *parts])


def flatten_summary(summary: dict, prefix: str = "summary") -> dict[str, Any]:
    """``{"train": {"final_loss": 1}}`` -> ``{"summary/train/final_loss": 1}`` (numbers and strings only)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flatten_summary(value, name))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


# ---- export --------------------------------------------------------------------------------
def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def to_wandb_sweep(spec: SweepSpec) -> dict:
    """The equivalent W&B sweep config (``wandb sweep FILE``; then ``wandb agent ID``).

    W&B optimises one metric: with several objectives the first is used (a W&B sweep has no
    Pareto search). Pruning maps to Hyperband early termination over the logged pruning metric.
    """
    parameters: dict[str, dict] = {}
    for p in spec.params:
        if p.kind == "categorical":
            parameters[p.name] = {"values": list(p.choices)}
        elif p.kind == "int":
            if p.step not in (None, 1):
                parameters[p.name] = {"values": list(range(int(p.low), int(p.high) + 1, int(p.step)))}
            else:
                dist = "q_log_uniform_values" if p.log else "int_uniform"
                parameters[p.name] = {"distribution": dist, "min": int(p.low), "max": int(p.high)}
                if p.log:
                    parameters[p.name]["q"] = 1
        else:
            if p.step:
                n = int(round((p.high - p.low) / p.step))
                parameters[p.name] = {"values": [p.low + i * p.step for i in range(n + 1)]}
            else:
                dist = "log_uniform_values" if p.log else "uniform"
                parameters[p.name] = {"distribution": dist, "min": float(p.low), "max": float(p.high)}
    command = ["${env}", "${interpreter}", "${program}"]
    for b in spec.base:
        command += ["--config", _rel(b)]
    command += [*spec.overrides, f"logging.wandb.group={spec.wandb_group}", "logging.wandb.mode=online", "${args}"]
    first = spec.objectives[0]
    out = {
        "program": "train.py",
        "name": spec.name,
        "method": "random" if spec.sampler == "random" else "bayes",
        "metric": {"name": metric_wandb_name(first.metric), "goal": first.direction},
        "parameters": parameters,
        "command": command,
        "run_cap": spec.n_trials,
    }
    if spec.pruning.enabled:
        out["early_terminate"] = {"type": "hyperband", "min_iter": max(1, spec.pruning.n_warmup_steps)}
    return out


def journal_path(storage: str) -> Path | None:
    """A storage string naming a journal file (``*.log``/``*.journal`` path or ``journal:PATH``), else None."""
    if storage.startswith("journal:"):
        return Path(storage[len("journal:"):])
    if "://" not in storage:
        return Path(storage)
    return None


def is_finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
