"""The sweep tool's schema (``sweep.py``): a hyperparameter search over training config keys.

::

    name: lr-vs-memorization            # also the W&B group of every trial
    base: [configs/tests/tiny.yaml]     # training config files
    overrides: [extraction.enabled=false]
    params:                              # dotted training keys -> search space
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      train.max_steps: {type: int, low: 4, high: 8, step: 2}
      train.lr_schedule: {choices: [constant, cosine]}     # or just [constant, cosine]
    objectives:                          # one: best trial; several: Pareto front
      - {metric: summary.train.final_loss, direction: minimize}
      - {metric: summary.solidmark.eidetic.0.1, direction: minimize}
    n_trials: 20

Metric paths: ``summary.<section>.<key>...`` reads the trial's ``summary.json`` (keys that
themselves contain dots, such as ``0.1``, are matched against the actual keys);
``metrics.<name>`` is the last logged value of ``<name>`` in ``metrics.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from eidetic.config import Section, choice_problem

__all__ = ["SweepConfig", "PruningSettings"]


@dataclass
class PruningSettings(Section):
    enabled: bool = False
    metric: str = "train/loss"  # a logged metric (trainer.callback_metrics)
    pruner: str = "median"  # median | hyperband | percentile | none
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    interval: int = 1  # report every N optimizer steps

    def problems(self) -> list[str]:
        return choice_problem("pruner", self.pruner, ("median", "hyperband", "percentile", "none"))


@dataclass
class SweepConfig(Section):
    name: Optional[str] = None  # default: the sweep file's name
    base: list[str] = field(default_factory=list)  # training config files (relative to the sweep file, the cwd or the repository)
    overrides: list[str] = field(default_factory=list)  # training overrides of every trial
    params: dict[str, Any] = field(default_factory=dict)  # dotted training key -> {type, low, high, log, step} or {choices}
    objectives: list[Any] = field(default_factory=list)  # {metric, direction} or a metric path
    n_trials: int = 10
    sampler: str = "tpe"  # tpe | random | nsga2 (several objectives)
    seed: Optional[int] = 0
    pruning: PruningSettings = field(default_factory=PruningSettings)
    storage: Optional[str] = None  # default sqlite:///<dir>/study.db; any RDB URL, or a journal file path
    study_name: Optional[str] = None  # default: name
    dir: Optional[str] = None  # default: sweeps/<name>
    group: Optional[str] = None  # W&B group (default: name)
    workers: int = 1  # worker processes on this machine
    export_wandb: Optional[str] = None  # write the equivalent W&B sweep YAML to this file and exit

    def problems(self) -> list[str]:
        out = choice_problem("sampler", self.sampler, ("tpe", "random", "nsga2"))
        if self.n_trials < 1:
            out.append(f"n_trials must be at least 1, got {self.n_trials}")
        if self.workers < 1:
            out.append(f"workers must be at least 1, got {self.workers}")
        if not self.objectives:
            out.append("a sweep needs at least one objective, e.g. objectives: [{metric: summary.train.final_loss, direction: minimize}]")
        if self.pruning.enabled and len(self.objectives) > 1:
            out.append("pruning works with a single objective only (Optuna cannot prune multi-objective trials)")
        return out
