"""The monitors inside real (tiny) training runs: files, summary sections, W&B."""

import csv
import json


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
    for name in ["denoising_confidence", "edge_consistency", "noise_prediction_norm"]:
        assert {"auc", "precision_at_k", "unet_evals_per_caption"} <= set(section[name])
        assert section[name]["unet_evals_per_caption"] > 0
    assert section["denoising_confidence"]["unet_evals_per_caption"] < 1.2  # one evaluation per caption
    assert "train" in json.loads((run_dir / "summary.json").read_text())  # other sections survive


def test_realism_callback_in_a_run(tiny_cfg):
    from workflows.train import run

    run_dir = run(tiny_cfg("realism.enabled=true", "realism.every_n_steps=3", "realism.num_samples=4", "realism.steps=2", "realism.max_real=8"))
    section = json.loads((run_dir / "summary.json").read_text())["realism"]
    assert section["num_samples"] == 4 and 0 <= section["fake_rate"] <= 1
    assert section["irs_generated_mean"] > 0 and section["irs_real_mean"] > 0
