"""The mitigation comparison end to end on the tiny config: table, report, plot, W&B group,
and the same table again from the same seed."""

import csv
import json
import shutil

import pytest
from omegaconf import OmegaConf

import compare
from eidetic.config import ConfigError

TINY = str(compare.ROOT / "configs" / "compare" / "tiny.yaml")


def _table(path):
    with open(path) as fh:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(fh)]


def test_tiny_comparison_end_to_end_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.delenv("EIDETIC_RUN_DIR", raising=False)
    assert compare.main(["--config", TINY, f"out={tmp_path / 'a'}"]) == 0
    out = tmp_path / "a"
    rows = _table(out / "comparison.csv")
    assert [r["setting"] for r in rows] == ["baseline", "random_word"]
    for r in rows:
        assert float(r["frechet_distance"]) > 0 and float(r["final_loss"]) > 0 and r["global_step"] == "6"
        assert 0 <= float(r["denoising_confidence_auc_heldout"]) <= 1
    assert rows[0]["captions_changed"] == "" and int(rows[1]["captions_changed"]) > 0
    report = (out / "report.md").read_text()
    assert "| setting |" in report and "| random_word |" in report and "frechet_distance" in report
    assert (out / "memorization_vs_quality.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "<td>random_word</td>" in page and "data:image/png;base64," in page
    for name in ("baseline", "random_word"):  # each run is in W&B, grouped under the comparison's name
        assert len(list((out / name / "wandb").glob("offline-run-*"))) == 1
        config = OmegaConf.load(out / name / "config.yaml")
        assert config.logging.wandb.group == "tiny" and config.seed == 0
    # one autoencoder for both settings, trained before either
    for name in ("baseline", "random_word"):
        assert OmegaConf.load(out / name / "config.yaml").model.vae.pretrained == str(out / "shared" / "autoencoder")

    # an existing comparison is never silently mixed into
    with pytest.raises(ConfigError, match="overwrite=true"):
        compare.compare(compare.load_compare_config([TINY], [f"out={out}"]))
    assert compare.main(["--config", TINY, f"out={tmp_path / 'b'}"]) == 0
    assert _table(tmp_path / "b" / "comparison.csv") == rows

    # an interrupted comparison resumes: finished settings are kept, the unfinished one reruns
    baseline_metrics = (out / "baseline" / "metrics.csv").stat().st_mtime_ns
    shutil.rmtree(out / "random_word" / "checkpoints")
    summary = json.loads((out / "random_word" / "summary.json").read_text())
    del summary["compare"]  # died before its row was recorded
    (out / "random_word" / "summary.json").write_text(json.dumps(summary))
    assert compare.main(["--config", TINY, f"out={out}", "resume=true"]) == 0
    assert (out / "baseline" / "metrics.csv").stat().st_mtime_ns == baseline_metrics
    assert (out / "random_word" / "checkpoints" / "last.ckpt").exists()
    assert _table(out / "comparison.csv") == rows
    # kept rows come back from summary.json with sorted keys; the columns keep the table's order
    header = (out / "comparison.csv").read_text().splitlines()[0]
    assert header == (tmp_path / "b" / "comparison.csv").read_text().splitlines()[0] and header.startswith("setting,")


def test_comparison_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown comparison config key"):
        compare.load_compare_config([TINY], ["settingz=1"])
    bad = tmp_path / "dup.yaml"
    bad.write_text("settings:\n  - {name: a, overrides: []}\n  - {name: a, overrides: []}\n")
    with pytest.raises(ConfigError, match="unique"):
        compare.load_compare_config([bad], [])
    # a typo in a setting's training override fails before anything trains
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"out: {tmp_path / 'o'}\nsettings:\n  - {{name: a, overrides: [mitigation.wen.enabeld=true]}}\n")
    with pytest.raises(ConfigError, match="did you mean"):
        compare.compare(compare.load_compare_config([typo], []))
    assert not (tmp_path / "o" / "a").exists()
    with pytest.raises(ConfigError, match="solidmark.deltas"):
        compare.compare(compare.load_compare_config([TINY], [f"out={tmp_path / 'd'}", "delta=0.01"]))


def test_non_comparison_overrides_reach_every_setting():
    files, own, training = compare.split_overrides([TINY], ["out=/x", "quality.steps=2", "train.max_steps=3", "seed=4"])
    assert own == ["out=/x", "quality.steps=2", "seed=4"] and training == ["train.max_steps=3"]
    cfg = compare.load_compare_config(files, own, training)
    assert list(cfg.overrides)[-1] == "train.max_steps=3" and cfg.seed == 4 and cfg.quality.steps == 2
