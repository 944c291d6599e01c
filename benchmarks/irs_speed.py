"""Images/second of the batched torch IRS statistics vs a per-image scikit-image/numpy
implementation of the same five statistics, side by side in one run.

    python benchmarks/irs_speed.py [--size 32] [--n 1024] [--batch 512] [--threads 1]

Both sides compute exactly the same numbers (the script checks it): skimage's
``feature.canny`` / ``graycomatrix`` + ``graycoprops`` / ``filters.laplace`` and numpy's FFT
on one image at a time, vs ``eidetic.irs.image_statistics`` on whole batches. The score
itself (normalise + pentagon) is a handful of tensor ops and is included on the torch
side only. Both run single-threaded by default so the comparison is per core. The last
line is JSON with ``ratio`` = torch images/s / skimage images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage import feature, filters  # noqa: E402

from eidetic import irs  # noqa: E402


def skimage_statistics(gray: np.ndarray, levels: int = 32) -> np.ndarray:
    """The five IRS statistics of one (H, W) float image in [0, 1], the reference way."""
    edges = feature.canny(gray, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
    q = np.clip(np.floor(gray * levels), 0, levels - 1).astype(np.uint8)
    glcm = feature.graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels, symmetric=True, normed=True)
    contrast = feature.graycoprops(glcm, "contrast").mean()
    energy = feature.graycoprops(glcm, "energy").mean()
    lap_var = filters.laplace(gray).var()
    fft = np.abs(np.fft.fft2(gray - gray.mean(), norm="ortho")).mean()
    return np.array([edges.mean(), contrast, energy, lap_var, fft])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (the project trains 32 px interiors)")
    ap.add_argument("--n", type=int, default=1024, help="images per side")
    ap.add_argument("--batch", type=int, default=512, help="torch batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (skimage is single-threaded)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timed torch passes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    images = irs.random_crops(irs.builtin_photographs(), args.n, args.size, seed=0)
    gray64 = irs.to_grayscale(images.double()).numpy()
    reference = irs.default_reference(args.size)

    # per-image scikit-image / numpy
    t0 = time.perf_counter()
    sk = np.stack([skimage_statistics(g) for g in gray64])
    t_sk = time.perf_counter() - t0

    # batched torch (float32, as used in training); warm up once, best of `repeats`
    def torch_pass():
        out = [irs.image_realism_score(images[i : i + args.batch], reference) for i in range(0, args.n, args.batch)]
        return torch.cat(out)

    torch_pass()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch_pass()
        times.append(time.perf_counter() - t0)
    t_torch = min(times)

    # same numbers? (float64 torch vs skimage; float32 differs only by rounding)
    th = irs.image_statistics(images.double()).numpy()
    max_rel = float(np.max(np.abs(th - sk) / np.maximum(np.abs(sk), 1e-12)))

    sk_ips, torch_ips = args.n / t_sk, args.n / t_torch
    print(f"images: {args.n} random {args.size}x{args.size} crops of the skimage photographs; torch threads={args.threads}")
    print(f"{'implementation':<34}{'seconds':>10}{'images/s':>12}")
    print(f"{'skimage/numpy, one image at a time':<34}{t_sk:>10.3f}{sk_ips:>12.0f}")
    print(f"{'torch batched (batch ' + str(args.batch) + ')':<34}{t_torch:>10.3f}{torch_ips:>12.0f}")
    print(f"max relative difference of the five statistics (float64): {max_rel:.2e}")
    result = {
        "benchmark": "irs_speed",
        "size": args.size,
        "n": args.n,
        "threads": args.threads,
        "skimage_images_per_s": round(sk_ips, 1),
        "torch_images_per_s": round(torch_ips, 1),
        "max_rel_diff": max_rel,
        "ratio": round(torch_ips / sk_ips, 2),
        "target": 20,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
