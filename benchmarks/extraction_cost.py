"""One-step extraction probes vs the clique baseline: AUC and UNet evaluations per caption.

Same model, same captions for every detector. The model is the empirical optimal denoiser
(a model that memorizes perfectly, so ground truth is known) over SolidMark canvases cut
from the photographs shipped with scikit-image: ``--single`` captions each carry one
image (memorized: the conditional mean is that image) and ``--groups`` captions are each
shared by ``--group-size`` images (their conditional mean is a blurry mixture). The AUC is
"single vs shared caption". Wall time is reported too, but the cost that transfers to a
real model is the evaluation count.

    python benchmarks/extraction_cost.py            # ~1 minute on 2 CPU cores

The last line is JSON: ``evals_ratio`` (clique / white-box one-step evaluations per
caption), ``evals_ratio_edge`` (clique / edge consistency), and ``auc_<detector>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from eidetic import extraction  # noqa: E402
from eidetic.borders import add_border, make_keys  # noqa: E402
from eidetic.diffusion import DiffusionModel  # noqa: E402
from eidetic.oracle import EmpiricalDenoiser  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "camera", "moon", "coins", "clock", "brick"]


def photo_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random ``size``-px crops (B, 3, size, size) in [-1, 1] from scikit-image photos,
    each photo first shrunk so that a crop shows a recognisable part of it."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        img = torch.as_tensor(getattr(skimage.data, name)()).float() / 255
        img = img.unsqueeze(-1).expand(*img.shape, 3) if img.ndim == 2 else img[..., :3]
        img = img.permute(2, 0, 1).unsqueeze(0)
        scale = 4 * size / min(img.shape[-2:])
        photos.append(F.interpolate(img, scale_factor=scale, mode="area")[0])
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for k in range(n):
        photo = photos[k % len(photos)]
        y = int(torch.randint(0, photo.shape[1] - size + 1, (1,), generator=gen))
        x = int(torch.randint(0, photo.shape[2] - size + 1, (1,), generator=gen))
        crops.append(photo[:, y : y + size, x : x + size])
    return torch.stack(crops) * 2 - 1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--single", type=int, default=16, help="captions carried by one image each")
    p.add_argument("--groups", type=int, default=8, help="captions shared by many images")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="image interior size (px)")
    p.add_argument("--border", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--clique-generations", type=int, default=32)
    p.add_argument("--clique-steps", type=int, default=25)
    p.add_argument("--clique-min", type=int, default=10, help="the paper's clique size")
    p.add_argument(
        "--verify-guidance", type=float, default=1.0,
        help="guidance of the verification samples: guidance exaggerates a copied image's contrast past the L2 "
        "threshold (the oracle's copies sit at RMS 0.14-0.26 from the original at guidance 3)",
    )
    p.add_argument("--wen-steps", type=int, default=50)
    p.add_argument("--wen-first-steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    n_images = args.single + args.groups * args.group_size
    interiors = photo_crops(n_images, args.size, args.seed)
    canvases = add_border(interiors, make_keys(n_images, args.seed).float(), args.border)
    shape = tuple(canvases.shape[-2:])
    train_captions = [f"photo {i}" for i in range(args.single)] + [
        f"shared {g}" for g in range(args.groups) for _ in range(args.group_size)
    ]
    # Integer-valued caption embeddings keep the oracle's caption matching exact in float32.
    gen = torch.Generator().manual_seed(args.seed + 1)
    table = {c: torch.randint(-1, 2, (4, 16), generator=gen).float() for c in sorted(set(train_captions))}
    table[""] = torch.zeros(4, 16)
    device = torch.device(args.device)

    def encode(captions):
        return torch.stack([table[c] for c in captions]).to(device)

    scheduler = DDPMScheduler()
    oracle = EmpiricalDenoiser(canvases, scheduler.alphas_cumprod, encode(train_captions).cpu()).to(device)
    model = DiffusionModel(oracle, scheduler, encode)
    captions = [f"photo {i}" for i in range(args.single)] + [f"shared {g}" for g in range(args.groups)]
    memorized = torch.tensor([1] * args.single + [0] * args.groups)
    g = args.guidance

    detectors = {
        "denoising_confidence": lambda: extraction.denoising_confidence(model, captions, shape, guidance=g),
        "denoising_confidence_literal": lambda: extraction.denoising_confidence(model, captions, shape, guidance=g, reference="noise"),
        "edge_consistency": lambda: extraction.edge_consistency(model, captions, shape),
        "noise_prediction_norm": lambda: extraction.noise_prediction_norm(
            model, captions, shape, steps=args.wen_steps, first_steps=args.wen_first_steps, guidance=g
        ),
        "clique": lambda: extraction.clique_detector(
            model, captions, shape, generations=args.clique_generations, steps=args.clique_steps,
            guidance=g, min_clique=args.clique_min, tiles=4,
        ),
    }
    results = {}
    print(f"{len(captions)} captions ({args.single} memorized), {n_images} training canvases of {shape[0]}x{shape[1]} px, device {device}")
    print(f"{'detector':32s} {'AUC':>6s} {'evals/caption':>14s} {'seconds':>8s}")
    for name, run in detectors.items():
        start = time.perf_counter()
        r = run()
        seconds = time.perf_counter() - start
        results[name] = {"auc": extraction.auc(r.scores, memorized), "evals": r.unet_evals_per_caption, "seconds": seconds}
        print(f"{name:32s} {results[name]['auc']:6.3f} {r.unet_evals_per_caption:14.2f} {seconds:8.2f}")
        if name == "clique":
            flagged = [c for c, f in zip(captions, r.flagged.tolist()) if f]
    verified = extraction.verify_extractions(model, flagged, canvases, train_captions, steps=args.clique_steps, guidance=args.verify_guidance) if flagged else None
    n_verified = verified.count if verified else 0
    print(f"clique flagged {len(flagged)} captions; {n_verified} verified as copies of a training image")

    one_step = results["denoising_confidence"]["evals"]
    clique = results["clique"]["evals"]
    out = {
        "evals_ratio": clique / one_step,
        "evals_ratio_edge": clique / results["edge_consistency"]["evals"],
        "evals_ratio_wen": clique / results["noise_prediction_norm"]["evals"],
        **{f"auc_{name}": round(v["auc"], 4) for name, v in results.items()},
        **{f"evals_per_caption_{name}": round(v["evals"], 4) for name, v in results.items()},
        "verified_extractions": n_verified,
    }
    print(f"clique spends {out['evals_ratio']:.0f}x the white-box's and {out['evals_ratio_edge']:.0f}x edge consistency's evaluations per caption")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
