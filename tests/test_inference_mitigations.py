"""Inference-time mitigations do exactly what the papers' code does, and nothing else: caption
changes at query time, embedding noise of the stated scale, delayed guidance, Wen et al.'s
prompt-embedding adjustment; and they reach the generating code paths."""

import random

import pytest
import torch

from eidetic import inference_mitigations as im
from eidetic.diffusion import DiffusionModel, generate
from eidetic.solidmark import outpaint_border

CAPTION = "a photo of a tabby cat"
CAPTIONS = [CAPTION, "a dog on a red sofa", "two birds in a tree"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny pixel-space text-to-image model (random weights) with its own tokenizer."""
    from diffusers import DDPMScheduler
    from omegaconf import OmegaConf

    from eidetic.schema.train import TextSettings, UNetSettings
    from lightning_modules.models import build_text_stack, build_unet

    torch.manual_seed(0)
    text_cfg = OmegaConf.structured(TextSettings(hidden_size=16, layers=1, heads=2, max_length=16, vocab_size=600))
    text = build_text_stack(CAPTIONS, text_cfg, tmp_path_factory.mktemp("tok")).eval().requires_grad_(False)
    unet = build_unet(OmegaConf.structured(UNetSettings(block_out_channels=[16, 32], norm_num_groups=8)), 8, 3, 16).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return DiffusionModel(unet=unet, scheduler=scheduler, encode_prompt=torch.no_grad()(text)), text


# ---- caption changes: as specified, and nothing else ------------------------------------------
def _without(words: list[str], inserted: list[str]) -> list[str]:
    rest = list(words)
    for w in inserted:
        rest.remove(w)
    return rest


def test_random_number_addition_inserts_count_numbers_below_100000_and_nothing_else():
    for seed in range(30):
        out = im.random_number_addition(CAPTION, random.Random(seed), count=2)
        words = out.split(" ")
        numbers = [w for w in words if w.isdigit()]
        assert len(words) == len(CAPTION.split(" ")) + 2 and len(numbers) == 2
        assert all(0 <= int(n) < 100_000 for n in numbers)
        assert _without(words, numbers) == CAPTION.split(" ")  # the caption's words, in order
    assert im.random_number_addition(CAPTION, random.Random(3)) == im.random_number_addition(CAPTION, random.Random(3))


def test_random_token_addition_draws_ids_from_the_tokenizer_vocabulary(tiny):
    _, text = tiny
    tok = text.tokenizer
    pool = im.token_id_pool(tok)
    assert set(pool).isdisjoint(tok.all_special_ids) and len(pool) == len(tok) - len(set(tok.all_special_ids))
    seen = set()
    for seed in range(200):
        out, ids = im.random_token_addition(CAPTION, random.Random(seed), tok, count=2)
        assert len(ids) == 2 and all(0 <= i < len(tok) and i not in tok.all_special_ids for i in ids)
        seen.update(ids)
        # the caption is the original with the two decoded tokens inserted, one at a time
        again = random.Random(seed)
        rebuilt = CAPTION
        for i in ids:
            again.randrange(len(pool))
            rebuilt = im.insert_word(rebuilt, tok.decode([i]), again)
        assert out == rebuilt
    caption_ids = {i for c in CAPTIONS for i in tok(c).input_ids}
    assert len(seen - caption_ids) > 100  # ids from the whole vocabulary, not the captions' words


def test_word_repetition_repeats_words_of_the_original_caption():
    for seed in range(30):
        words = im.word_repetition(CAPTION, random.Random(seed), count=3).split(" ")
        assert len(words) == len(CAPTION.split(" ")) + 3 and set(words) == set(CAPTION.split(" "))


def test_the_wrapped_model_changes_query_captions_deterministically_but_never_the_empty_prompt(tiny):
    model, text = tiny
    for method in im.CAPTION_CHANGES:
        m = im.mitigate(model, im.InferenceMitigation(captions=(method,), seed=5))
        changed = m.change(CAPTION)
        assert changed != CAPTION and m.change(CAPTION) == changed  # seeded by (seed, caption): the same every query
        assert m.change("") == ""
        batch = m.encode_prompt(["", CAPTION, CAPTIONS[1]])
        assert torch.equal(batch[0], model.encode_prompt([""])[0])
        assert torch.equal(batch[1], model.encode_prompt([changed])[0])
        alone = m.encode_prompt([CAPTION])
        assert torch.equal(alone[0], batch[1])  # independent of the batch it is in
    other = im.mitigate(model, im.InferenceMitigation(captions=("random_number",), seed=6)).change(CAPTION)
    assert other != im.mitigate(model, im.InferenceMitigation(captions=("random_number",), seed=5)).change(CAPTION)


def test_embedding_noise_has_the_stated_std_and_spares_the_unconditional_embedding(tiny):
    model, _ = tiny
    captions = [f"{CAPTION} {i}" for i in range(64)]
    clean = model.encode_prompt(captions)
    for sigma in (0.05, 0.5):
        m = im.mitigate(model, im.InferenceMitigation(text_noise_sigma=sigma))
        noisy = m.encode_prompt(captions + [""])
        diff = noisy[:-1] - clean
        assert abs(float(diff.std()) - sigma) < 0.03 * sigma and abs(float(diff.mean())) < 0.03 * sigma
        assert torch.equal(noisy[-1], model.encode_prompt([""])[0])
        assert torch.equal(m.encode_prompt(captions[:3]), noisy[:3])  # a function of the caption, not the batch


# ---- delayed guidance -------------------------------------------------------------------------
def _sample(model, guidance=3.0, sampler="ddpm", hook=None):
    g = torch.Generator().manual_seed(0)
    return generate(model, CAPTIONS, (8, 8), steps=8, guidance=guidance, generator=g, sampler=sampler, step_hook=hook)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_delayed_guidance_with_transition_1000_is_plain_sampling_bit_for_bit(tiny, sampler):
    model, _ = tiny
    delayed = im.mitigate(model, im.InferenceMitigation(delayed_guidance=True, transition=1000))
    assert torch.equal(_sample(delayed, sampler=sampler), _sample(model, sampler=sampler))


@pytest.mark.parametrize("before", [0.0, 1.0, -2.0])
def test_delayed_guidance_uses_the_before_scale_until_the_transition(tiny, before):
    model, _ = tiny
    never = im.mitigate(model, im.InferenceMitigation(delayed_guidance=True, transition=-1, guidance_before=before))
    assert torch.equal(_sample(never), _sample(model, guidance=before))  # the other extreme: the before scale throughout

    def recorder(store):
        def hook(x, t_next, i):
            store.append((t_next, x.clone()))
            return x
        return hook

    mid, plain_before, plain = [], [], []
    _sample(im.mitigate(model, im.InferenceMitigation(delayed_guidance=True, transition=500, guidance_before=before)), hook=recorder(mid))
    _sample(model, guidance=before, hook=recorder(plain_before))
    _sample(model, hook=recorder(plain))
    # steps taken from t > 500 match sampling at the before scale; after the transition they differ
    from_t = [999] + [t for t, _ in mid[:-1]]
    early = [k for k, t in enumerate(from_t) if t > 500]
    assert early and len(early) < len(mid)
    for k in early:
        assert torch.equal(mid[k][1], plain_before[k][1])
    assert not torch.equal(mid[-1][1], plain_before[-1][1])
    if before != 3.0:
        assert not torch.equal(mid[early[-1]][1], plain[early[-1]][1])


def test_guidance_at_follows_the_static_transition_point():
    assert im.guidance_at(999, 7.5, 500, 0.0) == 0.0 and im.guidance_at(501, 7.5, 500, -2.0) == -2.0
    assert im.guidance_at(500, 7.5, 500, 0.0) == 7.5 and im.guidance_at(0, 7.5, 500, 0.0) == 7.5


# ---- Wen et al.'s prompt-embedding adjustment -------------------------------------------------
def _predict(model):
    def predict(x, t, hidden):
        return model.unet(x, t, encoder_hidden_states=hidden).sample
    return predict


def test_wen_adjustment_lowers_the_conditional_norm_and_leaves_the_unconditional_embedding(tiny):
    model, _ = tiny
    cond = model.encode_prompt(CAPTIONS)
    uncond = model.encode_prompt([""])
    uncond_before = uncond.clone()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 999)
    out = im.wen_adjust_embeddings(_predict(model), x, t, cond, uncond, steps=10, lr=0.05, target_loss=None)
    assert torch.equal(uncond, uncond_before)
    assert (out.norms_after < out.norms_before).all() and out.iterations.tolist() == [10, 10, 10]
    # the measured norm of the adjusted embedding is the one reported, and lower than the original's
    with torch.no_grad():
        eps_u = model.unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        norm = lambda h: (model.unet(x, t, encoder_hidden_states=h).sample - eps_u).flatten(1).norm(dim=1)
        assert torch.allclose(norm(out.embeddings), out.norms_after, atol=1e-5)
        assert (norm(out.embeddings) < norm(cond)).all()
    # the start token's gradient is zeroed: it moves only by AdamW's decoupled weight decay, as in their code
    assert torch.allclose(out.embeddings[:, 0], cond[:, 0] * (1 - 0.05 * 0.01) ** 10, atol=1e-6)
    # a caption already under the target is left exactly as it is (their early stop)
    target = float(out.norms_before[1]) + 1e-6
    stop = im.wen_adjust_embeddings(_predict(model), x, t, cond, uncond, steps=10, lr=0.05, target_loss=target)
    below = out.norms_before <= target
    assert below.any()
    assert torch.equal(stop.embeddings[below], cond[below]) and (stop.iterations[below] == 0).all()


def test_wen_adjustment_in_sampling_adjusts_once_at_the_first_step_and_spares_uncond_rows(tiny):
    model, _ = tiny
    m = im.mitigate(model, im.InferenceMitigation(wen=True, wen_steps=3, wen_target_loss=None))
    before = model.unet_evals
    images = _sample(m)
    assert len(m.wen_log) == 1 and m.wen_log[0].embeddings.shape[0] == 3  # once per conditional batch
    assert (m.wen_log[0].norms_after < m.wen_log[0].norms_before).all()
    assert model.unet_evals - before > 8 * 3  # the adjustment's UNet calls are counted
    assert not torch.equal(images, _sample(model))
    # a call whose conditioning holds the unconditional embedding rows (the norm probes) keeps them
    cond = torch.cat([model.encode_prompt(CAPTIONS[:1]), model.encode_prompt([""])])
    m2 = im.mitigate(model, im.InferenceMitigation(wen=True, wen_steps=2, wen_target_loss=None))
    m2.predict_noise(torch.randn(2, 3, 8, 8), 999, cond)
    assert m2.wen_log[0].embeddings.shape[0] == 1


# ---- the generating paths ---------------------------------------------------------------------
def test_outpainting_queries_the_mitigated_captions(tiny):
    model, _ = tiny
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, captions):
            seen.extend(captions)
            return self.inner(captions)

    spy = DiffusionModel(unet=model.unet, scheduler=model.scheduler, encode_prompt=Spy(model.encode_prompt))
    m = im.MitigatedDiffusionModel(spy, im.InferenceMitigation(captions=("random_number",)), tokenizer=tiny[1].tokenizer)
    canvases = torch.zeros(2, 3, 8, 8)
    outpaint_border(m, canvases, CAPTIONS[:2], 1, steps=2, guidance=3.0, seed=0)
    assert "" in seen and all(m.change(c) in seen for c in CAPTIONS[:2]) and not any(c in seen for c in CAPTIONS[:2])


def test_settings_validate_and_convert():
    from eidetic.config import load
    from eidetic.errors import ConfigError
    from eidetic.schema.train import TrainConfig

    cfg = load(TrainConfig, [], ["inference_mitigation.captions=[random_token]", "inference_mitigation.delayed_guidance.enabled=true",
                                 "inference_mitigation.wen.target_loss=null"])
    m = im.InferenceMitigation.from_settings(cfg.inference_mitigation)
    assert m.captions == ("random_token",) and m.delayed_guidance and m.transition == 500 and m.wen_target_loss is None and m.active
    assert not im.InferenceMitigation.from_settings(load(TrainConfig, [], []).inference_mitigation).active
    for bad, message in (("inference_mitigation.captions=[random_word]", "did you mean"), ("inference_mitigation.count=0", "count"),
                         ("inference_mitigation.text_noise_sigma=-1", "text_noise_sigma"), ("inference_mitigation.wen.lr=0", "lr"),
                         ("inference_mitigation.delayed_guidance.transition=-2", "transition"),
                         ("inference_mitigation.wen.stepz=3", "did you mean")):
        with pytest.raises(ConfigError, match=message):
            load(TrainConfig, [], [bad])


def test_delayed_guidance_with_per_item_timesteps_splits_at_the_transition(tiny):
    model, _ = tiny
    m = im.mitigate(model, im.InferenceMitigation(delayed_guidance=True, transition=500, guidance_before=0.0))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = model.encode_prompt(CAPTIONS), model.encode_prompt([""])
    out = m.predict_noise(x, torch.tensor([900, 300, 700]), cond, uncond, 3.0)
    for k, (t, g) in enumerate(((900, 0.0), (300, 3.0), (700, 0.0))):
        one = model.predict_noise(x[k : k + 1], t, cond[k : k + 1], uncond, g)
        assert torch.allclose(out[k], one[0], atol=1e-5)
