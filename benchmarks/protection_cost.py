"""Every protection objective's wall time and peak memory per image, the same PGD attack.

    python benchmarks/protection_cost.py [--image-size 128 --batch 2 --steps 4 --repeats 2]
    python benchmarks/protection_cost.py --models sd_ratio --objectives advdm+ sds+

Every objective runs ``eidetic.protection.protect_images`` on the same randomly initialised,
Stable Diffusion-shaped (but small) latent diffusion model, the same images, captions,
seeds, number of PGD steps and batch size; only the objective differs. The headline is SDS
vs full-backprop AdvDM (``sds+`` / ``advdm+``: the SDS gradient is (eps_hat - eps) through
the encoder only, UNet under no_grad), whose saving is the UNet's share of the work, so it is
measured on two models (``--models``): ``default`` (UNet : encoder parameters about 8.6 : 1)
and ``sd_ratio`` (about 26 : 1, Stable Diffusion 1.x's UNet 860M against its encoder's 34M).
Random weights do not change the cost of a forward/backward pass.

How it measures, honestly:
- Each measurement runs in a fresh subprocess, alternating AdvDM, SDS, AdvDM, SDS, ...
  so neither inherits the other's allocator state and drifting machine load hits both.
- Time: wall time of the PGD loop (after a no-grad warm-up forward of encoder and UNet
  that both share); the minimum over repeats is reported (least disturbed by other load).
- Peak memory on CPU: torch's CPU allocator keeps no statistics and tracemalloc does not
  see torch's buffers, so the worker reads the process's peak resident set size
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after building the model and inputs and
  again after the attack; the difference is the attack's own peak memory (activations,
  gradients, allocator overhead). Weights and the Python/torch runtime are excluded from
  the ratio but printed. On CUDA it uses ``torch.cuda.max_memory_allocated`` the same way.
- Also reported: bytes of the distinct tensor storages autograd saves for backward in one
  PGD step, weights excluded (via ``torch.autograd.graph.saved_tensors_hooks``): an
  allocator-independent view of the activation memory each method keeps alive.

The last line is JSON with ``time_ratio`` and ``memory_ratio`` (SDS / AdvDM) of the first
model, and per model every objective's seconds and peak MiB per image with its ratios to AdvDM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eidetic.schema.protect import OBJECTIVES  # noqa: E402

# UNet channels per model preset; the autoencoder is the same [32, 64, 128, 128] in both
MODELS = {"default": [64, 128, 256], "sd_ratio": [112, 224, 448]}


def build_model(args, device):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from eidetic.diffusion import DiffusionModel

    torch.manual_seed(0)
    vae_ch = tuple(args.vae_channels)
    vae = AutoencoderKL(
        block_out_channels=vae_ch, latent_channels=4, norm_num_groups=16, layers_per_block=args.layers,
        down_block_types=("DownEncoderBlock2D",) * len(vae_ch), up_block_types=("UpDecoderBlock2D",) * len(vae_ch),
    )
    unet_ch = tuple(args.unet_channels)
    n = len(unet_ch)
    unet = UNet2DConditionModel(
        sample_size=args.image_size // 2 ** (len(vae_ch) - 1), in_channels=4, out_channels=4, layers_per_block=args.layers,
        block_out_channels=unet_ch,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    for m in (vae, unet):
        m.to(device).eval().requires_grad_(False)
    table = {}

    def encode_prompt(captions):
        out = []
        for c in captions:
            if c not in table:
                table[c] = torch.randn(16, 64, generator=torch.Generator().manual_seed(len(table)))
            out.append(table[c])
        return torch.stack(out).to(device)

    return DiffusionModel(unet, DDPMScheduler(), encode_prompt, vae)


def worker(args) -> dict:
    import torch

    from eidetic import protection

    device = torch.device(args.device)
    model = build_model(args, device)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = model.encode_prompt(["a photo"] * args.batch)
    with torch.no_grad():  # small warm-up shared by both methods (lazy init), little transient memory
        z = model.encode_images(images[:1, :, : args.image_size // 2, : args.image_size // 2].to(device))
        model.predict_noise(z, torch.tensor([500], device=device), cond[:1])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    start = time.perf_counter()
    protection.protect_images(model, images, cond, args.worker, steps=args.steps, generator=torch.Generator().manual_seed(2))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # distinct storages autograd keeps for backward, weights excluded (both methods hold those)
    weights = {p.untyped_storage().data_ptr() for m in (model.unet, model.vae) for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        protection.protect_images(model, images, cond, args.worker, steps=1, generator=torch.Generator().manual_seed(2))
    return {"objective": args.worker, "seconds": seconds, "peak_bytes": peak - base, "base_bytes": base, "saved_for_backward_bytes": sum(storages.values())}


def run_worker(objective: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", objective] + [
        "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
        "--layers", str(args.layers), "--vae-channels", *map(str, args.vae_channels), "--unet-channels", *map(str, args.unet_channels),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {objective} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parameter_counts(args) -> tuple[int, int]:
    """(UNet, encoder incl. quant_conv) parameters of the model ``args`` describes."""
    import torch

    with torch.device("meta"):
        model = build_model(args, torch.device("meta"))
    encoder = sum(p.numel() for m in (model.vae.encoder, model.vae.quant_conv) for p in m.parameters())
    return sum(p.numel() for p in model.unet.parameters()), encoder


def measure(args) -> dict:
    """Every objective in alternating fresh subprocesses: per objective the minimum time and the
    median peak memory over repeats, per image."""
    results: dict[str, list[dict]] = {o: [] for o in args.objectives}
    for r in range(args.repeats):
        for objective in args.objectives:
            res = run_worker(objective, args)
            results[objective].append(res)
            print(f"repeat {r}: {objective:10s} {res['seconds']:7.2f} s  peak +{res['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"(baseline {res['base_bytes'] / 2**20:.0f} MiB)  saved-for-backward {res['saved_for_backward_bytes'] / 2**20:.1f} MiB/step", flush=True)
    out = {}
    for objective, runs in results.items():
        out[objective] = {
            "seconds_per_image": min(r["seconds"] for r in runs) / args.batch,
            "peak_mib_per_image": statistics.median(r["peak_bytes"] for r in runs) / args.batch / 2**20,
            "saved_for_backward_mib_per_image": max(r["saved_for_backward_bytes"] for r in runs) / args.batch / 2**20,
        }
    ref = out.get("advdm+")
    for v in out.values():
        if ref:
            v["time_vs_advdm"] = v["seconds_per_image"] / ref["seconds_per_image"]
            v["memory_vs_advdm"] = v["peak_mib_per_image"] / ref["peak_mib_per_image"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="PGD steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of one fresh subprocess per objective")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="model presets, measured one after the other")
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[32, 64, 128, 128])
    parser.add_argument("--unet-channels", type=int, nargs="+", default=None, help="overrides the preset's UNet channels")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not {"advdm+", "sds+"} <= set(args.objectives):
        parser.error("--objectives must include advdm+ and sds+ (the headline ratio)")
    memory_method = "cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss increase in a fresh process"
    per_model, override = {}, args.unet_channels
    for name in args.models:
        args.unet_channels = override or MODELS[name]
        unet, encoder = parameter_counts(args)
        print(f"\nmodel {name}: VAE {args.vae_channels}, UNet {args.unet_channels} (UNet {unet / 1e6:.1f}M : encoder {encoder / 1e6:.2f}M "
              f"= {unet / encoder:.1f} : 1), {args.image_size}px, batch {args.batch}, {args.steps} PGD steps, device {args.device}", flush=True)
        table = measure(args)
        print(f"{'objective':10s} {'s/image':>9s} {'peak MiB/image':>15s} {'saved bwd MiB':>14s} {'time/AdvDM':>11s} {'mem/AdvDM':>10s}")
        for objective, v in table.items():
            print(f"{objective:10s} {v['seconds_per_image']:9.2f} {v['peak_mib_per_image']:15.1f} {v['saved_for_backward_mib_per_image']:14.1f} "
                  f"{v['time_vs_advdm']:11.3f} {v['memory_vs_advdm']:10.3f}")
        sds, adv = table["sds+"], table["advdm+"]
        print(f"SDS / AdvDM: time {sds['time_vs_advdm']:.3f}, peak memory {sds['memory_vs_advdm']:.3f} ({memory_method})  (paper: 0.5 and 0.5)")
        per_model[name] = {"unet_to_encoder": round(unet / encoder, 2), "unet_channels": list(args.unet_channels),
                           "objectives": {o: {k: round(x, 4) for k, x in v.items()} for o, v in table.items()},
                           "time_ratio": round(sds["seconds_per_image"] / adv["seconds_per_image"], 4),
                           "memory_ratio": round(sds["peak_mib_per_image"] / adv["peak_mib_per_image"], 4),
                           "saved_for_backward_ratio": round(sds["saved_for_backward_mib_per_image"] / adv["saved_for_backward_mib_per_image"], 4)}
    first = per_model[args.models[0]]
    print(json.dumps({
        "time_ratio": first["time_ratio"], "memory_ratio": first["memory_ratio"], "saved_for_backward_ratio": first["saved_for_backward_ratio"],
        "models": per_model, "memory_method": memory_method, "device": args.device,
        "image_size": args.image_size, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
    }))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    main()
