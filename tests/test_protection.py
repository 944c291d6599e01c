"""Protective perturbations: PGD budget after saving, SDS vs full gradient, objective
directions, the protect.py entry point (corrupt images, bad configs)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protect  # noqa: E402
from eidetic import protection  # noqa: E402
from eidetic.errors import ConfigError  # noqa: E402
from workflows import protect as protect_workflow  # noqa: E402
from eidetic.diffusion import DiffusionModel  # noqa: E402
from eidetic.oracle import EmpiricalDenoiser  # noqa: E402


# ---- tiny models ----------------------------------------------------------------------
def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def caption_encoder():
    """A fixed random (4, 32) embedding per distinct caption."""
    table = {}

    def encode(captions):
        for c in captions:
            if c not in table:
                table[c] = torch.randn(4, 32, generator=torch.Generator().manual_seed(1000 + len(table)))
        return torch.stack([table[c] for c in captions])

    return encode


@pytest.fixture(scope="module")
def oracle_model():
    """Tiny VAE + the exact optimal denoiser over the latents of 8 other images.

    The empirical denoiser is what a perfectly trained diffusion model computes, so the
    SDS premise (a denoiser whose Jacobian is close to a scaled identity) is meaningful on
    it; on a randomly initialised UNet the SDS and full gradients are uncorrelated
    (measured cosine about 0 +- 0.2), as they should be.
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    vae = tiny_vae().requires_grad_(False)
    scheduler = DDPMScheduler()
    encode = caption_encoder()
    with torch.no_grad():
        data = vae.encode(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1).latent_dist.mean
        data = data * vae.config.scaling_factor
    return DiffusionModel(EmpiricalDenoiser(data, scheduler.alphas_cumprod), scheduler, encode, vae)


def clean_images(n=4, size=16, seed=3):
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return protection.from_levels(protection.to_levels(x))


def write_tiny_pipeline(path: Path) -> Path:
    """A StableDiffusionPipeline of tiny random components, saved like a real one."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok_dir = path.parent / "tok_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(), scheduler=DDPMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("model") / "pipe")


def save_rgb(path: Path, arr: np.ndarray, fmt=None):
    from PIL import Image

    Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        save_rgb(folder / f"img{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    # saturated pixels: valid-pixel clipping matters here
    sat = np.zeros((16, 16, 3), np.uint8)
    sat[:, 8:] = 255
    save_rgb(folder / "saturated.png", sat)
    # a size that is not a multiple of the autoencoder factor, stored as JPEG
    save_rgb(folder / "odd.jpg", rng.integers(0, 256, (15, 17, 3), dtype=np.uint8), fmt="JPEG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (folder / "notes.txt").write_text("not an image")
    rows = [{"file_name": "img0.png", "text": "a red cat"}, {"file_name": "odd.jpg", "text": "a dog"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# ---- the end-to-end run (shared by several tests) -------------------------------------
EPS = 0.05  # 12.75 levels: the saved perturbation must stay within floor(12.75) = 12


@pytest.fixture(scope="module")
def protect_run(pipeline_dir, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("protected")
    rc = protect.main([
        f"input={image_folder}", f"model={pipeline_dir}", f"output={out}", "objective=mist",
        f"eps={EPS}", "step_size=0.0196", "steps=3", "batch_size=2",
        "evaluate.max_images=2", "evaluate.strengths=[0.5]", "evaluate.steps=4", "evaluate.semantic_samples=2",
    ])
    return rc, out


def test_random_null_control_runs_end_to_end_and_says_so(pipeline_dir, image_folder, tmp_path):
    out = tmp_path / "random"
    assert protect.main([f"input={image_folder}", f"model={pipeline_dir}", f"output={out}", "objective=random", "eps=8/255",
                         "evaluate.max_images=1", "evaluate.strengths=[0.5]", "evaluate.steps=2", "evaluate.semantic_samples=1"]) == 0
    delta = np.abs(read_rgb(out / "img0.png") - read_rgb(image_folder / "img0.png"))
    assert delta.max() == 8 and (delta == 8).mean() > 0.9  # every pixel moved by the budget, bar the clipped ones
    s = json.loads((out / "summary.json").read_text())["protection"]
    assert s["objective"] == "random"
    assert "the null control: no PGD" in (out / "report.md").read_text()


def test_perturbation_within_budget_after_save_and_reload(protect_run, image_folder):
    rc, out = protect_run
    assert rc == 0
    budget = int(np.floor(EPS * 255))
    for name in ["img0.png", "img1.png", "img2.png", "saturated.png", "odd.jpg"]:
        clean = read_rgb(image_folder / name)
        protected = read_rgb(out / (Path(name).stem + ".png"))
        assert protected.shape == clean.shape, name
        delta = np.abs(protected - clean)
        if name == "odd.jpg":  # the JPEG decodes to the same pixels protect.py read
            assert delta.max() <= budget
        else:
            assert 0 < delta.max() <= budget, name
        assert delta.max() / 255 <= EPS
    summary = json.loads((out / "summary.json").read_text())["protection"]
    assert summary["max_linf_levels_after_save"] <= budget


def test_corrupt_image_is_reported_and_the_rest_protected(protect_run):
    rc, out = protect_run
    summary = json.loads((out / "summary.json").read_text())["protection"]
    assert [f["file"] for f in summary["images_failed"]] == ["broken.png"]
    assert summary["images_protected"] == 5
    assert not (out / "broken.png").exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png", "odd.png", "saturated.png"]
    report = (out / "report.md").read_text()
    assert "broken.png" in report and "SDEdit" in report


def test_report_and_metadata(protect_run, render):
    _, out = protect_run
    text = render(protect_workflow.console_summary(out))
    assert "protected 5 images" in text and "SDEdit similarity" in text and f"report: {out / 'report.md'}" in text
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {m["file_name"]: m["text"] for m in meta} == {"img0.png": "a red cat", "odd.png": "a dog"}
    s = json.loads((out / "summary.json").read_text())["protection"]
    assert 0 < s["visibility"]["ssim_mean"] < 1 and 20 < s["visibility"]["psnr_mean"] < 100
    row = s["sdedit"]["by_strength"]["0.5"]
    assert set(row) >= {"clean_ssim", "protected_ssim", "ssim_drop", "psnr_drop", "latent_distance_increase"}
    assert s["evaluated_images"] == 2 and "target_distance" in s
    per_image = [json.loads(line) for line in (out / "protection_per_image.jsonl").read_text().splitlines()]
    assert len(per_image) == 5 and sum("sdedit_0.5" in r for r in per_image) == 2


# ---- PGD mechanics ---------------------------------------------------------------------
def test_pgd_projection_quantisation_and_valid_pixels(oracle_model):
    x = clean_images()
    x[:, :, :4] = 1.0  # saturated rows must stay in range
    x[:, :, 4:8] = -1.0
    out = protection.protect_images(oracle_model, x, oracle_model.encode_prompt(["a"] * 4), "sds+", eps=0.05, step_size=0.7 / 255, steps=6,
                           generator=torch.Generator().manual_seed(0))
    levels = (out + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # exactly on 8-bit levels
    assert levels.min() >= 0 and levels.max() <= 255
    delta = (protection.to_levels(out) - protection.to_levels(x)).abs()
    assert delta.max() <= 12 and delta.max() >= 1


def test_random_null_perturbation_is_a_seeded_sign_of_size_eps(oracle_model):
    x = clean_images() * 0.5  # levels 64-191: +-16 stays valid
    x[:, :, :4] = 1.0  # saturated: the sign that would leave the valid range is clipped
    cond = oracle_model.encode_prompt(["a"] * 4)

    def run(seed):
        return protection.protect_images(oracle_model, x, cond, protection.RANDOM, eps=16 / 255, generator=torch.Generator().manual_seed(seed))

    out = run(0)
    delta = protection.to_levels(out) - protection.to_levels(x)
    interior = delta[:, :, 4:]  # away from the clipped rows every pixel moves by exactly +-16 levels
    assert set(interior.unique().tolist()) == {-16.0, 16.0}
    assert abs(float((interior > 0).float().mean()) - 0.5) < 0.05  # a fair sign, not a direction
    assert delta[:, :, :4].max() <= 0 and delta.abs().max() == 16
    assert torch.equal(run(0), out) and not torch.equal(run(1), out)  # seeded


def test_sds_gradient_correlates_with_full_gradient(oracle_model):
    """Same images, timesteps and noise; the SDS direction must match backprop's."""
    x = clean_images()
    cond = oracle_model.encode_prompt(["a"] * 4)
    g = torch.Generator().manual_seed(11)
    cosines = []
    for t in (100, 300, 500, 700, 900):
        timesteps = torch.full((4,), t)
        noise = torch.randn(4, 4, 8, 8, generator=g)
        full = protection.semantic_gradient(oracle_model, x, cond, timesteps, noise, "full")
        sds = protection.semantic_gradient(oracle_model, x, cond, timesteps, noise, "sds")
        cosines.append(F.cosine_similarity(full.flatten(1), sds.flatten(1)))
    cosines = torch.stack(cosines)
    assert cosines.mean() > 0.9, cosines
    assert cosines.min() > 0.5, cosines


@pytest.mark.slow
def test_sds_gradient_correlates_on_a_briefly_trained_unet():
    """A real (tiny) UNet trained to loss ~0.02 on 8 latents: SDS still tracks backprop.

    Measured: cosine 0.71-0.996 per image and t, mean ~0.93 (400 steps). Untrained, ~0.
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = DiffusionModel(tiny_unet(), DDPMScheduler(), caption_encoder(), tiny_vae().requires_grad_(False))
    x = clean_images(8, seed=3)
    cond = model.encode_prompt(["a"] * 8)
    with torch.no_grad():
        z = model.encode_images(x)
    opt = torch.optim.Adam(model.unet.parameters(), lr=2e-3)
    model.unet.train()
    for _ in range(400):
        t, noise = torch.randint(0, 1000, (8,)), torch.randn_like(z)
        loss = F.mse_loss(model.predict_noise(model.add_noise(z, noise, t), t, cond), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.unet.eval()
    assert loss.item() < 0.1
    g = torch.Generator().manual_seed(11)
    cosines = []
    for t in (100, 300, 500, 700, 900):
        timesteps, noise = torch.full((4,), t), torch.randn(4, 4, 8, 8, generator=g)
        full = protection.semantic_gradient(model, x[:4], cond[:4], timesteps, noise, "full")
        sds = protection.semantic_gradient(model, x[:4], cond[:4], timesteps, noise, "sds")
        cosines.append(F.cosine_similarity(full.flatten(1), sds.flatten(1)))
    cosines = torch.stack(cosines)
    assert cosines.mean() > 0.7 and cosines.min() > 0.3, cosines


def test_sds_does_not_build_a_unet_graph(oracle_model):
    calls = []
    unet = oracle_model.unet
    handle = unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        x = clean_images(2)
        cond = oracle_model.encode_prompt(["a"] * 2)
        t, noise = torch.full((2,), 500), torch.randn(2, 4, 8, 8)
        protection.semantic_gradient(oracle_model, x, cond, t, noise, "sds")
        protection.semantic_gradient(oracle_model, x, cond, t, noise, "full")
    finally:
        handle.remove()
    assert calls == [False, True]


@pytest.mark.parametrize("objective", protection.OBJECTIVES)
def test_objective_moves_latents_in_intended_direction(oracle_model, objective):
    x = clean_images()
    cond = oracle_model.encode_prompt(["a"] * 4)
    out = protection.protect_images(oracle_model, x, cond, objective, steps=10, step_size=4 / 255, generator=torch.Generator().manual_seed(0))

    def semantic(images):  # common random numbers: same (t, noise) draws for both
        return protection.evaluate_semantic_loss(oracle_model, images, cond, 16, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        target = oracle_model.encode_images(protection.default_target_pattern(16, 16)[None])

        def textural(images):
            return ((oracle_model.encode_images(images) - target) ** 2).flatten(1).mean(1)

        ls0, ls1 = semantic(x), semantic(out)
        lt0, lt1 = textural(x), textural(out)
    if objective in ("advdm+", "sds+"):
        assert (ls1 > 1.3 * ls0).all(), (ls0, ls1)
    if objective in ("advdm-", "sds-", "sdst"):
        assert (ls1 < 0.8 * ls0).all(), (ls0, ls1)
    if objective in ("photoguard", "mist", "sdst"):
        assert (lt1 < 0.7 * lt0).all(), (lt0, lt1)
    if objective == "mist":  # its semantic term pushes L_S up relative to the textural term alone
        pg = protection.protect_images(oracle_model, x, cond, "photoguard", steps=10, step_size=4 / 255, generator=torch.Generator().manual_seed(0))
        assert (ls1 > semantic(pg)).all()


def test_sdedit_is_seeded_and_keeps_size(oracle_model):
    x = clean_images(2, size=16)
    a = protection.sdedit(oracle_model, x, ["a", "b"], 0.5, steps=4, generator=torch.Generator().manual_seed(1))
    b = protection.sdedit(oracle_model, x, ["a", "b"], 0.5, steps=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="strength"):
        protection.sdedit(oracle_model, x, ["a", "b"], 1.5)


# ---- errors ----------------------------------------------------------------------------
def test_bad_config_errors(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="objective"):
        protect_workflow.load_config([], ["objectiv=sds-"])  # typo: names the closest key
    with pytest.raises(ConfigError, match="expects int"):
        protect_workflow.load_config([], ["steps=many"])
    base = [f"input={image_folder}", f"model={tmp_path}", f"output={tmp_path / 'out'}"]
    for extra, message in [
        (["objective=sds"], "objective must be one of"),
        (["eps=0.001"], "smaller than one 8-bit level"),
        (["eps=16"], "eps must be in"),
        (["t_range=[500,100]"], "t_range"),
        (["target=x.png"], "target is only used by"),
        ([f"output={image_folder}"], "output must differ"),
    ]:
        with pytest.raises(ConfigError, match=message):
            protect_workflow.check_config(protect_workflow.load_config([], base + extra))
    with pytest.raises(ConfigError, match="'model' is required"):
        protect_workflow.check_config(protect_workflow.load_config([], [f"input={image_folder}", "output=o"]))


def test_cli_reports_errors_with_exit_code(tmp_path, image_folder, pipeline_dir, capsys):
    assert protect.main([f"input={image_folder}", f"model={tmp_path}", f"output={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing unet/ (the UNet)" in err and "vae/ (the autoencoder)" in err
    assert protect.main([f"input={image_folder}", f"model={pipeline_dir}", f"output={tmp_path / 'o'}", "t_range=[0,5000]", "steps=1"]) == 2
    assert "training timesteps" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.jpg").write_bytes(b"nope")
    assert protect.main([f"input={empty}", f"model={pipeline_dir}", f"output={tmp_path / 'o2'}", "steps=1"]) == 2
    assert "none of the 1 images" in capsys.readouterr().err


def test_objective_and_eps_validation(oracle_model):
    x = clean_images(1)
    cond = oracle_model.encode_prompt(["a"])
    with pytest.raises(ValueError, match="unknown protection objective"):
        protection.protect_images(oracle_model, x, cond, "advdm")
    with pytest.raises(ValueError, match="t_range"):
        protection.protect_images(oracle_model, x, cond, "sds-", t_range=(0, 1000))
    with pytest.raises(ValueError, match="one caption embedding per image"):
        protection.protect_images(oracle_model, clean_images(2), cond, "sds-")


@pytest.mark.parametrize("eps, levels", [("16/255", 16), (0.0627, 16), (16 / 255, 16), ("8/255", 8), (0.06, 15), ("1/255", 1)])
def test_budget_in_whole_levels(eps, levels):
    """The README's eps=0.0627 (written for 16/255) protects at 16 levels, not floor(15.99) = 15;
    a budget between levels keeps the largest whole number inside it."""
    assert protection.eps_in_levels(eps) == levels


@pytest.mark.parametrize("eps", ["16/0", "sixteen", 0.0, 1.5, "2/255.0e-9"])
def test_budget_outside_the_range_is_refused(eps):
    with pytest.raises(ValueError, match="eps"):
        protection.eps_in_levels(eps)


def test_budget_written_as_a_fraction_on_the_command_line():
    from workflows import protect as protect_workflow

    cfg = protect_workflow.load_config([], ["eps=16/255", "step_size=1/255", "input=a", "model=b", "output=c"])
    assert cfg.eps == pytest.approx(16 / 255) and cfg.step_size == pytest.approx(1 / 255)
    with pytest.raises(ConfigError, match="eps"):
        protect_workflow.load_config([], ["eps=sixteen", "input=a", "model=b", "output=c"])


# ---- purification ----------------------------------------------------------------------
from eidetic import purification  # noqa: E402


def photo_crop(name="astronaut", size=64):
    """A crop of a built-in photograph (skimage ships it; no download), (1, 3, size, size)."""
    from eidetic.images import to_tensor
    from eidetic.photos import load_photo

    return to_tensor(load_photo(name)[100 : 100 + size, 150 : 150 + size].copy())[None]


def psnr(a, b):
    return float(protection.image_similarity(a, b)["psnr"][0])


def test_jpeg_75_costs_a_stated_amount_on_a_photo():
    x = photo_crop(size=128)
    y = purification.jpeg(x, 75)
    assert y.shape == x.shape and torch.equal(y, purification.jpeg(x, 75))  # deterministic
    assert 30 < psnr(y, x) < 40  # measured 34.7 dB on this crop
    assert psnr(purification.jpeg(x, 95), x) > psnr(y, x) > psnr(purification.jpeg(x, 10), x)


def test_gaussian_noise_has_the_stated_rms_and_is_seeded():
    x = protection.from_levels(torch.full((2, 3, 64, 64), 128.0))  # mid-grey: no clipping, so the RMS change is sigma
    for sigma in (0.02, 0.05, 0.1):
        y = purification.gaussian_noise(x, sigma, torch.Generator().manual_seed(0))
        rms = float(((y - x) / 2).pow(2).mean().sqrt())  # on the [0, 1] scale
        assert abs(rms - sigma) < 0.05 * sigma + 0.5 / 255, (sigma, rms)
    a = purification.gaussian_noise(x, 0.05, torch.Generator().manual_seed(1))
    b = purification.gaussian_noise(x, 0.05, torch.Generator().manual_seed(1))
    c = purification.gaussian_noise(x, 0.05, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(purification.gaussian_noise(x, 0.0), x)


def test_noisy_upscale_changes_but_preserves_the_image():
    x = photo_crop(size=64)
    y = purification.noisy_upscale(x, 0.02, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    assert 25 < psnr(y, x) < 45  # measured 29.5 dB on this crop
    assert torch.equal(y, purification.noisy_upscale(x, 0.02, 2, torch.Generator().manual_seed(0)))
    odd = purification.noisy_upscale(clean_images(1, size=15), 0.02, 2, torch.Generator().manual_seed(0))
    assert odd.shape == (1, 3, 15, 15)


@pytest.mark.parametrize("kind", purification.PURIFICATIONS)
def test_purifications_keep_size_range_and_8bit_levels(kind, oracle_model):
    x = clean_images(2, size=16)
    y = purification.purify(kind, x, sigma=0.05, t_star=200, steps=3, model=oracle_model, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1
    levels = (y + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    z = purification.purify(kind, x, sigma=0.05, t_star=200, steps=3, model=oracle_model, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, z)  # same seed, same output bitwise


def test_diffpure_is_identity_at_zero_and_changes_more_with_t_star(oracle_model):
    """On the optimal denoiser of a set that holds the images themselves (a model that knows them),
    DiffPure returns near the image at small t* and drifts towards other images as t* grows."""
    x = clean_images(2, size=16)
    assert torch.equal(purification.diffpure(oracle_model, x, 0), x)
    with torch.no_grad():
        own = oracle_model.encode_images(x)
        others = oracle_model.unet.data if hasattr(oracle_model.unet, "data") else None
    assert others is not None
    knows = DiffusionModel(EmpiricalDenoiser(torch.cat([own, others]), oracle_model.scheduler.alphas_cumprod), oracle_model.scheduler,
                           oracle_model.encode_prompt, oracle_model.vae)
    with torch.no_grad():  # the tiny random autoencoder does not reconstruct: compare with its round trip
        round_trip = purification.quantise(knows.decode_latents(own))
    change = []
    for t_star in (10, 900):
        ys = [purification.diffpure(knows, x, t_star, steps=5, generator=torch.Generator().manual_seed(k)) for k in range(4)]
        change.append(float(torch.stack([(y - round_trip).pow(2).mean() for y in ys]).mean()))
    assert change[0] < 1e-3 and change[1] > 10 * max(change[0], 1e-4), change
    with pytest.raises(ValueError, match="t_star"):
        purification.diffpure(oracle_model, x, 1000)


@pytest.fixture(scope="module")
def purified_run(pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("purify_in")
    rng = np.random.default_rng(1)
    for i in range(2):
        save_rgb(folder / f"p{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = tmp_path_factory.mktemp("purify_out") / "out"
    rc = protect.main([
        f"input={folder}", f"model={pipeline_dir}", f"output={out}", "objective=sds-", "steps=2",
        "evaluate.strengths=[0.5]", "evaluate.steps=2", "evaluate.semantic_samples=1",
        "purification=[{kind: jpeg}, {kind: diffpure, t_star: 200, steps: 2}]",
    ])
    return rc, out


def test_purified_run_writes_the_new_report_columns(purified_run, render):
    rc, out = purified_run
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())["protection"]
    assert set(s["purification"]) == {"jpeg", "diffpure"}
    jp = s["purification"]["jpeg"]
    assert jp["settings"] == {"kind": "jpeg", "quality": 75}
    assert 10 < jp["clean_cost"]["psnr_mean"] < 100 and jp["clean_cost"]["psnr_se"] is not None
    row = jp["sdedit"]["by_strength"]["0.5"]
    assert {"ssim_drop", "ssim_drop_se", "psnr_drop", "psnr_drop_se"} <= set(row)
    assert "ssim_drop_se" in s["sdedit"]["by_strength"]["0.5"]
    report = (out / "report.md").read_text()
    assert "## Purification" in report and "cost: PSNR clean" in report and "| 0.5 | jpeg |" in report and "| 0.5 | none |" in report
    per_image = [json.loads(line) for line in (out / "protection_per_image.jsonl").read_text().splitlines()]
    assert all("sdedit_0.5" in r["purified"]["diffpure"] for r in per_image)
    assert "after purification" in render(protect_workflow.console_summary(out))


def test_purification_config_errors():
    base = ["input=a", "model=b", "output=c"]
    for extra, message in [
        ("purification=[{kind: jpg}]", "did you mean 'jpeg'"),
        ("purification=[{kind: jpeg, qualty: 50}]", "unknown config key 'purification\\[0\\].qualty'"),
        ("purification=[{kind: jpeg, quality: 0}]", "quality must be"),
        ("purification=[{kind: gaussian, sigma: 8}]", "sigma must be in"),
        ("purification=[{kind: diffpure, t_star: -1}]", "t_star"),
        ("purification=[{kind: jpeg}, {kind: jpeg}]", "names must be unique"),
    ]:
        with pytest.raises(ConfigError, match=message):
            protect_workflow.load_config([], base + [extra])


def test_diffpure_t_star_beyond_the_model_fails_before_protecting(tmp_path, image_folder, pipeline_dir, capsys):
    out = tmp_path / "o"
    assert protect.main([f"input={image_folder}", f"model={pipeline_dir}", f"output={out}", "steps=1",
                         "purification=[{kind: diffpure, t_star: 5000}]"]) == 2
    assert "t_star must be below the model's 1000" in capsys.readouterr().err
    assert not out.exists()


# ---- Diff-Protect's choices ----------------------------------------------------------
def test_diff_protect_sdst_weighting_is_its_signed_step(oracle_model):
    """rate * J^T(eps_hat - eps) + J^T 2(z - z_target), computed by hand through the encoder."""
    x = clean_images(2)
    cond = oracle_model.encode_prompt(["a"] * 2)
    t, noise = torch.full((2,), 400), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tl = oracle_model.encode_images(protection.default_target_pattern(16, 16)[None]).expand(2, -1, -1, -1)
    grad, _ = protection.attack_gradient(oracle_model, x, cond, "sdst", t, noise, tl, sdst_target_rate=5.0)
    xr = x.clone().requires_grad_(True)
    z = oracle_model.encode_images(xr)
    with torch.no_grad():
        residual = oracle_model.predict_noise(oracle_model.add_noise(z, noise, t), t, cond) - noise
    (g_sem,) = torch.autograd.grad(z, xr, grad_outputs=residual, retain_graph=True)
    (g_tex,) = torch.autograd.grad(((z - tl) ** 2).sum(), xr)
    expected = -(5.0 * g_sem + g_tex)  # SDST(-) ascends the negative of the official step direction
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
    # the same direction as the per-element-mean form with textural_weight = 2 / rate
    mean_form, _ = protection.attack_gradient(oracle_model, x, cond, "sdst", t, noise, tl, textural_weight=0.4)
    assert torch.equal(mean_form.sign(), grad.sign()) or F.cosine_similarity(mean_form.flatten(), grad.flatten(), dim=0) > 0.9999


def test_random_start_and_posterior_sample_are_seeded_and_within_budget(oracle_model):
    x = clean_images(2)
    cond = oracle_model.encode_prompt(["a"] * 2)

    def run(seed, **kw):
        return protection.protect_images(oracle_model, x, cond, "advdm+", eps=8 / 255, steps=1, step_size=1 / 255,
                                         generator=torch.Generator().manual_seed(seed), **kw)

    plain = run(0)
    started = run(0, random_start=True)
    assert torch.equal(started, run(0, random_start=True)) and not torch.equal(started, run(1, random_start=True))
    d_plain = (protection.to_levels(plain) - protection.to_levels(x)).abs()
    d_start = (protection.to_levels(started) - protection.to_levels(x)).abs()
    assert d_plain.max() == 1 and 1 < d_start.max() <= 8  # one step moves one level; a random start fills the ball
    sampled = run(0, encoder_latent="sample")
    assert torch.equal(sampled, run(0, encoder_latent="sample")) and not torch.equal(sampled, plain)
    with pytest.raises(ValueError, match="encoder_latent"):
        run(0, encoder_latent="mode")
    assert [protection.random_start_default(o) for o in protection.OBJECTIVES] == [True, True, True, True, False, False, False]


def test_config_defaults_follow_diff_protect():
    cfg = protect_workflow.load_config([], ["input=a", "model=b", "output=c", "objective=sdst"])
    assert protect_workflow.attack_options(cfg) == {"sdst_target_rate": 5.0, "random_start": False, "encoder_latent": "sample"}
    cfg = protect_workflow.load_config([], ["input=a", "model=b", "output=c", "objective=mist", "random_start=never", "encoder_latent=mean"])
    assert protect_workflow.attack_options(cfg) == {"sdst_target_rate": None, "random_start": False, "encoder_latent": "mean"}
    assert protect_workflow.attack_options(protect_workflow.load_config([], ["input=a", "model=b", "output=c", "objective=mist"]))["random_start"]
    with pytest.raises(ConfigError, match="sdst_weighting"):
        protect_workflow.load_config([], ["input=a", "model=b", "output=c", "sdst_weighting=paper"])


# ---- bad input -------------------------------------------------------------------------
def test_mixed_sizes_and_modes_in_one_folder_are_each_protected(tmp_path, pipeline_dir):
    """Grayscale, palette, RGBA, 16-bit and odd sizes in one folder: every file is protected at
    its own size (decoded as training data is: RGB, alpha on white)."""
    from PIL import Image

    src = tmp_path / "mixed"
    src.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(src / "gray.png")
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).convert("P").save(src / "palette.png")
    Image.fromarray(rng.integers(0, 256, (20, 16, 4), dtype=np.uint8), "RGBA").save(src / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(src / "deep.png")
    out = tmp_path / "out"
    assert protect.main([f"input={src}", f"model={pipeline_dir}", f"output={out}", "steps=1", "evaluate.enabled=false"]) == 0
    for name, size in {"gray.png": (16, 16), "palette.png": (24, 16), "alpha.png": (16, 20), "deep.png": (16, 16)}.items():
        with Image.open(out / name) as im:
            assert im.size == size and im.mode == "RGB", name


def test_wrong_kind_of_model_directory_is_a_clear_error(tmp_path, image_folder, pipeline_dir, capsys):
    out = tmp_path / "o"
    for model, message in [
        (pipeline_dir / "vae", "is not a diffusers text-to-image directory: missing unet/"),
        (tmp_path / "nowhere", "model directory not found"),
    ]:
        assert protect.main([f"input={image_folder}", f"model={model}", f"output={out}", "steps=1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("eps, message", [("0", "eps must be in (0, 1]"), ("-0.1", "eps must be in (0, 1]"),
                                          ("16", "write eps=16/255"), ("300", "eps must be in (0, 1]")])
def test_budget_outside_zero_one_is_a_clear_cli_error(tmp_path, image_folder, pipeline_dir, capsys, eps, message):
    out = tmp_path / "o"
    assert protect.main([f"input={image_folder}", f"model={pipeline_dir}", f"output={out}", f"eps={eps}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_output_inside_input_is_refused_and_nothing_is_written(tmp_path, pipeline_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    save_rgb(src / "a.png", np.zeros((16, 16, 3), np.uint8))
    (src / "previous").mkdir()
    (src / "previous" / "keep.txt").write_text("already written")
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    assert protect.main([f"input={src}", f"model={pipeline_dir}", f"output={src / 'previous'}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "must not be inside input" in err
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before
    assert (src / "previous" / "keep.txt").read_text() == "already written"


def test_every_unreadable_file_is_named_at_once(tmp_path, pipeline_dir, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    for name in ("one.png", "two.jpg", "three.webp"):
        (src / name).write_bytes(b"not an image")
    assert protect.main([f"input={src}", f"model={pipeline_dir}", f"output={tmp_path / 'o'}", "steps=1"]) == 2
    err = capsys.readouterr().err  # each file is named as it is skipped, then one error names them all
    final = err[err.index("error: "):]
    assert "none of the 3 images" in final and all(n in final for n in ("one.png", "two.jpg", "three.webp"))


def test_protection_grid_benchmark_tabulates_every_cell_with_intervals_and_resumes(tmp_path, pipeline_dir, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import protection_grid

    out = tmp_path / "grid"
    argv = ["--model", str(pipeline_dir), "--out", str(out), "--images", "3", "--objectives", "sds-", "--eps", "8",
            "--control", "photoguard:32", "--pgd-steps", "2", "--strengths", "0.5"]
    result = protection_grid.main(argv)
    grid = json.loads((out / "grid.json").read_text())
    cells = {(r["objective"], r["eps_levels"], r["purification"]) for r in grid["rows"]}
    assert cells == {(o, e, p) for o, e in (("sds-", 8), ("photoguard", 32)) for p in ("none", "jpeg", "gaussian", "noisy_upscale", "diffpure")}
    for r in grid["rows"]:
        lo, hi = r["psnr_drop_ci"]
        assert lo <= r["psnr_drop"] <= hi
    assert result["positive_control"]["cell"] == "photoguard:32" and set(result["psnr_drop_at_16"]) == set()
    table = (out / "grid.md").read_text()
    assert "| photoguard | 32/255 |" in table and "drop, diffpure" in table and "over 3 images" in table
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "protection_grid"
    # a second run keeps every finished cell
    stamp = (out / "pgd-seed0" / "sds--eps8" / "summary.json").stat().st_mtime_ns
    protection_grid.main(argv)
    assert (out / "pgd-seed0" / "sds--eps8" / "summary.json").stat().st_mtime_ns == stamp
    # tabulating while cells are missing: the finished ones, the others named, nothing run
    result = protection_grid.main([*argv, "--objectives", "sds-", "sdst", "--tabulate-only"])
    assert result["unfinished"] == ["sdst:8 (SDEdit)"] and not (out / "pgd-seed0" / "sdst-eps8").exists()
    assert json.loads((out / "grid.json").read_text())["rows"] == grid["rows"]


def test_protection_grid_pools_pgd_seeds_per_image_before_the_interval():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import protection_grid

    def image(clean_psnr, protected_psnr, purified_protected_psnr):
        edit = lambda c, p: {"sdedit_0.4": {"clean_psnr": c, "protected_psnr": p, "clean_ssim": 0.5, "protected_ssim": 0.5}}
        return {"visibility_psnr": 30.0, **edit(clean_psnr, protected_psnr), "purified": {"jpeg": edit(clean_psnr, purified_protected_psnr)}}

    unevaluated = {"visibility_psnr": 30.0}  # an image outside evaluate.max_images carries no SDEdit result
    per_image = {0: [image(20, 20, 20), image(20, 18, 20), image(20, 18, 20), unevaluated],
                 1: [image(20, 18, 20), image(20, 18, 20), image(20, 16, 21), unevaluated]}
    rows = protection_grid.sdedit_rows(per_image, "sds-", 16)
    by = {(r["seeds"], r["purification"]): r for r in rows}
    assert set(by) == {(s, p) for s in ("0", "1", "pooled") for p in ("none", "jpeg")}
    assert by[("0", "none")]["psnr_drop"] == pytest.approx(4 / 3) and by[("1", "none")]["psnr_drop"] == pytest.approx(8 / 3)
    pooled = by[("pooled", "none")]  # per-image drops over seeds: 1, 2, 3 (not six values: images are the unit)
    assert pooled["psnr_drop"] == pytest.approx(2.0) and pooled["images"] == 3
    half = 4.302652729911275 * 1 / 3 ** 0.5  # t(0.975, 2) x s.e. of (1, 2, 3)
    assert pooled["psnr_drop_ci"] == pytest.approx([2.0 - half, 2.0 + half])
    assert by[("pooled", "jpeg")]["psnr_drop"] == pytest.approx(-1 / 6) and by[("0", "none")]["ssim_drop"] == 0.0
    table = protection_grid.table(rows, 0.4, 3, {})
    assert "pooled over PGD seeds 0, 1" in table and "| sds- | 16/255 | 30.0 | +2.00 [" in table and "+1.33 / +2.67 |" in table


def test_every_table_cell_is_bold_exactly_when_its_interval_excludes_zero_on_either_side():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import protection_grid

    assert protection_grid.interval_text(0.5, (0.1, 0.9)) == "**+0.50** [+0.10, +0.90]"
    assert protection_grid.interval_text(-0.24, (-0.47, -0.01)) == "**-0.24** [-0.47, -0.01]"  # easier to mimic: a finding too
    assert protection_grid.interval_text(0.2, (-0.1, 0.5)) == "+0.20 [-0.10, +0.50]"
    assert protection_grid.interval_text(0.0123, (0.001, 0.02), 3) == "**+0.012** [+0.001, +0.020]"
    assert protection_grid.interval_text(1.5, None) == "+1.50"
    mean, ci = protection_grid.mean_interval([1.5])  # one image: no interval, shown without brackets
    assert (mean, ci) == (1.5, None) and protection_grid.interval_text(mean, ci) == "+1.50"
    assert protection_grid.mean_interval([1.0, 3.0])[1][0] < 1.0


def test_encoder_versus_denoiser_pairs_each_images_seed_pooled_drops():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import protection_grid

    def rows(*protected):
        return [{"sdedit_0.4": {"clean_psnr": 20.0, "protected_psnr": p}} for p in protected] + [{"visibility_psnr": 30.0}]

    per_cell = {("photoguard", 16): {0: rows(18, 17, 16), 1: rows(18, 17, 14)},  # drops per image over seeds: 2, 3, 5
                ("sds-", 16): {0: rows(20, 19, 19), 1: rows(20, 19, 19)},        # 0, 1, 1
                ("mist", 16): {0: rows(10, 10, 10), 1: rows(10, 10, 10)},        # neither encoder- nor denoiser-only
                ("photoguard", 64): {0: rows(10, 10, 10), 1: rows(10, 10, 10)}}  # no denoiser cell at 64: no pair
    out = protection_grid.encoder_vs_denoiser_rows(per_cell, 0.4)
    assert [(r["encoder"], r["denoiser"], r["eps_levels"]) for r in out] == [("photoguard", "sds-", 16)]
    r = out[0]  # paired differences 2, 2, 4
    assert r["psnr_drop_difference"] == pytest.approx(8 / 3) and r["images"] == 3
    half = 4.302652729911275 * (4 / 3) ** 0.5 / 3 ** 0.5  # t(0.975, 2) x s.e. of (2, 2, 4)
    assert r["psnr_drop_difference_ci"] == pytest.approx([8 / 3 - half, 8 / 3 + half])
    assert "| 16/255 | photoguard | sds- | +2.67 [-0.20, +5.54] |" in protection_grid.encoder_table(out)  # interval spans 0: not bold


def test_mimicry_drop_minus_the_null_is_paired_per_image_and_averaged_over_seeds():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import protection_grid

    def rows(*protected):  # clean-tuned 0.5 everywhere; files listed out of order on purpose
        return [{"file": f"{name}.png", "mimicry": {"clean_tuned": {"psnr_best": 20.0, "ssim_best": 0.5},
                                                     "protected_tuned": {"psnr_best": 20.0 - 10 * p, "ssim_best": 0.5 - p}}}
                for name, p in zip("cab", protected)]

    per_cell = {("sds-", 16): {0: rows(0.3, 0.1, 0.2), 1: rows(0.3, 0.1, 0.4)},
                ("random", 16): {0: rows(0.0, 0.0, 0.0), 1: rows(0.1, 0.1, 0.1)},
                ("sds-", 8): {0: rows(0.1, 0.1, 0.1)}}  # no null at 8/255: no row
    out = protection_grid.null_difference_rows(per_cell)
    assert [(r["objective"], r["eps_levels"]) for r in out] == [("sds-", 16)]
    r = out[0]  # per image (a, b, c): seed 0 (0.1, 0.2, 0.3), seed 1 (0.0, 0.3, 0.2) -> mean 0.05, 0.25, 0.25
    assert r["ssim_best"] == pytest.approx(0.55 / 3) and r["psnr_best"] == pytest.approx(5.5 / 3) and r["images"] == 3
    se = np.std([0.05, 0.25, 0.25], ddof=1) / 3 ** 0.5
    assert r["ssim_best_ci"] == pytest.approx([0.55 / 3 - 4.302652729911275 * se, 0.55 / 3 + 4.302652729911275 * se])
    assert "| sds- | 16/255 | +1.83 [" in protection_grid.null_table(out)

    # a larger budget minus the next smaller one, paired per image over the seeds both cells ran
    per_cell[("sds-", 32)] = {0: rows(0.4, 0.1, 0.2), 2: rows(0.9, 0.9, 0.9)}
    out = protection_grid.budget_effect_rows(per_cell)
    assert [(r["objective"], r["from_levels"], r["to_levels"], r["seeds"]) for r in out] == [("sds-", 8, 16, [0]), ("sds-", 16, 32, [0])]
    # per image (a, b, c), seed 0: 8/255 (0.1, 0.1, 0.1), 16/255 (0.1, 0.2, 0.3), 32/255 (0.1, 0.2, 0.4)
    assert [r["ssim_best"] for r in out] == pytest.approx([0.1, 0.1 / 3])
    assert "| sds- | 32/255 minus 16/255 | +0.33 [" in protection_grid.budget_effect_table(out)
    assert not protection_grid.budget_effect_rows({("sds-", 16): per_cell[("sds-", 16)]})  # one budget: nothing to compare


def test_drops_figure_fills_only_the_points_whose_interval_excludes_zero():
    from matplotlib.colors import to_rgba

    from eidetic.figures import figure_png, protection_drops

    rows = [
        {"objective": "sds-", "eps_levels": 16, "ssim_best": 0.08, "ssim_best_ci": [0.02, 0.14]},  # resolved
        {"objective": "random", "eps_levels": 16, "ssim_best": 0.01, "ssim_best_ci": [-0.02, 0.04]},  # not
        {"objective": "photoguard", "eps_levels": 64, "ssim_best": -0.05, "ssim_best_ci": [-0.09, -0.01]},  # resolved, negative
        {"objective": "mist", "eps_levels": 8, "ssim_best": 0.02, "ssim_best_ci": None},  # no interval: drawn hollow
    ]
    fig = protection_drops(rows, (("ssim_best", "SSIM-best drop"),), "title")
    ax = fig.axes[0]
    points = {round(line.get_ydata()[0], 3): to_rgba(line.get_markerfacecolor()) for line in ax.lines if line.get_marker() == "o"}
    white = to_rgba("white")
    assert points[0.08] != white and points[-0.05] != white
    assert points[0.01] == white and points[0.02] == white
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ε = 8/255", "ε = 16/255", "ε = 64/255"]
    assert figure_png(fig)[:4] == b"\x89PNG"
    assert protection_drops([{"objective": "sds-", "eps_levels": 8, "ssim_best": None}], (("ssim_best", "SSIM"),)) is None
