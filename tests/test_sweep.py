"""Sweeps: a real 2-worker Optuna sweep, resume, failed trials, W&B export and agent args, DDP."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from eidetic.errors import ConfigError
from workflows import sweep as sweep_mod
from workflows.sweep import load_sweep, make_study, run_sweep
from workflows.sweep_report import metric_wandb_name, resolve_metric, to_wandb_sweep, write_report

ROOT = Path(__file__).resolve().parent.parent
TINY_SWEEP = ROOT / "configs" / "sweeps" / "tiny.yaml"
FILE_OVERRIDES = yaml.safe_load(TINY_SWEEP.read_text())["overrides"]


def _spec(tmp_path, *extra, **fields):
    return load_sweep(TINY_SWEEP, dir=str(tmp_path / "sweep"), overrides=[*FILE_OVERRIDES, *extra], **fields)


def _rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "trials.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_two_worker_sweep_runs_to_completion(tmp_path, render):
    spec = _spec(tmp_path, "logging.wandb.enabled=false", n_trials=4)
    study = run_sweep(spec, workers=2)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}, "both worker processes ran trials"
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    sweep_dir = spec.sweep_dir
    assert (sweep_dir / "study.db").exists()
    rows = _rows(sweep_dir)
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        run_dir = Path(r["run_dir"])
        assert run_dir == sweep_dir / f"trial-{int(r['number']):04d}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert float(r["summary.train.final_loss"]) == pytest.approx(summary["train"]["final_loss"])
        assert float(r["train.lr"]) == pytest.approx(study.trials[int(r["number"])].params["train.lr"])
    best = json.loads((sweep_dir / "best.json").read_text())
    losses = [float(r["summary.train.final_loss"]) for r in rows]
    assert best["best"]["values"]["summary.train.final_loss"] == pytest.approx(min(losses))
    assert best["counts"] == {"COMPLETE": 4}
    png = (sweep_dir / "objective.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    text = render(sweep_mod.console_summary(sweep_dir))
    assert "best trial" in text and "complete 4 of 4" in text and f"trials: {sweep_dir / 'trials.csv'}" in text


def test_resume_does_not_repeat_finished_trials(tmp_path):
    journal = tmp_path / "shared" / "study.journal"  # the multi-machine storage path
    spec = _spec(tmp_path, "logging.wandb.enabled=false", n_trials=2, storage=str(journal))
    run_sweep(spec, workers=1)
    assert journal.exists() and not (spec.sweep_dir / "study.db").exists()
    first = {p.parent.name: p.stat().st_mtime_ns for p in spec.sweep_dir.glob("trial-*/summary.json")}
    assert len(first) == 2 and len(_rows(spec.sweep_dir)) == 2

    # a worker that died mid-trial leaves a RUNNING trial behind (pid of a finished process)
    study = make_study(spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                        "train.lr_warmup_steps": optuna.distributions.IntDistribution(0, 2),
                        "train.lr_schedule": optuna.distributions.CategoricalDistribution(["constant", "cosine"])})
    import socket

    orphan.set_user_attr("host", socket.gethostname())
    orphan.set_user_attr("pid", dead.pid)

    study = run_sweep(_spec(tmp_path, "logging.wandb.enabled=false", n_trials=4, storage=str(journal)), workers=1)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].user_attrs["interrupted"] is True and "interrupted" in trials[2].user_attrs["error"]
    assert trials[3].params == trials[2].params, "the interrupted trial's parameters were queued again"
    assert trials[4].params not in (trials[0].params, trials[1].params), "a resumed sampler draws new points"
    # the first two trials were not run again
    again = {p.parent.name: p.stat().st_mtime_ns for p in spec.sweep_dir.glob("trial-*/summary.json") if p.parent.name in ("trial-0000", "trial-0001")}
    assert again == first
    assert sorted(p.name for p in spec.sweep_dir.glob("trial-*")) == ["trial-0000", "trial-0001", "trial-0003", "trial-0004"]
    # a third run with the same budget runs nothing
    assert len(run_sweep(_spec(tmp_path, n_trials=4, storage=str(journal))).get_trials()) == 5


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real_run = sweep_mod._run

    def flaky(cfg, callbacks):
        if cfg.run.dir.endswith("trial-0000"):
            raise RuntimeError("simulated crash")
        return real_run(cfg, callbacks)

    monkeypatch.setattr(sweep_mod, "_run", flaky)
    spec = load_sweep(data={
        "name": "flaky", "base": [str(ROOT / "configs/tests/tiny.yaml")], "dir": str(tmp_path / "flaky"),
        "overrides": FILE_OVERRIDES,
        "params": {"train.lr": {"choices": [0.001, 1.0e12]}},
        "objectives": [{"metric": "summary.train.final_loss", "direction": "minimize"}],
        "n_trials": 3,
    })
    study = make_study(spec)
    for lr in (0.001, 1.0e12, 0.001):  # crash, NaN loss, fine
        study.enqueue_trial({"train.lr": lr})
    study = run_sweep(spec)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["error"] == "RuntimeError: simulated crash"
    assert trials[1].user_attrs["error"].startswith("FloatingPointError: train/loss is nan")
    # the NaN trial stopped early instead of training to the end
    assert not (spec.sweep_dir / "trial-0001" / "summary.json").exists()
    rows = _rows(spec.sweep_dir)
    assert [r["state"] for r in rows] == ["FAIL", "FAIL", "COMPLETE"]
    assert rows[0]["error"] == "RuntimeError: simulated crash"
    assert json.loads((spec.sweep_dir / "best.json").read_text())["best"]["number"] == 2
    # each trial that started is its own W&B run, grouped by the sweep's name
    ids = set()
    for run_dir in (spec.sweep_dir / "trial-0001", spec.sweep_dir / "trial-0002"):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["logging"]["wandb"]["group"] == "flaky" and cfg["run"]["name"] == f"flaky-{run_dir.name}"
        ids.add(cfg["logging"]["wandb"]["id"])
        assert [p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")] == [cfg["logging"]["wandb"]["id"]]
    assert len(ids) == 2


def test_pruning_reports_intermediate_values(tmp_path):
    spec = load_sweep(data={
        "name": "prune", "base": [str(ROOT / "configs/tests/tiny.yaml")], "dir": str(tmp_path / "prune"),
        "overrides": [*FILE_OVERRIDES, "logging.wandb.enabled=false"],
        "params": {"train.lr": {"choices": [0.001, 0.002]}},
        "objectives": ["summary.train.final_loss"],
        "n_trials": 1,
        "pruning": {"enabled": True, "metric": "train/loss", "n_startup_trials": 5},
    })
    study = run_sweep(spec)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE
    assert sorted(t.intermediate_values) == [1, 2, 3, 4]  # one report per optimizer step
    assert all(v > 0 for v in t.intermediate_values.values())


def test_sweep_spec_validation_and_metric_paths(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_sweep(data={"name": "x", "params": {"train.lrr": {"low": 0.1, "high": 1}}, "objectives": ["summary.train.final_loss"]})
    with pytest.raises(ConfigError, match="log scale needs low > 0"):
        load_sweep(data={"name": "x", "params": {"train.lr": {"low": 0, "high": 1, "log": True}}, "objectives": ["summary.a"]})
    with pytest.raises(ConfigError, match="single objective"):
        load_sweep(data={"name": "x", "objectives": ["summary.a", "summary.b"], "pruning": {"enabled": True}})
    with pytest.raises(ConfigError, match="did you mean 'n_trials'"):
        load_sweep(data={"name": "x", "objectives": ["summary.a"], "n_trial": 3})
    with pytest.raises(ConfigError, match="did you mean 'pruning.pruner'"):
        load_sweep(data={"name": "x", "objectives": ["summary.a"], "pruning": {"prunner": "median"}})
    with pytest.raises(ConfigError, match="summary"):
        load_sweep(data={"name": "x", "objectives": ["loss"]})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"solidmark": {"eidetic": {"0.1": 0.25, "0": 9}}, "train": {"final_loss": 1.5}}))
    (run_dir / "metrics.csv").write_text("step,train/loss,lr\n0,2.0,1\n1,,1\n2,1.25,1\n")
    assert resolve_metric(run_dir, "summary.solidmark.eidetic.0.1") == 0.25
    assert resolve_metric(run_dir, "summary.train.final_loss") == 1.5
    assert resolve_metric(run_dir, "metrics.train/loss") == 1.25
    assert resolve_metric(run_dir, "summary.train.missing") is None
    assert metric_wandb_name("summary.solidmark.eidetic.0.1") == "summary/solidmark/eidetic/0.1"


def test_export_wandb_sweep(tmp_path, monkeypatch):
    import sweep

    monkeypatch.chdir(ROOT)
    out = tmp_path / "wandb_sweep.yaml"
    assert sweep.main([str(TINY_SWEEP), "--export-wandb", str(out)]) == 0  # the pre-1.0 form still works
    assert sweep.main(["--config", str(TINY_SWEEP), f"export_wandb={out}"]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["program"] == "train.py"
    assert cfg["method"] == "bayes"
    assert cfg["metric"] == {"name": "summary/train/final_loss", "goal": "minimize"}
    assert cfg["parameters"] == {
        "train.lr": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
        "train.lr_warmup_steps": {"distribution": "int_uniform", "min": 0, "max": 2},
        "train.lr_schedule": {"values": ["constant", "cosine"]},
    }
    assert cfg["command"][:5] == ["${env}", "${interpreter}", "${program}", "--config", "configs/tests/tiny.yaml"]
    assert cfg["command"][-1] == "${args}"
    assert "logging.wandb.group=tiny" in cfg["command"] and "extraction.enabled=false" in cfg["command"]
    assert cfg["run_cap"] == 4
    # several objectives: W&B optimises the first; random sampler -> random method; pruning -> hyperband
    spec = load_sweep(TINY_SWEEP, sampler="random", objectives=[{"metric": "metrics.train/loss", "direction": "maximize"}],
                      pruning={"enabled": True, "n_warmup_steps": 2})
    exported = to_wandb_sweep(spec)
    assert exported["method"] == "random" and exported["metric"] == {"name": "train/loss", "goal": "maximize"}
    assert exported["early_terminate"] == {"type": "hyperband", "min_iter": 2}


def test_wandb_agent_style_arguments(tmp_path, monkeypatch):
    """What `wandb agent` runs: the exported command with --key=value parameters appended."""
    import train
    from workflows.cli import parse_args
    from workflows.train import load_config

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun01")
    files, overrides, _ = parse_args("train", [
        "--config", str(ROOT / "configs/tests/tiny.yaml"), "extraction.enabled=false", "logging.wandb.group=tiny",
        "--train.lr=0.0025", "--train.lr_schedule=cosine", "--train.lr_warmup_steps=1", "logging.wandb.mode=offline",
    ])
    cfg = load_config(files, overrides)
    assert cfg.train.lr == 0.0025 and cfg.train.lr_schedule == "cosine" and cfg.train.lr_warmup_steps == 1
    assert cfg.logging.wandb.id == "agentrun01", "the run logs into the W&B run the agent created"
    assert cfg.logging.wandb.group == "tiny" and cfg.logging.wandb.mode == "offline"
    monkeypatch.delenv("WANDB_SWEEP_ID")
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(*parse_args("train", ["--train.lrr=1"])[:2])
    # and the whole path trains: train.main with agent-style args
    run_dir = tmp_path / "agent"
    assert train.main(["--config", str(ROOT / "configs/tests/tiny.yaml"), f"--run.dir={run_dir}", "--train.max_steps=2",
                       "--extraction.enabled=false", "--logging.wandb.enabled=false", "--train.lr=0.0025"]) == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.0025
    assert json.loads((run_dir / "summary.json").read_text())["train"]["global_step"] == 2


def _train_tiny_on_two_cpu_processes(run_dir, *overrides) -> subprocess.CompletedProcess:
    """``train.py`` on the tiny config with trainer.strategy=ddp, 2 CPU processes (gloo)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tests/tiny.yaml", f"run.dir={run_dir}",
         "trainer.strategy=ddp", "trainer.devices=2", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # ~25 s alone, and the default file must stay well under 90 s
def test_ddp_two_cpu_processes_write_one_set_of_outputs(tmp_path):
    """trainer.strategy=ddp trainer.devices=2 on CPU (gloo): rank 0 alone writes files and W&B."""
    run_dir = tmp_path / "ddp"
    proc = _train_tiny_on_two_cpu_processes(
        run_dir, "extraction.enabled=true", "extraction.every_n_steps=0",
        "solidmark.enabled=true", "solidmark.every_n_steps=0", "solidmark.steps=3",
    )
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log, "two processes trained"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6
    assert summary["extraction"]["step"] == 6, "the extraction monitor ran (on rank 0)"
    # one set of outputs: one keymap, one summary, one W&B run, checkpoints from rank 0 only
    rows = (run_dir / "keymap.jsonl").read_text().splitlines()
    assert len(rows) == 12 and len({json.loads(r)["id"] for r in rows}) == 12
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step-000003.ckpt", "step-000006.ckpt"]
    with (run_dir / "metrics.csv").open() as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == sorted(set(steps)), "metrics.csv has one row per step (written by one process)"
    # the extraction probe ran once: one row per probed caption in its table
    extraction_rows = (run_dir / "extraction.csv").read_text().splitlines()
    assert len(extraction_rows) == 1 + summary["extraction"]["captions"]
    assert (run_dir / "model" / "model_index.json").exists()
    # SolidMark evaluated once (at the end), its images split across ranks and gathered, not repeated
    assert summary["solidmark"]["evaluations"] == 1
    solidmark_rows = list(csv.DictReader((run_dir / "solidmark.csv").open()))
    assert len(solidmark_rows) == len({r["id"] for r in solidmark_rows}) == 12


@pytest.mark.slow  # ~30 s alone
def test_ddp_ranks_exclude_the_same_extraction_flagged_images(tmp_path):
    """The ranks split the probed captions and gather their scores and verifications (torchmetrics)
    in a real gloo run; both exclude the same images, or their samplers would differ in length and
    DDP would hang before the end."""
    run_dir = tmp_path / "ddp-controls"
    _train_tiny_on_two_cpu_processes(
        run_dir, "extraction.enabled=true", "extraction.every_n_steps=3", "extraction.top_k=3", "extraction.heldout=false",
        "extraction.verify.threshold=1.0",  # RMS <= 1 always: every probed caption verifies
        "extraction.detectors=[denoising_confidence]", "controls.enabled=true", "controls.flagged.action=exclude",
        "controls.flagged.sources=[extraction]", "logging.wandb.enabled=false",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6
    actions = [json.loads(line) for line in (run_dir / "actions.jsonl").read_text().splitlines()]
    excluded = [a for a in actions if a["action"] == "exclude"]
    # the mid-run probe: every top-3 caption verifies (threshold 1), and what is excluded is the
    # training image each generation copies (several captions may copy the same one)
    keymap = {json.loads(line)["id"]: json.loads(line) for line in (run_dir / "keymap.jsonl").read_text().splitlines()}
    assert excluded[0]["step"] == 3 and 1 <= len(excluded[0]["ids"]) <= 3, actions
    assert all(keymap[i]["split"] == "train" for a in excluded for i in a["ids"])
    assert {a["step"] for a in excluded} <= {3, 6}, "only the probes (step 3 and the end) flag images"


def test_pruned_trial_stops_early_and_is_recorded(tmp_path, monkeypatch):
    class PruneAfterTwoSteps(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return max(trial.intermediate_values, default=0) >= 2

    monkeypatch.setattr(sweep_mod, "_pruner", lambda spec: PruneAfterTwoSteps())
    spec = load_sweep(data={
        "name": "pruned", "base": [str(ROOT / "configs/tests/tiny.yaml")], "dir": str(tmp_path / "pruned"),
        "overrides": [*FILE_OVERRIDES, "logging.wandb.enabled=false"],
        "params": {"train.lr": {"type": "float", "low": 0.001, "high": 0.002}},
        "objectives": ["summary.train.final_loss"], "n_trials": 1,
        "pruning": {"enabled": True, "metric": "train/loss"},
    })
    t = sweep_mod.run_sweep(spec).trials[0]
    assert t.state == TrialState.PRUNED and sorted(t.intermediate_values) == [1, 2]
    assert "pruned at step 2" in t.user_attrs["error"]
    assert not (spec.sweep_dir / "trial-0000" / "summary.json").exists(), "training stopped at the pruned step"
    assert _rows(spec.sweep_dir)[0]["state"] == "PRUNED"


def test_pareto_report_for_two_objectives(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial


    spec = load_sweep(data={
        "name": "pareto", "dir": str(tmp_path / "pareto"), "base": [str(ROOT / "configs/tests/tiny.yaml")],
        "params": {"train.lr": {"low": 0.001, "high": 0.01}},
        "objectives": [{"metric": "summary.train.final_loss", "direction": "minimize"},
                       {"metric": "summary.solidmark.eidetic.0.1", "direction": "minimize"}],
    })
    study = optuna.create_study(directions=spec.directions)
    dist = {"train.lr": FloatDistribution(0.001, 0.01)}
    for lr, values in [(0.001, [1.0, 0.2]), (0.002, [0.5, 0.5]), (0.003, [0.9, 0.9]), (0.004, [0.2, 1.0])]:
        study.add_trial(create_trial(params={"train.lr": lr}, distributions=dist, values=values))
    study.add_trial(create_trial(params={"train.lr": 0.005}, distributions=dist, state=TrialState.FAIL,
                                 user_attrs={"error": "RuntimeError: boom"}))
    write_report(study, spec)
    best = json.loads((spec.sweep_dir / "best.json").read_text())
    assert best["best"] is None
    assert sorted(b["number"] for b in best["pareto_front"]) == [0, 1, 3]  # trial 2 is dominated by 1
    assert best["counts"] == {"COMPLETE": 4, "FAIL": 1}
    rows = _rows(spec.sweep_dir)
    assert rows[4]["state"] == "FAIL" and rows[4]["error"] == "RuntimeError: boom"
    assert rows[2]["summary.solidmark.eidetic.0.1"] == "0.9"
    assert (spec.sweep_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
