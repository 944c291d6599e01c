"""How many SolidMark keys a perfect memorizer gives back, by outpainting method.

    python benchmarks/oracle_outpainting.py [--n 16] [--interior 16] [--border 4] [--seeds 0 1]
                                            [--steps 25 250] [--only NAME ...]

The model is the empirical optimal denoiser (:class:`eidetic.oracle.EmpiricalDenoiser`) on
``n`` distinct photograph tiles with their key borders, so every key is stored exactly and
an outpainting method that conditions on the interior properly must return all of them.
Each method outpaints every image in two settings where the caption does not identify the
image: ``uncond`` (the empty prompt: the whole set is a candidate) and ``shared`` (one
caption per group of four images, as in a DreamBooth-style set where all images share
"a photo of sks object"). A key counts as recovered when ℓ < δ (default 0.05). Counts are
per seed (out of n), at every step count given (the monitor's default, 25, and the paper's
250 ancestral DDPM steps). CPU only, a few minutes.

Last line: JSON {method: {setting: {steps: [recovered per seed]}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# name -> outpaint_border keyword arguments (beyond steps / seed / captions)
METHODS: dict[str, dict] = {
    "replace (paper)": dict(),
    "replace, fixed interior noise": dict(known_noise="fixed"),
    "replace, ddim": dict(sampler="ddim"),
    "repaint jump 5 x5": dict(resample_jump=5, resample_count=5),
    "repaint jump 10 x10": dict(resample_jump=10, resample_count=10),
    "recon guidance 1": dict(reconstruction_guidance=1.0),
    "recon guidance 4 (default)": dict(reconstruction_guidance=4.0),
    "recon guidance 16": dict(reconstruction_guidance=16.0),
    "recon guidance 4, fixed noise": dict(reconstruction_guidance=4.0, known_noise="fixed"),
    "recon guidance 4, jump 10 x3": dict(reconstruction_guidance=4.0, resample_jump=10, resample_count=3),
}


def embed(captions):
    """A fixed random embedding per distinct caption; '' (unconditional) is zeros."""
    out = []
    for c in captions:
        g = torch.Generator().manual_seed(zlib.crc32(c.encode()))
        out.append(torch.zeros(4, 32) if c == "" else torch.randn(4, 32, generator=g))
    return torch.stack(out)


def tile_canvases(n: int, interior: int, border: int, pick_seed: int = 0):
    """``n`` distinct photograph tiles (interior px) with key borders, and their keys."""
    from eidetic.borders import add_border, make_keys
    from eidetic.tiles import photo_tiles

    _, arrays = photo_tiles(interior, 2)
    pick = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(pick_seed))[:n]
    images = torch.from_numpy(arrays[pick.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
    keys = make_keys(n, 1)
    return add_border(images, keys, border), keys


def oracle(canvases, train_captions):
    from diffusers import DDPMScheduler

    from eidetic.diffusion import DiffusionModel
    from eidetic.oracle import EmpiricalDenoiser

    scheduler = DDPMScheduler()
    return DiffusionModel(EmpiricalDenoiser(canvases, scheduler.alphas_cumprod, embed(train_captions)), scheduler, embed)


def settings(n: int, group: int = 4) -> dict[str, tuple[list[str], list[str]]]:
    """setting -> (training captions, query captions)."""
    own = [f"tile {i}" for i in range(n)]
    shared = [f"a photo of object {i // group}" for i in range(n)]
    return {"uncond": (own, [""] * n), "shared": (shared, shared)}


def recovered(method: dict, canvases, keys, train_captions, query_captions, border: int, steps: int, seed: int,
              delta: float) -> int:
    from eidetic.solidmark import eidetic_scores, outpaint_border

    model = oracle(canvases, train_captions)
    kwargs = dict(guidance=1.0, batch_size=64, **method)
    out = outpaint_border(model, canvases, query_captions, border, steps=steps, seed=seed, **kwargs)
    return int((eidetic_scores(out.border_key, keys) < delta).sum())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--interior", type=int, default=16)
    parser.add_argument("--border", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 250])
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--only", nargs="+", default=None, help="method names to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    canvases, keys = tile_canvases(args.n, args.interior, args.border)
    methods = {k: v for k, v in METHODS.items() if args.only is None or k in args.only}
    results: dict = {}
    print(f"keys recovered (of {args.n}, l < {args.delta}) per seed {args.seeds}; "
          f"{args.interior} px interiors, {args.border} px border, empirical optimal denoiser")
    header = f"{'method':34s}" + "".join(f"{s + ' @' + str(k):>16s}" for s in settings(args.n) for k in args.steps)
    print(header)
    for name, method in methods.items():
        start = time.perf_counter()
        row = results.setdefault(name, {})
        cells = []
        for setting, (train_caps, query_caps) in settings(args.n).items():
            for steps in args.steps:
                counts = [recovered(method, canvases, keys, train_caps, query_caps, args.border, steps, s, args.delta)
                          for s in args.seeds]
                row.setdefault(setting, {})[steps] = counts
                cells.append("/".join(str(c) for c in counts))
        print(f"{name:34s}" + "".join(f"{c:>16s}" for c in cells) + f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
