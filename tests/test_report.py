"""What a finished run shows: report.html / report.md, the console summary, a quiet console."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from workflows import report

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tests" / "tiny.yaml"
MONITORED = [
    "solidmark.enabled=true", "solidmark.every_n_steps=3", "solidmark.steps=4",
    "extraction.enabled=true", "extraction.every_n_steps=3", "extraction.top_k=3", "extraction.verify.steps=3",
    "extraction.wen.steps=10", "extraction.wen.first_steps=2", "extraction.detectors=[denoising_confidence,noise_prediction_norm]",
    "data.duplicate.fraction=0.3", "data.duplicate.copies=3", "validation.every_n_steps=3", "controls.enabled=true",
]
SECTIONS = ["overview", "memorization", "extraction", "training", "validation", "configuration"]


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """A tiny run with every monitor that draws a figure, W&B offline."""
    from workflows.train import load_config, run

    run_dir = tmp_path_factory.mktemp("report") / "run"
    return run(load_config([TINY], [f"run.dir={run_dir}", *MONITORED]))


def test_report_html_is_self_contained_and_has_every_section(monitored_run):
    page = (monitored_run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    names = {name for name, _ in images}
    assert {"eidetic_over_training", "ell_histograms", "most_memorized", "detector_scores", "roc_curves", "training_curves"} <= names
    assert {"step-000003", "step-000006"} <= names  # validation samples over steps
    import base64

    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    # nothing outside the file: no linked stylesheet, script, remote or local reference
    assert not re.search(r"<(link|script|iframe)\b", page)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "SolidMark: eidetic memorization" in page and "Extraction probes" in page and "torch" in page  # tables, environment
    md = (monitored_run / "report.md").read_text()
    assert "| δ |" in md and "![roc_curves](report_files/roc_curves.png)" in md
    assert (monitored_run / "report_files" / "roc_curves.png").exists()


def test_console_summary_reads_the_run_directory(monitored_run, render):
    text = render(report.console_summary(monitored_run))
    for expected in ("status: finished", "steps: 6/6", "SolidMark: eidetic memorization", "held-out (n=3)", "duplicated",
                     "Most memorized training images", "Extraction probes", "denoising_confidence", "verified extractions",
                     "controls: on, no action taken", f"report: {monitored_run / 'report.html'}", f"model: {monitored_run / 'model'}"):
        assert expected in text, expected
    summary = json.loads((monitored_run / "summary.json").read_text())["solidmark"]
    if summary["uninformative_deltas"]:
        assert "under the autoencoder floor" in text


def test_wandb_gets_the_report_figures(monitored_run):
    media = [p.name for p in (monitored_run / "wandb").glob("offline-run-*/files/media/images/*/*.png")]
    assert any(n.startswith("ell_histograms_") for n in media) and any(n.startswith("roc_curves_") for n in media), media


def test_report_of_a_crashed_run(monitored_run, tmp_path):
    """A run killed mid-way: no train summary, no metrics.csv, a truncated image file."""
    crashed = tmp_path / "crashed"
    shutil.copytree(monitored_run, crashed, ignore=shutil.ignore_patterns("wandb", "checkpoints", "report*"))
    summary = json.loads((crashed / "summary.json").read_text())
    del summary["train"]
    (crashed / "summary.json").write_text(json.dumps(summary))
    (crashed / "metrics.csv").unlink()
    (crashed / "solidmark" / "most_memorized.npz").write_bytes(b"PK\x03\x04truncated")
    assert report.main([str(crashed), "--quiet"]) == 0
    page = (crashed / "report.html").read_text()
    assert "status: incomplete" in page and "crashed, was killed or is still running" in page
    assert "most_memorized.npz could not be read" in page
    assert 'alt="eidetic_over_training"' in page and 'alt="training_curves"' not in page
    # a directory with nothing in it still gets a report that says so
    empty = tmp_path / "empty"
    empty.mkdir()
    report.write_report(empty)
    assert "config.yaml is missing" in (empty / "report.html").read_text()
    assert report.main([str(tmp_path / "nowhere")]) == 2


def test_training_emits_none_of_the_warnings_the_project_fixed(tiny_cfg):
    """The eval-mode warning (frozen modules), the logging interval longer than an epoch, the
    DDIM export's steps_offset."""
    from workflows.train import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = run(tiny_cfg("trainer.log_every_n_steps=50", "logging.wandb.enabled=false"))
        from diffusers import DDIMScheduler

        DDIMScheduler.from_pretrained(run_dir / "model" / "scheduler")
    messages = [str(w.message) for w in caught]
    for fixed in ("module(s) in eval mode", "smaller than the logging interval", "steps_offset"):
        assert not any(fixed in m for m in messages), (fixed, [m for m in messages if fixed in m])
    assert json.loads((run_dir / "model" / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 1


def test_eval_mode_warning_still_shows_for_a_module_that_is_not_frozen():
    """Only the project's frozen modules are exempt: another module in eval mode still warns."""
    from workflows.train import load_config

    cfg = load_config([TINY], [])
    from lightning_modules.diffusion import LatentDiffusionModule

    module = LatentDiffusionModule.__new__(LatentDiffusionModule)
    import torch

    torch.nn.Module.__init__(module)
    module.train_text = True
    module.unet = torch.nn.Linear(1, 1)
    module.vae = torch.nn.Linear(1, 1).eval()
    assert module.unexpected_eval_modules() == []
    module.unet.eval()
    assert module.unexpected_eval_modules() == ["unet"]
    assert cfg.run.verbose_console is False


def test_quiet_console_filters_only_the_benign_notices():
    from workflows import console

    emitter = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    emitter.addHandler(handler)
    level = emitter.level
    emitter.setLevel(logging.INFO)
    try:
        console.configure(verbose=False)
        emitter.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        emitter.info("GPU available: False, used: False")
        emitter.info("Restoring states from the checkpoint path at last.ckpt")
        emitter.warning("something that matters")
        assert records == ["Restoring states from the checkpoint path at last.ckpt", "something that matters"]
        records.clear()
        console.configure(verbose=True)
        emitter.info("GPU available: False, used: False")
        assert records == ["GPU available: False, used: False"]
    finally:
        console.configure(verbose=False)
        emitter.removeHandler(handler)
        emitter.setLevel(level)


def test_command_line_run_is_quiet_and_ends_with_the_summary(tmp_path):
    """The real console of ``python train.py`` (a subprocess: warnings print as they would)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    env.pop("EIDETIC_VERBOSE_CONSOLE", None)
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", str(TINY), f"run.dir={tmp_path / 'run'}", "trainer.enable_progress_bar=true",
         "trainer.log_every_n_steps=50"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for noise in ("litlogger", "eval mode", "logging interval", "steps_offset", "LeafSpec", "anonymous setting",
                  "requires torchvision", "Writing model shards", "GPU available", "Epoch "):
        assert noise not in console, (noise, console[-3000:])
    assert "training (epoch" in console and "6/6" in console  # the progress bar counts steps of max_steps
    last = proc.stdout.strip().splitlines()[-3:]
    assert last[0] == f"report: {tmp_path / 'run' / 'report.html'}" and last[-1].startswith("run directory:"), last
    assert (tmp_path / "run" / "report.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_a_browser(monitored_run, tmp_path):
    """Headless Chromium renders report.html to a PNG that shows the figures, not a blank page."""
    from PIL import Image

    shot = Path(os.environ.get("EIDETIC_REPORT_SCREENSHOT", tmp_path / "report.png"))
    profile = tmp_path / "profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         f"--screenshot={shot}", "--window-size=1200,3000", (monitored_run / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 20, "the page rendered (nearly) blank"
    # figures are colourful, text is grey: a page with its figures has many saturated pixels
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 60).mean() > 0.01, "no figures visible in the rendered page"


def test_duplicated_images_rank_with_an_auc_interval(tmp_path):
    # 2 duplicated images with the smallest l among 6 trained ones (a held-out row is ignored)
    losses = {"a": (0.01, 8), "b": (0.02, 8), "c": (0.30, 1), "d": (0.40, 1), "e": (0.50, 1), "f": (0.60, 1)}
    rows = [{"step": "10", "split": "train", "id": k, "loss": str(v), "copies": str(n)} for k, (v, n) in losses.items()]
    rows.append({"step": "10", "split": "heldout", "id": "h", "loss": "0.001", "copies": "1"})
    text = report._duplicated_ranks(report.RunContents(path=tmp_path, solidmark=rows))
    assert text.startswith("Duplicated images rank 1, 2 of 6 trained by ℓ (AUC 1.00 [1.00, 1.00], 2 vs 4;")
    rows[1]["loss"] = "0.45"  # one duplicate falls among the singles: the AUC and its interval move
    text = report._duplicated_ranks(report.RunContents(path=tmp_path, solidmark=rows))
    lo, hi = map(float, re.search(r"AUC 0\.75 \[([\d.]+), ([\d.]+)\], 2 vs 4", text).groups())
    assert "rank 1, 4 of 6" in text and lo < 0.75 and hi == 1.0
