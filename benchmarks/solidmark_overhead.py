"""Training wall time with the SolidMark monitor at its default schedule vs without it.

    python benchmarks/solidmark_overhead.py [--steps 600] [--rounds 2]

Both runs use the same config and seed (the tiny test config, CPU); the monitor keeps its
default settings, with its step schedule scaled to the run the way the defaults relate to
the default run (solidmark.every_n_steps / train.max_steps = 400 / 800), plus the
evaluation at the end. The default 600 steps keep the default run's proportion of
training images seen to images scored: 800 steps x 16 per batch per 64 scored images
(default config) = 600 steps x 4 per batch per 12 scored images (tiny config). Runs
alternate in ABBA order (without, with, with, without, ...) so drift in machine load and
any first-in-pair effect hit both sides. The time is the trainer's fit time (``summary.json`` train.wall_time_s),
which includes every callback. Last line: JSON with ``ratio`` (target <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train_once(tmp: Path, name: str, steps: int, with_monitor: bool) -> dict:
    from workflows.train import load_config
    from workflows.train import run

    overrides = [
        f"run.dir={tmp / name}", f"train.max_steps={steps}", "train.checkpoint.every_n_steps=0",
        "logging.wandb.enabled=false", "extraction.enabled=false", "realism.enabled=false",
        f"solidmark.enabled={str(with_monitor).lower()}", f"solidmark.every_n_steps={max(1, steps // 2)}",
    ]
    cfg = load_config([ROOT / "configs" / "tests" / "tiny.yaml"], overrides)
    run_dir = run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {"seconds": summary["train"]["wall_time_s"]}
    if with_monitor:
        out["monitor_seconds"] = summary["solidmark"]["seconds"]
        out["unet_evals"] = summary["solidmark"]["unet_evals"]
        out["evaluations"] = summary["solidmark"]["evaluations"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (alternating)")
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # a warm-up run so imports and first-call costs hit neither side
        train_once(tmp, "warmup", 2, False)
        without, with_ = [], []
        for r in range(args.rounds):
            # ABBA order: a run that goes first in its pair (e.g. after the previous run's
            # memory is released) is not always the same side
            order = (False, True) if r % 2 == 0 else (True, False)
            for monitor in order:
                (with_ if monitor else without).append(train_once(tmp, f"{'with' if monitor else 'without'}-{r}", args.steps, monitor))
    t_without = sum(x["seconds"] for x in without)
    t_with = sum(x["seconds"] for x in with_)
    print(f"{'run':<10}{'without (s)':>14}{'with (s)':>12}{'monitor (s)':>14}{'UNet evals':>12}")
    for r, (a, b) in enumerate(zip(without, with_)):
        print(f"{r:<10}{a['seconds']:>14.2f}{b['seconds']:>12.2f}{b['monitor_seconds']:>14.2f}{b['unet_evals']:>12d}")
    ratio = t_with / t_without
    share = sum(x["monitor_seconds"] for x in with_) / t_with
    print(f"training wall time with / without the SolidMark monitor: {ratio:.3f} (target <= 1.15); "
          f"the monitor's own timer: {share:.1%} of the runs with it")
    print(json.dumps({
        "benchmark": "solidmark_overhead", "steps": args.steps, "rounds": args.rounds,
        "seconds_without": round(t_without, 2), "seconds_with": round(t_with, 2),
        "monitor_seconds": round(sum(x["monitor_seconds"] for x in with_), 2),
        "unet_evals": sum(x["unet_evals"] for x in with_), "evaluations_per_run": with_[0]["evaluations"],
        "monitor_share": round(sum(x["monitor_seconds"] for x in with_) / t_with, 4),
        "ratio": round(ratio, 4),
    }))


if __name__ == "__main__":
    main()
