"""SDS vs full-backprop AdvDM: wall time and peak memory of the same PGD attack.

    python benchmarks/protection_cost.py [--image-size 128 --batch 2 --steps 4 --repeats 2]

Both attacks run ``eidetic.protection.protect_images`` on the same randomly initialised,
Stable Diffusion-shaped (but small) latent diffusion model, the same images, captions,
seeds, number of PGD steps and batch size; only the objective differs (``advdm+`` vs
``sds+``: the SDS gradient is (eps_hat - eps) through the encoder only, UNet under no_grad).
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

The last line is JSON with ``time_ratio`` and ``memory_ratio`` (SDS / AdvDM).
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="PGD steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="subprocess pairs (AdvDM, SDS)")
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[32, 64, 128, 128])
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {"advdm+": [], "sds+": []}
    for r in range(args.repeats):
        for objective in ("advdm+", "sds+"):
            res = run_worker(objective, args)
            results[objective].append(res)
            print(f"repeat {r}: {objective:7s} {res['seconds']:7.2f} s  peak +{res['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"(baseline {res['base_bytes'] / 2**20:.0f} MiB)  saved-for-backward {res['saved_for_backward_bytes'] / 2**20:.1f} MiB/step", flush=True)

    def agg(objective, key, fn):
        return fn(r[key] for r in results[objective])

    t_adv, t_sds = agg("advdm+", "seconds", min), agg("sds+", "seconds", min)
    m_adv, m_sds = agg("advdm+", "peak_bytes", lambda v: statistics.median(list(v))), agg("sds+", "peak_bytes", lambda v: statistics.median(list(v)))
    s_adv, s_sds = agg("advdm+", "saved_for_backward_bytes", max), agg("sds+", "saved_for_backward_bytes", max)
    memory_method = "cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss increase in a fresh process"
    print()
    print(f"model: VAE {args.vae_channels}, UNet {args.unet_channels}, {args.image_size}px, batch {args.batch}, {args.steps} PGD steps, device {args.device}")
    print(f"{'':8s} {'time (s)':>10s} {'peak mem (MiB)':>15s} {'saved for bwd (MiB)':>20s}")
    print(f"{'AdvDM':8s} {t_adv:10.2f} {m_adv / 2**20:15.1f} {s_adv / 2**20:20.1f}")
    print(f"{'SDS':8s} {t_sds:10.2f} {m_sds / 2**20:15.1f} {s_sds / 2**20:20.1f}")
    print(f"SDS / AdvDM: time {t_sds / t_adv:.3f}, peak memory {m_sds / m_adv:.3f} ({memory_method}), saved-for-backward {s_sds / s_adv:.3f}  (paper: 0.5 and 0.5)")
    print(json.dumps({
        "time_ratio": round(t_sds / t_adv, 4),
        "memory_ratio": round(m_sds / m_adv, 4),
        "saved_for_backward_ratio": round(s_sds / s_adv, 4),
        "advdm_seconds": round(t_adv, 3), "sds_seconds": round(t_sds, 3),
        "advdm_peak_mib": round(m_adv / 2**20, 1), "sds_peak_mib": round(m_sds / 2**20, 1),
        "memory_method": memory_method, "device": args.device,
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
