"""Single-example imitation side by side: non-blind vs blind teacher, plain CNN vs small UNet.

    python benchmarks/imitation.py [--steps 400] [--example-size 256]

Trains one student per row from one astronaut example, evaluates on held-out scikit-image
photographs, and prints held-out PSNR of student vs teacher next to the identity baseline,
the MSE reduction ratio (identity MSE / student MSE), and the non-blind : blind gap.
Last line is JSON. About 3-5 minutes on two shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workflows import imitate  # noqa: E402
from eidetic.io import read_summary  # noqa: E402

ROWS = [  # (teacher, student arch, depth)
    ("gaussian_blur", "cnn", 6),
    ("gaussian_blur", "unet", 2),
    ("wavelet_denoise_blind", "cnn", 6),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--example-size", type=int, default=256)
    parser.add_argument("--eval-crop", type=int, default=128)
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for teacher, arch, depth in ROWS:
            cfg = imitate.load_config([], [
                f"teacher={teacher}", f"student.arch={arch}", f"student.depth={depth}",
                f"train.steps={args.steps}", f"example_size={args.example_size}", f"eval.crop={args.eval_crop}",
                "eval.every_n_steps=0", "logging.wandb.enabled=false", "logging.csv=false",
                f"run.dir={tmp}/{teacher}-{arch}",
            ])
            start = time.perf_counter()
            section = read_summary(imitate.run(cfg))["imitation"]
            row = section["teachers"][teacher]["results"][0]
            h = row["heldout"]
            mse_ratio = 10 ** ((h["psnr"] - h["identity_psnr"]) / 10)
            results[f"{teacher}/{arch}"] = {
                "psnr": round(h["psnr"], 2), "identity_psnr": round(h["identity_psnr"], 2),
                "ssim": round(h["ssim"], 4), "mse_reduction": round(mse_ratio, 2),
                "parameters": row["parameters"], "receptive_field": row["receptive_field"],
                "seconds": round(time.perf_counter() - start, 1),
            }

    print(f"\n{'teacher/student':<22}{'PSNR':>8}{'identity':>10}{'MSE ratio':>11}{'SSIM':>8}{'params':>9}{'RF':>5}{'s':>7}")
    for key, r in results.items():
        print(f"{key:<22}{r['psnr']:>8.2f}{r['identity_psnr']:>10.2f}{r['mse_reduction']:>11.2f}{r['ssim']:>8.3f}"
              f"{r['parameters']:>9}{r['receptive_field']:>5}{r['seconds']:>7.1f}")
    gap = results["gaussian_blur/cnn"]["mse_reduction"] / results["wavelet_denoise_blind/cnn"]["mse_reduction"]
    unet_vs_cnn = results["gaussian_blur/unet"]["mse_reduction"] / results["gaussian_blur/cnn"]["mse_reduction"]
    print(f"non-blind : blind MSE-reduction ratio (CNN) = {gap:.2f}x; UNet : CNN on gaussian_blur = {unet_vs_cnn:.2f}x")
    out = {"steps": args.steps, "example_size": args.example_size, "rows": results,
           "nonblind_over_blind_mse_reduction": round(gap, 2), "unet_over_cnn_mse_reduction": round(unet_vs_cnn, 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
