"""Images/second of the batched torch IRS statistics vs a per-image scikit-image/numpy
implementation of the same five statistics, side by side in one run.

    python benchmarks/irs_speed.py [--size 32] [--n 1024] [--batch 512] [--threads 1]
                                   [--rounds 8] [--per-round 512] [--torch-repeats 3]

Both sides compute exactly the same numbers (the script checks it): skimage's
``feature.canny`` / ``graycomatrix`` + ``graycoprops`` / ``filters.laplace`` and numpy's FFT
on one image at a time, vs ``eidetic.irs.image_statistics`` on whole batches. The score
itself (normalise + pentagon) is a handful of tensor ops and is included on the torch
side only. Both run single-threaded by default so the comparison is per core.

The machine this runs on may be shared with other jobs whose load drifts over seconds,
so the two sides are interleaved: each round sends ``--per-round`` images through
skimage, one at a time, and the same images through torch, in batches of ``--batch``
(``--torch-repeats`` passes, so its timing window is not a few milliseconds long), with
the order of the two sides alternating from round to round. Each side's time is its
total (no best-of on either side). ``ratio`` is the median over rounds of the per-round
ratio torch images/s / skimage images/s, so a load spike that hits only one side of one
round moves it little; ``ratio_of_totals`` is the same from the summed times. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# one thread for the BLAS/OpenMP pools too, before numpy and torch load them
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage import feature, filters  # noqa: E402

from eidetic import irs  # noqa: E402

TARGET = 20


def skimage_statistics(gray: np.ndarray, levels: int = 32) -> np.ndarray:
    """The five IRS statistics of one (H, W) float image in [0, 1], the reference way."""
    edges = feature.canny(gray, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
    q = np.clip(np.floor(gray * levels), 0, levels - 1).astype(np.uint8)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = feature.graycomatrix(q, [1], angles, levels=levels, symmetric=True, normed=True)
    contrast = feature.graycoprops(glcm, "contrast").mean()
    energy = feature.graycoprops(glcm, "energy").mean()
    lap_var = filters.laplace(gray).var()
    fft = np.abs(np.fft.fft2(gray - gray.mean(), norm="ortho")).mean()
    return np.array([edges.mean(), contrast, energy, lap_var, fft])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (the project trains 32 px interiors)")
    ap.add_argument("--n", type=int, default=1024, help="distinct images; rounds cycle through them")
    ap.add_argument("--batch", type=int, default=512, help="torch batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (skimage is single-threaded)")
    ap.add_argument("--rounds", type=int, default=8,
                    help="interleaved rounds (skimage on a slice of images, torch on the same images)")
    ap.add_argument("--per-round", type=int, default=None, help="images per side per round (default: --batch)")
    ap.add_argument("--torch-repeats", type=int, default=3, help="torch passes over a round's images (all timed)")
    args = ap.parse_args(argv)
    per_round = args.per_round or args.batch
    if min(args.n, args.batch, args.rounds, per_round, args.torch_repeats) < 1:
        ap.error("--n, --batch, --rounds, --per-round and --torch-repeats must be positive")
    torch.set_num_threads(args.threads)

    images = irs.random_crops(irs.builtin_photographs(), args.n, args.size, seed=0)
    gray64 = irs.to_grayscale(images.double()).numpy()
    reference = irs.default_reference(args.size)

    def torch_pass(batch_images: torch.Tensor) -> torch.Tensor:
        # batched torch (float32, as used in training)
        batches = range(0, len(batch_images), args.batch)
        return torch.cat([irs.image_realism_score(batch_images[i : i + args.batch], reference) for i in batches])

    # warm-up, untimed: caches (the default reference, filter matrices), allocator, FFT plans
    torch_pass(images[: min(args.n, args.batch)])
    skimage_statistics(gray64[0])

    sk_rows: dict[int, np.ndarray] = {}
    rounds = []
    for r in range(args.rounds):
        idx = (np.arange(per_round) + r * per_round) % args.n
        round_images = images[torch.from_numpy(idx)].contiguous()

        def run_skimage():
            t0 = time.perf_counter()
            rows = [skimage_statistics(gray64[i]) for i in idx]
            elapsed = time.perf_counter() - t0
            sk_rows.update(zip(idx.tolist(), rows))
            return elapsed

        def run_torch():
            t0 = time.perf_counter()
            for _ in range(args.torch_repeats):
                torch_pass(round_images)
            return time.perf_counter() - t0

        # alternate which side goes first, so neither always follows the other
        if r % 2 == 0:
            t_sk, t_torch = run_skimage(), run_torch()
        else:
            t_torch, t_sk = run_torch(), run_skimage()
        sk_ips = per_round / t_sk
        torch_ips = per_round * args.torch_repeats / t_torch
        rounds.append({"skimage_s": t_sk, "torch_s": t_torch, "skimage_images_per_s": sk_ips,
                       "torch_images_per_s": torch_ips, "ratio": torch_ips / sk_ips})

    # same numbers? (float64 torch vs skimage, on every image skimage saw; float32 differs
    # only by rounding)
    seen = sorted(sk_rows)
    sk = np.stack([sk_rows[i] for i in seen])
    th = irs.image_statistics(images[torch.tensor(seen)].double()).numpy()
    max_rel = float(np.max(np.abs(th - sk) / np.maximum(np.abs(sk), 1e-12)))

    t_sk_total = sum(r["skimage_s"] for r in rounds)
    t_torch_total = sum(r["torch_s"] for r in rounds)
    sk_ips = per_round * args.rounds / t_sk_total
    torch_ips = per_round * args.rounds * args.torch_repeats / t_torch_total
    ratios = np.array([r["ratio"] for r in rounds])

    print(f"images: {args.n} random {args.size}x{args.size} crops of the skimage photographs; "
          f"torch threads={args.threads}, batch {args.batch}; {args.rounds} interleaved rounds of "
          f"{per_round} images per side (torch: {args.torch_repeats} passes per round)")
    print(f"{'round':>5}{'skimage s':>11}{'images/s':>10}{'torch s':>10}{'images/s':>10}{'ratio':>8}")
    for i, r in enumerate(rounds):
        print(f"{i:>5}{r['skimage_s']:>11.3f}{r['skimage_images_per_s']:>10.0f}{r['torch_s']:>10.3f}"
              f"{r['torch_images_per_s']:>10.0f}{r['ratio']:>8.2f}")
    print(f"{'total':>5}{t_sk_total:>11.3f}{sk_ips:>10.0f}{t_torch_total:>10.3f}{torch_ips:>10.0f}"
          f"{torch_ips / sk_ips:>8.2f}")
    print(f"ratio: median of rounds {np.median(ratios):.2f} (min {ratios.min():.2f}, max {ratios.max():.2f}); "
          f"from totals {torch_ips / sk_ips:.2f}; target {TARGET}")
    print(f"max relative difference of the five statistics (float64, {len(seen)} images): {max_rel:.2e}")
    result = {
        "benchmark": "irs_speed",
        "size": args.size,
        "n": args.n,
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "per_round": per_round,
        "torch_repeats": args.torch_repeats,
        "skimage_images_per_s": round(sk_ips, 1),
        "torch_images_per_s": round(torch_ips, 1),
        "max_rel_diff": max_rel,
        "ratio": round(float(np.median(ratios)), 2),
        "ratio_of_totals": round(torch_ips / sk_ips, 2),
        "ratio_min": round(float(ratios.min()), 2),
        "ratio_max": round(float(ratios.max()), 2),
        "round_ratios": [round(float(x), 2) for x in ratios],
        "target": TARGET,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
