import functools

import torch

from eidetic.borders import add_border, border_key, border_mask, key_to_pixel, make_keys, strip_border
from eidetic.diffusion import DiffusionModel, generate
from eidetic.oracle import EmpiricalDenoiser


def test_border_round_trip_in_key_scale():
    keys = make_keys(5, seed=3)
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    canvas = add_border(images, keys.float(), 2)
    assert canvas.shape == (5, 3, 12, 12)
    torch.testing.assert_close(strip_border(canvas, 2), images)
    torch.testing.assert_close(border_key(canvas, 2), keys.float())
    # the border pixels hold 2k - 1, not k: a [0,1] reading compared with a [-1,1] key would fail here
    assert torch.allclose(canvas[:, 0, 0, 0], key_to_pixel(keys.float()))
    assert not torch.allclose(canvas[:, 0, 0, 0], keys.float())
    assert border_mask(12, 12, 2).sum() == 12 * 12 - 8 * 8


def test_keys_are_reproducible_and_validated():
    assert torch.equal(make_keys(4, 1), make_keys(4, 1))
    assert not torch.equal(make_keys(4, 1), make_keys(4, 2))
    import pytest

    with pytest.raises(ValueError, match="keys must lie in"):
        add_border(torch.zeros(1, 3, 4, 4), torch.tensor([-0.5]), 1)


def _oracle_model(data, embeddings=None):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    table = {}

    def encode(captions):
        return torch.stack([table.setdefault(c, torch.randn(1, 4, generator=torch.Generator().manual_seed(len(table)))) for c in captions])

    return DiffusionModel(unet=EmpiricalDenoiser(data, scheduler.alphas_cumprod, embeddings), scheduler=scheduler, encode_prompt=encode), encode


def test_oracle_sampling_returns_a_training_image():
    data = torch.rand(6, 3, 8, 8) * 2 - 1
    model, _ = _oracle_model(data)
    images = generate(model, ["a", "b", "c"], (8, 8), steps=50, guidance=1.0, generator=torch.Generator().manual_seed(0))
    dist = torch.cdist(images.flatten(1), data.flatten(1)).min(dim=1).values
    assert (dist < 0.05).all(), dist


def test_oracle_conditioning_selects_the_caption_s_image():
    data = torch.rand(4, 3, 8, 8) * 2 - 1
    model, encode = _oracle_model(data)
    emb = encode(["one", "two", "many", "many"])
    model.unet = EmpiricalDenoiser(data, model.alphas_cumprod, emb)
    images = generate(model, ["one", "two"], (8, 8), steps=30, guidance=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(images, data[:2], atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------
# outpainting a perfect memorizer whose caption does not identify the image
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _tiles() -> torch.Tensor:
    from eidetic.tiles import photo_tiles

    _, arrays = photo_tiles(16, 2)
    pick = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(0))[:16]
    return torch.from_numpy(arrays[pick.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1


def _tile_oracle(train_captions):
    """The empirical optimal denoiser on 16 distinct 16 px photograph tiles with 4 px key borders."""
    import zlib

    from diffusers import DDPMScheduler

    def embed(captions):
        return torch.stack([torch.zeros(4, 32) if c == "" else torch.randn(4, 32, generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                            for c in captions])

    keys = make_keys(16, 1)
    canvases = add_border(_tiles(), keys, 4)
    scheduler = DDPMScheduler()
    return DiffusionModel(EmpiricalDenoiser(canvases, scheduler.alphas_cumprod, embed(train_captions)), scheduler, embed), canvases, keys


def _keys_recovered(settings, train_captions, query_captions, seeds, **override) -> list[int]:
    from eidetic.solidmark import eidetic_scores, outpaint_border

    model, canvases, keys = _tile_oracle(train_captions)
    options = {**settings.outpaint_options(latent=False), **override}
    return [int((eidetic_scores(outpaint_border(model, canvases, query_captions, 4, **{**options, "seed": s}).border_key, keys) < 0.05).sum())
            for s in seeds]


SHARED = [f"a photo of object {i // 4}" for i in range(16)]  # four images per caption (DreamBooth-like)
OWN = [f"tile {i}" for i in range(16)]


def test_default_outpainting_recovers_every_key_under_a_shared_caption():
    """Replacement alone (the paper's) lets the frame commit to another image's key under a
    caption shared by four images (13 of 16 at these seeds); the default guided conditioning
    gives back all 16, at the monitor's step count and at the paper's 250."""
    from eidetic.schema.train import SolidMarkSettings

    default = SolidMarkSettings()
    assert default.conditioning == "guided"
    assert _keys_recovered(default, SHARED, SHARED, seeds=(0, 1)) == [16, 16]
    assert _keys_recovered(default, SHARED, SHARED, seeds=(0,), steps=250) == [16]
    paper = SolidMarkSettings(conditioning="replace")
    assert paper.outpaint_options(latent=False)["reconstruction_guidance"] == 0.0
    assert min(_keys_recovered(paper, SHARED, SHARED, seeds=(0, 1))) < 16  # the gap the default closes


def test_default_outpainting_recovers_more_keys_unconditionally():
    """With the empty prompt the whole training set is a candidate. Measured on 4 seeds at 25
    steps: replacement 9/13/13/10 of 16, guided 15/13/13/13 (not yet all: the frame still
    settles on a wrong image early in some samples; benchmarks/oracle_outpainting.py)."""
    from eidetic.schema.train import SolidMarkSettings

    seeds = (0, 1, 2, 3)
    guided = _keys_recovered(SolidMarkSettings(), OWN, [""] * 16, seeds)
    paper = _keys_recovered(SolidMarkSettings(conditioning="replace"), OWN, [""] * 16, seeds)
    assert sum(guided) >= 52, guided  # >= 13 of 16 on average
    assert sum(guided) >= sum(paper) + 6, (guided, paper)


def test_guided_outpainting_counts_one_unet_call_per_step_and_leaves_the_interior():
    from eidetic.schema.train import SolidMarkSettings
    from eidetic.solidmark import outpaint_border

    model, canvases, _ = _tile_oracle(OWN)
    out = outpaint_border(model, canvases[:4], OWN[:4], 4, **{**SolidMarkSettings().outpaint_options(latent=False), "steps": 10})
    assert out.unet_evals == 4 * 10
    torch.testing.assert_close(out.canvases[:, 0, :, 4:-4, 4:-4], canvases[:4, :, 4:-4, 4:-4])
    assert out.canvases.min() >= -1 and out.canvases.max() <= 1
