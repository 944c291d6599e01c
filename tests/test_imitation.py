"""Single-example imitation: teachers, crop sampler, students, errors, a short run, the entry point."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from eidetic import imitation

NON_BLIND = ["gaussian_blur", "unsharp_mask", "tv_denoise", "bicubic_sr"]
RESTORATION = ["wavelet_denoise", "richardson_lucy"]
DETERMINISTIC = NON_BLIND + RESTORATION + ["wavelet_denoise_blind"]


@pytest.fixture(scope="module")
def patch():
    return imitation.center_crop(imitation.load_image("astronaut"), 64)


# ---- teachers -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NON_BLIND)
def test_non_blind_teacher_is_a_fixed_operator(name, patch):
    teacher = imitation.build_teacher(name)
    assert teacher.blind is False
    a, b = teacher(patch), teacher(patch)
    assert np.array_equal(a, b), "a non-blind teacher must give the same output twice"
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    scale = 2 if name == "bicubic_sr" else 1
    assert a.shape == (64 * scale, 64 * scale, 3)
    # it really changes the image (else the audit would be trivial)
    base = np.repeat(np.repeat(patch, scale, 0), scale, 1)
    assert np.abs(a - base).mean() > 1e-3


@pytest.mark.parametrize("name", ["gaussian_blur", "unsharp_mask", "bicubic_sr"])
def test_local_teachers_commute_with_cropping(name):
    # The property single-example imitation relies on: away from the borders, the output on
    # a crop is the crop of the output (one image = many examples of the same local map).
    teacher = imitation.build_teacher(name)
    full = imitation.center_crop(imitation.load_image("camera"), 96)
    s = 2 if name == "bicubic_sr" else 1
    on_crop = teacher(full[16:80, 16:80])
    of_full = teacher(full)[16 * s : 80 * s, 16 * s : 80 * s]
    inner = slice(16 * s, 48 * s)
    np.testing.assert_allclose(on_crop[inner, inner], of_full[inner, inner], atol=2e-3)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_builtin_model_teacher_is_deterministic(name, patch):
    """Same input -> bitwise the same output, from the same object and from a fresh one
    (a blind teacher adapts to its input, it does not draw)."""
    teacher = imitation.build_teacher(name)
    x = teacher.inputs.apply(patch, teacher.inputs.level, "patch") if teacher.inputs else patch
    assert np.array_equal(x, teacher.inputs.apply(patch, teacher.inputs.level, "patch") if teacher.inputs else patch)
    out = teacher(x)
    assert np.array_equal(out, teacher(x)) and np.array_equal(out, imitation.build_teacher(name, seed=99)(x))
    assert teacher.stochastic is False and teacher.kind in ("fixed", "blind")


@pytest.mark.parametrize("name", RESTORATION)
def test_restoration_teachers_restore_their_degraded_inputs(name, patch):
    """The paper's setting: a restoration model on degraded inputs, not a degradation of a clean photo."""
    teacher = imitation.build_teacher(name)
    assert teacher.blind is False and teacher.inputs is not None
    assert teacher.inputs.heldout_levels == (teacher.inputs.level,)  # non-blind: held-out inputs at the same level
    clean = imitation.center_crop(imitation.load_image("camera"), 96)
    degraded = teacher.inputs.apply(clean, teacher.inputs.level, "camera")
    restored = teacher(degraded)
    err = lambda a: float(np.mean((a - clean)[8:-8, 8:-8] ** 2))
    assert err(restored) < 0.8 * err(degraded), (err(restored), err(degraded))


def test_blind_denoiser_adapts_to_its_input_noise_level():
    clean = imitation.center_crop(imitation.load_image("camera"), 128)
    blind = imitation.build_teacher("wavelet_denoise_blind")
    assert blind.blind is True and blind.inputs.level not in blind.inputs.heldout_levels
    estimated, psnr = {}, {}
    mse = lambda a: float(np.mean((a - clean) ** 2))
    for level in (0.02, 0.1):
        noisy = blind.inputs.apply(clean, level, "camera")
        out = blind(noisy)
        estimated[level] = blind.calls[-1]["estimated_sigma"]
        # a denoiser fixed at the *other* level, the one a student would copy from an example there
        other = 0.1 if level == 0.02 else 0.02
        fixed = imitation.build_teacher("wavelet_denoise", {"sigma": other})(noisy)
        psnr[level] = (-10 * np.log10(mse(out)), -10 * np.log10(mse(fixed)))
    assert estimated[0.1] > 3 * estimated[0.02] and abs(estimated[0.02] - 0.02) < 0.01
    for level, (adaptive, fixed) in psnr.items():
        assert adaptive > fixed + 0.5, (level, psnr)


def test_negative_control_is_labelled_and_random(patch):
    control = imitation.build_teacher("random_noise_control", seed=3)
    assert control.stochastic is True and "control" in control.name and "NEGATIVE CONTROL" in control.description
    assert control.kind == "random (negative control)" and control.blind is None
    assert not np.array_equal(control(patch), control(patch))
    # but a run is reproducible from its seed
    assert np.array_equal(imitation.build_teacher("random_noise_control", seed=3)(patch),
                          imitation.build_teacher("random_noise_control", seed=3)(patch))


def test_teacher_parameters_and_callable_path(patch):
    weak = imitation.build_teacher("gaussian_blur", {"sigma": 0.5})(patch)
    strong = imitation.build_teacher("gaussian_blur", {"sigma": 3.0})(patch)
    assert np.abs(strong - patch).mean() > np.abs(weak - patch).mean()
    t = imitation.build_teacher("skimage.filters:sobel")
    assert t.blind is None and imitation.is_deterministic(t, patch)
    assert t(patch).shape == patch.shape
    with pytest.raises(imitation.ImitationError, match="module:function"):
        imitation.build_teacher("gaussian-blur")
    with pytest.raises(imitation.ImitationError, match="cannot import"):
        imitation.build_teacher("no_such_module_xyz:fn")
    with pytest.raises(imitation.ImitationError, match="no parameter"):
        imitation.build_teacher("gaussian_blur", {"radius": 2})


def test_teacher_that_changes_size_is_a_clear_error(patch):
    cropping = imitation.Teacher("crops", lambda x: x[2:-2, 2:-2], blind=False, description="crops the border")
    with pytest.raises(imitation.ImitationError, match=r"teacher 'crops'.*64x64.*60x60"):
        cropping(patch)
    odd_scale = imitation.Teacher("x1.5", lambda x: np.zeros((96, 96, 3)), blind=False, description="1.5x")
    with pytest.raises(imitation.ImitationError, match="integer multiple"):
        odd_scale(patch)


def test_images_load_as_rgb():
    gray = imitation.load_image("camera")
    assert gray.shape == (512, 512, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert np.array_equal(imitation.load_image("cat"), imitation.load_image("chelsea"))
    with pytest.raises(imitation.ImitationError, match="photographs"):
        imitation.load_image("not_a_picture")


def test_heldout_excludes_the_example_even_under_an_alias():
    teacher = imitation.build_teacher("gaussian_blur")
    pairs = imitation.heldout_pairs(teacher, ["cat", "chelsea", "coins"], exclude=[imitation.load_image("chelsea")], crop=32)
    assert [p.name for p in pairs] == ["coins"]
    assert pairs[0].x.shape == (3, 32, 32)


# ---- sizes and crops ------------------------------------------------------------------------
def test_pair_size_errors():
    x = torch.rand(3, 64, 64)
    assert imitation.check_pair(x, torch.rand(3, 128, 128), 32) == 2
    with pytest.raises(imitation.ImitationError, match="same size"):
        imitation.check_pair(x, torch.rand(3, 64, 80), 32)
    with pytest.raises(imitation.ImitationError, match="integer multiple"):
        imitation.check_pair(x, torch.rand(3, 96, 96), 32)
    with pytest.raises(imitation.ImitationError, match="same size"):
        imitation.check_pair(x, torch.rand(3, 32, 32), 16)  # output smaller than input
    with pytest.raises(imitation.ImitationError, match="smaller than the training crop size 96"):
        imitation.check_pair(x, x.clone(), 96)


def test_crop_sampler_aligns_pairs_and_masks_interior_borders():
    h, w, s, c, m = 40, 50, 2, 16, 3
    x = torch.rand(3, h, w)
    y = torch.nn.functional.interpolate(x[None], scale_factor=s, mode="nearest")[0]
    sampler = imitation.RandomCropSampler(x, y, c, 8, margin=m, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([[0, 0], [10, 20], [h - c, w - c]])
    xb, yb, mb = sampler.crop(pos)
    assert xb.shape == (3, 3, c, c) and yb.shape == (3, 3, s * c, s * c) and mb.shape == (3, 1, s * c, s * c)
    # alignment: the output crop is the scaled input crop
    torch.testing.assert_close(torch.nn.functional.interpolate(xb, scale_factor=s, mode="nearest"), yb)
    # interior crop: margin masked on all sides; corner crops keep the image-edge sides
    assert mb[1, 0, : s * m].sum() == 0 and mb[1, 0, s * m : s * (c - m), s * m : s * (c - m)].all()
    assert mb[1].sum() == (s * (c - 2 * m)) ** 2
    assert mb[0, 0, 0, 0] == 1 and mb[0, 0, -1, -1] == 0
    assert mb[2, 0, -1, -1] == 1 and mb[2, 0, 0, 0] == 0
    # random positions stay inside and repeat with the seed
    a = imitation.RandomCropSampler(x, y, c, 64, margin=m, generator=torch.Generator().manual_seed(5)).positions(64)
    b = imitation.RandomCropSampler(x, y, c, 64, margin=m, generator=torch.Generator().manual_seed(5)).positions(64)
    assert torch.equal(a, b) and a[:, 0].max() <= h - c and a[:, 1].max() <= w - c and a.min() >= 0
    with pytest.raises(imitation.ImitationError, match="margin"):
        imitation.RandomCropSampler(x, y, c, 8, margin=8)


# ---- students -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,depth", [("cnn", 4), ("unet", 2)])
@pytest.mark.parametrize("scale", [1, 2])
def test_students_start_at_identity_and_keep_sizes(arch, depth, scale):
    net = imitation.build_student(arch, 8, depth, 3, scale)
    x = torch.rand(2, 3, 21, 30)  # odd sizes: the UNet pads and crops back
    y = net(x)
    assert y.shape == (2, 3, 21 * scale, 30 * scale)
    torch.testing.assert_close(y, torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest"))


def test_receptive_field_matches_cnn_depth_and_kernel():
    assert imitation.receptive_field(imitation.build_student("cnn", 8, 6, 3)) == 13
    assert imitation.receptive_field(imitation.build_student("cnn", 8, 3, 5)) == 13
    assert imitation.receptive_field(imitation.build_student("unet", 8, 2, 3)) > imitation.receptive_field(imitation.build_student("cnn", 8, 2, 3))
    with pytest.raises(imitation.ImitationError, match="arch"):
        imitation.build_student("transformer", 8, 2)


# ---- training -------------------------------------------------------------------------------
def test_short_training_run_clearly_beats_identity(tmp_path):
    from lightning_modules.imitation import ImitationModule, fit_student

    torch.manual_seed(0)
    teacher = imitation.build_teacher("gaussian_blur", {"sigma": 1.0})
    example = imitation.center_crop(imitation.load_image("astronaut"), 96)
    x, y = imitation.to_tensor(example), imitation.to_tensor(teacher(example))
    student = imitation.build_student("cnn", 16, 4, 3)
    sampler = imitation.RandomCropSampler(x, y, 24, 16, margin=4, generator=torch.Generator().manual_seed(0))
    heldout = imitation.heldout_pairs(teacher, ["camera", "coffee"], exclude=[imitation.load_image("astronaut")], crop=64)
    module = ImitationModule(student, sampler, heldout[:1], lr=3e-3, max_steps=150, warmup_steps=10)
    fit_student(module, 150, eval_every_n_steps=75)
    result = imitation.evaluate_student(module.student, heldout, scale=1)
    assert result["psnr"] > result["identity_psnr"] + 4.0, result
    assert result["ssim"] > result["identity_ssim"]
    # the checkpoint round-trips
    path = tmp_path / "s.safetensors"
    imitation.save_student(module.student, path)
    torch.testing.assert_close(imitation.apply_student(imitation.load_student(path), heldout[0].x), imitation.apply_student(module.student, heldout[0].x))


# ---- entry point ----------------------------------------------------------------------------
FAST = ["train.steps=25", "train.batch_size=4", "train.crop_size=16", "student.width=8", "student.depth=3",
        "eval.images=[camera,coins]", "eval.crop=48", "eval.every_n_steps=0", "logging.wandb.enabled=false",
        "train.warmup_steps=5"]


def test_imitate_writes_run_directory_with_size_sweep(tmp_path, render):
    import imitate

    from workflows import imitate as imitate_workflow

    rc = imitate.main(["teacher=gaussian_blur,bicubic_sr", "example_sizes=[24,40]", f"run.dir={tmp_path}", *FAST])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["imitation"]
    assert set(summary["teachers"]) == {"gaussian_blur", "bicubic_sr"}
    sr = summary["teachers"]["bicubic_sr"]
    assert sr["blind"] is False and [r["example_size"] for r in sr["results"]] == [[24, 24], [40, 40]]
    assert sr["results"][0]["scale"] == 2 and set(sr["results"][0]["heldout"]["per_image"]) == {"camera", "coins"}
    assert summary["command"]  # how the run was made, as the process was invoked
    for name in ("config.yaml", "report.md", "psnr_vs_example_size.png", "students/bicubic_sr_40.safetensors",
                 "logs/gaussian_blur_24/metrics.csv"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert "| bicubic_sr | fixed | clean photograph | 40x40 |" in report
    assert "**bicubic_sr, example 40x40**" in report and "| camera |" in report  # the per-image table
    assert {"identity_psnr", "meets_bar"} <= set(sr["results"][0]["heldout"]["per_image"]["camera"])
    text = render(imitate_workflow.console_summary(tmp_path))
    assert "student PSNR on held-out images" in text and "bicubic_sr fixed 40x40" in text
    assert imitation.load_student(tmp_path / "students/bicubic_sr_40.safetensors").config["scale"] == 2


def test_imitate_from_a_pair_of_files_and_its_errors(tmp_path, capsys):
    from PIL import Image

    import imitate

    example = imitation.center_crop(imitation.load_image("coffee"), 48)
    out = imitation.build_teacher("unsharp_mask")(example)
    for name, arr in [("in.png", example), ("out.png", out), ("wide.png", np.zeros((48, 60, 3)))]:
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(tmp_path / name)
    run = tmp_path / "run"
    assert imitate.main([f"input={tmp_path / 'in.png'}", f"output={tmp_path / 'out.png'}", f"run.dir={run}", *FAST]) == 0
    res = json.loads((run / "summary.json").read_text())["imitation"]["teachers"]["pair"]
    assert res["results"][0]["heldout"] is None and res["results"][0]["example_fit_psnr"] > 20
    assert "no teacher to query" in (run / "report.md").read_text()

    assert imitate.main([f"input={tmp_path / 'in.png'}", f"output={tmp_path / 'wide.png'}", f"run.dir={run}", *FAST]) == 2
    assert "48x48 but output is 48x60" in capsys.readouterr().err
    assert imitate.main([f"input={tmp_path / 'in.png'}", f"run.dir={run}", *FAST]) == 2
    assert "both input" in capsys.readouterr().err
    assert imitate.main(["example_size=24", "train.crop_size=32", f"run.dir={run}"]) == 2
    assert "smaller than the training crop size 32" in capsys.readouterr().err
    assert imitate.main(["train.stepz=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


def test_imitate_with_restoration_blind_and_control_teachers(tmp_path):
    import imitate

    rc = imitate.main(["teacher=wavelet_denoise,wavelet_denoise_blind,random_noise_control", "example_size=32",
                       f"run.dir={tmp_path}", *FAST])
    assert rc == 0
    teachers = json.loads((tmp_path / "summary.json").read_text())["imitation"]["teachers"]
    blind = teachers["wavelet_denoise_blind"]
    assert blind["kind"] == "blind" and blind["deterministic"] is True and blind["meets_psnr_bar"] is None
    assert blind["inputs"] == {"degradation": "noise", "example_level": 0.05, "heldout_levels": [0.02, 0.1]}
    assert "estimated_sigma" in blind["results"][0]["example_teacher_record"]
    assert set(blind["results"][0]["heldout"]["per_image"]) == {f"{n} (noise σ={v})" for n in ("camera", "coins") for v in (0.02, 0.1)}
    control = teachers["random_noise_control"]
    assert control["negative_control"] is True and control["deterministic"] is False and control["meets_psnr_bar"] is None
    assert teachers["wavelet_denoise"]["kind"] == "fixed" and teachers["wavelet_denoise"]["meets_psnr_bar"] is not None
    report = (tmp_path / "report.md").read_text()
    assert "NEGATIVE CONTROL" in report and "| camera (noise σ=0.1) |" in report


# ---- the audit's bar ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", NON_BLIND)
def test_non_blind_classical_teachers_are_imitated_above_30db(name, tmp_path):

    from workflows import imitate as workflow

    run_dir = workflow.run(workflow.load_config([], [f"teacher={name}", f"run.dir={tmp_path}", "logging.wandb.enabled=false"]))
    section = json.loads((run_dir / "summary.json").read_text())["imitation"]
    heldout = section["teachers"][name]["results"][0]["heldout"]
    assert heldout["psnr"] >= 30.0, heldout
    assert section["teachers"][name]["meets_psnr_bar"] is True


def test_heldout_pairs_record_levels_and_teacher_records():
    control = imitation.build_teacher("random_noise_control", {"sigma_min": 0.01, "sigma_max": 0.02})
    pairs = imitation.heldout_pairs(control, ["camera", "coins"], crop=32)
    sigmas = [p.record["sigma"] for p in pairs]
    assert len(control.calls) == 2 and all(0.01 <= s <= 0.02 for s in sigmas) and sigmas[0] != sigmas[1]
    assert imitation.heldout_pairs(imitation.build_teacher("gaussian_blur"), ["camera"], crop=32)[0].record is None
    blind = imitation.build_teacher("wavelet_denoise_blind")
    pairs = imitation.heldout_pairs(blind, ["camera", "coins"], crop=48)
    assert [(p.photo, p.input_level) for p in pairs] == [("camera", 0.02), ("camera", 0.1), ("coins", 0.02), ("coins", 0.1)]
    assert all("estimated_sigma" in p.record for p in pairs) and pairs[0].name == "camera (noise σ=0.02)"
    result = imitation.evaluate_student(imitation.build_student("cnn", 4, 2, 3), pairs, scale=1)
    assert result["n_images"] == 4 and 0 <= result["n_meeting_bar"] <= 4
    for v in result["per_image"].values():  # each image beside its own identity baseline and the bar
        assert {"psnr", "identity_psnr", "meets_bar", "input_level"} <= set(v)


# ---- the project's diffusion model as a teacher --------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight latent diffusion model saved the way a run writes model/."""
    from pathlib import Path

    from eidetic.pipelines import save_pipeline
    from workflows.train import load_config
    from lightning_modules.models import build_scheduler, build_text_stack, build_unet, build_vae

    root = tmp_path_factory.mktemp("diffusion")
    cfg = load_config([Path(__file__).resolve().parent.parent / "configs" / "tests" / "tiny.yaml"])
    torch.manual_seed(0)
    text = build_text_stack(["a photo", "a cat on a mat"], cfg.model.text, root / "tokenizer")
    vae = build_vae(cfg.model.vae, 24)
    unet = build_unet(cfg.model.unet, 12, cfg.model.vae.latent_channels, text.hidden_size)
    scheduler = build_scheduler(cfg.model.scheduler, "epsilon", latent=True)
    save_pipeline(root / "model", unet=unet, text_encoder=text.text_encoder, tokenizer=text.tokenizer,
                  scheduler=scheduler, vae=vae)
    return root / "model"


def test_diffusion_model_teacher(tiny_model_dir, patch, tmp_path):
    import imitate
    from eidetic.pipelines import load_diffusion_model

    model = load_diffusion_model(tiny_model_dir)
    fixed = imitation.diffusion_teacher(model, timestep=200)
    image = patch[:30, :30]  # not a multiple of the model's downsampling: padded and cropped back
    out = fixed(image)
    assert fixed.blind is False and out.shape == image.shape and np.array_equal(out, fixed(image))
    noisy = imitation.diffusion_teacher(model, timestep=200, noise=True)
    assert noisy.stochastic is True and not np.array_equal(noisy(image), noisy(image))
    with pytest.raises(imitation.ImitationError, match="timestep"):
        imitation.diffusion_teacher(model, timestep=5000)

    rc = imitate.main(["teacher=diffusion", f"teachers.diffusion.model_dir={tiny_model_dir}", "example_size=32",
                       f"run.dir={tmp_path}", *FAST])
    assert rc == 0
    res = json.loads((tmp_path / "summary.json").read_text())["imitation"]["teachers"]["diffusion"]
    assert res["blind"] is False and res["params"]["timestep"] == 100 and res["results"][0]["heldout"]["psnr"] > 0
    assert imitate.main(["teacher=diffusion", f"run.dir={tmp_path}"]) == 2
