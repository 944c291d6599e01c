"""Memorization controls: act on what the monitors found.

:class:`MemorizationControlCallback` is handed the run's monitors (:mod:`callbacks.monitor`)
and, after every training batch, reads each one's newest :class:`MonitorResult`:

* **stop** (``controls.stop``): end training (``trainer.should_stop``) when the SolidMark
  eidetic count at ``controls.delta`` exceeds chance by ``margin``, or its p-value falls
  below ``p_value``; or, with ``mode=keep``, train on and keep
  ``checkpoints/under_budget.ckpt``, the newest state an evaluation found under the budget;
* **flagged images** (``controls.flagged``): exclude (weight 0 at once, gone from batches
  from the next epoch) or down-weight the training images a monitor has per-image evidence
  for (``MonitorResult.flagged``), for the monitors named in ``sources``.

Every action is appended to ``actions.jsonl`` with its reason, logged as ``controls/*``
scalars (and as text on W&B) and summarised in the ``controls`` summary section. The
control's state is checkpointed, so a resumed run keeps excluding what it excluded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch

from eidetic.errors import ConfigError
from eidetic.io import update_summary

from .loggers import log_scalars, log_wandb
from .monitor import BudgetSignal, Monitor

__all__ = ["MemorizationControlCallback"]


class MemorizationControlCallback(pl.Callback):
    def __init__(self, cfg, monitors: Sequence[Monitor] = ()):
        self.cfg = cfg  # the controls section
        self.monitors = list(monitors)
        self.actions: list[dict] = []
        self.stopped = False
        self.excluded: set[str] = set()
        self.weights: dict[str, float] = {}
        self.under_budget_step: int | None = None
        self.budget_exceeded = False
        self._seen: dict[str, int] = {}  # source -> step of the newest result acted on
        self._installed = False

    @property
    def key(self) -> str:
        return f"{float(self.cfg.delta):g}"

    def setup(self, trainer, pl_module, stage=None):
        if self._installed:
            return
        self._installed = True
        if self.cfg.flagged.action != "none":
            known = {m.source for m in self.monitors}
            unknown = sorted(set(self.cfg.flagged.sources) - known)
            if unknown:
                raise ConfigError(
                    f"controls.flagged.sources names {unknown}, but this run's monitors are {sorted(known) or 'none'}: "
                    "enable them (solidmark.enabled / extraction.enabled) or drop them from the list"
                )
        pl_module.batch_transforms.append(self._weigh)

    def _weigh(self, module, batch, batch_idx):
        if not self.weights:
            return batch
        w = torch.tensor([self.weights.get(i, 1.0) for i in batch["id"]], dtype=torch.float32, device=module.device)
        if "loss_weight" in batch:
            w = w * batch["loss_weight"].to(w)
        return {**batch, "loss_weight": w}

    def stop_reason(self, signal: BudgetSignal | dict | None, step: int) -> str | None:
        s = self.cfg.stop
        if signal is None or step < s.min_step:
            return None
        if isinstance(signal, dict):
            signal = BudgetSignal(**{k: signal.get(k, float("nan")) for k in ("eidetic", "chance", "p_value")})
        if s.margin is not None and signal.eidetic - signal.chance > s.margin:
            return (f"SolidMark eidetic count {signal.eidetic:g} exceeds chance {signal.chance:.3f} by "
                    f"{signal.eidetic - signal.chance:.3f} > margin {s.margin:g} (delta {self.key})")
        if s.p_value is not None and signal.p_value < s.p_value:
            return f"SolidMark p-value {signal.p_value:.3g} < bound {s.p_value:g} (eidetic {signal.eidetic:g}, delta {self.key})"
        return None

    # ---- resume: what was decided before the interruption still holds ---------------------
    def state_dict(self) -> dict:
        # plain lists and dicts: checkpoints load with weights_only=True
        return {"actions": self.actions, "stopped": self.stopped, "excluded": sorted(self.excluded),
                "weights": dict(self.weights), "under_budget_step": self.under_budget_step,
                "budget_exceeded": self.budget_exceeded, "seen": dict(self._seen)}

    def load_state_dict(self, state: dict) -> None:
        self.actions = list(state.get("actions", []))
        self.stopped = bool(state.get("stopped", False))
        self.excluded = set(state.get("excluded", []))
        self.weights = dict(state.get("weights", {}))
        self.under_budget_step = state.get("under_budget_step")
        self.budget_exceeded = bool(state.get("budget_exceeded", False))
        self._seen = dict(state.get("seen", {}))

    def on_fit_start(self, trainer, pl_module):
        # runs after a checkpoint's callback state is restored and before the dataloaders
        # are built, so restored exclusions shape the first resumed epoch
        if self.excluded and trainer.datamodule is not None:
            trainer.datamodule.excluded.update(self.excluded)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.cfg.stop.mode == "keep":  # the monitors' end-of-training evaluation
            self.check(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.reload_dataloaders_every_n_epochs and self.excluded:
            trainer.reload_dataloaders_every_n_epochs = 0  # reloaded once for this epoch; back to off

    # ---- acting -------------------------------------------------------------------------
    def _fresh_results(self):
        """Results published since the last check, one per monitor."""
        fresh = []
        for monitor in self.monitors:
            result = monitor.latest
            if result is not None and self._seen.get(monitor.source) != result.step:
                self._seen[monitor.source] = result.step
                fresh.append(result)
        return fresh

    def check(self, trainer, pl_module) -> None:
        step = trainer.global_step
        for result in self._fresh_results():
            signal = result.signal(self.cfg.delta)
            if signal is not None:
                self._apply_stop_rule(trainer, pl_module, signal, step)
            if self.cfg.flagged.action != "none" and result.source in self.cfg.flagged.sources:
                self._apply_flags(trainer, pl_module, result.source, result.flagged)

    def _apply_stop_rule(self, trainer, pl_module, signal: BudgetSignal, step: int) -> None:
        reason = self.stop_reason(signal, step)
        if self.cfg.stop.mode == "stop":
            if reason and not self.stopped:
                self.stopped = True
                trainer.should_stop = True
                self._act(trainer, pl_module, "stop", reason, signal=vars(signal))
        elif not self.budget_exceeded:
            if reason:
                self.budget_exceeded = True
                kept = f"; checkpoints/under_budget.ckpt keeps step {self.under_budget_step}" if self.under_budget_step is not None else ""
                self._act(trainer, pl_module, "budget_exceeded", reason + kept, signal=vars(signal))
            else:
                self._keep_under_budget(trainer, pl_module)

    def _apply_flags(self, trainer, pl_module, source: str, flagged) -> None:
        new = sorted(set(flagged) - set(self.weights))
        if not new:
            return
        exclude = self.cfg.flagged.action == "exclude"
        weight = 0.0 if exclude else float(self.cfg.flagged.weight)
        for i in new:
            self.weights[i] = weight
        if exclude:
            self.excluded.update(new)
            trainer.datamodule.excluded.update(new)
            trainer.reload_dataloaders_every_n_epochs = 1  # drop them from batches from the next epoch
        self._act(trainer, pl_module, self.cfg.flagged.action, f"{len(new)} image(s) flagged by {source}", ids=new, weight=weight)

    def _keep_under_budget(self, trainer, pl_module) -> None:
        """Checkpoint the state the monitor just cleared (stop.mode=keep): training goes on,
        and this file always holds the newest weights known to be under the budget."""
        if pl_module.run_dir is None:
            return
        path = Path(pl_module.run_dir) / "checkpoints" / "under_budget.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            tmp.replace(path)
        self.under_budget_step = trainer.global_step
        if trainer.is_global_zero:
            update_summary(pl_module.run_dir, "controls", self.section())

    def _act(self, trainer, pl_module, action: str, reason: str, **extra) -> None:
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "action": action, "reason": reason, "time": time.time(), **extra}
        self.actions.append(row)
        if trainer.is_global_zero and pl_module.run_dir is not None:
            with open(Path(pl_module.run_dir) / "actions.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            update_summary(pl_module.run_dir, "controls", self.section())
        log_scalars(trainer, {"controls/stopped": float(self.stopped), "controls/excluded": float(len(self.excluded)),
                              "controls/actions": float(len(self.actions))})
        log_wandb(trainer, lambda wandb: {"controls/action": f"step {row['step']}: {action}: {reason}"})

    def section(self) -> dict:
        return {
            "stopped": self.stopped,
            "stop_step": next((a["step"] for a in self.actions if a["action"] == "stop"), None),
            "budget_exceeded": self.budget_exceeded,
            "under_budget_step": self.under_budget_step,
            "excluded": sorted(self.excluded),
            "downweighted": sorted(i for i, w in self.weights.items() if w > 0),
            "actions": [{k: v for k, v in a.items() if k != "ids"} for a in self.actions],
        }
