"""Mitigations wired into training, and memorization controls that act on the monitors.

* :class:`MitigationCallback` installs the ``mitigation:`` section's transforms on the module
  (``batch_transforms``: caption perturbation, flips; ``embedding_transforms``: Gaussian
  text-embedding noise; ``sample_filters``: Wen et al.'s norm filter) and writes a
  ``mitigation`` summary section with what they did (captions changed, samples skipped,
  near-duplicates removed). The algorithms live in :mod:`eidetic.mitigations`.
* :class:`MemorizationControlCallback` reads the monitors after every training batch —
  SolidMark counts from ``trainer.callback_metrics`` (``solidmark/eidetic@δ``,
  ``solidmark/chance@δ``, ``solidmark/p_value@δ``), flagged images from the SolidMark
  callback's last result, the extraction callback's verified captions, or any callback with
  a ``flagged_ids`` attribute — and acts: stops training (``trainer.should_stop``) when the
  eidetic count exceeds chance by ``controls.stop.margin`` or the p-value falls below
  ``controls.stop.p_value``; excludes flagged images (``datamodule.excluded``; weight 0 at
  once, gone from batches from the next epoch) or down-weights them (``loss_weight``). Every
  action is appended to ``actions.jsonl`` with its reason, logged as ``controls/*`` scalars
  (W&B included) and summarised in the ``controls`` summary section.

Callbacks run in list order, so the controls come after the monitors in ``build_callbacks``.
The last checkpoint before a stop is the one ``StepCheckpoint`` keeps as ``last.ckpt``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from eidetic import mitigations as mit
from eidetic.io import update_summary

__all__ = ["MitigationCallback", "MemorizationControlCallback", "flagged_from_callbacks"]


def _micro(module, batch_idx: int) -> int:
    return batch_idx % max(1, module.cfg.train.grad_accum)


class MitigationCallback(pl.Callback):
    def __init__(self, cfg, captions: list[str], near_dedup_removed: list[str] | None = None):
        self.cfg = cfg  # the mitigation section
        self.vocabulary = mit.caption_vocabulary(captions)
        self.near_dedup_removed = list(near_dedup_removed or [])
        self.captions_seen = 0
        self.captions_changed = 0
        self.flipped = 0
        self.wen_seen = 0
        self.wen_skipped = 0
        self.wen_norms: list[float] = []
        self._installed = False

    @staticmethod
    def active(cfg) -> bool:
        m = cfg.mitigation
        return bool(m.caption.methods) or m.text_noise_sigma > 0 or m.near_dedup.enabled or m.augment.flip > 0 or m.wen.enabled

    def setup(self, trainer, pl_module, stage=None):
        if self._installed:
            return
        self._installed = True
        m = self.cfg
        if m.caption.methods:
            mit.perturb_captions([], list(m.caption.methods), float(m.caption.prob), mit.step_rng(0, 0))  # validate early
            pl_module.batch_transforms.append(self._captions)
        if m.augment.flip > 0:
            pl_module.batch_transforms.append(self._flip)
        if m.text_noise_sigma > 0:
            pl_module.embedding_transforms.append(self._embedding_noise)
        if m.wen.enabled:
            pl_module.sample_filters.append(self._wen_filter)

    # ---- the hooks --------------------------------------------------------------------------
    def _captions(self, module, batch, batch_idx):
        rng = mit.step_rng(module.cfg.seed, module.global_step, _micro(module, batch_idx), salt=1)
        new, changed = mit.perturb_captions(batch["caption"], list(self.cfg.caption.methods), float(self.cfg.caption.prob), rng, self.vocabulary)
        self.captions_seen += len(new)
        self.captions_changed += sum(changed)
        return {**batch, "caption": new}

    def _flip(self, module, batch, batch_idx):
        g = mit.step_generator(module.cfg.seed, module.global_step, _micro(module, batch_idx), salt=3)
        pixels, flipped = mit.random_flip(batch["pixel_values"], float(self.cfg.augment.flip), g)
        self.flipped += int(flipped.sum())
        return {**batch, "pixel_values": pixels}

    def _embedding_noise(self, module, hidden, batch_idx):
        g = mit.step_generator(module.cfg.seed, module.global_step, _micro(module, batch_idx), salt=2)
        return mit.embedding_noise(hidden, float(self.cfg.text_noise_sigma), g)

    def _wen_filter(self, module, batch, x_t, t, hidden):
        b = x_t.shape[0]
        if module.global_step < self.cfg.wen.warmup_steps:
            return torch.ones(b, dtype=torch.bool, device=x_t.device)
        with torch.no_grad():
            uncond = module.text([""]).detach()

            def predict(x, tt, h):
                return module.unet(x, tt, encoder_hidden_states=h).sample

            keep, norms = mit.wen_keep_mask(predict, x_t, t, hidden.detach(), uncond, float(self.cfg.wen.threshold))
        self.wen_seen += b
        self.wen_skipped += int((~keep).sum())
        self.wen_norms += norms.tolist()
        return keep

    # ---- resume: counts cover the whole run, not just its last leg ---------------------------
    _COUNTERS = ("captions_seen", "captions_changed", "flipped", "wen_seen", "wen_skipped", "wen_norms")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for name in self._COUNTERS:
            if name in state:
                setattr(self, name, state[name])

    # ---- reporting --------------------------------------------------------------------------
    def section(self) -> dict:
        norms = torch.tensor(self.wen_norms) if self.wen_norms else None
        return {
            "caption_methods": list(self.cfg.caption.methods),
            "captions_seen": self.captions_seen,
            "captions_changed": self.captions_changed,
            "text_noise_sigma": float(self.cfg.text_noise_sigma),
            "flipped": self.flipped,
            "near_duplicates_removed": len(self.near_dedup_removed),
            "wen_seen": self.wen_seen,
            "wen_skipped": self.wen_skipped,
            "wen_norm_median": float(norms.median()) if norms is not None else None,
        }

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and pl_module.run_dir is not None:
            update_summary(pl_module.run_dir, "mitigation", self.section())
        for logger in trainer.loggers:
            logger.log_metrics({"mitigation/wen_skipped": float(self.wen_skipped), "mitigation/captions_changed": float(self.captions_changed)}, step=trainer.global_step)


def flagged_from_callbacks(trainer, delta: float, sources) -> dict[str, set[str]]:
    """Image ids flagged by each monitor source present on the trainer."""
    records = trainer.datamodule.records
    out: dict[str, set[str]] = {}
    for cb in trainer.callbacks:
        ids = getattr(cb, "flagged_ids", None)
        if ids is not None and not isinstance(cb, MemorizationControlCallback):
            out.setdefault(getattr(cb, "source", type(cb).__name__), set()).update(ids)
        name = type(cb).__name__
        if "solidmark" in sources and name == "SolidMarkCallback" and getattr(cb, "last_result", None):
            rows = cb.last_result["per_image"]
            hits = (rows["loss"] < delta) & (rows["trained"] > 0.5)
            out.setdefault("solidmark", set()).update(records[int(i)].id for i in rows["index"][hits].long().tolist())
        if "extraction" in sources and name == "ExtractionProbeCallback" and getattr(cb, "rows", None):
            last = max(r["step"] for r in cb.rows)
            captions = {r["caption"] for r in cb.rows if r["step"] == last and r.get("verified") == "matching"}
            out.setdefault("extraction", set()).update(r.id for r in records if r.split == "train" and r.caption in captions)
    return out


class MemorizationControlCallback(pl.Callback):
    def __init__(self, cfg):
        self.cfg = cfg  # the controls section
        self.actions: list[dict] = []
        self.stopped = False
        self.excluded: set[str] = set()
        self.weights: dict[str, float] = {}
        self.under_budget_step: int | None = None
        self.budget_exceeded = False
        self._last_signal: tuple | None = None
        self._installed = False

    @property
    def key(self) -> str:
        return f"{float(self.cfg.delta):g}"

    def setup(self, trainer, pl_module, stage=None):
        if not self._installed:
            self._installed = True
            pl_module.batch_transforms.append(self._weigh)

    def _weigh(self, module, batch, batch_idx):
        if not self.weights:
            return batch
        ids = batch["id"]
        w = torch.tensor([self.weights.get(i, 1.0) for i in ids], dtype=torch.float32, device=module.device)
        if "loss_weight" in batch:
            w = w * batch["loss_weight"].to(w)
        return {**batch, "loss_weight": w}

    def signal(self, trainer) -> dict | None:
        m = trainer.callback_metrics
        names = {k: f"solidmark/{k}@{self.key}" for k in ("eidetic", "chance", "p_value")}
        if names["eidetic"] not in m:
            return None
        return {k: float(m[v]) for k, v in names.items() if v in m}

    def stop_reason(self, signal: dict | None, step: int) -> str | None:
        s = self.cfg.stop
        if signal is None or step < s.min_step:
            return None
        if s.margin is not None and "chance" in signal and signal["eidetic"] - signal["chance"] > s.margin:
            return (f"SolidMark eidetic count {signal['eidetic']:g} exceeds chance {signal['chance']:.3f} by "
                    f"{signal['eidetic'] - signal['chance']:.3f} > margin {s.margin:g} (delta {self.key})")
        if s.p_value is not None and "p_value" in signal and signal["p_value"] < s.p_value:
            return f"SolidMark p-value {signal['p_value']:.3g} < bound {s.p_value:g} (eidetic {signal['eidetic']:g}, delta {self.key})"
        return None

    # ---- resume: what was decided before the interruption still holds ---------------------
    def state_dict(self) -> dict:
        # plain lists and dicts: checkpoints load with weights_only=True
        return {"actions": self.actions, "stopped": self.stopped, "excluded": sorted(self.excluded),
                "weights": dict(self.weights), "under_budget_step": self.under_budget_step,
                "budget_exceeded": self.budget_exceeded}

    def load_state_dict(self, state: dict) -> None:
        self.actions = list(state.get("actions", []))
        self.stopped = bool(state.get("stopped", False))
        self.excluded = set(state.get("excluded", []))
        self.weights = dict(state.get("weights", {}))
        self.under_budget_step = state.get("under_budget_step")
        self.budget_exceeded = bool(state.get("budget_exceeded", False))

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

    def check(self, trainer, pl_module) -> None:
        step = trainer.global_step
        signal = self.signal(trainer)
        mode = self.cfg.stop.mode
        if mode not in ("stop", "keep"):
            raise ValueError(f"controls.stop.mode must be stop or keep, got {mode!r}")
        # a new monitor evaluation (its step, or for monitors without one, its numbers)
        key = (self._signal_step(trainer), tuple(sorted(signal.items()))) if signal is not None else None
        fresh = key is not None and key != self._last_signal
        if fresh:
            self._last_signal = key
        if mode == "stop" and not self.stopped:
            reason = self.stop_reason(signal, step)
            if reason:
                self.stopped = True
                trainer.should_stop = True
                self._act(trainer, pl_module, "stop", reason, signal=signal)
        elif mode == "keep" and fresh and not self.budget_exceeded:
            reason = self.stop_reason(signal, step)
            if reason:
                self.budget_exceeded = True
                kept = f"; checkpoints/under_budget.ckpt keeps step {self.under_budget_step}" if self.under_budget_step is not None else ""
                self._act(trainer, pl_module, "budget_exceeded", reason + kept, signal=signal)
            else:
                self._keep_under_budget(trainer, pl_module)
        action = self.cfg.flagged.action
        if action == "none":
            return
        if action not in ("exclude", "downweight"):
            raise ValueError(f"controls.flagged.action must be none, exclude or downweight, got {action!r}")
        flagged = flagged_from_callbacks(trainer, float(self.cfg.delta), list(self.cfg.flagged.sources))
        for source, ids in sorted(flagged.items()):
            new = sorted(ids - set(self.weights))
            if not new:
                continue
            weight = 0.0 if action == "exclude" else float(self.cfg.flagged.weight)
            for i in new:
                self.weights[i] = weight
            if action == "exclude":
                self.excluded.update(new)
                trainer.datamodule.excluded.update(new)
                trainer.reload_dataloaders_every_n_epochs = 1  # drop them from batches from the next epoch
            self._act(trainer, pl_module, action, f"{len(new)} image(s) flagged by {source}", ids=new, weight=weight)

    @staticmethod
    def _signal_step(trainer) -> int | None:
        # the step of the monitor evaluation whose numbers are in callback_metrics
        for cb in trainer.callbacks:
            if type(cb).__name__ == "SolidMarkCallback":
                return getattr(cb, "last_step", None)
        return None

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
        scalars = {"controls/stopped": float(self.stopped), "controls/excluded": float(len(self.excluded)), "controls/actions": float(len(self.actions))}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.log({"controls/action": f"step {row['step']}: {action}: {reason}"}, step=trainer.global_step)

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
