"""LoRA fine-tuning, memory savers and cached latents on a tiny SD-shaped base model."""

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY

LORA = ["model.lora.enabled=true", "logging.wandb.enabled=false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny trained text-to-image model exported as a diffusers StableDiffusionPipeline directory."""
    from workflows.train import load_config, run

    root = tmp_path_factory.mktemp("base")
    return run(load_config([TINY], [f"run.dir={root / 'run'}", "logging.wandb.enabled=false"])) / "model"


@pytest.fixture
def lora_cfg(tiny_cfg, base):
    def make(*overrides):
        return tiny_cfg(f"model.pretrained={base}", *LORA, *overrides)

    return make


def _build(cfg):
    from workflows.train import build, resolve_run_dir

    run_dir = resolve_run_dir(cfg)
    run_dir.create()
    dm, module = build(cfg, run_dir)
    return run_dir, dm, module


def _fit(cfg):
    from workflows.train import fit

    run_dir, dm, module = _build(cfg)
    with run_dir:
        trainer = fit(cfg, dm, module, run_dir)
    return run_dir.path, module, trainer


def _expected_lora_count(model, targets, rank):
    """rank * (in + out) for every adapted linear layer (peft keeps the original as ``<name>.base_layer``)."""
    total = 0
    for name, m in model.named_modules():
        if name.endswith(".base_layer") and isinstance(m, torch.nn.Linear):
            owner = name[: -len(".base_layer")]
            if any(owner == t or owner.endswith("." + t) for t in targets):
                total += rank * (m.in_features + m.out_features)
    return total


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_lora_trains_only_the_adapters_and_leaves_the_base_bitwise_unchanged(lora_cfg, base):
    from eidetic.pipelines import load_components

    cfg = lora_cfg("model.lora.text_encoder=true", "model.lora.rank=2")
    run_dir, dm, module = _build(cfg)
    unet_count = _expected_lora_count(module.unet, cfg.model.lora.target_modules, 2)
    text_count = _expected_lora_count(module.text.text_encoder, cfg.model.lora.text_target_modules, 2)
    assert unet_count > 0 and text_count > 0
    assert module.lora_parameter_count == unet_count + text_count
    from workflows.train import fit

    with run_dir:
        trainer = fit(cfg, dm, module, run_dir)
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    lora = {id(p) for n, p in module.named_parameters() if "lora_" in n and not n.startswith("ema_")}
    assert held == lora and sum(p.numel() for p in module.trainable_parameters()) == unet_count + text_count
    # base weights: bitwise those of the base directory (the adapters changed)
    fresh = load_components(base)
    for ours, theirs in ((module.unet, fresh.unet), (module.text.text_encoder, fresh.text_encoder)):
        tuned = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            live = tuned[name] if name in tuned else tuned[f"{owner}.base_layer.{leaf}"]
            assert torch.equal(live, p), name
    assert any(p.abs().sum() > 0 for n, p in module.unet.named_parameters() if "lora_B" in n), "the adapters did not train"
    # the EMA averages only the adapters and shares the base weights
    assert module.ema_unet.averaged_names() and all("lora_" in n for n in module.ema_unet.averaged_names())
    shadow = dict(module.ema_unet.shadow.named_parameters())
    assert all(shadow[n] is p for n, p in module.unet.named_parameters() if "lora_" not in n)
    # checkpoints hold only what trains: adapters, their averages, the EMA counters
    keys = set(_state(run_dir.path / "checkpoints" / "last.ckpt"))
    assert keys == module.checkpoint_keys()
    assert all("lora_" in k or k.endswith("num_updates") for k in keys)
    assert len([k for k in keys if not k.startswith("ema_") and "lora_" in k]) == len(lora)
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["lora"]["parameters"] == unet_count + text_count
    assert (run_dir.path / "lora" / "pytorch_lora_weights.safetensors").is_file() and not (run_dir.path / "model").exists()


def test_lora_resume_with_cached_latents_matches_the_uninterrupted_run(lora_cfg, tmp_path):
    import train

    common = ["model.lora.text_encoder=true", "data.cache_latents=true", "mitigation.augment.flip=0.5"]
    from workflows.train import run

    full = run(lora_cfg(*common, "train.max_steps=6", f"run.dir={tmp_path / 'full'}"))
    part = tmp_path / "part"
    run(lora_cfg(*common, "train.max_steps=4", f"run.dir={part}"))
    assert json.loads((part / "summary.json").read_text())["latent_cache"]["built_this_run"] is True
    assert train.main([f"run.dir={part}", "train.resume=last", "train.max_steps=6"]) == 0
    a, b = _state(full / "checkpoints" / "last.ckpt"), _state(part / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and any(k.startswith("ema_unet.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=f"{name} differs after resume")
    summary = json.loads((part / "summary.json").read_text())
    assert summary["train"]["global_step"] == 6
    assert summary["latent_cache"] == {**summary["latent_cache"], "built_this_run": False, "views": 2}, "the resumed leg re-encoded"


def test_exported_adapter_loads_with_load_lora_weights_and_reproduces_the_module(lora_cfg, base):
    from diffusers import StableDiffusionPipeline

    from eidetic.diffusion import DiffusionModel, generate
    from eidetic.pipelines import TextStack, load_components

    cfg = lora_cfg("model.lora.text_encoder=true", "model.lora.export_merged=true", "train.lr=0.01")
    run_dir, module, _ = _fit(cfg)
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(run_dir / "lora")
    sched = module.scheduler
    loaded = DiffusionModel(unet=pipe.unet, scheduler=sched, encode_prompt=TextStack(pipe.tokenizer, pipe.text_encoder), vae=pipe.vae)
    plain = load_components(base).diffusion_model()
    merged = load_components(run_dir / "model").diffusion_model()
    captions = ["a photo of the moon surface", "a picture of a cat"]

    def sample(model):
        return generate(model, captions, (24, 24), steps=4, guidance=3.0, generator=torch.Generator().manual_seed(7))

    module.eval()
    ours = sample(module.diffusion_model(ema=True))
    torch.testing.assert_close(sample(loaded), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample(merged), ours, atol=1e-4, rtol=1e-4)
    assert (sample(plain) - ours).abs().max() > 1e-3, "the adapters should change the samples"


def test_mixed_precision_keeps_trained_weights_fp32_and_stores_frozen_ones_in_half(lora_cfg):
    cfg = lora_cfg("model.lora.text_encoder=false", "train.precision=16-mixed")
    _, _, module = _build(cfg)
    for name, p in module.unet.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name else torch.float16), name
    assert {p.dtype for p in module.text.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in module.vae.parameters()} == {torch.float16}
    assert {p.dtype for p in module.trainable_parameters()} == {torch.float32}
    assert {p.dtype for n, p in module.ema_unet.shadow.named_parameters() if "lora_" in n} == {torch.float32}


def test_lora_bf16_mixed_run_on_the_cpu(lora_cfg):
    """The mixed-precision path end to end (bf16 autocast is what the CPU has): frozen bf16 base, fp32 adapters."""
    run_dir, module, _ = _fit(lora_cfg("train.precision=bf16-mixed", "train.max_steps=2", "data.cache_latents=true"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["global_step"] == 2 and summary["train"]["final_loss"] == pytest.approx(summary["train"]["final_loss"])
    assert {p.dtype for p in module.trainable_parameters()} == {torch.float32}


def _step_grads(module, batch):
    module.train()
    module.log = lambda *a, **k: None
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora_cfg, tmp_path, lora):
    extra = ["model.lora.text_encoder=true"] if lora else ["model.lora.enabled=false"]
    runs = []
    for checkpointing in (False, True):
        cfg = lora_cfg(*extra, f"train.gradient_checkpointing={str(checkpointing).lower()}", f"run.dir={tmp_path / str(checkpointing)}",
                       "train.caption_dropout=0")
        _, dm, module = _build(cfg)
        assert module.unet.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        batch = next(iter(dm.train_dataloader()))
        runs.append(_step_grads(module, batch))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    if lora:
        assert any(k.startswith("text.") for k in grads_a) and all("lora_" in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_cached_latents_give_the_same_training_batches_as_encoding_on_the_fly(lora_cfg):
    from eidetic.mitigations import random_flip

    _, dm, module = _build(lora_cfg("data.cache_latents=true", "mitigation.augment.flip=0.5"))
    module.latent_cache.prepare(module.vae)
    assert module.latent_cache.path.is_file() and module.latent_cache.mean.shape[1] == 2
    seen_flip = False
    for batch in dm.train_dataloader():
        pixels, flipped = random_flip(batch["pixel_values"], 0.5, torch.Generator().manual_seed(int(batch["index"][0])))
        seen_flip |= bool(flipped.any())
        batch = {**batch, "pixel_values": pixels, "flipped": flipped}
        cached = module.training_latents(batch, torch.Generator().manual_seed(3))
        direct = module.encode_batch(pixels, torch.Generator().manual_seed(3))
        torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)
    assert seen_flip
    # SolidMark's autoencoder floor reads the cached means: the same as encoding the canvases
    rows = list(range(4))
    canvases = dm.canvases([dm.records[i].id for i in rows])
    torch.testing.assert_close(module.cached_latents(rows), module.diffusion_model().encode_images(canvases), atol=1e-5, rtol=1e-5)


def test_latent_cache_from_another_vae_or_data_set_is_refused(lora_cfg, tmp_path):
    from eidetic.errors import DataError
    from eidetic.latent_cache import LatentCache

    _, dm, module = _build(lora_cfg("data.cache_latents=true"))
    ids = [r.id for r in dm.records]
    LatentCache(tmp_path / "cache", lambda: dm.canvases(ids), flips=False).prepare(module.vae)
    LatentCache(tmp_path / "cache", lambda: dm.canvases(ids), flips=False).prepare(module.vae)  # same: reused
    other_data = lambda: dm.canvases(ids[1:] + ids[:1])  # noqa: E731
    with pytest.raises(DataError, match="another autoencoder or data set"):
        LatentCache(tmp_path / "cache", other_data, flips=False).prepare(module.vae)
    with pytest.raises(DataError, match="Delete the file"):
        LatentCache(tmp_path / "cache", lambda: dm.canvases(ids), flips=True).prepare(module.vae)
    with torch.no_grad():
        next(module.vae.parameters()).add_(1e-3)
    with pytest.raises(DataError, match="another autoencoder or data set"):
        LatentCache(tmp_path / "cache", lambda: dm.canvases(ids), flips=False).prepare(module.vae)


def test_lora_targets_the_model_lacks_are_a_clear_error(lora_cfg):
    from eidetic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.lora.target_modules names modules .*'to_qq' \(did you mean 'to_q'\?\)"):
        _build(lora_cfg("model.lora.target_modules=[to_q,to_qq]"))
    with pytest.raises(ConfigError, match="model.lora.text_target_modules.*'query'"):
        _build(lora_cfg("model.lora.text_encoder=true", "model.lora.text_target_modules=[query]"))


def test_lora_without_a_base_model_and_8bit_adam_on_the_cpu_are_clear_errors(tiny_cfg, lora_cfg):
    from eidetic.errors import ConfigError

    with pytest.raises(ConfigError, match="model.pretrained"):
        tiny_cfg(*LORA)
    with pytest.raises(ConfigError, match="adamw_8bit needs a CUDA GPU.*train.optimizer=adamw"):
        _build(lora_cfg("train.optimizer=adamw_8bit"))
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        tiny_cfg("train.optimizer=sgd")
    with pytest.raises(ConfigError, match="cache_latents needs a latent model"):
        tiny_cfg("data.cache_latents=true", "model.space=pixel")


def test_compile_option_compiles_the_unet_in_place(lora_cfg):
    _, _, module = _build(lora_cfg("train.compile=true"))
    assert module.unet._compiled_call_impl is not None
    assert all(not n.startswith("_orig_mod") for n in module.unet.state_dict())


def test_monitors_on_a_lora_fine_tune(lora_cfg):
    """SolidMark, extraction probes, realism and controls on base + adapter, as on a full model."""
    from workflows.train import run

    cfg = lora_cfg(
        "model.lora.text_encoder=true", "data.cache_latents=true",
        "solidmark.enabled=true", "solidmark.every_n_steps=3", "solidmark.steps=3",
        "extraction.enabled=true", "extraction.every_n_steps=3", "extraction.top_k=2", "extraction.verify.steps=3",
        "extraction.wen.steps=10", "extraction.detectors=[denoising_confidence,noise_prediction_norm]",
        "realism.enabled=true", "realism.every_n_steps=3", "realism.num_samples=2", "realism.steps=2", "realism.max_real=8",
        # keep mode: every SolidMark result under the budget writes checkpoints/under_budget.ckpt
        "controls.enabled=true", "controls.flagged.action=downweight", "controls.stop.mode=keep", "controls.stop.margin=0.99",
    )
    run_dir = run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["solidmark"]["evaluations"] == 2 and summary["solidmark"]["autoencoder_floor"]["mean"] >= 0
    assert summary["extraction"]["denoising_confidence"]["unet_evals_per_caption"] == pytest.approx(8)
    assert summary["realism"]["num_samples"] == 2
    assert summary["controls"]["under_budget_step"] == 6 and summary["lora"]["text_encoder"] is True
    assert set(_state(run_dir / "checkpoints" / "under_budget.ckpt")) == set(_state(run_dir / "checkpoints" / "last.ckpt"))
    assert (run_dir / "solidmark.csv").is_file() and (run_dir / "extraction.csv").is_file()


@pytest.mark.parametrize("name", ["examples/sd15_lora.yaml", "examples/sd15_full.yaml", "experiments/dreambooth_lora.yaml"])
def test_fine_tuning_configs_load_and_need_their_base_model(name):
    from eidetic.errors import ConfigError
    from lightning_modules.data import SolidMarkDataModule
    from workflows.train import load_config

    path = TINY.parent.parent / name
    if "lora" in name:  # a LoRA config without its base model is an error (a full one would train from scratch)
        with pytest.raises(ConfigError, match="model.pretrained"):
            load_config([path], ["data.folder=/images"])
    cfg = load_config([path], ["model.pretrained=/base", "data.folder=/images"])
    if name.startswith("examples/"):
        assert cfg.data.resolution + 2 * cfg.data.border == 512 and cfg.train.precision == "16-mixed"
    else:
        dm = SolidMarkDataModule(cfg.data, seed=cfg.seed)
        assert {r.caption for r in dm.records} == {"a photo of sks object"} and len(dm.train_index()) == 5
