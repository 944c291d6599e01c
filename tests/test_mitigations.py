"""Each mitigation does what it says: captions changed as specified, noise of the right scale,
duplicates removed, high-norm samples skipped; and they work inside a tiny run."""

import json
import random

import pytest
import torch

from eidetic import mitigations

CAPTION = "a photo of a tabby cat"
VOCAB = ["zebra", "violin", "orange", "kettle"]


def test_random_number_addition_inserts_one_number():
    rng = random.Random(0)
    out = mitigations.random_number_addition(CAPTION, rng)
    words, base = out.split(), CAPTION.split()
    assert len(words) == len(base) + 1
    numbers = [w for w in words if w.isdigit()]
    assert len(numbers) == 1
    words.remove(numbers[0])
    assert words == base
    assert out == mitigations.random_number_addition(CAPTION, random.Random(0))  # seeded


def test_random_word_addition_inserts_a_vocabulary_word():
    out = mitigations.random_word_addition(CAPTION, random.Random(1), VOCAB).split()
    extra = [w for w in out if w in VOCAB]
    assert len(out) == len(CAPTION.split()) + 1 and len(extra) == 1
    out.remove(extra[0])
    assert out == CAPTION.split()


def test_training_random_word_draws_tokenizer_ids_not_caption_words(tmp_path):
    from lightning_modules.models import build_tokenizer

    tok = build_tokenizer([CAPTION, "a dog on a red sofa"], 600, 16, tmp_path / "tok")
    special = set(tok.all_special_ids)
    decoded = {tok.decode([i]) for i in range(len(tok)) if i not in special}
    new, changed = mitigations.perturb_captions([CAPTION] * 200, ["random_word"], 1.0, random.Random(0), tokenizer=tok)
    assert all(changed)
    inserted = set()
    for caption in new:
        words = caption.split(" ")
        for w in CAPTION.split():  # exactly one token's text was inserted, the caption's words kept in order
            words.remove(w)
        inserted.add(" ".join(words))
    assert inserted <= decoded and len(inserted) > 50  # many distinct vocabulary ids, not the captions' few words
    with pytest.raises(ValueError, match="tokenizer"):
        mitigations.perturb_captions([CAPTION], ["random_word"], 1.0, random.Random(0), VOCAB)


def test_repeat_word_repeats_a_caption_word():
    for seed in range(20):
        out = mitigations.repeat_word(CAPTION, random.Random(seed)).split()
        assert len(out) == len(CAPTION.split()) + 1
        assert set(out) == set(CAPTION.split())  # no new words, one repeated
    assert mitigations.repeat_word("", random.Random(0)) == ""


def test_randomize_replaces_the_caption_with_vocabulary_words_of_same_length():
    out = mitigations.randomize_caption(CAPTION, random.Random(2), VOCAB).split()
    assert len(out) == len(CAPTION.split()) and set(out) <= set(VOCAB)


def test_perturb_captions_probability_and_composition():
    captions = [f"{CAPTION} {i}" for i in range(2000)]
    new, changed = mitigations.perturb_captions(captions, ["random_number"], 0.3, random.Random(0))
    rate = sum(changed) / len(captions)
    assert 0.26 < rate < 0.34
    assert all((a != b) == c for a, b, c in zip(captions, new, changed))
    none, changed0 = mitigations.perturb_captions(captions[:50], ["repeat_word", "caption_word"], 0.0, random.Random(0), VOCAB)
    assert none == captions[:50] and not any(changed0)
    both, _ = mitigations.perturb_captions([CAPTION], ["repeat_word", "caption_word"], 1.0, random.Random(0), VOCAB)
    assert len(both[0].split()) == len(CAPTION.split()) + 2
    dropped, _ = mitigations.perturb_captions([CAPTION] * 3, ["dropout"], 1.0, random.Random(0))
    assert dropped == ["", "", ""]
    with pytest.raises(ValueError, match="unknown caption mitigation"):
        mitigations.perturb_captions([CAPTION], ["shuffle"], 0.5, random.Random(0))


def test_embedding_noise_has_the_configured_scale():
    hidden = torch.zeros(64, 16, 32)
    for sigma in (0.05, 0.5):
        noisy = mitigations.embedding_noise(hidden, sigma, torch.Generator().manual_seed(0))
        assert abs(float(noisy.std()) - sigma) < 0.02 * sigma + 1e-3
        assert abs(float(noisy.mean())) < 0.02 * sigma + 1e-3
    assert mitigations.embedding_noise(hidden, 0.0, torch.Generator()) is hidden
    a = mitigations.embedding_noise(hidden, 0.1, torch.Generator().manual_seed(3))
    b = mitigations.embedding_noise(hidden, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_random_flip_flips_exactly_the_drawn_images():
    x = torch.randn(200, 3, 8, 8)
    out, flipped = mitigations.random_flip(x, 0.5, torch.Generator().manual_seed(0))
    assert 70 < int(flipped.sum()) < 130
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])


def test_near_duplicates_found_and_distinct_images_kept():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    # smooth random "photos" (distinct ones are >= 0.08 apart on 8x8 thumbnails)
    base = F.interpolate(torch.rand(6, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False) * 2 - 1
    near = (base[1] + 0.05 * torch.randn(3, 32, 32, generator=g)).clamp(-1, 1)  # noisy re-encoding of 1
    shifted = torch.roll(base[4], 1, dims=-1)  # one-pixel shift of 4
    images = torch.cat([base, near[None], base[2:3], shifted[None]])  # 6: near 1, 7: exact 2, 8: shifted 4
    found = mitigations.near_duplicates(mitigations.perceptual_features(images), threshold=0.05)
    assert {(d.removed, d.kept) for d in found} == {(6, 1), (7, 2), (8, 4)}
    assert [d.distance for d in found if d.removed == 7] == [0.0]
    # uint8 input gives the same features as [-1, 1] input
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(mitigations.perceptual_features(as_uint8), mitigations.perceptual_features(images), atol=3e-3, rtol=0)
    # a tight threshold keeps everything but the exact copy... and 0 keeps everything (strict <)
    assert [(d.removed, d.kept) for d in mitigations.near_duplicates(mitigations.perceptual_features(images), 1e-6)] == [(7, 2)]
    assert mitigations.near_duplicates(mitigations.perceptual_features(images), 0.0) == []


def test_wen_filter_skips_high_norm_samples_only():
    # a predictor whose text-conditional part scales with the first channel of the condition
    def predict(x, t, h):
        return x * 0 + h[:, :1, :1].reshape(-1, 1, 1, 1)

    b = 6
    x_t = torch.randn(b, 4, 4, 4)
    t = torch.full((b,), 500)
    cond = torch.zeros(b, 3, 8)
    cond[:, 0, 0] = torch.tensor([0.0, 0.1, 0.2, 1.0, 2.0, 0.05])
    uncond = torch.zeros(1, 3, 8)
    keep, norms = mitigations.wen_keep_mask(predict, x_t, t, cond, uncond, threshold=0.5 * 8)
    # ||eps_c - eps_u|| = |c| * sqrt(4*4*4) = 8|c|
    torch.testing.assert_close(norms, 8 * cond[:, 0, 0])
    assert keep.tolist() == [True, True, True, False, False, True]


# ---- inside a run ---------------------------------------------------------------------------
def test_mitigations_inside_a_tiny_run(tiny_cfg):
    from workflows.train import run

    cfg = tiny_cfg(
        "mitigation.caption.methods=[random_number,repeat_word]", "mitigation.caption.prob=0.5",
        "mitigation.text_noise_sigma=0.1", "mitigation.augment.flip=0.5",
        "mitigation.wen.enabled=true", "mitigation.wen.threshold=0.0",  # everything skipped
        "mitigation.near_dedup.enabled=true", "mitigation.near_dedup.threshold=0.1",
        "extraction.enabled=false", "logging.wandb.enabled=false",
    )
    run_dir = run(cfg)
    section = json.loads((run_dir / "summary.json").read_text())["mitigation"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6
    assert section["captions_seen"] == section["wen_seen"] >= 6
    assert 0 < section["captions_changed"] < section["captions_seen"]
    assert section["wen_skipped"] == section["wen_seen"]  # threshold 0: every sample skipped
    removed = (run_dir / "near_duplicates_removed.txt").read_text().splitlines()
    assert len(removed) == section["near_duplicates_removed"] > 0
    kept = {json.loads(line)["id"] for line in (run_dir / "keymap.jsonl").read_text().splitlines()}
    assert all(line.split()[0] not in kept for line in removed)
