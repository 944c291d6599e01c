"""SolidMark outpainting and scores, checked against the empirical optimal denoiser.

The empirical denoiser memorizes its training set exactly, so it must reproduce trained
keys; images it never saw (held-out) and keys it never saw (a model that memorized other
keys, or a random-init UNet) must score at chance.
"""

from __future__ import annotations

import os
import zlib
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from eidetic.borders import add_border, key_to_pixel, make_keys, pixel_to_key  # noqa: E402
from eidetic.diffusion import DiffusionModel  # noqa: E402
from eidetic.oracle import EmpiricalDenoiser  # noqa: E402
from eidetic.solidmark import (  # noqa: E402
    SolidMarkMetric,
    autoencoder_floor,
    binomial_p_value,
    chance_count,
    chance_probability,
    eidetic_counts,
    eidetic_scores,
    fixed_sample,
    outpaint_border,
    poisson_binomial_sf,
)

THICKNESS = 3
INTERIOR = 10  # canvas 16x16: a 3 px frame straddles the 2x2 latent cells of the test VAE
N = 24


class CaptionEmbedder:
    """A fixed random (4, 32) embedding per distinct caption; '' (unconditional) is zeros."""

    def __call__(self, captions):
        out = []
        for c in captions:
            g = torch.Generator().manual_seed(zlib.crc32(c.encode()))
            out.append(torch.zeros(4, 32) if c == "" else torch.randn(4, 32, generator=g))
        return torch.stack(out)


class MixingAutoencoder(torch.nn.Module):
    """An exactly invertible 'VAE' (space-to-depth + an orthogonal channel mix, factor 2).

    Every latent cell mixes a 2x2 pixel block across channels, so the pixel-space
    replacement of the latent path is exercised for real, with a round-trip floor of 0.
    """

    def __init__(self):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0)))
        self.q = torch.nn.Parameter(q, requires_grad=False)
        self.config = SimpleNamespace(scaling_factor=1.0, block_out_channels=[8, 8], latent_channels=12)

    def encode(self, x):
        z = torch.einsum("ij,bjhw->bihw", self.q, torch.nn.functional.pixel_unshuffle(x, 2))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z))

    def decode(self, z):
        return SimpleNamespace(sample=torch.nn.functional.pixel_shuffle(torch.einsum("ji,bjhw->bihw", self.q, z), 2))


def smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(INTERIOR, INTERIOR), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def keyed():
    train_keys, heldout_keys = make_keys(N, 1), make_keys(N, 2)
    return SimpleNamespace(
        train=add_border(smooth_images(N, 1), train_keys, THICKNESS),
        train_keys=train_keys,
        train_captions=[f"train image {i}" for i in range(N)],
        heldout=add_border(smooth_images(N, 2), heldout_keys, THICKNESS),
        heldout_keys=heldout_keys,
        heldout_captions=[f"held-out image {i}" for i in range(N)],
    )


def oracle_model(canvases, captions, vae=None) -> DiffusionModel:
    scheduler, embed = DDPMScheduler(), CaptionEmbedder()
    data = canvases if vae is None else vae.encode(canvases).latent_dist.mean
    return DiffusionModel(EmpiricalDenoiser(data, scheduler.alphas_cumprod, embed(captions)), scheduler, embed, vae=vae)


# ---------------------------------------------------------------------------------------
# ground truth: the empirical optimal denoiser
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_recovers_trained_keys_and_heldout_sits_at_chance(keyed, space, sampler):
    vae = MixingAutoencoder() if space == "latent" else None
    model = oracle_model(keyed.train, keyed.train_captions, vae)
    kwargs = dict(steps=50, guidance=1.0, sampler=sampler, seed=0)
    trained = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, **kwargs)
    heldout = outpaint_border(model, keyed.heldout, keyed.heldout_captions, THICKNESS, **kwargs)

    loss = eidetic_scores(trained.border_key, keyed.train_keys)
    assert (loss < 0.01).float().mean() >= 0.95, loss  # (nearly) all trained keys recovered
    assert trained.unet_evals == N * 50
    assert trained.canvases.shape == (N, 1, 3, 16, 16)
    assert trained.canvases.min() >= -1 and trained.canvases.max() <= 1
    # the interior handed back is the true one, in the same [-1, 1] scale
    t = THICKNESS
    torch.testing.assert_close(trained.canvases[:, 0, :, t:-t, t:-t], keyed.train[:, :, t:-t, t:-t])

    held_loss = eidetic_scores(heldout.border_key, keyed.heldout_keys)
    for delta in (0.1, 0.05):
        # held-out keys were never seen: the count is not significant...
        assert binomial_p_value(heldout.border_key, keyed.heldout_keys, delta) > 0.01
        # ...and sits within a few standard deviations of the exact chance count
        probs = chance_probability(heldout.border_key, delta)
        observed = int((held_loss < delta).sum())
        assert abs(observed - float(probs.sum())) <= 4 * float((probs * (1 - probs)).sum().sqrt()) + 1

    metric = SolidMarkMetric(deltas=[0.1, 0.05, 0.005])
    metric.update(trained.border_key, keyed.train_keys, torch.ones(N), torch.ones(N), torch.arange(N))
    metric.update(heldout.border_key, keyed.heldout_keys, torch.zeros(N), torch.ones(N), torch.arange(N, 2 * N))
    result = metric.compute()
    assert result["auc_heldout"] > 0.9
    assert result["auc_duplicated"] is None  # no duplicates in this set
    assert result["trained"]["eidetic"][0.005] >= 0.9 * N
    assert result["trained"]["p_value"][0.005] < 1e-10
    assert result["heldout"]["p_value"][0.1] > 0.01


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_guidance_extrapolation_costs_some_keys_but_stays_far_above_chance(keyed, space):
    """Classifier-free guidance 3 (the paper's default) with the exact denoiser.

    Where the unconditional posterior settles on another image, cond + 3 (cond − uncond)
    overshoots the frame value, so a few keys are lost; the count stays far above chance.
    """
    vae = MixingAutoencoder() if space == "latent" else None
    model = oracle_model(keyed.train, keyed.train_captions, vae)
    out = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, steps=50, guidance=3.0, seed=0)
    assert (eidetic_scores(out.border_key, keyed.train_keys) < 0.01).float().mean() >= 0.7
    assert binomial_p_value(out.border_key, keyed.train_keys, 0.005) < 1e-12


def test_latent_reencode_schedule_still_recovers_and_saves_autoencoder_passes(keyed):
    model = oracle_model(keyed.train, keyed.train_captions, MixingAutoencoder())
    every = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, steps=20, guidance=1.0, reencode_every=1)
    sparse = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, steps=20, guidance=1.0, reencode_every=5)
    assert sparse.vae_passes < every.vae_passes / 3
    assert (eidetic_scores(sparse.border_key, keyed.train_keys) < 0.01).float().mean() >= 0.9
    floor = autoencoder_floor(model, keyed.train, keyed.train_keys, THICKNESS)
    assert floor.max() < 1e-5  # the test autoencoder is exactly invertible


def test_input_border_never_leaks_and_noise_does_not_depend_on_batching(keyed):
    """Outpainting sees only the interior; each image's noise depends on (seed, noise id)."""
    model = oracle_model(keyed.train, keyed.train_captions)
    relabelled = add_border(keyed.train[:, :, THICKNESS:-THICKNESS, THICKNESS:-THICKNESS], make_keys(N, 99), THICKNESS)
    kwargs = dict(steps=10, guidance=3.0, seed=3)
    a = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, **kwargs)
    b = outpaint_border(model, relabelled, keyed.train_captions, THICKNESS, **kwargs)
    assert torch.equal(a.canvases, b.canvases)
    # batch size does not change the samples (guidance 1: with guidance 3 the exact
    # denoiser is chaotic on near-tied images and amplifies float rounding of the batch)
    kwargs["guidance"] = 1.0
    a = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, batch_size=24, **kwargs)
    b = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, batch_size=5, **kwargs)
    torch.testing.assert_close(a.canvases, b.canvases)
    # splitting the set (as across processes) with global noise ids gives the same samples
    half = outpaint_border(model, keyed.train[12:], keyed.train_captions[12:], THICKNESS, noise_ids=range(12, 24), **kwargs)
    torch.testing.assert_close(half.canvases, a.canvases[12:])
    # another seed gives other samples; several samples per image are averaged
    c = outpaint_border(model, keyed.train[:4], [""] * 4, THICKNESS, samples_per_image=3, steps=10, seed=4)
    assert c.canvases.shape == (4, 3, 3, 16, 16)
    torch.testing.assert_close(c.border_key, c.sample_keys.mean(dim=1))
    assert not torch.equal(c.canvases[:, 0], c.canvases[:, 1])


# ---------------------------------------------------------------------------------------
# the null: models whose prediction cannot depend on the scored key
# ---------------------------------------------------------------------------------------
def test_model_that_memorized_other_keys_is_at_chance_across_seeds(keyed):
    """Memorized images with keys k', scored against fresh keys k: p-values ~ uniform.

    The p-value is one-sided and discrete, so under the null P(p <= α) <= α (it is
    conservative), and it must not collapse to 1 either.
    """
    interiors = keyed.train[:, :, THICKNESS:-THICKNESS, THICKNESS:-THICKNESS]
    p_values = []
    for seed in range(40):
        memorized = add_border(interiors, make_keys(N, 1000 + seed), THICKNESS)
        model = oracle_model(memorized, keyed.train_captions)
        scored_keys = make_keys(N, 2000 + seed)
        scored = add_border(interiors, scored_keys, THICKNESS)
        out = outpaint_border(model, scored, keyed.train_captions, THICKNESS, steps=10, seed=seed)
        p_values.append(binomial_p_value(out.border_key, scored_keys, 0.1))
    p = torch.tensor(p_values)
    for alpha in (0.05, 0.1, 0.25, 0.5):
        # 40 draws: allow ~2.5 binomial standard deviations above α
        assert (p <= alpha).float().mean() <= alpha + 2.5 * (alpha * (1 - alpha) / 40) ** 0.5, (alpha, p)
    assert (p <= 0.5).float().mean() >= 0.2, p
    assert p.median() < 0.9


def test_random_init_unet_counts_are_consistent_with_chance(keyed):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    model = DiffusionModel(unet, DDPMScheduler(), CaptionEmbedder())
    out = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, steps=8, guidance=3.0, batch_size=24)
    for delta in (0.1, 0.05, 0.005):
        assert binomial_p_value(out.border_key, keyed.train_keys, delta) > 0.001


# ---------------------------------------------------------------------------------------
# chance level and p-value arithmetic
# ---------------------------------------------------------------------------------------
def test_chance_probability_is_exact_including_edges():
    pred = torch.tensor([0.0, 0.03, 0.5, 0.97, 1.0], dtype=torch.float64)
    torch.testing.assert_close(chance_probability(pred, 0.05), torch.tensor([0.05, 0.08, 0.1, 0.08, 0.05], dtype=torch.float64))
    # Monte Carlo over independent keys agrees with the formula
    keys = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for p in (0.02, 0.4):
        empirical = ((keys - p).abs() < 0.1).double().mean()
        assert abs(empirical - chance_probability(torch.tensor([p]), 0.1)[0]) < 0.005
    assert chance_count(pred, 0.05) == pytest.approx(0.36)


def test_poisson_binomial_tail_matches_binomial_and_brute_force():
    assert poisson_binomial_sf(7, [0.2] * 30) == pytest.approx(stats.binom.sf(6, 30, 0.2), rel=1e-10)
    probs = [0.1, 0.5, 0.9, 0.3]
    brute = 0.0
    for bits in range(16):
        hits = [(bits >> i) & 1 for i in range(4)]
        weight = 1.0
        for h, q in zip(hits, probs):
            weight *= q if h else 1 - q
        brute += weight if sum(hits) >= 2 else 0.0
    assert poisson_binomial_sf(2, probs) == pytest.approx(brute, rel=1e-12)
    assert poisson_binomial_sf(0, probs) == 1.0 and poisson_binomial_sf(5, probs) == 0.0


def test_counts_and_aucs_through_the_metric():
    pred = torch.tensor([0.10, 0.52, 0.30, 0.90, 0.00, 0.75], dtype=torch.float64)
    keys = torch.tensor([0.12, 0.50, 0.80, 0.10, 0.60, 0.74], dtype=torch.float64)
    trained = torch.tensor([1, 1, 1, 0, 0, 1])
    copies = torch.tensor([4, 4, 1, 1, 1, 1])
    loss = eidetic_scores(pred, keys)
    assert eidetic_counts(loss, [0.1, 0.05, 0.005]) == {0.1: 3, 0.05: 3, 0.005: 0}
    metric = SolidMarkMetric(deltas=[0.1, 0.05])
    metric.update(pred[3:], keys[3:], trained[3:], copies[3:], torch.arange(3, 6))  # out of order on purpose
    metric.update(pred[:3], keys[:3], trained[:3], copies[:3], torch.arange(3))
    result = metric.compute()
    torch.testing.assert_close(result["per_image"]["loss"], loss)
    assert result["trained"]["eidetic"] == {0.1: 3, 0.05: 3}
    assert result["heldout"]["eidetic"] == {0.1: 0, 0.05: 0}
    assert result["trained"]["chance"][0.1] == pytest.approx(float(chance_probability(pred[trained == 1], 0.1).sum()))
    # trained losses (.02,.02,.5,.01) vs held-out (.8,.6): every trained image ranks higher
    assert result["auc_heldout"] == pytest.approx(1.0)
    # duplicated (.02,.02) vs single trained (.5,.01): 2 of 4 pairs ranked right
    assert result["auc_duplicated"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# the value scale: a [0, 1] reading must never be compared with a [-1, 1] key
# ---------------------------------------------------------------------------------------
def test_border_value_scale_is_checked(keyed):
    model = oracle_model(keyed.train, keyed.train_captions)
    out = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, steps=30, guidance=1.0)
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[THICKNESS:-THICKNESS, THICKNESS:-THICKNESS] = False
    raw_border_pixels = out.canvases[:, 0][..., mask].flatten(1).mean(dim=1).double()  # [-1, 1] scale
    # the returned prediction is the key-scale reading of the generated frame
    torch.testing.assert_close(out.border_key.double(), pixel_to_key(raw_border_pixels))
    assert (eidetic_scores(out.border_key, keyed.train_keys) < 0.01).float().mean() >= 0.9
    # the mismatched comparisons are refused instead of silently scoring
    assert (keyed.train_keys < 0.5).any()
    with pytest.raises(ValueError, match="pixel_to_key"):
        eidetic_scores(raw_border_pixels, keyed.train_keys)
    with pytest.raises(ValueError, match="pixel_to_key"):
        eidetic_scores(out.border_key, key_to_pixel(keyed.train_keys))
    with pytest.raises(ValueError, match="pixel_to_key"):
        SolidMarkMetric().update(raw_border_pixels, keyed.train_keys, torch.ones(N), torch.ones(N), torch.arange(N))
    # and a [0, 1] canvas is refused as input (it would shift every key by the scale error)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        outpaint_border(model, keyed.train * 127.5 + 127.5, keyed.train_captions, THICKNESS, steps=2)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5])
def test_delta_outside_unit_interval_is_rejected(delta):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        eidetic_counts(torch.zeros(3), [0.1, delta])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        chance_probability(torch.zeros(3), delta)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        SolidMarkMetric(deltas=[delta])


def test_sample_larger_than_the_set_is_rejected():
    assert fixed_sample(10, 4, seed=1) == fixed_sample(10, 4, seed=1)
    assert len(set(fixed_sample(10, 4, seed=1))) == 4
    assert fixed_sample(5, None) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot sample 11 images from a set of 10"):
        fixed_sample(10, 11)


def test_canvas_size_must_match_the_model(keyed):
    model = oracle_model(keyed.train, keyed.train_captions)  # a 16x16 model
    wrong = add_border(torch.zeros(2, 3, 14, 14), torch.tensor([0.2, 0.4]), THICKNESS)
    with pytest.raises(ValueError, match="generates 16x16 canvases but got 20x20"):
        outpaint_border(model, wrong, ["a", "b"], THICKNESS, steps=2)
    latent = oracle_model(keyed.train, keyed.train_captions, MixingAutoencoder())
    with pytest.raises(ValueError, match="generates 16x16 canvases but got 20x20"):
        outpaint_border(latent, wrong, ["a", "b"], THICKNESS, steps=2)
    with pytest.raises(ValueError, match="one caption per canvas"):
        outpaint_border(model, keyed.train[:2], ["only one"], THICKNESS, steps=2)
    with pytest.raises(ValueError, match="sampler"):
        outpaint_border(model, keyed.train[:2], ["a", "b"], THICKNESS, steps=2, sampler="euler")


# ---------------------------------------------------------------------------------------
# multi-process aggregation comes from torchmetrics
# ---------------------------------------------------------------------------------------
_METRIC_WORKER = """
import json, sys, torch, torch.distributed as dist
from eidetic.solidmark import SolidMarkMetric
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
pred = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
keys = pred.flip(0).clone()
keys[:4] = pred[:4] + 0.001  # four trained images memorized
trained = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
mine = list(range(rank, 8, world))  # each process scores its own share
metric = SolidMarkMetric(deltas=[0.1])
metric.update(pred[mine], keys[mine], trained[mine], torch.ones(len(mine)), torch.tensor(mine))
result = metric.compute()
print(json.dumps([result["per_image"]["index"].tolist(), result["trained"]["eidetic"][0.1], result["auc_heldout"]]))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two fresh interpreters importing torch + torchmetrics: ~10-20 s of wall time
def test_metric_gathers_across_processes():
    """Two gloo processes each update half of the images; both compute the full result."""
    # run with: pytest -m slow tests/test_solidmark.py
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen([sys.executable, "-c", _METRIC_WORKER, str(r), "2", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    single = SolidMarkMetric(deltas=[0.1])
    pred = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    keys = pred.flip(0).clone()
    keys[:4] = pred[:4] + 0.001
    single.update(pred, keys, torch.tensor([1, 1, 1, 1, 1, 0, 0, 0]), torch.ones(8), torch.arange(8))
    expected = single.compute()
    for out, _ in outputs:
        index, eidetic, auc = json.loads(out.strip().splitlines()[-1])
        assert index == list(range(8)), "every process sees every image after the sync"
        assert eidetic == expected["trained"]["eidetic"][0.1] == 4
        assert auc == pytest.approx(expected["auc_heldout"])


# ---------------------------------------------------------------------------------------
# the callback inside a real (tiny) training run
# ---------------------------------------------------------------------------------------
def solidmark_run_config(tmp_path, *overrides):
    from pathlib import Path

    from workflows.train import load_config

    return load_config([Path(__file__).resolve().parent.parent / "configs" / "tests" / "tiny.yaml"], [f"run.dir={tmp_path / 'run'}", "solidmark.enabled=true", *overrides])


def test_callback_in_a_run_writes_rows_summary_and_images(tmp_path):
    import csv
    import json

    from workflows.train import run

    cfg = solidmark_run_config(
        tmp_path, "solidmark.every_n_steps=3", "solidmark.steps=4", "solidmark.train_sample=5",
        "data.duplicate.fraction=0.3", "data.duplicate.copies=3", "extraction.enabled=false", "realism.enabled=false",
    )
    run_dir = run(cfg)
    rows = list(csv.DictReader((run_dir / "solidmark.csv").open()))
    keymap = {r["id"]: r for r in map(json.loads, (run_dir / "keymap.jsonl").read_text().splitlines())}
    n_heldout = sum(r["split"] == "heldout" for r in keymap.values())
    assert {int(r["step"]) for r in rows} == {3, 6}  # the step schedule; the end coincides with step 6
    per_eval = [[r["id"] for r in rows if r["step"] == s] for s in ("3", "6")]
    assert per_eval[0] == per_eval[1] and len(per_eval[0]) == 5 + n_heldout  # the same fixed sample
    for r in rows:
        assert abs(float(r["key"]) - keymap[r["id"]]["key"]) < 1e-5 and r["split"] == keymap[r["id"]]["split"]
        assert abs(float(r["loss"]) - abs(float(r["pred_key"]) - float(r["key"]))) < 2e-6
    section = json.loads((run_dir / "summary.json").read_text())["solidmark"]
    assert set(section["eidetic"]) == set(section["chance"]) == set(section["p_value"]) == {"0.1", "0.05", "0.005"}
    assert 0 <= section["auc_heldout"] <= 1 and section["evaluations"] == 2
    assert section["unet_evals"] == 2 * 4 * (5 + n_heldout)
    assert "train" in json.loads((run_dir / "summary.json").read_text())  # other sections survive
    assert (run_dir / "solidmark" / "step-000006.png").exists()

    # resumed past an evaluation its checkpoint predates (here: rows of a later step 9 left by a
    # crashed run), the repeated evaluation replaces those rows instead of duplicating them
    text = (run_dir / "solidmark.csv").read_text().splitlines()
    stale = [line.replace("6,", "9,", 1) for line in text[1:] if line.startswith("6,")]
    (run_dir / "solidmark.csv").write_text("\n".join(text + stale) + "\n")
    run(solidmark_run_config(
        tmp_path, "solidmark.every_n_steps=3", "solidmark.steps=4", "solidmark.train_sample=5", "train.max_steps=9",
        "train.resume=last", "data.duplicate.fraction=0.3", "data.duplicate.copies=3", "extraction.enabled=false", "realism.enabled=false",
    ))
    rows = list(csv.DictReader((run_dir / "solidmark.csv").open()))
    assert [sum(r["step"] == s for r in rows) for s in ("3", "6", "9")] == [5 + n_heldout] * 3


def test_callback_rejects_a_sample_larger_than_the_split(tmp_path):
    from workflows.train import run

    cfg = solidmark_run_config(tmp_path, "solidmark.heldout_sample=50", "extraction.enabled=false", "realism.enabled=false")
    with pytest.raises(ValueError, match="heldout_sample=50 but the data has only"):
        run(cfg)


# ---------------------------------------------------------------------------------------
# a perfect memorizer whose caption does not identify the image
# ---------------------------------------------------------------------------------------
def _tile_oracle(n: int, thickness: int, shared: bool):
    """The empirical denoiser on ``n`` distinct photograph tiles (16 px), all under one caption
    (``shared``) or each under its own."""
    from eidetic.tiles import photo_tiles

    _, arrays = photo_tiles(16, 2)
    pick = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(0))[:n]
    interiors = torch.from_numpy(arrays[pick.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
    keys = make_keys(n, 1)
    canvases = add_border(interiors, keys, thickness)
    captions = ["a photo"] * n if shared else [f"tile {i}" for i in range(n)]
    return oracle_model(canvases, captions), canvases, captions, keys


def _recovered(thickness: int, shared: bool, seeds=(0, 1)) -> float:
    model, canvases, captions, keys = _tile_oracle(32, thickness, shared)
    hits = [(eidetic_scores(outpaint_border(model, canvases, captions, thickness, steps=25, guidance=1.0, seed=s,
                                            batch_size=64).border_key, keys) < 0.05).float().mean() for s in seeds]
    return float(torch.stack(hits).mean())


def test_identifying_captions_recover_every_key_and_a_shared_caption_most_with_a_thin_border():
    """With its own caption per image the oracle gives back every key. Under one shared caption
    outpainting commits to some image's frame while the interior is still noise (the flat frame's
    mean is sqrt(frame pixels) times more informative than a pixel), so keys are lost: about 40 %
    come back with a 4 px frame, about 60 % with one in the paper's proportion (6 % of the side:
    1 px at 16 px)."""
    assert _recovered(1, shared=False) == 1.0
    thin, thick = _recovered(1, shared=True), _recovered(4, shared=True)
    assert thin > thick and thin >= 0.55, (thin, thick)
    assert thick > 0.3  # still far above chance (~0.1 of keys land within 0.05 by luck)


def test_per_image_flags_are_significant_on_the_oracle_and_rare_on_a_random_model(keyed):
    from eidetic.solidmark import per_image_p_values
    from eidetic.stats import benjamini_hochberg

    model = oracle_model(keyed.train, keyed.train_captions)
    out = outpaint_border(model, keyed.train, keyed.train_captions, THICKNESS, steps=25, guidance=1.0, seed=0)
    flagged = benjamini_hochberg(per_image_p_values(out.border_key, keyed.train_keys).numpy(), 0.1)
    assert flagged.mean() >= 0.9
    # keys the model never saw: p-values uniform, so Benjamini-Hochberg flags (almost) nothing
    other = make_keys(N, 99)
    assert benjamini_hochberg(per_image_p_values(out.border_key, other).numpy(), 0.1).mean() <= 0.1
    p = per_image_p_values(out.border_key, other)
    assert stats.kstest(p.numpy(), "uniform").pvalue > 0.001
