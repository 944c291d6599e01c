"""The monitors inside real (tiny) training runs: files, summary sections, W&B."""

import csv
import json

import pytest


def test_extraction_probe_callback_in_a_run(tiny_cfg):
    from workflows.train import run

    cfg = tiny_cfg(
        "extraction.enabled=true",
        "extraction.every_n_steps=3",
        "extraction.top_k=2",
        "extraction.verify.steps=3",
        "extraction.wen.steps=10",
        "extraction.wen.first_steps=2",
        "data.duplicate.fraction=0.3",
        "data.duplicate.copies=3",
    )
    run_dir = run(cfg)
    rows = list(csv.DictReader((run_dir / "extraction.csv").open()))
    assert {int(r["step"]) for r in rows} == {3, 6}
    section = json.loads((run_dir / "summary.json").read_text())["extraction"]
    expected_evals = {"denoising_confidence": 8, "edge_consistency": 4, "noise_prediction_norm": 2, "anisotropy": 2}  # wen.first_steps=2 above
    for name, evals in expected_evals.items():
        entry = section[name]
        assert entry["unet_evals_per_caption"] == pytest.approx(evals), name
        report = entry["auc_duplicated"]  # duplicated vs single captions, with its interval
        assert report["n_positive"] + report["n_negative"] == sum(1 for r in rows if r["step"] == "6" and r["duplicated"] != "")
        assert report["auc_ci"][0] <= report["auc"] <= report["auc_ci"][1]
        assert entry["trained_vs_heldout"]["n_negative"] == section["heldout_captions"]
    assert "train" in json.loads((run_dir / "summary.json").read_text())  # other sections survive


def test_realism_callback_in_a_run(tiny_cfg):
    from workflows.train import run

    run_dir = run(tiny_cfg("realism.enabled=true", "realism.every_n_steps=3", "realism.num_samples=4", "realism.steps=2", "realism.max_real=8"))
    section = json.loads((run_dir / "summary.json").read_text())["realism"]
    assert section["num_samples"] == 4 and 0 <= section["fake_rate_two_sided"] <= 1
    assert section["irs_two_sided_generated_mean"] > 0 and section["irs_paper_real_mean"] > 0
