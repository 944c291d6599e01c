"""Run a sweep (:mod:`eidetic.sweep`) with Optuna: trials in-process, workers as processes.

Each trial is a whole :func:`lightning_modules.run.run` in ``<sweep_dir>/trial-NNNN`` with its
own W&B run in the sweep's group. Workers (local processes, or processes on other machines
pointing at the same ``storage``) share one study. A trial that raises or produces a
non-finite loss/objective is told FAIL with its error in the ``error`` user attribute; the
sweep goes on. ``trials.csv``, ``best.json`` and a plot are rewritten (atomically) after
every finished trial.

Budget: ``n_trials`` counts COMPLETE + PRUNED + FAIL trials plus those RUNNING now, so a
rerun never repeats finished trials. A trial whose worker died (Ctrl-C, kill, a crash of
the machine) is marked FAIL with ``interrupted=True``, does not count, and its parameters
are queued again. Dead workers are recognised on the same host (pid gone) when a sweep
starts; trials of workers on other hosts are never touched.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import math
import multiprocessing as mp
import os
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch
from optuna.trial import TrialState

from eidetic.io import atomic_write, write_json_atomic, write_text_atomic
from eidetic.sweep import SweepSpec, is_finite, journal_path, resolve_metric

__all__ = ["TrialCallback", "make_study", "run_sweep", "worker", "write_report", "budget_used"]

log = logging.getLogger("eidetic.sweep")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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
    from .run import run

    return run(cfg, callbacks=callbacks)


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
        _finish_wandb_quietly()
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    trial.set_user_attr("duration_s", round(time.perf_counter() - started, 2))
    study.tell(trial, results if len(results) > 1 else results[0])
    return TrialState.COMPLETE


def _finish_wandb_quietly() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        try:
            wandb.finish(exit_code=1)
        except Exception:
            pass


def worker(spec: SweepSpec, worker_id: int = 0) -> int:
    """Run trials until the study has used its budget; returns how many this worker ran."""
    os.environ.pop("EIDETIC_RUN_DIR", None)
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
        os.environ.pop("EIDETIC_RUN_DIR", None)
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


# ---- report --------------------------------------------------------------------------------
def _objective_columns(spec: SweepSpec) -> list[str]:
    return [o.metric for o in spec.objectives]


def trial_rows(study: optuna.Study, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        values = t.values or [None] * len(spec.objectives)
        for name, v in zip(_objective_columns(spec), values):
            row[name] = v
        for p in spec.params:
            row[p.name] = t.params.get(p.name)
        row["duration_s"] = t.user_attrs.get("duration_s")
        row["run_dir"] = t.user_attrs.get("run_dir")
        row["error"] = t.user_attrs.get("error")
        rows.append(row)
    return rows


def _trial_json(t, spec: SweepSpec) -> dict:
    return {
        "number": t.number,
        "values": dict(zip(_objective_columns(spec), t.values)),
        "params": t.params,
        "run_dir": t.user_attrs.get("run_dir"),
    }


def write_report(study: optuna.Study, spec: SweepSpec) -> None:
    """``trials.csv``, ``best.json`` and ``objective.png`` (one objective) or ``pareto.png`` (several)."""
    out = spec.sweep_dir
    rows = trial_rows(study, spec)
    buf = io.StringIO()
    columns = ["number", "state", *_objective_columns(spec), *[p.name for p in spec.params], "duration_s", "run_dir", "error"]
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "trials.csv", buf.getvalue())

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = [_trial_json(t, spec) for t in (study.best_trials if complete else [])]
    counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    write_json_atomic(
        out / "best.json",
        {
            "sweep": spec.name,
            "study": spec.study,
            "storage": spec.storage_url,
            "objectives": [{"metric": o.metric, "direction": o.direction} for o in spec.objectives],
            "n_trials": spec.n_trials,
            "counts": {k: v for k, v in counts.items() if v},
            "best": best[0] if len(spec.objectives) == 1 and best else None,
            "pareto_front": best if len(spec.objectives) > 1 else None,
        },
    )
    _plot(spec, rows, {b["number"] for b in best}, out / ("pareto.png" if len(spec.objectives) > 1 else "objective.png"))


def _plot(spec: SweepSpec, rows: list[dict], best: set[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _objective_columns(spec)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if len(names) == 1:
        name, sign = names[0], (1 if spec.objectives[0].direction == "minimize" else -1)
        ax.scatter([r["number"] for r in done], [r[name] for r in done], label="complete", color="tab:blue")
        running, xs, ys = math.inf, [], []
        for r in sorted(done, key=lambda r: r["number"]):
            running = min(running, sign * r[name])
            xs.append(r["number"])
            ys.append(sign * running)
        if xs:
            ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
        failed = [r["number"] for r in rows if r["state"] in ("FAIL", "PRUNED")]
        for n in failed:
            ax.axvline(n, color="tab:red", alpha=0.25, lw=1)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{name} ({spec.objectives[0].direction})")
    else:
        x, y = names[0], names[1]
        others = [r for r in done if r["number"] not in best]
        front = sorted((r for r in done if r["number"] in best), key=lambda r: r[x])
        ax.scatter([r[x] for r in others], [r[y] for r in others], color="tab:blue", alpha=0.6, label="dominated")
        ax.plot([r[x] for r in front], [r[y] for r in front], "o-", color="tab:red", label="Pareto front")
        for r in front:
            ax.annotate(str(r["number"]), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{x} ({spec.objectives[0].direction})")
        ax.set_ylabel(f"{y} ({spec.objectives[1].direction})")
    ax.set_title(f"sweep {spec.name}: {len(done)} complete of {len(rows)} trials")
    if done:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def load_study(spec: SweepSpec) -> optuna.Study:
    return optuna.load_study(study_name=spec.study, storage=_storage(spec))


def summary_text(study: optuna.Study, spec: SweepSpec) -> str:
    data = json.loads((spec.sweep_dir / "best.json").read_text())
    lines = [f"sweep {spec.name}: {data['counts']} in {spec.sweep_dir}"]
    for b in ([data["best"]] if data["best"] else data["pareto_front"] or []):
        lines.append(f"  trial {b['number']}: {b['values']} {b['params']}")
    return "\n".join(lines)
