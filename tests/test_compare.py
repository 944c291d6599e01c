"""The mitigation comparison on the tiny config: table, report, plot, W&B group, shared
autoencoder, refusal to mix into an existing comparison, reproducibility and resume."""

import csv
import json
import shutil

import pytest
from omegaconf import OmegaConf

import compare
from eidetic.errors import ConfigError
from workflows import compare as workflow

TINY = str(workflow.ROOT / "configs" / "compare" / "tiny.yaml")


def _table(path):
    with open(path) as fh:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny comparison (two settings), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("compare") / "a"
    assert compare.main(["--config", TINY, f"out={out}"]) == 0
    return out


def test_table_report_and_plot(finished):
    rows = _table(finished / "comparison.csv")
    assert [r["setting"] for r in rows] == ["baseline", "random_word"]
    for r in rows:
        assert float(r["frechet_distance"]) > 0 and float(r["final_loss"]) > 0 and r["global_step"] == "6"
        assert 0 <= float(r["denoising_confidence_auc_heldout"]) <= 1
        assert int(r["eidetic"]) >= 0 and 0 < float(r["chance"]) and 0 < float(r["p_value"]) <= 1
        assert float(r["frechet_unseen"]) > 0 and r["quality_unseen"] == "128" and r["quality_samples"] == "8"
        for key in ("precision", "recall", "classifier_accuracy"):
            lo, hi = json.loads(r[f"{key}_ci"])
            assert 0 <= lo <= float(r[key]) <= hi <= 1
    assert rows[0]["captions_changed"] == "" and int(rows[1]["captions_changed"]) > 0
    report = (finished / "report.md").read_text()
    assert "| setting |" in report and "| random_word |" in report and "frechet_distance" in report
    assert (finished / "memorization_vs_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (finished / "report.html").read_text()
    assert "<td>random_word</td>" in page and "data:image/png;base64," in page



def test_console_summary(finished, render):
    text = render(workflow.console_summary(finished))
    assert "Comparison (2 settings)" in text and "random_word" in text and f"report: {finished / 'report.html'}" in text


def test_every_setting_is_its_own_wandb_run_in_the_group_and_shares_one_autoencoder(finished):
    for name in ("baseline", "random_word"):
        assert len(list((finished / name / "wandb").glob("offline-run-*"))) == 1
        config = OmegaConf.load(finished / name / "config.yaml")
        assert config.logging.wandb.group == "tiny" and config.seed == 0
        assert config.model.vae.pretrained == str(finished / "shared" / "autoencoder")
    a, b = (OmegaConf.load(finished / n / "config.yaml") for n in ("baseline", "random_word"))
    assert list(a.mitigation.caption.methods) == [] and list(b.mitigation.caption.methods) == ["random_word"]


def test_an_existing_comparison_is_never_mixed_into(finished):
    before = sorted(p.relative_to(finished) for p in finished.rglob("*"))
    with pytest.raises(ConfigError, match="overwrite=true"):
        workflow.run(workflow.load_config([TINY], [f"out={finished}"]))
    assert sorted(p.relative_to(finished) for p in finished.rglob("*")) == before


def test_the_same_config_and_seed_give_the_same_table(finished, tmp_path):
    assert compare.main(["--config", TINY, f"out={tmp_path / 'b'}"]) == 0
    assert _table(tmp_path / "b" / "comparison.csv") == _table(finished / "comparison.csv")


def test_an_interrupted_comparison_resumes_where_it_stopped(finished, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    rows = _table(out / "comparison.csv")
    baseline_metrics = (out / "baseline" / "metrics.csv").stat().st_mtime_ns
    shutil.rmtree(out / "random_word")  # died before its row was recorded
    assert compare.main(["--config", TINY, f"out={out}", "resume=true"]) == 0
    assert (out / "baseline" / "metrics.csv").stat().st_mtime_ns == baseline_metrics, "the finished setting was not rerun"
    assert (out / "random_word" / "checkpoints" / "last.ckpt").exists()
    # the kept row comes back from summary.json; the table and its column order are unchanged
    assert _table(out / "comparison.csv") == rows
    assert (out / "comparison.csv").read_text().splitlines()[0] == (finished / "comparison.csv").read_text().splitlines()[0]


def test_only_runs_the_named_settings_and_keeps_the_rest(finished, tmp_path):
    out = tmp_path / "only"
    shutil.copytree(finished, out)
    baseline_metrics = (out / "baseline" / "metrics.csv").stat().st_mtime_ns
    shutil.rmtree(out / "random_word")
    assert compare.main(["--config", TINY, f"out={out}", "resume=true", "only=[random_word]"]) == 0
    assert (out / "baseline" / "metrics.csv").stat().st_mtime_ns == baseline_metrics
    assert [r["setting"] for r in _table(out / "comparison.csv")] == ["baseline", "random_word"]
    # an unfinished setting outside `only` is neither rerun nor removed
    summary = json.loads((out / "baseline" / "summary.json").read_text())
    del summary["compare"]
    (out / "baseline" / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(out / "random_word")
    assert compare.main(["--config", TINY, f"out={out}", "resume=true", "only=[random_word]"]) == 0
    assert (out / "baseline" / "metrics.csv").stat().st_mtime_ns == baseline_metrics
    assert [r["setting"] for r in _table(out / "comparison.csv")] == ["random_word"]
    assert "- **baseline**: `(none)` (not run)" in (out / "report.md").read_text()
    assert "<code>(none)</code> (not run)</li>" in (out / "report.html").read_text()
    with pytest.raises(ConfigError, match="did you mean 'random_word'"):
        workflow.load_config([TINY], ["only=[random_wrd]"])


def test_comparison_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'settings'"):
        workflow.load_config([TINY], ["settingz=1"])
    with pytest.raises(ConfigError, match="did you mean 'quality.steps'"):
        workflow.load_config([TINY], ["quality.stepz=3"])
    bad = tmp_path / "dup.yaml"
    bad.write_text("settings:\n  - {name: a, overrides: []}\n  - {name: a, overrides: []}\n")
    with pytest.raises(ConfigError, match="unique"):
        workflow.load_config([bad], [])
    nested = tmp_path / "nested.yaml"
    nested.write_text("settings:\n  - {name: a, overides: []}\n")
    with pytest.raises(ConfigError, match=r"settings\[0\].overides': did you mean 'settings\[0\].overrides'"):
        workflow.load_config([nested], [])
    # a typo in a setting's training override fails before anything trains
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"out: {tmp_path / 'o'}\nsettings:\n  - {{name: a, overrides: [mitigation.wen.enabeld=true]}}\n")
    with pytest.raises(ConfigError, match="did you mean"):
        workflow.run(workflow.load_config([typo], []))
    assert not (tmp_path / "o" / "a").exists()
    with pytest.raises(ConfigError, match="solidmark.deltas"):
        workflow.run(workflow.load_config([TINY], [f"out={tmp_path / 'd'}", "delta=0.01"]))


def test_non_comparison_overrides_reach_every_setting():
    cfg = workflow.load_config([TINY], ["out=/x", "quality.steps=2", "train.max_steps=3", "seed=4"])
    assert list(cfg.overrides)[-1] == "train.max_steps=3" and cfg.seed == 4 and cfg.quality.steps == 2 and cfg.out == "/x"


def test_summary_rows_are_what_the_table_shows(finished):
    row = json.loads((finished / "baseline" / "summary.json").read_text())["compare"]
    table = _table(finished / "comparison.csv")[0]
    assert table["setting"] == row["setting"] == "baseline"
    assert float(table["final_loss"]) == pytest.approx(row["final_loss"], rel=1e-3)


# ---- seeds, parallel processes and inference-time settings on a trained setting's model ------
TINY_INFERENCE = str(workflow.ROOT / "configs" / "compare" / "tiny_inference.yaml")


def test_inference_time_settings_evaluate_the_baselines_model_at_every_seed_in_parallel(tmp_path, render):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(open(TINY_INFERENCE).read() + "  - name: same\n    model_of: baseline\n    overrides: []\n")
    out = tmp_path / "ti"
    assert compare.main(["--config", str(cfg_file), f"out={out}"]) == 0
    rows = _table(out / "comparison.csv")
    assert [r["setting"] for r in rows] == [f"{n}-seed{s}" for n in ("baseline", "query_random_token", "delayed_guidance", "same") for s in (0, 1)]
    by = {r["setting"]: r for r in rows}
    for s in (0, 1):
        base = by[f"baseline-seed{s}"]
        for name in ("query_random_token", "delayed_guidance", "same"):
            row = by[f"{name}-seed{s}"]
            assert row["model_of"] == f"baseline-seed{s}" and row["seed"] == str(s)
            assert row["final_loss"] == base["final_loss"]  # no training of its own: the baseline's model
            assert not (out / f"{name}-seed{s}" / "checkpoints").exists()
        # with nothing changed at query time the evaluation reproduces the baseline's own scores
        same = _table(out / f"same-seed{s}" / "solidmark.csv")
        assert [r["pred_key"] for r in same] == [r["pred_key"] for r in _table(out / f"baseline-seed{s}" / "solidmark.csv")]
        assert by[f"same-seed{s}"]["frechet_distance"] == base["frechet_distance"]
        # guided sampling: conditional and unconditional evaluation at each of the 3 quality steps
        assert float(base["unet_passes_per_sample"]) == float(by[f"same-seed{s}"]["unet_passes_per_sample"]) == 6
        assert float(by[f"delayed_guidance-seed{s}"]["unet_passes_per_sample"]) != 6  # its own schedule and Wen's steps cost differently
        changed = _table(out / f"query_random_token-seed{s}" / "solidmark.csv")
        assert [r["pred_key"] for r in changed] != [r["pred_key"] for r in same]
        # memorization per rung of the ladder: SolidMark, the detector, generations; the unchanged query reproduces it
        ladder = [k for k in base if k.startswith(("x1_", "x3_", "heldout_", "denoising_confidence_x3"))]
        assert {"x3_eidetic", "x3_chance", "x3_p", "x3_auc", "x3_auc_ci", "x1_eidetic", "heldout_eidetic", "x3_copy_rate",
                "x3_copy_rate_ci", "x1_copy_rate", "heldout_copy_rate", "denoising_confidence_x3_auc"} <= set(ladder)
        assert 0 <= float(base["x3_auc"]) <= 1 and 0 <= float(base["x3_copy_rate"]) <= 1 and 0 < float(base["x3_chance"]) <= 2
        assert all(by[f"same-seed{s}"][k] == base[k] for k in ladder)
    report = (out / "report.md").read_text()
    assert "x3_excess" in report and "x3_copy_rate" in report and "Seeds 0, 1;" in report
    assert all(x == float(f"{x:.4g}") for x in json.loads(base["x3_auc_ci"]))  # intervals printed to 4 digits
    assert "x3 copy rate" in render(workflow.console_summary(out))
    assert float(by["baseline-seed0"]["final_loss"]) != float(by["baseline-seed1"]["final_loss"])  # the seeds differ
    # resume keeps every finished run
    stamp = (out / "same-seed1" / "summary.json").stat().st_mtime_ns
    assert compare.main(["--config", str(cfg_file), f"out={out}", "resume=true", "workers=1"]) == 0
    assert (out / "same-seed1" / "summary.json").stat().st_mtime_ns == stamp


def test_inference_settings_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("settings:\n  - {name: a, overrides: []}\n  - {name: b, model_of: c, overrides: []}\n")
    with pytest.raises(ConfigError, match="model_of='c' must name a training setting"):
        workflow.load_config([bad], [])
    training = tmp_path / "training.yaml"
    training.write_text("settings:\n  - {name: a, overrides: []}\n  - {name: b, model_of: a, overrides: [train.lr=0.1]}\n")
    with pytest.raises(ConfigError, match="may only override"):
        workflow.load_config([training], [])
    with pytest.raises(ConfigError, match="workers"):
        workflow.load_config([TINY], ["workers=0"])
    # too few samples for the classifier's folds is refused before anything trains, with the way out
    with pytest.raises(ConfigError, match=r"num_samples must be >= 5 .*quality.reference=0"):
        workflow.load_config([TINY], ["quality.num_samples=4"])
    workflow.load_config([TINY], ["quality.num_samples=4", "quality.reference=0"])


def test_the_selective_comparison_config_loads_and_validates(tmp_path):
    cfg = workflow.load_config([workflow.ROOT / "configs" / "compare" / "selective.yaml"], [f"out={tmp_path}"])
    jobs = workflow.jobs_of(cfg)
    trained = [j for j in jobs if j.base is None]
    inference = [j for j in jobs if j.base is not None]
    assert len(cfg.seeds) >= 3 and {j.seed for j in trained} == set(cfg.seeds)
    assert {j.setting.name for j in trained} >= {"baseline", "random_number", "random_word", "repeat_word", "text_noise", "wen_filter"}
    assert all(j.setting.model_of == "baseline" for j in inference)
    assert {j.setting.name for j in inference} >= {"query_random_number", "query_random_token", "query_repeat_word", "query_text_noise",
                                                  "wen_adjust", "delayed_guidance", "opposite_guidance"}
    from workflows import train

    for job in jobs:  # every run's training config validates
        name = job.setting.model_of or job.setting.name
        own = [*({s.name: s for s in cfg.settings}[name].overrides), *(job.setting.overrides if job.setting.model_of else [])]
        c = train.load_config([workflow.ROOT / f for f in cfg.base], [*cfg.overrides, *own])
        assert c.data.source == "tiles" and c.model.space == "pixel"
    assert list(c.inference_mitigation.captions) == [] and c.inference_mitigation.delayed_guidance.guidance_before == -2.0


def test_over_seeds_pairs_each_setting_with_the_baseline_by_seed():
    from scipy.stats import t as student_t

    from workflows.compare_report import _over_seeds_lines, over_seeds

    rows = [{"setting": f"{name}-seed{s}", "seed": s, "eidetic": e, "chance": 1.0, "frechet_distance": f, "final_loss": s + shift}
            for name, vals, shift in (("baseline", [(5, 3.0), (7, 4.0), (6, 5.0)], 0.0), ("mitigated", [(2, 3.5), (5, 4.0), (2, 6.5)], 0.5))
            for s, (e, f) in enumerate(vals)]
    base, mit = over_seeds(rows)
    assert (base["setting"], base["seeds"], mit["setting"]) == ("baseline", 3, "mitigated")
    assert base["eidetic_excess"][0] == pytest.approx(5.0) and base["eidetic_excess"][1] == pytest.approx(1 / 3 ** 0.5)
    assert "eidetic_excess_delta" not in base
    # per-seed differences -3, -2, -4: mean -3, s.e. 1/sqrt(3), t interval with 2 degrees of freedom
    d, lo, hi, n = mit["eidetic_excess_delta"]
    half = student_t.ppf(0.975, 2) / 3 ** 0.5
    assert (d, n) == (pytest.approx(-3.0), 3) and (lo, hi) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
    assert hi < 0  # a difference the interval separates from 0
    d, lo, hi, _ = mit["frechet_distance_delta"]  # +0.5, 0, +1.5: the interval spans 0
    assert d == pytest.approx(2 / 3) and lo < 0 < hi
    text = "\n".join(_over_seeds_lines([base, mit]))
    assert "| mitigated | 3 |" in text and "paired by seed" in text
    # +0.5 at every seed: a zero-width interval, flagged rather than read as certainty
    assert mit["final_loss_delta"][1] == mit["final_loss_delta"][2] and "the same at every seed" in text
    # one seed per setting: no over-seeds section (a standard error needs two)
    assert _over_seeds_lines(over_seeds([r for r in rows if r["seed"] == 0])) == []
