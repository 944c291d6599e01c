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
