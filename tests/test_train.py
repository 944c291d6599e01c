"""End-to-end runs of the tiny config: outputs, resume equivalence, export, fine-tuning."""

import json
from pathlib import Path

import pytest
import torch

from workflows.train import run


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_smoke_run_writes_every_artifact(tiny_cfg):
    cfg = tiny_cfg("validation.every_n_steps=3")
    run_dir = run(cfg)
    for name in ["config.yaml", "keymap.jsonl", "checkpoints/last.ckpt", "model/model_index.json", "summary.json", "metrics.csv"]:
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step-000003.png", "step-000006.png"]
    rows = [json.loads(line) for line in (run_dir / "keymap.jsonl").read_text().splitlines()]
    assert {"id", "source", "caption", "key", "copies", "split"} <= set(rows[0])
    assert {r["split"] for r in rows} == {"train", "heldout"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and cfg.logging.wandb.id in wandb_runs[0].name
    # checkpoint limit: keep=2 newest step checkpoints plus last.ckpt
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt")) == ["step-000003.ckpt", "step-000006.ckpt"]


def test_fast_dev_run(tiny_cfg):
    """One batch through training (Lightning's fast_dev_run): no checkpoints, no export, no summary."""
    run_dir = run(tiny_cfg("trainer.fast_dev_run=true", "logging.wandb.enabled=false"))
    assert (run_dir / "config.yaml").exists() and (run_dir / "keymap.jsonl").exists()
    assert not list((run_dir / "checkpoints").glob("*.ckpt")), "fast_dev_run writes no checkpoint to resume from"
    assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()


def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    # 9 training images, batch 4, drop_last: 2 steps per epoch; stop after 2 epochs.
    full = run(tiny_cfg("train.max_steps=6", f"run.dir={tmp_path / 'full'}"))
    part_dir = tmp_path / "part"
    first = tiny_cfg("train.max_steps=4", f"run.dir={part_dir}")
    run(first)
    import train

    assert train.main([f"run.dir={part_dir}", "train.resume=last", "train.max_steps=6"]) == 0
    a, b = _state(full / "checkpoints" / "last.ckpt"), _state(part_dir / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=f"{name} differs after resume")
    assert any(k.startswith("ema_unet.") for k in a)
    summary = json.loads((part_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6
    # the resumed run logs into the same W&B run
    assert len(list((part_dir / "wandb").glob("offline-run-*"))) >= 1
    # offline-run-<time>-<id>[-n]: W&B suffixes a directory that would collide within a second
    segments = [p.name for p in (part_dir / "wandb").glob("offline-run-*")]
    assert len(segments) == 2 and all(f"-{first.logging.wandb.id}" in name for name in segments), segments


def test_export_loads_in_diffusers_and_generates(tiny_cfg):
    from diffusers import StableDiffusionPipeline

    run_dir = run(tiny_cfg())
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "model", local_files_only=True)
    out = pipe("a photo of an astronaut", num_inference_steps=2, height=24, width=24, output_type="np")
    assert out.images.shape == (1, 24, 24, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_pixel_space_run_exports_pixel_pipeline(tiny_cfg):
    from eidetic.pipelines import PixelTextToImagePipeline

    run_dir = run(tiny_cfg("model.space=pixel"))
    pipe = PixelTextToImagePipeline.from_pretrained(run_dir / "model")
    out = pipe("a photo of the moon surface", num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 24, 24)

    from eidetic.config import ConfigError
    from workflows.train import read_inputs

    # the run's config says model.space=latent (the default) but the directory has no autoencoder
    with pytest.raises(ConfigError, match="pixel-space model.*data.cache_latents=false"):
        read_inputs(tiny_cfg(f"model.pretrained={run_dir / 'model'}", "data.cache_latents=true"))


def test_finetune_an_exported_model(tiny_cfg, tmp_path):
    base = run(tiny_cfg(f"run.dir={tmp_path / 'base'}"))
    tuned = run(tiny_cfg(f"run.dir={tmp_path / 'tuned'}", f"model.pretrained={base / 'model'}", "train.max_steps=2"))
    before = _state(base / "checkpoints" / "last.ckpt")
    after = _state(tuned / "checkpoints" / "last.ckpt")
    name = next(k for k in before if k.startswith("unet.") and k.endswith("weight"))
    assert not torch.equal(before[name], after[name]), "fine-tuning did not change the UNet"
    assert (tuned / "model" / "unet").is_dir()


def test_finetune_rejects_a_model_of_another_resolution(tiny_cfg, tmp_path):
    from eidetic.config import ConfigError

    base = run(tiny_cfg(f"run.dir={tmp_path / 'base'}"))
    with pytest.raises(ConfigError, match="data.resolution"):
        run(tiny_cfg(f"run.dir={tmp_path / 'other'}", f"model.pretrained={base / 'model'}", "data.resolution=24"))


def test_pretrained_directory_that_is_not_a_model(tiny_cfg, tmp_path):
    from eidetic.errors import ModelLoadError

    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelLoadError, match="unet"):
        run(tiny_cfg(f"model.pretrained={tmp_path / 'notamodel'}"))
