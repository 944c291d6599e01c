"""Images/second of the Lightning training step vs a plain PyTorch loop, and of cached vs
on-the-fly VAE latents, side by side.

All three train the same diffusers UNet + text encoder over the same frozen VAE, batches and
step recipe (noise, caption dropout, EMA). Rounds alternate (plain, Lightning, Lightning
with ``data.cache_latents``, plain, ...) so drift on a noisy machine hits all; each ratio is
the median of per-round ratios. The cache is built once per round before the timed steps
(its one-off cost is reported as ``cache_build_s``); the speed-up is cached / on-the-fly.

    python benchmarks/train_throughput.py [--steps 30] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from eidetic.latent_cache import LatentCache  # noqa: E402
from workflows.train import load_config  # noqa: E402
from lightning_modules.data import SolidMarkDataModule  # noqa: E402
from lightning_modules.diffusion import LatentDiffusionModule  # noqa: E402
from lightning_modules.models import build_scheduler, build_text_stack, build_unet, build_vae  # noqa: E402


class _Timer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def make_module(cfg, dm, vae, tmp):
    torch.manual_seed(0)
    text = build_text_stack(dm.captions, cfg.model.text, Path(tmp) / "tok")
    unet = build_unet(cfg.model.unet, dm.canvas_size // 2, 4, text.hidden_size)
    scheduler = build_scheduler(cfg.model.scheduler, cfg.model.prediction_type, True)
    return LatentDiffusionModule(cfg, unet, text, scheduler, vae=vae)


def lightning_rate(cfg, dm, vae, tmp, steps: int, warmup: int, cache=None) -> float:
    module = make_module(cfg, dm, vae, tmp)
    module.latent_cache = cache
    timer = _Timer(warmup)
    trainer = pl.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], gradient_clip_val=cfg.train.grad_clip)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return steps * cfg.data.batch_size / (timer.end - timer.start)


def plain_rate(cfg, dm, vae, tmp, steps: int, warmup: int) -> float:
    """The same recipe written as a hand loop over the module's pieces, no Lightning."""
    module = make_module(cfg, dm, vae, tmp)
    opt = module.configure_optimizers()
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    module.train()
    module.log = lambda *a, **k: None  # logging is not part of the step being compared
    loader = dm.train_dataloader()
    step, start = 0, None
    while step < warmup + steps:
        for batch in loader:
            if step == warmup:
                start = time.perf_counter()
            if step >= warmup + steps:
                break
            loss = module.training_step(batch, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(module.parameters()), cfg.train.grad_clip)
            optimizer.step()
            module.on_before_zero_grad(optimizer)
            optimizer.zero_grad(set_to_none=True)
            sched.step()
            step += 1
    return steps * cfg.data.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config([], ["logging.wandb.enabled=false", *args.overrides])
    dm = SolidMarkDataModule(cfg.data, seed=cfg.seed)
    vae = build_vae(cfg.model.vae, dm.canvas_size).eval().requires_grad_(False)
    ids = [r.id for r in dm.records]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain = plain_rate(cfg, dm, vae, tmp, args.steps, args.warmup)
            light = lightning_rate(cfg, dm, vae, tmp, args.steps, args.warmup)
            started = time.perf_counter()
            cache = LatentCache(Path(tmp) / f"cache-{r}", lambda: dm.canvases(ids), flips=False).prepare(vae)
            build = time.perf_counter() - started
            cached = lightning_rate(cfg, dm, vae, tmp, args.steps, args.warmup, cache=cache)
            rows.append((plain, light, cached, build))
            print(f"round {r}: plain {plain:.1f} img/s   lightning {light:.1f} img/s   ratio {light / plain:.3f}   "
                  f"cached latents {cached:.1f} img/s   speed-up {cached / light:.3f} (cache built in {build:.2f} s)", flush=True)
    median = statistics.median
    print(json.dumps({"ratio": round(median(l / p for p, l, _, _ in rows), 4),
                      "cache_speedup": round(median(c / l for _, l, c, _ in rows), 4),
                      "plain_img_s": round(median(p for p, _, _, _ in rows), 2),
                      "lightning_img_s": round(median(l for _, l, _, _ in rows), 2),
                      "cached_img_s": round(median(c for _, _, c, _ in rows), 2),
                      "cache_build_s": round(median(b for *_, b in rows), 3),
                      "images": len(ids), "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
