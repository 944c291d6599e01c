"""Memorization controls on a scripted monitor signal: the stop fires exactly when the
condition is met, excluded images stop appearing in batches, down-weighted ones carry their
weight, and every action is logged with its reason."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from callbacks.controls import MemorizationControlCallback
from callbacks.monitor import BudgetSignal, Monitor, MonitorResult
from workflows.train import run

OFF = ["extraction.enabled=false", "logging.wandb.enabled=false", "controls.enabled=true", "controls.flagged.sources=[scripted]"]
WANDB = ["extraction.enabled=false", "controls.enabled=true", "controls.flagged.sources=[scripted]"]


class ScriptedMonitor(Monitor):
    """Publishes a scripted SolidMark signal per step and flags the first batch's images."""

    source = "scripted"

    def __init__(self, script: dict[int, dict], flag_at: int | None = None):
        super().__init__()
        self.script, self.flag_at = script, flag_at
        self.flagged_ids: set[str] = set()
        self.batches: list[tuple[int, int, list[str], list[float]]] = []  # (step, epoch, ids, weights)

    def on_train_start(self, trainer, pl_module):
        def record(module, batch, batch_idx):  # runs after every other batch transform
            w = batch.get("loss_weight", torch.ones(len(batch["id"])))
            self.batches.append((module.global_step, module.current_epoch, list(batch["id"]), w.tolist()))
            return batch

        pl_module.batch_transforms.append(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.flag_at is not None and step == self.flag_at:
            self.flagged_ids = set(batch["id"])
        values = self.script.get(step)
        if values is not None or (self.flag_at is not None and step == self.flag_at):
            budget = {0.05: BudgetSignal(values["eidetic"], values["chance"], values.get("p_value", 1.0))} if values else {}
            self.publish(MonitorResult(self.source, step, frozenset(self.flagged_ids), budget))


def _actions(run_dir):
    return [json.loads(line) for line in (run_dir / "actions.jsonl").read_text().splitlines()]


def test_stop_reason_conditions_are_strict():
    cfg = OmegaConf.create({"delta": 0.01, "stop": {"margin": 2.0, "p_value": 0.05, "min_step": 3}, "flagged": {"action": "none"}})
    c = MemorizationControlCallback(cfg)
    assert c.stop_reason({"eidetic": 5, "chance": 3.0, "p_value": 0.5}, 5) is None  # exactly the margin: no
    assert "margin" in c.stop_reason({"eidetic": 5.1, "chance": 3.0, "p_value": 0.5}, 5)
    assert c.stop_reason({"eidetic": 1, "chance": 1.0, "p_value": 0.05}, 5) is None  # exactly the bound: no
    assert "p-value" in c.stop_reason({"eidetic": 1, "chance": 1.0, "p_value": 0.049}, 5)
    assert c.stop_reason({"eidetic": 9, "chance": 0.0, "p_value": 1e-9}, 2) is None  # before min_step
    assert c.stop_reason(None, 5) is None


def test_stop_fires_exactly_when_margin_exceeded(tiny_cfg):
    script = {1: {"eidetic": 1, "chance": 0.5}, 2: {"eidetic": 2, "chance": 0.5}, 3: {"eidetic": 3, "chance": 0.5}, 4: {"eidetic": 4, "chance": 0.5}}
    run_dir = run(tiny_cfg(*WANDB, "controls.stop.margin=2.0", "train.max_steps=6"), callbacks=[ScriptedMonitor(script)])  # W&B on: actions logged there too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 3  # 3 - 0.5 = 2.5 > 2 first at step 3
    (action,) = _actions(run_dir)
    assert action["action"] == "stop" and action["step"] == 3 and "exceeds chance" in action["reason"]
    assert summary["controls"]["stopped"] and summary["controls"]["stop_step"] == 3
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "controls/stopped" in header


def test_stop_fires_on_p_value_bound(tiny_cfg):
    script = {s: {"eidetic": 1, "chance": 1.0, "p_value": p} for s, p in zip(range(1, 7), [0.5, 0.2, 0.06, 0.01, 0.001, 0.0])}
    run_dir = run(tiny_cfg(*OFF, "controls.stop.p_value=0.05"), callbacks=[ScriptedMonitor(script)])
    assert json.loads((run_dir / "summary.json").read_text())["train"]["global_step"] == 4
    assert _actions(run_dir)[0]["reason"].startswith("SolidMark p-value 0.01 < bound 0.05")


def test_excluded_images_stop_appearing_in_batches(tiny_cfg):
    # 9 training images, batch 4, drop_last: 2 steps per epoch; flag the first batch's images at step 1
    monitor = ScriptedMonitor({}, flag_at=1)
    run_dir = run(tiny_cfg(*OFF, "controls.flagged.action=exclude", "train.max_steps=10"), callbacks=[monitor])
    flagged = monitor.flagged_ids
    assert len(flagged) == 4
    (action,) = _actions(run_dir)
    assert action["action"] == "exclude" and action["step"] == 1 and sorted(action["ids"]) == sorted(flagged)
    assert "flagged by scripted" in action["reason"]
    later = [(step, epoch, ids, w) for step, epoch, ids, w in monitor.batches if epoch >= 1]
    assert len(later) == 8
    assert all(not (set(ids) & flagged) for _, _, ids, _ in later)  # gone from every batch after the epoch
    seen_later = {i for _, _, ids, _ in later for i in ids}
    assert len(seen_later) == 5  # the other 5 training images keep training
    for step, epoch, ids, w in monitor.batches:  # step-0 batch trained them at full weight, nothing else
        if step >= 1:
            assert all(wi == 0.0 for i, wi in zip(ids, w) if i in flagged)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["controls"]["excluded"]) == sorted(flagged)


def test_downweighted_images_keep_training_with_their_weight(tiny_cfg):
    monitor = ScriptedMonitor({}, flag_at=1)
    run(tiny_cfg(*OFF, "controls.flagged.action=downweight", "controls.flagged.weight=0.25", "train.max_steps=8"), callbacks=[monitor])
    flagged = monitor.flagged_ids
    weights = [(i, wi) for step, _, ids, w in monitor.batches if step >= 1 for i, wi in zip(ids, w)]
    assert any(i in flagged for i, _ in weights)  # they still appear ...
    assert all(wi == (0.25 if i in flagged else 1.0) for i, wi in weights)  # ... at a quarter weight


def test_keep_mode_trains_on_and_keeps_the_last_checkpoint_under_budget(tiny_cfg):
    script = {1: {"eidetic": 1, "chance": 0.5}, 2: {"eidetic": 2, "chance": 0.5}, 3: {"eidetic": 3, "chance": 0.5}, 4: {"eidetic": 1, "chance": 0.5}}
    run_dir = run(tiny_cfg(*OFF, "controls.stop.margin=2.0", "controls.stop.mode=keep", "train.max_steps=6"), callbacks=[ScriptedMonitor(script)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6  # not stopped
    (action,) = _actions(run_dir)  # exceeded once; a later signal under the margin does not move the kept state
    assert action["action"] == "budget_exceeded" and action["step"] == 3 and "keeps step 2" in action["reason"]
    assert summary["controls"]["under_budget_step"] == 2 and summary["controls"]["budget_exceeded"]
    kept = torch.load(run_dir / "checkpoints" / "under_budget.ckpt", weights_only=True, map_location="cpu")
    assert kept["global_step"] == 2
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_resume_keeps_exclusions_and_the_action_log(tiny_cfg):
    monitor = ScriptedMonitor({}, flag_at=1)
    run_dir = run(tiny_cfg(*OFF, "controls.flagged.action=exclude", "train.max_steps=4"), callbacks=[monitor])
    flagged = monitor.flagged_ids
    resumed = ScriptedMonitor({})  # flags nothing: the exclusions must come from the checkpoint
    run(tiny_cfg(*OFF, "controls.flagged.action=exclude", "train.max_steps=8", "train.resume=last"), callbacks=[resumed])
    seen = {i for _, _, ids, _ in resumed.batches for i in ids}
    assert resumed.batches and not (seen & flagged)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["controls"]["excluded"]) == sorted(flagged)
    assert [a["action"] for a in summary["controls"]["actions"]] == ["exclude"]


def test_a_source_that_names_no_monitor_is_an_error(tiny_cfg):
    from eidetic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"controls.flagged.sources names \['nothing'\]"):
        run(tiny_cfg("extraction.enabled=false", "logging.wandb.enabled=false", "controls.enabled=true",
                     "controls.flagged.action=exclude", "controls.flagged.sources=[nothing]"))
