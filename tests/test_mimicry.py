"""Mimicry after fine-tuning (protect.py mimicry.enabled=true, lightning_modules/mimicry.py),
and the shared loaders it relies on (eidetic.imagefolder, eidetic.pipelines)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protect  # noqa: E402
from eidetic.errors import ConfigError  # noqa: E402
from workflows import protect as protect_workflow  # noqa: E402
from workflows import mimicry  # noqa: E402

TINY = ROOT / "configs" / "tests" / "tiny.yaml"
MIMICRY_STEPS = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny run's exported model/ (16 px interior, 4 px border) with its config.yaml beside it."""
    from workflows.train import load_config, run

    run_dir = run(load_config([TINY], [f"run.dir={tmp_path_factory.mktemp('base') / 'run'}", "logging.wandb.enabled=false"]))
    return run_dir / "model"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        # smooth images: something a few fine-tuning steps can start to learn
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(base).resize((16, 16), Image.BICUBIC).save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a photo of the moon surface, detail {i}"})
    # not at the interior resolution: trained resized, and reported as such
    Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(folder / "big.jpg", format="JPEG")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def mimicry_run(tiny_model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("protected") / "out"
    rc = protect.main([
        f"input={images}", f"model={tiny_model}", f"output={out}", "objective=sds-", "steps=2", "evaluate.enabled=false",
        "mimicry.enabled=true", f"mimicry.steps={MIMICRY_STEPS}", "mimicry.samples_per_image=2", "mimicry.sample_steps=2",
        "mimicry.train_overrides=[train.lr_warmup_steps=0]",
    ])
    return rc, out


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_mimicry_section_and_report(mimicry_run):
    rc, out = mimicry_run
    assert rc == 0
    m = json.loads((out / "summary.json").read_text())["protection"]["mimicry"]
    assert m["images"] == 5 and m["resolution"] == 16 and m["border"] == 4 and m["steps"] == MIMICRY_STEPS
    assert set(m["similarity"]) == set(mimicry.MODELS)
    for key in mimicry.MODELS:
        assert set(m["similarity"][key]) == set(mimicry.METRICS)
        assert all(finite(v) for v in m["similarity"][key].values()), m["similarity"][key]
    for metric in mimicry.METRICS:
        expected = m["similarity"]["clean_tuned"][metric] - m["similarity"]["protected_tuned"][metric]
        assert m["drop"][metric] == pytest.approx(expected, abs=1e-6)
        assert finite(m["drop_standard_error"][metric])
        # best of samples can only be at least the mean of samples
        if metric.endswith("_best"):
            for key in mimicry.MODELS:
                assert m["similarity"][key][metric] >= m["similarity"][key][metric.replace("_best", "_mean")] - 1e-6
    assert "per_image" not in m  # per-image rows go to protection_per_image.jsonl
    rows = [json.loads(line) for line in (out / "protection_per_image.jsonl").read_text().splitlines()]
    assert all(set(r["mimicry"]) == set(mimicry.MODELS) for r in rows) and len(rows) == 5
    assert any("big.jpg" in w and "16x16" in w for w in m["warnings"])
    report = (out / "report.md").read_text()
    assert "## Mimicry after fine-tuning" in report and "fine-tuned on protected" in report and "big.jpg" in report


def test_both_finetunes_used_the_same_settings(mimicry_run):
    _, out = mimicry_run
    m = json.loads((out / "summary.json").read_text())["protection"]["mimicry"]
    clean, prot = m["finetune"]["clean"], m["finetune"]["protected"]
    for key in ("seed", "max_steps", "lr", "global_step", "train_images"):
        assert clean[key] == prot[key], key
    assert clean["global_step"] == MIMICRY_STEPS and clean["train_images"] == 5
    assert all(finite(f["final_loss"]) and f["wall_time_s"] >= 0 for f in (clean, prot))

    def config(arm):
        cfg = OmegaConf.to_container(OmegaConf.load(Path(m["finetune"][arm]["run_dir"]) / "config.yaml"))
        folder = cfg["data"].pop("folder")
        for key in ("dir", "name"):
            cfg["run"].pop(key)
        cfg["logging"]["wandb"].pop("id")
        return cfg, folder

    (a, folder_a), (b, folder_b) = config("clean"), config("protected")
    assert a == b  # identical apart from the folder and the run's own names
    assert a["train"]["lr_warmup_steps"] == 0  # train_overrides reached both
    assert a["data"]["heldout_fraction"] == 0 and a["data"]["source"] == "folder"
    assert not a["solidmark"]["enabled"] and not a["extraction"]["enabled"] and not a["logging"]["wandb"]["enabled"]
    # the fine-tunes trained on staged folders holding only the PNGs and metadata.jsonl
    names_a = sorted(p.name for p in Path(folder_a).iterdir())
    assert names_a == sorted(p.name for p in Path(folder_b).iterdir())
    assert names_a == ["big.png", "img0.png", "img1.png", "img2.png", "img3.png", "metadata.jsonl"]
    assert (Path(folder_a) / "metadata.jsonl").read_text() == (Path(folder_b) / "metadata.jsonl").read_text()
    # protected copies are the published files; clean copies differ from them
    assert (Path(folder_b) / "img0.png").read_bytes() == (out / "img0.png").read_bytes()
    assert (Path(folder_a) / "img0.png").read_bytes() != (out / "img0.png").read_bytes()
    # nothing of the evaluation inside the output folder, which is itself a dataset
    assert not [p for p in out.iterdir() if p.is_dir()]
    assert Path(m["work_dir"]) == mimicry.default_work_dir(out)


def test_the_evaluation_really_fine_tuned(mimicry_run, tiny_model):
    from safetensors.torch import load_file

    _, out = mimicry_run
    m = json.loads((out / "summary.json").read_text())["protection"]["mimicry"]
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    for arm in mimicry.ARMS:
        tuned = load_file(Path(m["finetune"][arm]["run_dir"]) / "model" / "unet" / "diffusion_pytorch_model.safetensors")
        assert base.keys() == tuned.keys()
        assert any(not torch.equal(base[k], tuned[k]) for k in base), f"{arm} fine-tune did not change the UNet"
        # the text encoder of a fine-tune stays frozen
        te_base = load_file(tiny_model / "text_encoder" / "model.safetensors")
        te_tuned = load_file(Path(m["finetune"][arm]["run_dir"]) / "model" / "text_encoder" / "model.safetensors")
        assert all(torch.equal(te_base[k], te_tuned[k]) for k in te_base)


def test_wrong_resolution_fails_before_protecting(tiny_model, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = protect.main([f"input={images}", f"model={tiny_model}", f"output={out}", "steps=1", "mimicry.enabled=true",
                       "mimicry.train_overrides=[data.resolution=20]"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "24px canvases" in err and "data.resolution=16" in err
    assert not out.exists()


def test_mimicry_config_errors(images, tmp_path):
    base = [f"input={images}", f"model={tmp_path}", f"output={tmp_path / 'out'}", "mimicry.enabled=true"]
    for extra, message in [
        ([f"mimicry.work_dir={tmp_path / 'out' / 'm'}"], "must not be inside output"),
        ([f"mimicry.work_dir={images}"], "must not be inside input"),
        ([f"mimicry.work_dir={tmp_path}"], "output .* must not be inside mimicry.work_dir"),
        (["mimicry.lr=-1"], "mimicry.lr"),
        (["mimicry.steps=0"], "mimicry.steps"),
        (["mimicry.sampler=euler"], "mimicry.sampler"),
        (["mimicry.train_overrides=[lr]"], "key=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            protect_workflow.check_config(protect_workflow.load_config([], base + extra))
    # an out-of-range value is an error even while its section is off: it would bite when switched on
    with pytest.raises(ConfigError, match="mimicry.steps"):
        protect_workflow.load_config([], base[:3] + ["mimicry.steps=0"])
    with pytest.raises(ConfigError, match="(?s)invalid mimicry.train_overrides.*did you mean 'train.lr'"):
        cfg = protect_workflow.load_config([], base + ["mimicry.train_overrides=[train.lrr=1]"])
        mimicry.training_config(tmp_path / "model", tmp_path / "d", tmp_path / "r", cfg.mimicry)


def test_purified_only_mimicry_needs_one_purification_to_name_its_clean_run(images, tmp_path):
    common = [f"input={images}", "model=m", f"output={tmp_path / 'o'}", "mimicry.enabled=true", "mimicry.unpurified=false"]
    with pytest.raises(ConfigError, match="needs a purification"):
        protect_workflow.load_config([], common)
    with pytest.raises(ConfigError, match="names the clean fine-tune of one purification; 2 are given"):
        protect_workflow.load_config([], [*common, "purification=[{kind: jpeg}, {kind: gaussian}]", "mimicry.clean_run=r"])
    assert protect_workflow.load_config([], [*common, "purification=[{kind: jpeg}, {kind: gaussian}]"]).mimicry.unpurified is False


def test_base_config_from_an_older_run_drops_unknown_keys(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("data:\n  resolution: 24\n  border: 4\nmodel:\n  space: latent\ntrain:\n  checkpoint:\n    export_diffusers: false\n")
    layer, source, dropped = mimicry.base_config(tmp_path / "model")
    assert source == str(tmp_path / "config.yaml") and dropped == ["train.checkpoint.export_diffusers"]
    cfg = protect_workflow.load_config([], ["input=i", "model=m", "output=o", "mimicry.steps=7"])
    train = mimicry.training_config(tmp_path / "model", tmp_path / "d", tmp_path / "r", cfg.mimicry, (layer, source, dropped))
    assert train.data.resolution == 24 and train.train.max_steps == 7 and train.model.pretrained == str((tmp_path / "model").resolve())
    # no run config beside the model: the embedded default
    assert mimicry.base_config(tmp_path / "elsewhere" / "model")[2] == [] and mimicry.base_config(tmp_path / "elsewhere" / "model")[1] == "the training defaults"


def test_work_dir_not_made_by_mimicry_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        mimicry._prepare_work_dir(tmp_path / "work")
    assert (tmp_path / "work" / "mine.txt").exists()


# ---- the shared loaders ----------------------------------------------------------------
def test_one_model_loader_freezes_for_inference_and_not_for_fine_tuning(tiny_model):
    from eidetic.pipelines import load_components, load_diffusion_model

    frozen = load_diffusion_model(tiny_model)
    parts = load_components(tiny_model)
    assert not any(p.requires_grad for p in frozen.unet.parameters())
    assert all(p.requires_grad for p in parts.unet.parameters())  # fine-tuning needs trainable weights
    assert type(frozen.scheduler).__name__ == type(parts.scheduler).__name__ == "DDPMScheduler"
    with torch.no_grad():
        torch.testing.assert_close(frozen.encode_prompt(["a photo of the moon"]), parts.text(["a photo of the moon"]))


def test_mimicry_after_purification_scores_against_the_clean_images(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    rc = protect.main([
        f"input={images}", f"model={tiny_model}", f"output={out}", "objective=sds-", "steps=1", "evaluate.enabled=false",
        "mimicry.enabled=true", "mimicry.steps=2", "mimicry.samples_per_image=1", "mimicry.sample_steps=2",
        "mimicry.train_overrides=[train.lr_warmup_steps=0]", "purification=[{kind: jpeg}]",
    ])
    assert rc == 0
    m = json.loads((out / "summary.json").read_text())["protection"]["mimicry"]
    p = m["purified"]["jpeg"]
    assert p["images"] == m["images"] and finite(p["drop"]["ssim_mean"])
    assert (out.with_name("out.mimicry") / "purified-jpeg" / "runs" / "clean" / "model").is_dir()
    assert "purified with `jpeg`" in (out / "report.md").read_text()

    # a second protection of the same images, purified copies only, sharing the purified clean fine-tune
    clean_run = Path(p["finetune"]["clean"]["run_dir"])
    second = tmp_path / "second"
    rc = protect.main([
        f"input={images}", f"model={tiny_model}", f"output={second}", "objective=photoguard", "steps=1", "evaluate.enabled=false",
        "mimicry.enabled=true", "mimicry.steps=2", "mimicry.samples_per_image=1", "mimicry.sample_steps=2",
        "mimicry.train_overrides=[train.lr_warmup_steps=0]", "purification=[{kind: jpeg}]", "mimicry.unpurified=false",
        f"mimicry.clean_run={clean_run}",
    ])
    assert rc == 0
    m2 = json.loads((second / "summary.json").read_text())["protection"]["mimicry"]
    p2 = m2["purified"]["jpeg"]
    assert m2["unpurified"] is False and "drop" not in m2
    assert p2["finetune"]["clean"]["reused"] and p2["similarity"]["clean_tuned"] == p["similarity"]["clean_tuned"]
    work = second.with_name("second.mimicry")
    assert not (work / "clean").exists() and not (work / "protected").exists()  # nothing fine-tuned unpurified
    assert (work / "purified-jpeg" / "runs" / "protected" / "model").is_dir()
    rows = [json.loads(line) for line in (second / "protection_per_image.jsonl").read_text().splitlines()]
    assert all("mimicry" not in r and finite(r["purified"]["jpeg"]["mimicry"]["protected_tuned"]["psnr_best"]) for r in rows)
    assert "Not evaluated on the unpurified copies" in (second / "report.md").read_text()


def test_a_second_protection_reuses_the_clean_fine_tune_and_a_different_one_is_refused(mimicry_run, tiny_model, images, tmp_path):
    """Protections of the same images compared side by side share one clean fine-tune: the reused
    clean model scores exactly as it did, and a clean run made with other settings is refused."""
    _, first = mimicry_run
    m1 = json.loads((first / "summary.json").read_text())["protection"]["mimicry"]
    clean_run = Path(m1["finetune"]["clean"]["run_dir"])
    common = [f"input={images}", f"model={tiny_model}", "objective=photoguard", "steps=2", "evaluate.enabled=false", "mimicry.enabled=true",
              "mimicry.samples_per_image=2", "mimicry.sample_steps=2", "mimicry.train_overrides=[train.lr_warmup_steps=0]",
              f"mimicry.clean_run={clean_run}"]
    out = tmp_path / "second"
    assert protect.main([*common, f"output={out}", f"mimicry.steps={MIMICRY_STEPS}"]) == 0
    m2 = json.loads((out / "summary.json").read_text())["protection"]["mimicry"]
    assert m2["finetune"]["clean"]["reused"] and m2["finetune"]["clean"]["run_dir"] == str(clean_run)
    assert m2["similarity"]["clean_tuned"] == m1["similarity"]["clean_tuned"]
    assert m2["similarity"]["base"] == m1["similarity"]["base"]
    assert not (Path(m2["work_dir"]) / "clean").exists()  # nothing fine-tuned on the clean images here
    with pytest.raises(ConfigError, match=r"another config \(train.max_steps"):
        protect_workflow.run(protect_workflow.load_config([], [*common, f"output={tmp_path / 'third'}", f"mimicry.steps={MIMICRY_STEPS + 1}"]))
    assert not (tmp_path / "third").exists()  # refused before protecting anything


def test_protection_grid_against_mimicry_shares_each_seeds_clean_fine_tune_and_pools_seeds(tiny_model, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import protection_grid

    out = tmp_path / "grid"
    argv = ["--model", str(tiny_model), "--out", str(out), "--images", "3", "--objectives", "sds-", "--eps", "8", "--control", "photoguard:32",
            "--pgd-steps", "2", "--mimicry-only", "--mimicry-seeds", "0", "1", "--finetune-steps", "3", "--samples", "2",
            "--finetune-override", "train.ema.enabled=false", "train.lr_warmup_steps=0"]
    result = protection_grid.main(argv)
    rows = json.loads((out / "mimicry.json").read_text())["rows"]
    assert {(r["objective"], r["eps_levels"], r["seeds"]) for r in rows} == {
        (o, e, s) for o, e in (("sds-", 8), ("photoguard", 32)) for s in ("0", "1", "pooled")}
    for objective, levels in (("sds-", 8), ("photoguard", 32)):
        by = {r["seeds"]: r for r in rows if (r["objective"], r["eps_levels"]) == (objective, levels)}
        for m in protection_grid.MIMICRY_MEASURES:
            assert by["pooled"][m] == pytest.approx((by["0"][m] + by["1"][m]) / 2)  # the mean over seeds of the means over images
            lo, hi = by["pooled"][f"{m}_ci"]
            assert lo <= by["pooled"][m] <= hi
    for seed in (0, 1):  # one clean fine-tune per seed, used by every cell of that seed
        first = json.loads((out / f"mimicry-seed{seed}" / "sds--eps8" / "summary.json").read_text())["protection"]["mimicry"]
        second = json.loads((out / f"mimicry-seed{seed}" / "photoguard-eps32" / "summary.json").read_text())["protection"]["mimicry"]
        assert not first["finetune"]["clean"].get("reused") and second["finetune"]["clean"]["reused"]
        assert second["finetune"]["clean"]["run_dir"] == first["finetune"]["clean"]["run_dir"]
        assert second["similarity"]["clean_tuned"] == first["similarity"]["clean_tuned"] and first["seed"] == seed
        # a resumed grid finds that clean fine-tune whichever cell it meets first
        found = protection_grid.finished_clean_run(out / f"mimicry-seed{seed}", [("photoguard", 32), ("sds-", 8)])
        assert found == Path(first["finetune"]["clean"]["run_dir"])
        for arm in ("clean", "protected"):  # --finetune-override reached every fine-tune
            train_cfg = OmegaConf.load(Path(first["finetune"][arm]["run_dir"]) / "config.yaml").train
            assert train_cfg.ema.enabled is False and train_cfg.lr_warmup_steps == 0
    assert set(result["mimicry"]["psnr_best_drop_at_16"]) == set() and result["mimicry"]["positive_control"]["psnr_best_ci"]
    assert "| photoguard | 32/255 |" in (out / "mimicry.md").read_text()
    assert (out / "mimicry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert protection_grid.finished_clean_run(out / "mimicry-seed2", [("sds-", 8)]) is None
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "protection_grid"
    stamp = (out / "mimicry-seed1" / "photoguard-eps32" / "summary.json").stat().st_mtime_ns
    protection_grid.main(argv)  # resumes: every finished cell kept
    assert (out / "mimicry-seed1" / "photoguard-eps32" / "summary.json").stat().st_mtime_ns == stamp

    # purification before fine-tuning: one more fine-tune per cell and seed, the purified clean one shared
    result = protection_grid.main([*argv, "--mimicry-purify", "jpeg"])
    assert (out / "mimicry-seed1" / "photoguard-eps32" / "summary.json").stat().st_mtime_ns == stamp  # unpurified cells kept
    saved = json.loads((out / "mimicry.json").read_text())
    purified = saved["purified"]["jpeg"]
    assert purified["settings"] == protection_grid.PURIFICATION_SETTINGS["jpeg"]
    for seed in (0, 1):
        folder = out / f"mimicry-seed{seed}"
        first = json.loads((folder / "sds--eps8-purified-jpeg" / "summary.json").read_text())["protection"]["mimicry"]
        second = json.loads((folder / "photoguard-eps32-purified-jpeg" / "summary.json").read_text())["protection"]["mimicry"]
        assert first["unpurified"] is False and not first["purified"]["jpeg"]["finetune"]["clean"].get("reused")
        assert second["purified"]["jpeg"]["finetune"]["clean"]["reused"]
        assert protection_grid.finished_clean_run(folder, [("sds-", 8)], "jpeg") == Path(first["purified"]["jpeg"]["finetune"]["clean"]["run_dir"])
    before = {(r["objective"], r["eps_levels"]): r for r in saved["rows"] if r["seeds"] == "pooled"}
    after = {(r["objective"], r["eps_levels"]): r for r in purified["rows"] if r["seeds"] == "pooled"}
    effect = {(r["objective"], r["eps_levels"]): r for r in purified["effect"]}
    for cell in (("sds-", 8), ("photoguard", 32)):  # paired per image, so the mean is the difference of the pooled means
        assert effect[cell]["psnr_best"] == pytest.approx(after[cell]["psnr_best"] - before[cell]["psnr_best"])
    clean_tuned = {}
    for suffix in ("", "-purified-jpeg"):
        for seed in (0, 1):
            for r in (json.loads(line) for line in (out / f"mimicry-seed{seed}" / f"sds--eps8{suffix}" / "protection_per_image.jsonl").read_text().splitlines()):
                m = r["purified"]["jpeg"]["mimicry"] if suffix else r["mimicry"]
                clean_tuned.setdefault(suffix, []).append(m["clean_tuned"]["ssim_best"])
    assert effect[("clean", 0)]["ssim_best"] == pytest.approx(np.mean(clean_tuned[""]) - np.mean(clean_tuned["-purified-jpeg"]))
    text = (out / "mimicry.md").read_text()
    assert "both sets purified with `jpeg` first" in text and "| clean (the purification's cost) |" in text
    assert (out / "mimicry-jpeg.png").is_file()
    assert set(result["mimicry"]["purification_effect_ssim_best"]["jpeg"]) == {"sds-:8", "photoguard:32", "clean:0"}

    # tabulating a grid that still runs: only cells finished for every seed, the others named, nothing run
    i = argv.index("--eps")
    tabulate = [*argv[:i + 1], "8", "16", *argv[i + 2:], "--mimicry-purify", "jpeg", "--tabulate-only"]
    result = protection_grid.main(tabulate)
    assert result["unfinished"] == ["sds-:16 (mimicry)", "sds-:16 (mimicry after jpeg)"]
    assert not (out / "mimicry-seed0" / "sds--eps16").exists()
    again = json.loads((out / "mimicry.json").read_text())
    assert again["rows"] == saved["rows"] and again["purified"]["jpeg"]["effect"] == purified["effect"]
    result = protection_grid.main([*tabulate[:tabulate.index("--mimicry-seeds") + 1], "0", "1", "2",
                                   *tabulate[tabulate.index("--finetune-steps"):]])
    assert len(result["unfinished"]) == 6 and not (out / "mimicry-seed2").exists()  # seed 2 never ran: nothing is finished for every seed
    assert (out / "mimicry.md").read_text().startswith("No mimicry cell has finished")
