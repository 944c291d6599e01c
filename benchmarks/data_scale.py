"""Wall time and peak resident memory of the streaming data path at N images.

A synthetic folder of N images is cut from the built-in photographs (random crops at random
scales, colour jitter), with planted exact duplicates (byte copies) and near-duplicates (the
same crop with +-2 grey levels of noise), and a metadata.jsonl of captions. Then, each phase in
its own process so each peak is its own:

(a) ``prepare``: ``data.source=stream`` over the folder (listing, one pass over every file's
    bytes: content digest, header size) and the key map written chunk by chunk;
(b) ``near``: the perceptual thumbnails of every image and the blocked near-duplicate search
    (eidetic.mitigations.near_duplicates), timed apart, and whether every planted
    near-duplicate pair lost one of its two images;
(c) ``train``: the default model trained for ``--steps`` steps from the stream (monitors and
    validation off, a short autoencoder stage), the whole ``train.py`` run.

    python benchmarks/data_scale.py --n 10000 [--dir /tmp/data_scale] [--steps 200] [--keep]

The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def synthesize(folder: Path, n: int, size: int, exact_fraction: float, near_fraction: float, seed: int) -> dict:
    """N images: (1 - exact - near) crops, plus exact and near copies of random earlier ones."""
    import numpy as np
    from PIL import Image

    from eidetic.photos import PHOTOS, load_photo

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(PHOTOS)
    n_exact, n_near = int(n * exact_fraction), int(n * near_fraction)
    n_base = n - n_exact - n_near
    rows, base = [], []
    for i in range(n_base):
        photo = load_photo(names[i % len(names)])
        h, w = photo.shape[:2]
        side = int(rng.integers(size, max(size + 1, min(h, w, 4 * size))))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        gain, offset = rng.uniform(0.7, 1.3, 3), rng.uniform(-30, 30, 3)
        arr = np.clip(np.asarray(crop, dtype=np.float32) * gain + offset, 0, 255).astype(np.uint8)
        name = f"img/{i // 1000:04d}/b{i:07d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)
        base.append(name)
        rows.append({"file_name": name, "text": f"a photo of {PHOTOS[names[i % len(names)]]}, crop {i}"})
    exact, near = [], []
    for k in range(n_exact):
        src = base[int(rng.integers(0, n_base))]
        name = f"img/dup/e{k:07d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / src, folder / name)
        exact.append([src, name])
        rows.append({"file_name": name, "text": f"copy {k}"})
    for k in range(n_near):
        src = base[int(rng.integers(0, n_base))]
        arr = np.asarray(Image.open(folder / src), dtype=np.int16)
        noisy = np.clip(arr + rng.integers(-2, 3, arr.shape), 0, 255).astype(np.uint8)
        name = f"img/near/n{k:07d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(folder / name)
        near.append([src, name])
        rows.append({"file_name": name, "text": f"near copy {k}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = {"n": n, "exact": exact, "near": near}
    (folder.parent / "plan.json").write_text(json.dumps(plan))
    return plan


def _config(folder: Path, run_dir: Path, steps: int, near: bool, extra: list[str]):
    from workflows.train import load_config

    overrides = [
        "data.source=stream", f"data.folder={folder}", f"run.dir={run_dir}", f"train.max_steps={steps}",
        "solidmark.enabled=false", "extraction.enabled=false", "realism.enabled=false", "validation.every_n_steps=0",
        "logging.wandb.enabled=false", "trainer.enable_progress_bar=false", "model.vae.train_steps=20",
        f"mitigation.near_dedup.enabled={str(near).lower()}", *extra,
    ]
    return load_config([], overrides)


def phase_prepare(args) -> dict:
    from lightning_modules.data import SolidMarkDataModule

    cfg = _config(args.folder, args.work / "prepare", 1, False, args.override)
    base = peak_rss_mb()
    start = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = SolidMarkDataModule(cfg.data, seed=cfg.seed, mitigation=cfg.mitigation)
    listed = time.perf_counter()
    dm.write_keymap(args.work / "prepare")
    done = time.perf_counter()
    plan = json.loads((args.folder.parent / "plan.json").read_text())
    removed = {line.split(" ")[0] for line in dm.dedup_removed}
    found = sum(1 for a, b in plan["exact"] if a in removed or b in removed)
    return {"wall_s": round(done - start, 2), "records_s": round(listed - start, 2), "keymap_s": round(done - listed, 2),
            "records": len(dm.records), "exact_removed": len(dm.dedup_removed), "planted_exact": len(plan["exact"]),
            "planted_exact_found": found, "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def phase_near(args) -> dict:
    import torch

    from eidetic.mitigations import near_duplicates
    from eidetic.sources import FolderImages
    from lightning_modules.stream import probe_items

    cfg = _config(args.folder, args.work / "near", 1, True, args.override)
    base = peak_rss_mb()
    start = time.perf_counter()
    source = FolderImages(args.folder)
    probes = probe_items(source, int(cfg.data.resolution), int(cfg.mitigation.near_dedup.size), "upscale", int(cfg.data.num_workers))
    features = torch.stack([p.features for p in probes])
    del probes
    featured = time.perf_counter()
    found = near_duplicates(features, float(cfg.mitigation.near_dedup.threshold))
    done = time.perf_counter()
    plan = json.loads((args.folder.parent / "plan.json").read_text())
    removed = {source.items[d.removed].id for d in found}
    planted = [pair for pair in plan["near"]]
    hit = sum(1 for a, b in planted if a in removed or b in removed)
    return {"wall_s": round(done - start, 2), "features_s": round(featured - start, 2), "search_s": round(done - featured, 2),
            "removed": len(found), "planted_near": len(planted), "planted_near_found": hit,
            "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def phase_train(args) -> dict:
    from workflows.train import run

    run_dir = args.work / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = _config(args.folder, run_dir, args.steps, False, args.override)
    base = peak_rss_mb()
    start = time.perf_counter()
    run(cfg)
    done = time.perf_counter()
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": round(done - start, 2), "steps": summary["train"]["global_step"],
            "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


PHASES = {"prepare": phase_prepare, "near": phase_near, "train": phase_train}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/data_scale"))
    p.add_argument("--size", type=int, default=64, help="side of the synthetic images in pixels")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--exact-fraction", type=float, default=0.01)
    p.add_argument("--near-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the synthetic folder (and reuse one of the same N)")
    p.add_argument("override", nargs="*", help="extra config overrides (key=value)")
    args = p.parse_args(argv)
    args.work = args.dir / f"n{args.n}"
    args.folder = args.work / "images"
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0
    result: dict = {"n": args.n, "image_size": args.size}
    plan = args.work / "plan.json"
    if not (args.keep and plan.exists() and json.loads(plan.read_text())["n"] == args.n):
        shutil.rmtree(args.work, ignore_errors=True)
        start = time.perf_counter()
        synthesize(args.folder, args.n, args.size, args.exact_fraction, args.near_fraction, args.seed)
        result["synthesize_s"] = round(time.perf_counter() - start, 1)
    for name in ("prepare", "near", "train"):
        cmd = [sys.executable, __file__, "--n", str(args.n), "--dir", str(args.dir), "--steps", str(args.steps), "--phase", name, *args.override]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.stderr.write(out.stderr[-4000:])
            result[name] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
        else:
            result[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {result[name]}", flush=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
