"""A sweep's outputs and exports: trial metrics, ``trials.csv``/``best.json``/plots, the W&B sweep."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from eidetic.io import atomic_write, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from workflows.sweep import SweepSpec

__all__ = ["resolve_metric", "metric_wandb_name", "to_wandb_sweep", "trial_rows", "write_report", "console_summary"]


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


def summary_text(study: optuna.Study, spec: SweepSpec) -> str:
    data = json.loads((spec.sweep_dir / "best.json").read_text())
    lines = [f"sweep {spec.name}: {data['counts']} in {spec.sweep_dir}"]
    for b in ([data["best"]] if data["best"] else data["pareto_front"] or []):
        lines.append(f"  trial {b['number']}: {b['values']} {b['params']}")
    return "\n".join(lines)


def console_summary(sweep_dir: Path):
    """The sweep's essentials: trial counts and the best trial (or the Pareto front)."""
    from .report import Table, essentials

    path = Path(sweep_dir) / "best.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    objectives = [f"{o['metric']} ({o['direction']})" for o in data.get("objectives", [])]
    best = [data["best"]] if data.get("best") else list(data.get("pareto_front") or [])
    params = list(dict.fromkeys(k for b in best for k in (b.get("params") or {})))
    table = Table("best trial" if data.get("best") else "Pareto front", ["trial", *objectives, *params],
                  [[str(b.get("number")), *[f"{v:.4g}" if isinstance(v, (int, float)) else str(v) for v in (b.get("values") or [])],
                    *[str((b.get("params") or {}).get(p, "")) for p in params]] for b in best]) if best else None
    counts = ", ".join(f"{k.lower()} {v}" for k, v in (data.get("counts") or {}).items())
    lines = [f"trials: {counts or 'none'} of {data.get('n_trials')}"] + ([] if best else ["no trial completed"])
    plots = [p for p in ("objective.png", "pareto.png") if (Path(sweep_dir) / p).exists()]
    return essentials(f"sweep {data.get('sweep')}: study {data.get('study')}", [table], lines,
                      [f"trials: {Path(sweep_dir) / 'trials.csv'}", *[f"plot: {Path(sweep_dir) / p}" for p in plots]])
