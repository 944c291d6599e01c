"""Does protecting images stop a fine-tuned model from mimicking them?

    python benchmarks/protection_mimicry.py --model RUN/model [--out DIR] [--images 8] [--objective sds-]
    python benchmarks/protection_mimicry.py --train-base [--out DIR]      # trains the default model first

End to end, with the framework's own pieces: ``--images`` crops of the scikit-image
photographs that the default built-in data set does not contain (a different crop seed),
with captions of the built-in kind, are written to ``OUT/clean/``; ``protect.py`` protects
them against the model (``--objective`` at ``--eps``, default 16/255, ``--pgd-steps``) and, with
``mimicry.enabled=true``, fine-tunes the model once on the clean and once on the protected
copies (same seed, steps, captions) and compares how well each fine-tuned model reproduces
the clean interiors (SSIM/PSNR, mean and best of samples). The last line is JSON with the
similarity of each model and the drop (clean-tuned − protected-tuned; positive = the
protection works) with its standard error over images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CROP_SEED = 1234  # the built-in data set crops with data.key_seed (default 0): other crops of the same photographs


def write_images(folder: Path, n: int, resolution: int) -> None:
    """``n`` built-in-style crops at the model's interior resolution, with metadata.jsonl."""
    from PIL import Image

    from eidetic.io import write_jsonl_atomic
    from lightning_modules.data import load_builtin

    records, arrays = load_builtin(n, resolution, shared_caption_fraction=0.0, seed=CROP_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for rec, arr in zip(records, arrays):
        name = f"{rec.id}.png"
        Image.fromarray(arr).save(folder / name)
        rows.append({"file_name": name, "text": rec.caption})
    write_jsonl_atomic(folder / "metadata.jsonl", rows)


def train_base(run_dir: Path, steps: int, config: Path | None) -> Path:
    from workflows.train import load_config
    from workflows.train import run

    if (run_dir / "model" / "model_index.json").is_file():
        return run_dir / "model"
    # attention at every UNet level: the base model the README's protection figures were measured on
    cfg = load_config([config] if config else [], [f"run.dir={run_dir}", f"train.max_steps={steps}", "model.unet.attention=all",
                           "solidmark.enabled=false", "extraction.enabled=false", "logging.wandb.enabled=false"])
    run(cfg)
    return run_dir / "model"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a run's model/ directory (its run's config.yaml gives the fine-tuning config)")
    ap.add_argument("--train-base", action="store_true", help="train the default model first (OUT/base)")
    ap.add_argument("--base-steps", type=int, default=800, help="steps of that base training")
    ap.add_argument("--base-config", type=Path, help="config file of that base training (default: configs/default.yaml)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "protection-mimicry")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--objective", default="sds-")
    ap.add_argument("--eps", type=int, default=16, help="budget in 8-bit levels (of 255)")
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed of both fine-tunes (training variance is part of the uncertainty)")
    ap.add_argument("--pgd-steps", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=1500, help="steps of each fine-tune (at 200 the default model barely learns the images)")
    ap.add_argument("--samples", type=int, default=16,
                    help="generations per caption and model; best of 16 resolves a fine-tune's mimicry where best of 4 is mostly sampling luck")
    args = ap.parse_args(argv)
    if (args.model is None) == (not args.train_base):
        ap.error("give either --model DIR or --train-base")

    import protect

    t0 = time.perf_counter()
    model = train_base(args.out / "base", args.base_steps, args.base_config) if args.train_base else args.model
    resolution = int(json.loads((model / "unet" / "config.json").read_text())["sample_size"])
    from eidetic.config import load
    from workflows.mimicry import base_config
    from workflows.train import Schema

    base_layer, _, _ = base_config(model)
    interior = int(load(Schema, base=base_layer).data.resolution)
    clean = args.out / "clean"
    write_images(clean, args.images, interior)
    output = args.out / f"protected-{args.objective}-eps{args.eps}-seed{args.seed}"
    rc = protect.main([
        f"input={clean}", f"model={model}", f"output={output}", f"objective={args.objective}", f"eps={args.eps}/255",
        f"steps={args.pgd_steps}", "mimicry.enabled=true", f"mimicry.steps={args.finetune_steps}", f"mimicry.seed={args.seed}",
        f"mimicry.samples_per_image={args.samples}", f"mimicry.work_dir={output}.mimicry",
    ])
    if rc != 0:
        raise SystemExit(f"protect.py failed (exit {rc})")
    section = json.loads((output / "summary.json").read_text())["protection"]
    m = section["mimicry"]
    print(f"\n{args.images} images ({interior}px interior; UNet sample size {resolution}), objective {args.objective} at {args.eps}/255, "
          f"{args.pgd_steps} PGD steps, fine-tunes of {args.finetune_steps} steps, {args.samples} samples per caption")
    print(f"{'model':<18}" + "".join(f"{k:>12}" for k in m["similarity"]["base"]))
    for name, sims in m["similarity"].items():
        print(f"{name:<18}" + "".join(f"{v:>12.4f}" for v in sims.values()))
    print(f"{'drop (±se)':<18}" + "".join(f"{m['drop'][k]:>7.4f}±{m['drop_standard_error'][k]:.3f}" for k in m["drop"]))
    result = {
        "benchmark": "protection_mimicry", "objective": args.objective, "eps_levels": args.eps, "seed": args.seed, "images": args.images,
        "finetune_steps": args.finetune_steps, "similarity": m["similarity"], "drop": m["drop"],
        "drop_standard_error": m["drop_standard_error"], "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
