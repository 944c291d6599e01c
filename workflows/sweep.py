"""The sweep workflow: a hyperparameter search (:mod:`eidetic.schema.sweep`) run with Optuna.

Each trial is a whole :func:`workflows.train.run` in ``<sweep_dir>/trial-NNNN`` with its own
W&B run in the sweep's group. Workers (local processes, or processes on other machines
pointing at the same ``storage``) share one study. A trial that raises or produces a
non-finite loss/objective is told FAIL with its error in the ``error`` user attribute; the
sweep goes on. ``trials.csv``, ``best.json`` and a plot are rewritten (atomically) after
every finished trial (:mod:`workflows.sweep_report`).

Budget: ``n_trials`` counts COMPLETE + PRUNED + FAIL trials plus those RUNNING now, so a
rerun never repeats finished trials. A trial whose worker died (Ctrl-C, kill, a crash of
the machine) is marked FAIL with ``interrupted=True``, does not count, and its parameters
are queued again. Dead workers are recognised on the same host (pid gone) when a sweep
starts; trials of workers on other hosts are never touched.
"""

from __future__ import annotations

import fcntl
import logging
import math
import multiprocessing as mp
import os
import re
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from eidetic.config import load
from eidetic.errors import ConfigError
from eidetic.io import write_text_atomic
from eidetic.schema.sweep import PruningSettings, SweepConfig

from .rundir import finish_wandb
from .sweep_report import resolve_metric, to_wandb_sweep, write_report

__all__ = ["Schema", "SweepSpec", "load_config", "load_sweep", "spec_from_config", "TrialCallback", "make_study", "run_sweep",
           "worker", "budget_used", "run", "done_message"]

log = logging.getLogger("eidetic.sweep")
Schema = SweepConfig
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


REPO_ROOT = Path(__file__).resolve().parent.parent


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
    pruning: PruningSettings = field(default_factory=PruningSettings)
    workers: int = 1
    export_wandb: str | None = None
    config: DictConfig | None = field(default=None, repr=False)  # the resolved sweep config it came from
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

    def trial_config(self, values: dict[str, Any], extra: Sequence[str] = ()):
        from . import train

        return train.load_config(self.base, [*self.trial_overrides(values), *extra])


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


def spec_from_config(cfg: DictConfig, source: Path | None = None) -> SweepSpec:
    """The sweep a typed config describes (``source``: the sweep file, for relative paths and the default name)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    name = data["name"] or (source.stem if source else None)
    if not name:
        raise ConfigError("a sweep needs a name (name=..., or give the sweep file with --config)")
    objs = []
    for o in data["objectives"]:
        o = {"metric": o} if isinstance(o, str) else dict(o)
        unknown = set(o) - {"metric", "direction"}
        if unknown:
            raise ConfigError(f"objective {o}: unknown field(s) {sorted(unknown)} (an objective is {{metric, direction}})")
        direction = o.get("direction", "minimize")
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"objective {o.get('metric')}: direction must be minimize or maximize, got {direction!r}")
        if not str(o.get("metric", "")).startswith(("summary.", "metrics.")):
            raise ConfigError(f"objective metric must start with 'summary.' or 'metrics.', got {o.get('metric')!r}")
        objs.append(Objective(str(o["metric"]), direction))
    spec = SweepSpec(
        name=str(name),
        path=source,
        base=[_resolve_file(str(b), source) for b in data["base"]],
        overrides=[str(o) for o in data["overrides"]],
        params=[_param(k, v) for k, v in data["params"].items()],
        objectives=objs,
        n_trials=int(data["n_trials"]),
        sampler=data["sampler"],
        seed=data["seed"],
        pruning=cfg.pruning,
        storage=data["storage"],
        study_name=data["study_name"],
        dir=Path(data["dir"]) if data["dir"] else None,
        group=data["group"],
        workers=int(data["workers"]),
        export_wandb=data["export_wandb"],
        config=cfg,
    )
    # every parameter must be a valid config key of the right type: fail before any trial runs
    spec.trial_config({p.name: p.example() for p in spec.params})
    return spec


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> SweepSpec:
    """The sweep of a command line: ``--config SWEEP.yaml ... key=value``."""
    cfg = load(Schema, files, overrides)
    return spec_from_config(cfg, Path(files[-1]).resolve() if files else None)


def load_sweep(path: str | Path | None = None, data: dict | None = None, **fields: Any) -> SweepSpec:
    """A sweep from a file and/or a mapping; ``fields`` replace top-level keys (``n_trials=8``)."""
    layer = {**(data or {}), **{k: v for k, v in fields.items() if v is not None}}
    cfg = load(Schema, [path] if path else [], extra=[("sweep fields", layer)] if layer else ())
    return spec_from_config(cfg, Path(path).resolve() if path else None)


def journal_path(storage: str) -> Path | None:
    """A storage string naming a journal file (``*.log``/``*.journal`` path or ``journal:PATH``), else None."""
    if storage.startswith("journal:"):
        return Path(storage[len("journal:"):])
    if "://" not in storage:
        return Path(storage)
    return None


def is_finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


class TrialCallback(pl.Callback):
    """Reports a logged metric to the Optuna trial (pruning) and stops on a non-finite loss."""

    def __init__(self, trial: optuna.Trial, metric: str | None = None, interval: int = 1, loss_key: str = "train/loss"):
        self.trial = trial
        self.metric = metric
        self.interval = max(1, int(interval))
        self.loss_key = loss_key
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:
            return  # a gradient-accumulation micro-batch: the step has not advanced
        self._last_step = step
        metrics = trainer.callback_metrics
        loss = metrics.get(self.loss_key)
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            raise FloatingPointError(f"{self.loss_key} is {float(loss)} at step {step}")
        if self.metric is None or step % self.interval or self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.metric} is {value} at step {step}")
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric}={value:.5g})")


# ---- study ---------------------------------------------------------------------------------
def _storage(spec: SweepSpec):
    url = spec.storage_url
    journal = journal_path(url)
    if journal is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        journal.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several processes write one SQLite file: wait for the lock instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return optuna.storages.RDBStorage(url)


def _sampler(spec: SweepSpec, worker_id: int, n_existing: int = 0):
    # workers must not draw the same points, nor a resumed worker the points of its first run
    seed = None if spec.seed is None else int(spec.seed) + 7919 * worker_id + 104729 * n_existing
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, spec.n_trials // 3)))


def _pruner(spec: SweepSpec):
    p = spec.pruning
    if not p.enabled or p.pruner == "none":
        return optuna.pruners.NopPruner()
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.n_warmup_steps))
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)


def make_study(spec: SweepSpec, worker_id: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=spec.study,
        storage=_storage(spec),
        directions=spec.directions,
        sampler=_sampler(spec, worker_id),
        pruner=_pruner(spec),
        load_if_exists=True,
    )
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = _sampler(spec, worker_id, existing)
    return study


def budget_used(trials) -> int:
    """Trials that count against ``n_trials``: finished (not interrupted) and running."""
    return sum(
        1 for t in trials
        if t.state == TrialState.RUNNING or (t.state in FINISHED and not t.user_attrs.get("interrupted"))
    )


@contextmanager
def _lock(spec: SweepSpec):
    """Serialise 'count, then ask' among processes sharing the sweep directory."""
    with open(spec.sweep_dir / ".ask.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _requeue(study: optuna.Study, trial_id: int, params: dict, reason: str) -> None:
    storage = study._storage
    storage.set_trial_user_attr(trial_id, "error", reason)
    storage.set_trial_user_attr(trial_id, "interrupted", True)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    study.enqueue_trial(params, skip_if_exists=False)


def recover_interrupted(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead local workers FAIL (interrupted) and queue their params again."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid is not None and pid != os.getpid() and not _pid_alive(int(pid)):
            _requeue(study, t._trial_id, t.params, "interrupted: worker process gone")
            n += 1
    return n


# ---- trials --------------------------------------------------------------------------------
def _run(cfg, callbacks):  # indirection so tests can make a trial fail
    from . import train

    return train.run(cfg, callbacks=callbacks)


def run_trial(spec: SweepSpec, study: optuna.Study, trial: optuna.Trial) -> TrialState:
    run_dir = spec.sweep_dir / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    started = time.perf_counter()
    try:
        values = {p.name: p.suggest(trial) for p in spec.params}
        extra = [
            f"run.dir={run_dir}",
            f"run.name={spec.name}-trial-{trial.number:04d}",
            f"logging.wandb.group={spec.wandb_group}",
            "logging.wandb.id=null",
            "train.resume=null",
        ]
        cfg = spec.trial_config(values, extra)
        reporter = TrialCallback(trial, spec.pruning.metric if spec.pruning.enabled else None, spec.pruning.interval)
        _run(cfg, [reporter])
        results = [resolve_metric(run_dir, o.metric) for o in spec.objectives]
        bad = [f"{o.metric}={v}" for o, v in zip(spec.objectives, results) if not is_finite(v)]
        if bad:
            raise FloatingPointError(f"objective not finite or missing: {', '.join(bad)}")
    except optuna.TrialPruned as exc:
        trial.set_user_attr("duration_s", round(time.perf_counter() - started, 2))
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C (Lightning turns it into SystemExit): retry later
        _requeue(study, trial._trial_id, trial.params, f"interrupted: {type(exc).__name__}")
        raise
    except Exception as exc:  # the sweep goes on
        message = f"{type(exc).__name__}: {exc}"
        log.warning("trial %d failed: %s", trial.number, message)
        trial.set_user_attr("error", message[:2000])
        trial.set_user_attr("duration_s", round(time.perf_counter() - started, 2))
        if run_dir.is_dir():
            write_text_atomic(run_dir / "error.txt", traceback.format_exc())
        finish_wandb(exit_code=1)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    trial.set_user_attr("duration_s", round(time.perf_counter() - started, 2))
    study.tell(trial, results if len(results) > 1 else results[0])
    return TrialState.COMPLETE


def worker(spec: SweepSpec, worker_id: int = 0) -> int:
    """Run trials until the study has used its budget; returns how many this worker ran."""
    study = make_study(spec, worker_id)
    ran = 0
    while True:
        with _lock(spec):
            if budget_used(study.get_trials(deepcopy=False)) >= spec.n_trials:
                break
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("worker", worker_id)
        run_trial(spec, study, trial)
        ran += 1
        try:
            write_report(study, spec)
        except Exception as exc:  # a report is never worth a sweep
            log.warning("could not write the sweep report: %s", exc)
    return ran


def _worker_main(spec: SweepSpec, worker_id: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    worker(spec, worker_id)


def run_sweep(spec: SweepSpec, workers: int = 1) -> optuna.Study:
    """Run (or resume) a sweep with ``workers`` processes on this machine; returns the study."""
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    study = make_study(spec)  # create the study once before workers race to
    with _lock(spec):
        recovered = recover_interrupted(study)
    if recovered:
        log.warning("%d interrupted trial(s) queued again", recovered)
    if workers <= 1:
        worker(spec, 0)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(spec, i), name=f"sweep-worker-{i}") for i in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:  # the workers got Ctrl-C too: give them a moment to requeue, then stop them
            for p in procs:
                p.join(timeout=15)
                if p.is_alive():
                    p.terminate()  # its RUNNING trial is requeued when the sweep restarts
            raise
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            log.warning("worker(s) exited with an error: %s", ", ".join(failed))
    write_report(study, spec)
    return study


def run(spec: SweepSpec) -> Path:
    """Run (or resume) the sweep, or with ``export_wandb`` write the W&B sweep file; returns its path."""
    if spec.export_wandb:
        import yaml

        write_text_atomic(spec.export_wandb, yaml.safe_dump(to_wandb_sweep(spec), sort_keys=False))
        return Path(spec.export_wandb)
    run_sweep(spec, workers=spec.workers)
    return spec.sweep_dir


def done_message(path: Path) -> str:
    if path.suffix in (".yaml", ".yml"):
        return f"W&B sweep config: {path}  (wandb sweep {path}; wandb agent ENTITY/PROJECT/ID)"
    return f"sweep directory: {path} (trials.csv, best.json)"


def console_summary(path: Path):
    if path.suffix in (".yaml", ".yml"):  # an exported W&B sweep file: nothing ran
        return None
    from .sweep_report import console_summary as summary

    return summary(path)
